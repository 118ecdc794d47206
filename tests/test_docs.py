"""The README a newcomer reads and the pages it links: short, true links, and install advice
that works from a checkout (onnx-ssl is on no package registry)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _links():
    spec = importlib.util.spec_from_file_location("check_links", ROOT / "scripts/check_links.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_and_anchor_exists():
    assert _links().broken(_pages()) == []


def test_the_link_check_sees_a_broken_file_and_anchor(tmp_path: Path, monkeypatch):
    links = _links()
    monkeypatch.setattr(links, "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n\n## Two words\n")
    page = tmp_path / "p.md"
    page.write_text("# Page\n[ok](a.md#two-words) [gone](b.md) [bad](a.md#three) [self](#page)\n"
                    "```\n[in code](nowhere.md)\n```\n")
    assert links.broken([page]) == ["p.md: b.md: no such file",
                                    "p.md: a.md#three: no heading 'three' in a.md"]


def test_readme_is_short_and_its_two_commands_are_there():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 300
    assert ("python3 -m venv .venv && .venv/bin/pip install -e '.[train]' && "
            ".venv/bin/onnx-ssl demo") in text
    assert "bash .ci/run" in text and (ROOT / ".ci/run").exists()
    for page in ("install", "cli", "contract", "passes", "training", "results", "limitations",
                 "ci", "layout"):
        assert f"(docs/{page}.md)" in text, page


def test_no_page_advises_installing_from_a_registry():
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        assert "install 'onnx-ssl[" not in text and "install onnx-ssl" not in text, page
