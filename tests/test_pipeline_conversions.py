"""A prune is one pipeline of passes over one model object (issue 19): one proto -> graph
conversion at load, one graph -> proto at save, plus what ONNX Runtime needs to run (the
zeroed reference of a threshold, the checks' sessions); a failure names its pass."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import exported as X
import onnx
import onnx.shape_inference
import onnx_graphsurgeon as gs
import pytest

from onnx_ssl import compiler, graphutil, io, runtime
from onnx_ssl.compiler import PruneModel, prune, prune_pipeline
from onnx_ssl.errors import InputError, PassError
from onnx_ssl.io import ModelMeta
from onnx_ssl.models import build
from onnx_ssl.pipeline import PassManager

CASES = X.cases()
# The passes of a prune, in order (a threshold adds its step after `analyze`).
STEPS = ["prepare", "analyze", "rewrite", "count", "unbind-batch", "finish", "verify"]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every onnx-graphsurgeon import, every graph export (``io.export_graph``, which
    stands for ``gs.export_onnx``, or that itself), every ONNX shape inference, and every
    ONNX Runtime session of a whole model (``runtime.session``: the checks, the batch
    check, the load in finish) adds 1 here."""
    calls: Counter[str] = Counter()

    def counting(key: str, f):  # type: ignore[no-untyped-def]
        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            calls[key] += 1
            return f(*a, **kw)
        return wrapper

    monkeypatch.setattr(gs, "import_onnx", counting("import", gs.import_onnx))
    monkeypatch.setattr(gs, "export_onnx", counting("export", gs.export_onnx))
    export = counting("export", io.export_graph)
    monkeypatch.setattr(io, "export_graph", export)
    monkeypatch.setattr(graphutil, "export_graph", export)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes",
                        counting("infer", onnx.shape_inference.infer_shapes))
    monkeypatch.setattr(runtime, "session", counting("session", runtime.session))
    return calls


@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_a_prune_converts_once_each_way(name, exporter, counted):
    model = X.load(name, exporter)
    counted.clear()
    res = prune(model, verify=1)
    assert counted["import"] == 1, counted  # the working copy, at load
    assert counted["export"] == 1, counted  # the result, at save
    # The check's two sessions (input and result; finish leaves the load to the check),
    # and, for a symbolic batch, the check that the input runs at another batch size.
    assert counted["session"] == 2 + (exporter in X.DYNAMIC_BATCH), counted
    # Inference at each batch the preparation binds and after each round of folding (Swin
    # at a symbolic batch: 2 batches x 3 rounds), after each pass that changes shapes, and
    # the strict one of finish.
    assert counted["infer"] <= 9, counted
    assert res.report.verification


@pytest.mark.parametrize("name,exporter", [("hf_resnet_basic", "ts"),
                                           ("hf_resnet_bottleneck", "ts_dynbatch")])
def test_a_threshold_exports_the_zeroed_reference_once(name, exporter, counted):
    model = X.load(name, exporter)
    counted.clear()
    res = prune(model, threshold=0.0, verify=1)
    assert counted["import"] == 1, counted
    assert counted["export"] == 2, counted  # the result, and the zeroed model it matches
    # effect: input and reference; check: reference and result (+ the batch check)
    assert counted["session"] == 4 + (exporter in X.DYNAMIC_BATCH), counted
    assert res.report.effect and res.report.verification


def test_syn_same_pad_converts_once_each_way(counted):
    """The issue's example: 4 imports and 3 exports before the prune was one pipeline."""
    res = prune(build("syn_same_pad"), verify=2)
    assert (counted["import"], counted["export"], counted["session"]) == (1, 1, 2), counted
    assert res.report.verification


def test_without_a_check_finish_loads_the_result(counted):
    prune(build("syn_residual"), verify=0)
    assert (counted["import"], counted["export"], counted["session"]) == (1, 1, 1), counted


def test_the_pipeline_names_its_passes():
    assert [p.name for p in prune_pipeline(verify=1).passes] == STEPS
    assert [p.name for p in prune_pipeline(verify=0).passes] == STEPS[:-1]
    with_threshold = [p.name for p in prune_pipeline(threshold=0.1, verify=0).passes]
    assert with_threshold[2] == "zero-small-groups"


def test_a_sub_pipeline_runs_from_python():
    """A toolchain runs any part of the pipeline on the model object: here load and
    analysis, whose analysis then drives the rest."""
    model = build("syn_residual")
    state = PruneModel(None, ModelMeta.of(model), model)
    passes = prune_pipeline(verify=1).passes
    PassManager(passes[:2])(state)
    assert state.graph is not None and state.before is not None and state.proto is None
    assert state.before.layers
    out = PassManager(passes[2:])(state)
    assert state.proto is not None and state.graph is None
    assert [n for n, _ in out.report.results][-3:] == ["unbind-batch", "finish", "verify"]
    assert state.verification


def test_a_failing_pass_is_named_with_the_passes_before(monkeypatch):
    def boom(self, model):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(compiler.CountPass, "step", boom)
    with pytest.raises(PassError, match=r"pass count failed \(after: prepare, analyze, "
                                        r"rewrite\): boom") as e:
        prune(build("syn_residual"), verify=1)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_an_input_error_keeps_its_message_and_notes_its_pass(monkeypatch):
    def bad(model):  # type: ignore[no-untyped-def]
        raise InputError("the input is bad")

    monkeypatch.setattr(compiler, "working_copy", bad)
    with pytest.raises(InputError) as e:
        prune(build("syn_residual"), verify=1)
    assert str(e.value) == "the input is bad"
    assert e.value.__notes__ == ["in pass prepare (after: none)"]


def test_debug_names_the_failing_pass(monkeypatch, tmp_path: Path, capsys):
    from onnx_ssl.cli import main

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save_model(build("syn_residual"), str(src))

    def boom(self, model):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(compiler.UnbindBatchPass, "step", boom)
    assert main(["prune", str(src), "-o", str(out)]) == 2
    assert "pass unbind-batch failed (after: prepare, analyze, rewrite, count)" in (
        capsys.readouterr().err)
    with pytest.raises(PassError, match="pass unbind-batch failed"):
        main(["--debug", "prune", str(src), "-o", str(out)])
    assert not out.exists()
