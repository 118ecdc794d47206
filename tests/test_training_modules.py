"""The training package split by job: names stay importable where scripts import them, and
the helpers that moved out of artifacts.py and chain.py keep their behaviour."""

from __future__ import annotations

import ast
import importlib
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_ssl.bench import time_pair
from onnx_ssl.training import artifacts, chain, evaluate, forms, probe, spec, speedup
from onnx_ssl.training.probe import set_batch, with_static_batch

ROOT = Path(__file__).resolve().parents[1]


def _unresolved(source: str) -> list[str]:
    """``module.name`` for each name ``source`` imports from onnx_ssl.training.* that the
    module does not have (submodules count as names of their package)."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "onnx_ssl.training"):
            mod = importlib.import_module(node.module or "")
            for a in node.names:
                if hasattr(mod, a.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{a.name}")
                except ImportError:
                    missing.append(f"{node.module}.{a.name}")
    return missing


def test_scripts_and_benchmarks_import_what_exists():
    files = sorted((*ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")))
    assert files
    missing = {str(f.relative_to(ROOT)): m for f in files if (m := _unresolved(f.read_text()))}
    assert missing == {}


def test_import_check_catches_a_moved_name():
    # The demo left chain.py: importing it from there must be reported, from demo.py not.
    assert _unresolved("from onnx_ssl.training.chain import run_demo, run_ssl") == [
        "onnx_ssl.training.chain.run_demo"]
    assert _unresolved("from onnx_ssl.training.demo import run_demo") == []
    assert _unresolved("from onnx_ssl.training import _ort, trainer") == []


def test_reexports_are_the_defining_modules_objects():
    home = {"ArtifactOptions": spec, "Artifacts": spec, "load_artifacts": spec,
            "PENALTY_SCALE": spec, "export_inference_model": forms}
    for name, mod in home.items():
        assert getattr(artifacts, name) is getattr(mod, name), name
    assert chain.evaluate_model is evaluate.evaluate_model
    assert chain.add_speedups is speedup.add_speedups
    for mod in (artifacts, chain):
        assert all(hasattr(mod, n) for n in mod.__all__)


def _model(batch: int | str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_with_static_batch_binds_a_free_batch_to_one():
    m = with_static_batch(_model("N"))
    assert _dims(m.graph.input[0]) == [1, 3] and _dims(m.graph.output[0]) == [1, 3]
    static = _model(4)
    assert with_static_batch(static) is static  # near miss: a fixed batch stays as it is
    assert _dims(set_batch(static, "batch").graph.input[0]) == ["batch", 3]
    assert probe.static_batch(static) == 4 and probe.static_batch(_model("N")) == 1


class _Sleeper:
    """A session stand-in whose run takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def run(self, names: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        time.sleep(self.seconds)
        return []


def test_time_pair_times_each_session_per_run():
    fast, slow = _Sleeper(0.001), _Sleeper(0.01)
    t_fast, t_slow = time_pair((fast, {}), (slow, {}), min_time=0.1, rounds=3)
    assert 0.001 <= t_fast < t_slow and t_slow >= 0.01
    assert t_slow / t_fast > 2
    # Calibrated: the faster session runs more times per round than the slower one.
    assert fast.calls > slow.calls
