"""ruff (with bugbear) and mypy over the code, as part of the test command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def under_ci(environ: dict[str, str] | None = None) -> bool:
    """Whether this is a CI run, where the [dev] extra is installed and a missing tool is a
    failure: $CI set to anything but false/0 (as CI services set it), or one of the
    variables that `.ci/run` sets for its test runs."""
    e = os.environ if environ is None else environ
    ci = e.get("CI", "").strip().lower()
    return (ci not in ("", "0", "false", "no")
            or any(e.get(v) for v in ("ONNX_SSL_REQUIRE_TRAINING", "ONNX_SSL_REQUIRE_EXPORTS")))


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        why = f"{name} is not installed (pip install -e '.[dev]' from the checkout)"
        if under_ci():
            pytest.fail(f"{why}; CI installs the [dev] extra, so it must be there")
        pytest.skip(why)
    return str(exe)


def test_a_missing_tool_fails_under_ci_and_skips_elsewhere():
    assert under_ci({"CI": "true"}) and under_ci({"CI": "1"})
    assert under_ci({"ONNX_SSL_REQUIRE_EXPORTS": "1"})
    assert under_ci({"ONNX_SSL_REQUIRE_TRAINING": "1"})
    assert not under_ci({}) and not under_ci({"CI": "false"}) and not under_ci({"CI": "0"})


def test_tool_lookup_fails_under_ci(monkeypatch):
    for v in ("ONNX_SSL_REQUIRE_TRAINING", "ONNX_SSL_REQUIRE_EXPORTS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI installs the"):
        _tool("no-such-tool-onnx-ssl")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        _tool("no-such-tool-onnx-ssl")


def test_ruff():
    r = subprocess.run([_tool("ruff"), "check", "onnx_ssl", "tests",
                        "benchmarks", "scripts"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy(tmp_path: Path):
    r = subprocess.run([_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"),
                        "--cache-dir", str(tmp_path / ".mypy_cache"), "-p", "onnx_ssl"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def _package_of(path: Path) -> str:
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return package if path.name == "__init__.py" else package.rpartition(".")[0]


def _imported_modules(source: str, package: str) -> set[str]:
    """The absolute names of the modules ``source`` (a module of ``package``) imports,
    relative imports resolved, with ``module.name`` for each name imported from a module."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_library_never_imports_the_cli():
    """Layers point one way: the CLI imports the library, no library module the CLI."""
    lib = ROOT / "onnx_ssl"
    cli = lib / "cli"
    assert (cli / "__init__.py").exists()
    offenders = {}
    for path in sorted(lib.rglob("*.py")):
        if path.is_relative_to(cli):
            continue
        bad = {m for m in _imported_modules(path.read_text(), _package_of(path))
               if m == "onnx_ssl.cli" or m.startswith("onnx_ssl.cli.")}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    # __main__ is the `python -m onnx_ssl` door to the CLI, not a library module.
    assert offenders == {"onnx_ssl/__main__.py": ["onnx_ssl.cli", "onnx_ssl.cli.main"]}


def test_import_check_sees_relative_imports():
    """The check above resolves relative imports: near misses it must catch or let pass."""
    def mods(src: str, package: str = "onnx_ssl.training") -> set[str]:
        return {m for m in _imported_modules(src, package) if m.startswith("onnx_ssl.cli")}

    assert mods("from ..cli import main") == {"onnx_ssl.cli", "onnx_ssl.cli.main"}
    assert mods("from .. import cli") == {"onnx_ssl.cli"}
    assert mods("import onnx_ssl.cli.prune") == {"onnx_ssl.cli.prune"}
    assert mods("from . import cli") == set()  # onnx_ssl.training.cli is no CLI module
    assert mods("from ..compiler import prune") == set()
    assert mods("from . import cli", "onnx_ssl") == {"onnx_ssl.cli"}
