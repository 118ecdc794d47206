"""The pieces that keep prune linear in time and lean in memory compute what they replace:
one session for many node runs or seeds, a skeleton export for shape inference, a graph with
shapes without a copy of the model, a model file whose weights lie beside it, fresh names
from a set made once."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ssl import runtime
from onnx_ssl.graphutil import (
    evaluate,
    evaluate_seeds,
    fresh_names,
    refresh_shapes,
    run_node,
    run_nodes,
    unique_name,
)
from onnx_ssl.io import (
    export_skeleton,
    infer_shapes,
    shaped_graph,
    tensor_map,
    to_graph,
    weight_bytes,
    write_external,
)
from onnx_ssl.pipeline import collect_if_grown, gc_paused, settle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import chain  # noqa: E402


def _shapes(graph: gs.Graph) -> dict[str, tuple[object, object]]:
    return {n: (None if t.dtype is None else np.dtype(t.dtype), None if t.shape is None
                else tuple(t.shape)) for n, t in graph.tensors().items()
            if isinstance(t, gs.Variable)}


def test_shaped_graph_is_to_graph_of_infer_shapes():
    m = chain(3, channels=64)  # 64*64*9 weights: the skeleton makes them graph inputs
    ref = to_graph(infer_shapes(m, strict=False))
    got = shaped_graph(m)
    assert _shapes(got) == _shapes(ref)
    assert any(s[1] == (1, 64, 8, 8) for s in _shapes(got).values())
    assert [n.name for n in got.nodes] == [n.name for n in ref.nodes]


def test_skeleton_export_infers_what_a_full_export_does():
    g = to_graph(chain(2, channels=64))
    for t in g.tensors().values():
        if isinstance(t, gs.Variable) and t not in g.inputs and t not in g.outputs:
            t.shape = None
    full = infer_shapes(gs.export_onnx(g), strict=False)
    skel = export_skeleton(g)
    assert not any(i.name == "b0.c1" for i in skel.graph.initializer)  # 36864 floats
    assert any(i.name == "b0.c1" for i in skel.graph.input)
    lean = infer_shapes(skel, strict=False)
    assert ({v.name: v.type for v in full.graph.value_info}
            == {v.name: v.type for v in lean.graph.value_info})
    refresh_shapes(g)
    assert tuple(g.tensors()["b1.sum"].shape) == (1, 64, 8, 8)


def test_run_nodes_in_one_session_equals_one_run_each():
    g = to_graph(chain(2))
    convs = [n for n in g.nodes if n.op == "Conv"]
    rng = np.random.default_rng(0)
    jobs = [(n, {0: rng.standard_normal((1, int(n.inputs[1].shape[1]), 8, 8)).astype(
        np.float32)}) for n in convs]
    together = run_nodes(jobs, 17, drop_from=2)
    for (node, inputs), got in zip(jobs, together, strict=True):
        np.testing.assert_array_equal(got, run_node(node, inputs, 17, drop_from=2))
    assert run_nodes([], 17) == []


def test_evaluate_seeds_equals_evaluate_and_leaves_the_graph_alone():
    g = to_graph(chain(2))
    before = (len(g.nodes), [t.name for t in g.outputs], [tuple(t.shape) for t in g.inputs])
    names = ["b0.r", "b1.out", "b0.c1"]  # two activations and a constant
    a, b = evaluate_seeds(g, names, (0, 1))
    for seed, got in ((0, a), (1, b)):
        ref = evaluate(g, names, seed)
        for n in names:
            np.testing.assert_array_equal(got[n], ref[n])
    assert not np.array_equal(a["b0.r"], b["b0.r"])
    assert (len(g.nodes), [t.name for t in g.outputs], [tuple(t.shape) for t in g.inputs]
            ) == before


def test_fresh_names_hands_out_the_names_unique_name_would():
    g = to_graph(chain(1))
    plain = [unique_name(g, "b0.conv1"), unique_name(g, "new")]
    with fresh_names(g):
        first = unique_name(g, "b0.conv1")
        second = unique_name(g, "b0.conv1")  # taken by the first, though not in the graph
        new = unique_name(g, "new")
    assert plain == [first, "new"] == ["b0.conv1_1", new]
    assert second == "b0.conv1_2"


def test_write_external_neither_changes_nor_copies_the_model(tmp_path):
    m = chain(2, channels=32)
    m.graph.initializer.append(numpy_helper.from_array(np.arange(5, dtype=np.int64), "idx"))
    raw = helper.make_tensor("fd", TensorProto.FLOAT, [300], list(np.linspace(0, 1, 300)))
    m.graph.initializer.append(raw)  # float_data, not raw_data
    before = m.SerializeToString()
    write_external(m, tmp_path / "m.onnx", "m.data")
    assert m.SerializeToString() == before
    back = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    ext = [t.name for t in back.graph.initializer
           if t.data_location == TensorProto.EXTERNAL]
    assert "b0.c1" in ext and "idx" not in ext
    for t in back.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            off = int(next(e.value for e in t.external_data if e.key == "offset"))
            assert off % 4096 == 0
    onnx.load_external_data_for_model(back, str(tmp_path))
    want = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for t in back.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), want[t.name])
    assert weight_bytes(m) == sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)


def test_a_large_model_runs_from_a_file_with_the_same_outputs(monkeypatch):
    m = chain(3, channels=32)
    s = runtime.session(m)
    feeds = runtime.random_inputs(s, 0)
    ref = runtime.run(s, feeds)
    monkeypatch.setattr(runtime, "SESSION_FILE_THRESHOLD", 1)
    before = m.SerializeToString()
    got = runtime.run(runtime.session(m), feeds)
    assert m.SerializeToString() == before
    np.testing.assert_array_equal(got["logits"], ref["logits"])


def test_gc_paused_restores_the_collector_even_on_error():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("boom")
    assert gc.isenabled()


def _collections_during(fn: object) -> int:
    """How many garbage collections ``fn()`` ran."""
    runs: list[object] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            runs.append(info)

    gc.callbacks.append(note)
    try:
        fn()  # type: ignore[operator]
    finally:
        gc.callbacks.remove(note)
    return len(runs)


def test_settle_keeps_what_the_caller_built_from_triggering_a_collection():
    """Objects built to stay alive (prune's working copy and analysis) do not by themselves
    make the paused collector walk them; garbage beyond them does."""
    import gc

    from onnx_ssl.pipeline import _MIN_GROWTH

    def grow(k: int) -> list[list[object]]:  # k tracked objects
        return [[] for _ in range(k)]

    # more than pipeline._MIN_GROWTH and than the objects alive now (many in a full run)
    alive = len(gc.get_objects())
    n = max(_MIN_GROWTH, alive) + 50_000
    with gc_paused():
        kept = grow(n)
        assert _collections_during(collect_if_grown) == 1  # not settled: collects
    del kept
    with gc_paused():
        kept = grow(n)
        settle()
        assert _collections_during(collect_if_grown) == 0
        more = grow(alive + n + 100_000)  # more than are alive: now the objects have doubled
        assert _collections_during(collect_if_grown) == 1
    del kept, more


def test_tensor_map_is_graph_tensors():
    g = to_graph(chain(3))
    g.nodes[0].outputs[0].name = ""  # an unnamed tensor is left out, as tensors() does
    assert list(tensor_map(g).items()) == list(g.tensors().items())
    # Two distinct tensors of one name: onnx-graphsurgeon's own map (the later one's value).
    twin = gs.Variable(g.nodes[2].outputs[0].name, dtype=np.float32)
    g.nodes[3].outputs = [twin]
    got = tensor_map(g)
    assert list(got.items()) == list(g.tensors().items()) and got[twin.name] is twin


@pytest.mark.parametrize("blocks", [2, 6])
def test_collapsing_branches_walks_the_graph_a_fixed_number_of_times(blocks, monkeypatch):
    """Each collapsed branch gets a constant with a fresh name: from one name set for the
    pass, not from a walk over the whole graph per branch (which made a 10,000-node chain
    with every branch zeroed take 7x the time per node of a 1,000-node one)."""
    from bench_prune import zero_branches

    from onnx_ssl import graphutil
    from onnx_ssl.passes.collapse_residual import CollapseResidualPass

    walks: list[int] = []
    real = graphutil.tensor_map

    def counted(graph: gs.Graph) -> dict[str, gs.Tensor]:
        walks.append(len(graph.nodes))
        return real(graph)

    monkeypatch.setattr(graphutil, "tensor_map", counted)
    res = CollapseResidualPass()(to_graph(zero_branches(chain(blocks))))
    assert len(res.report.branches_removed) == res.report.constant_adds == blocks
    # fresh_names' set, evaluate_seeds, and the shape refresh (clear, then fill in)
    assert len(walks) == 4


def test_the_benchmark_child_prunes_with_the_code_on_its_pythonpath(tmp_path):
    from bench_prune import ROOT, _run_child, zero_half

    m, _ = zero_half(chain(4))
    path = tmp_path / "chain4.onnx"
    onnx.save_model(m, str(path))
    r = _run_child(ROOT, path, verify=1, repeat=1)
    assert r is not None
    assert Path(str(r["code"])).resolve() == ROOT.resolve()
    assert r["nodes"] == len(m.graph.node) and int(str(r["removed"])) > 0
    assert float(str(r["peak_mb"])) >= float(str(r["idle_mb"])) > 0
    assert 0 < float(str(r["weights_mb"])) < 1 and float(str(r["wall"])) > 0
    assert 0 < float(str(r["walk"])) < float(str(r["wall"]))  # a walk is cheaper than a prune
