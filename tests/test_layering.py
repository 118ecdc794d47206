"""Layers point one way: the core (op table, analysis, compiler) never imports the training
package, which needs onnxruntime-training and builds on the core; and no module of the
package imports, through any chain of imports, itself (no import circle)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["onnx_ssl.rules", "onnx_ssl.analysis", "onnx_ssl.compiler",
                                    "onnx_ssl.decompositions"])
def test_core_does_not_import_training(module):
    code = (f"import json, sys, {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('onnx_ssl'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert module in loaded  # the probe saw the module it imported
    assert not [m for m in loaded if m.startswith("onnx_ssl.training")], loaded


def test_the_training_package_does_import_the_core_table():
    code = ("import json, sys, onnx_ssl.training.lowering; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('onnx_ssl'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert {"onnx_ssl.decompositions", "onnx_ssl.rules"} <= set(loaded)


# --- no import circle among the package's modules -----------------------------------------
#
# An edge A -> B is any `import` of B written in A: at module level, inside a function (a
# deferred import), or under `if TYPE_CHECKING:`. A deferred or type-only import hides a
# circle from the interpreter but not from the reader, so all of them count. `from P import
# n` is an edge to the module P.n when that is a module, else to P. That importing P.n runs
# P/__init__.py first is the interpreter's doing, not a dependency of the importer: no edge.

PACKAGE = Path(__file__).resolve().parent.parent / "onnx_ssl"


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see the rules above)."""
    modules = _modules(root)
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                    if target:
                        edges.add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source != top and not source.startswith(top + "."):
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    edges.add(sub if sub in modules else source)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*path[path.index(w):], w]
            if w not in state and (found := visit(w)) is not None:
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)) is not None:
            return found
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    # The probe sees the edges it should: a module-level, a deferred and a type-only import.
    assert "onnx_ssl.rules" in graph["onnx_ssl.analysis"]
    assert "onnx_ssl.runtime" in graph["onnx_ssl.training.evaluate"]  # inside run_model
    assert "onnx_ssl.training.spec" in graph["onnx_ssl.training.distributed"]  # TYPE_CHECKING
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or ())


def test_the_cycle_finder_names_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_resolves_relative_and_package_imports(tmp_path):
    pkg = tmp_path / "onnx_ssl"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from . import b\ndef f():\n    from onnx_ssl.sub import c\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from onnx_ssl import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\nimport onnx_ssl.b\n")
    graph = import_graph(pkg)
    assert graph == {"onnx_ssl": {"onnx_ssl.a"}, "onnx_ssl.a": {"onnx_ssl.b", "onnx_ssl.sub.c"},
                     "onnx_ssl.b": {"onnx_ssl"}, "onnx_ssl.sub": set(),
                     "onnx_ssl.sub.c": {"onnx_ssl.a", "onnx_ssl.b"}}
    assert find_cycle(graph) == ["onnx_ssl", "onnx_ssl.a", "onnx_ssl.b", "onnx_ssl"]
