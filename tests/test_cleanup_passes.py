"""SimplifyContiguousIndexingPass: identity Slices and Gathers go, contiguous Gathers become
Slices, the outputs stay the same; near misses are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, make_model, rand, vi
from onnx import helper

from onnx_ssl.io import ModelMeta, from_graph, infer_shapes, to_graph
from onnx_ssl.passes.cleanup_contiguous import SimplifyContiguousIndexingPass

INT64_MAX = np.iinfo(np.int64).max


def conv_then(rng: np.random.Generator, op: str, inits: dict[str, np.ndarray],
              attrs: dict[str, int] | None = None, out_shape: list[int] | None = None,
              op_is_output: bool = False) -> onnx.ModelProto:
    """x[1,8,5,5] -> Conv 1x1 (8 filters) -> ``op`` (inputs: conv output and ``inits``) ->
    Relu -> y; with ``op_is_output`` the op's output is the graph output."""
    names = ["c", *inits]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node(op, names, ["s"], name="idx", **(attrs or {}))]
    if not op_is_output:
        nodes.append(helper.make_node("Relu", ["s"], ["y"], name="relu"))
    out = vi("s" if op_is_output else "y", out_shape or [1, 8, 5, 5])
    return make_model(nodes, [vi("x", [1, 8, 5, 5])], [out],
                      {"w": rand(rng, 8, 8, 1, 1), "b": rand(rng, 8), **inits})


def run_pass(model: onnx.ModelProto):
    result = SimplifyContiguousIndexingPass()(to_graph(infer_shapes(model)))
    return result, from_graph(result.graph, ModelMeta.of(model))


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


@pytest.mark.parametrize("slice_inits", [
    {"st": i64(0), "en": i64(8), "ax": i64(1)},
    {"st": i64(0), "en": i64(INT64_MAX), "ax": i64(1)},
    {"st": i64(-8), "en": i64(100), "ax": i64(-3), "sp": i64(1)},
    {"st": i64(0, 0), "en": i64(8, 5), "ax": i64(1, 2)},
])
def test_identity_slice_is_removed(rng, slice_inits):
    model = conv_then(rng, "Slice", slice_inits)
    result, out = run_pass(model)
    assert result.report.slices_removed == ("idx",)
    assert ops(out) == ["Conv", "Relu"]
    assert_same_outputs(model, out, seed=1)


@pytest.mark.parametrize("slice_inits,shape", [
    ({"st": i64(0), "en": i64(7), "ax": i64(1)}, [1, 7, 5, 5]),
    ({"st": i64(1), "en": i64(8), "ax": i64(1)}, [1, 7, 5, 5]),
    ({"st": i64(0), "en": i64(8), "ax": i64(1), "sp": i64(2)}, [1, 4, 5, 5]),
    ({"st": i64(0), "en": i64(4), "ax": i64(2)}, [1, 8, 4, 5]),
])
def test_slice_that_selects_less_is_kept(rng, slice_inits, shape):
    model = conv_then(rng, "Slice", slice_inits, out_shape=shape)
    result, out = run_pass(model)
    assert not result.report.modified
    assert ops(out) == ["Conv", "Slice", "Relu"]


def test_slice_to_int64_max_is_removed_without_shapes(rng):
    model = conv_then(rng, "Slice", {"st": i64(0), "en": i64(INT64_MAX), "ax": i64(1)})
    result = SimplifyContiguousIndexingPass()(to_graph(model))
    assert result.report.slices_removed == ("idx",)


def test_slice_of_unknown_size_is_kept(rng):
    model = conv_then(rng, "Slice", {"st": i64(0), "en": i64(8), "ax": i64(1)})
    result = SimplifyContiguousIndexingPass()(to_graph(model))  # no shapes inferred
    assert not result.report.modified


def test_slice_that_is_a_graph_output_is_kept(rng):
    model = conv_then(rng, "Slice", {"st": i64(0), "en": i64(8), "ax": i64(1)},
                      op_is_output=True)
    result, _ = run_pass(model)
    assert not result.report.modified


@pytest.mark.parametrize("axis", [1, -3])
def test_gather_of_the_whole_axis_in_order_is_removed(rng, axis):
    model = conv_then(rng, "Gather", {"i": np.arange(8, dtype=np.int64)}, {"axis": axis})
    result, out = run_pass(model)
    assert result.report.gathers_removed == ("idx",)
    assert ops(out) == ["Conv", "Relu"]
    assert_same_outputs(model, out, seed=2)


@pytest.mark.parametrize("idx", [i64(2, 3, 4, 5), i64(-3, -2, -1), i64(0, 1, 2), i64(7)])
def test_contiguous_gather_becomes_a_slice(rng, idx):
    model = conv_then(rng, "Gather", {"i": idx}, {"axis": 1}, out_shape=[1, len(idx), 5, 5])
    result, out = run_pass(model)
    assert result.report.gathers_to_slices == ("idx",)
    assert ops(out) == ["Conv", "Slice", "Relu"]
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(model, out, seed=3)
    again = SimplifyContiguousIndexingPass()(to_graph(infer_shapes(out)))
    assert not again.report.modified


@pytest.mark.parametrize("idx", [i64(0, 2, 3), i64(3, 2, 1), i64(1, 1)])
def test_gather_out_of_order_or_with_gaps_is_kept(rng, idx):
    model = conv_then(rng, "Gather", {"i": idx}, {"axis": 1}, out_shape=[1, len(idx), 5, 5])
    result, _ = run_pass(model)
    assert not result.report.modified


def test_gather_with_a_scalar_index_is_kept(rng):
    model = conv_then(rng, "Gather", {"i": np.array(0, dtype=np.int64)}, {"axis": 1},
                      out_shape=[1, 5, 5])
    result, _ = run_pass(model)
    assert not result.report.modified


def test_second_run_reports_no_change(rng):
    model = conv_then(rng, "Slice", {"st": i64(0), "en": i64(8), "ax": i64(1)})
    first, out = run_pass(model)
    assert first.report.modified
    second = SimplifyContiguousIndexingPass()(to_graph(infer_shapes(out)))
    assert not second.report.modified
