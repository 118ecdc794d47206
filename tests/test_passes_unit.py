"""CollapseResidualPass, ZeroSmallGroupsPass and CleanupPass, each on its own tiny graph: the
report's fields, the input graph left alone, a second run that reports no change, a near
miss where the pass must not fire, and the outputs (the same, or for ZeroSmallGroupsPass
the stated change: exactly the model with the group's weights set to zero by hand)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import arrays, assert_same_outputs, make_model, outputs, rand, vi, with_arrays
from onnx import helper

from onnx_ssl.analysis import prepare
from onnx_ssl.io import ModelMeta, to_graph
from onnx_ssl.passes.cleanup import CleanupPass
from onnx_ssl.passes.collapse_residual import CollapseResidualPass
from onnx_ssl.passes.zero_small_groups import ZeroSmallGroupsPass, group_norm
from onnx_ssl.pipeline import finish

PAD = {"pads": [1, 1, 1, 1]}


def _constants(g: gs.Graph) -> dict[str, np.ndarray]:
    return {n: np.array(t.values) for n, t in g.tensors().items() if isinstance(t, gs.Constant)}


def _model_of(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    return finish(graph.copy(), ModelMeta.of(like))


# --- CleanupPass ------------------------------------------------------------------------------


def _with_dead_nodes(dead: bool) -> onnx.ModelProto:
    """x -> Conv -> Relu -> y; with ``dead``, also Conv(x) -> Sigmoid reaching no output (two
    dead nodes, two initializers only they read)."""
    rng = np.random.default_rng(1)
    w = {"c.w": rand(rng, 3, 2, 3, 3), "c.b": rand(rng, 3)}
    nodes = [helper.make_node("Conv", ["x", "c.w", "c.b"], ["h"], name="c", **PAD),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    if dead:
        w |= {"d.w": rand(rng, 4, 2, 1, 1), "d.b": rand(rng, 4)}
        nodes += [helper.make_node("Conv", ["x", "d.w", "d.b"], ["z"], name="d"),
                  helper.make_node("Sigmoid", ["z"], ["s"], name="sig")]
    return make_model(nodes, [vi("x", [1, 2, 5, 5])], [vi("y", [1, 3, 5, 5])], w)


def test_cleanup_removes_dead_nodes_and_their_initializers():
    model = _with_dead_nodes(dead=True)
    g = to_graph(model)
    res = CleanupPass()(g)
    assert (res.report.nodes_removed, res.report.initializers_removed) == (2, 2)
    assert res.modified
    assert [n.name for n in res.graph.nodes] == ["c", "relu"]
    assert set(_constants(res.graph)) == {"c.w", "c.b"}
    assert len(g.nodes) == 4 and "d.w" in _constants(g)  # the input graph is left alone
    assert_same_outputs(model, _model_of(res.graph, model), seed=2)
    assert not CleanupPass()(res.graph).modified


def test_cleanup_keeps_a_graph_without_dead_nodes_and_unused_inputs():
    model = _with_dead_nodes(dead=False)
    extra = helper.make_tensor_value_info("unused", onnx.TensorProto.FLOAT, [1])
    model.graph.input.append(extra)
    res = CleanupPass()(to_graph(model))
    assert not res.modified
    assert [t.name for t in res.graph.inputs] == ["x", "unused"]  # the signature stays


# --- ZeroSmallGroupsPass ----------------------------------------------------------------------


def _two_convs(scale: float) -> onnx.ModelProto:
    """x -> c1 (4 filters) -> Relu -> c2 -> y, c1's channel 2 (filter, bias, c2's input slice)
    scaled by ``scale``."""
    rng = np.random.default_rng(3)
    w = {"c1.w": rand(rng, 4, 2, 3, 3), "c1.b": rand(rng, 4), "c2.w": rand(rng, 3, 4, 3, 3),
         "c2.b": rand(rng, 3)}
    w["c1.w"][2] *= scale
    w["c1.b"][2] *= scale
    w["c2.w"][:, 2] *= scale
    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["h"], name="c1", **PAD),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "c2.w", "c2.b"], ["y"], name="c2", **PAD)]
    return prepare(make_model(nodes, [vi("x", [1, 2, 6, 6])], [vi("y", [1, 3, 6, 6])], w))


def _channel2_norm(model: onnx.ModelProto) -> float:
    a = arrays(model)
    return float(np.sqrt(np.sum(a["c1.w"][2].astype(np.float64) ** 2) + a["c1.b"][2] ** 2
                         + np.sum(a["c2.w"][:, 2].astype(np.float64) ** 2)))


def test_zero_small_groups_zeroes_exactly_the_groups_at_or_below_the_threshold():
    model = _two_convs(scale=1e-3)
    norm = _channel2_norm(model)
    g = to_graph(model)
    res = ZeroSmallGroupsPass(norm)(g)  # <= T: a group exactly at T is zeroed
    assert res.report.groups_zeroed == 1
    assert res.report.by_kind == (("channel", 1),)
    assert res.report.threshold == norm
    got = _constants(res.graph)
    want = arrays(model)
    want["c1.w"][2] = 0
    want["c1.b"][2] = 0
    want["c2.w"][:, 2] = 0
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(_constants(g)["c1.w"], arrays(model)["c1.w"])  # not in place
    # The stated change of function: the outputs are those of the hand-zeroed model, and
    # they differ from the original's.
    changed = _model_of(res.graph, model)
    assert_same_outputs(with_arrays(model, want), changed, seed=4)
    diff = np.max(np.abs(outputs(changed, 4)["y"] - outputs(model, 4)["y"]))
    assert 0 < diff < 1e-2
    # Idempotent: the zeroed group is skipped, nothing else is small.
    assert not ZeroSmallGroupsPass(norm)(res.graph).modified


def test_zero_small_groups_leaves_groups_above_the_threshold():
    model = _two_convs(scale=1e-3)
    norm = _channel2_norm(model)
    res = ZeroSmallGroupsPass(norm * (1 - 1e-6))(to_graph(model))
    assert not res.modified and res.report.groups_zeroed == 0
    assert_same_outputs(model, _model_of(res.graph, model), seed=5)
    # The output channels of c2 reach the graph output: never zeroed, however small.
    big = ZeroSmallGroupsPass(1e9)(to_graph(model))
    assert big.report.groups_zeroed == 4  # c1's four channels, none of c2's three
    assert np.any(_constants(big.graph)["c2.b"])


def test_group_norm_is_the_l2_norm_over_out_and_in_members():
    from onnx_ssl.analysis import analyze_graph

    model = _two_convs(scale=0.5)
    g = to_graph(model)
    group = next(x for x in analyze_graph(g, kinds=("channel",)).groups
                 if x.space == "c1" and x.index == 2)
    assert group_norm(group, _constants(g)) == pytest.approx(_channel2_norm(model), rel=1e-6)


# --- CollapseResidualPass ---------------------------------------------------------------------


def _residual(branch_weight: float, branch_bias: bool) -> onnx.ModelProto:
    """x -> c0 -> t; branch t -> c1 (3x3) -> Relu -> c2 (1x1, weight x ``branch_weight``);
    Add(t, branch) -> c3 -> y. With a zero c2 weight the branch is the constant c2.b."""
    rng = np.random.default_rng(5)
    w = {"c0.w": rand(rng, 4, 2, 1, 1), "c0.b": rand(rng, 4), "c1.w": rand(rng, 4, 4, 3, 3),
         "c1.b": rand(rng, 4), "c2.w": rand(rng, 4, 4, 1, 1) * branch_weight,
         "c2.b": rand(rng, 4) * float(branch_bias), "c3.w": rand(rng, 3, 4, 1, 1),
         "c3.b": rand(rng, 3)}
    nodes = [helper.make_node("Conv", ["x", "c0.w", "c0.b"], ["t"], name="c0"),
             helper.make_node("Conv", ["t", "c1.w", "c1.b"], ["h"], name="c1", **PAD),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "c2.w", "c2.b"], ["f"], name="c2"),
             helper.make_node("Add", ["t", "f"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "c3.w", "c3.b"], ["y"], name="c3")]
    return prepare(make_model(nodes, [vi("x", [1, 2, 5, 5])], [vi("y", [1, 3, 5, 5])], w))


@pytest.mark.parametrize("bias", [True, False])
def test_collapse_residual_replaces_a_constant_branch(bias):
    model = _residual(branch_weight=0.0, branch_bias=bias)
    g = to_graph(model)
    res = CollapseResidualPass()(g)
    assert res.report.branches_removed == ("add",)
    assert res.report.layers_removed == 2
    assert res.report.constant_adds == (1 if bias else 0)
    assert not res.report.kept
    names = [n.name for n in res.graph.nodes]
    assert "c1" not in names and "c2" not in names
    assert ("add" in names) == bias  # a zero constant needs no Add
    if bias:
        k = next(v for n, v in _constants(res.graph).items() if "branch_constant" in n)
        np.testing.assert_array_equal(k.reshape(-1), arrays(model)["c2.b"])
        assert k.shape == (1, 4, 1, 1)
    assert len(g.nodes) == 6  # the input graph is left alone
    assert_same_outputs(model, _model_of(res.graph, model), seed=6)
    assert not CollapseResidualPass()(res.graph).modified


def test_collapse_residual_keeps_a_live_branch():
    model = _residual(branch_weight=1e-3, branch_bias=True)  # small but not zero
    res = CollapseResidualPass()(to_graph(model))
    assert not res.modified and res.report.branches_removed == ()
    assert len(res.graph.nodes) == 6
