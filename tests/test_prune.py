"""The prune passes: zero groups in a model, prune, and the outputs must not change."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fuzz_graphs import float_params
from helpers import assert_same_outputs, make_model, pick_groups, rand, vi, zero_groups
from onnx import helper, numpy_helper

from onnx_ssl import models
from onnx_ssl.analysis import analyze, prepare
from onnx_ssl.compiler import prune
from onnx_ssl.errors import VerificationError
from onnx_ssl.models._builder import GraphBuilder
from onnx_ssl.runtime import verify

PROPERTY_MODELS = [n for n in models.names()
                   if n not in ("alexnet", "caffenet") and not n.startswith("syn_block_")]


def filters(model: onnx.ModelProto) -> int:
    a = analyze(model)
    return sum(la.weight_shape[la.out_axis] for la in a.layers)


def report_of(result, name):
    return dict(result.report.passes)[name]


@pytest.mark.parametrize("name", PROPERTY_MODELS)
@pytest.mark.parametrize("side", ["both", "in", "filter"])
def test_zeroed_groups_are_removed_exactly(name, side):
    model = prepare(models.build(name, batch=2))
    a = analyze(model, prepared=True)
    chosen = pick_groups(a, 5, seed=len(name))
    if not chosen:
        pytest.skip(f"{name} has no prunable channel group")
    zeroed = zero_groups(model, chosen, side)
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=7)
    # The model keeps its input and output names, shapes and types.
    assert list(result.model.graph.input) == list(zeroed.graph.input)
    assert list(result.model.graph.output) == list(zeroed.graph.output)
    assert result.model.ir_version <= 10
    removed = report_of(result, "remove-zero-channels").channels_removed
    if not result.report.kept:
        assert removed >= len(chosen)
        # Every zeroed group takes one output channel (or FC neuron) of a layer with it.
        assert filters(result.model) <= filters(model) - len(chosen)
    else:  # only these reasons may keep a zeroed channel (random picks on syn_grouped are
        # uneven, so they are all kept: test_grouped_convs_lose_channels_only_evenly removes)
        assert all("convolution groups loses the same number" in k or "every channel is zero"
                   in k or "keeps at least one channel" in k or "bias map" in k
                   for k in result.report.kept), result.report.kept
    if removed:
        assert result.report.macs_after < result.report.macs_before
    # Pruning the result again changes nothing and says so.
    again = prune(result.model, verify=1)
    assert not again.report.modified


def test_caffenet_grouped_channels():
    model = prepare(models.build("caffenet"))
    a = analyze(model, prepared=True)
    conv3 = [g for g in a.groups if g.space == "conv3"]
    # Two channels per conv group of conv4 (group 2: channels 0..191, 192..383).
    chosen = [conv3[i] for i in (0, 5, 200, 300)]
    result = prune(zero_groups(model, chosen), verify=1)
    w = {t.name: t for t in result.model.graph.initializer}
    assert numpy_helper.to_array(w["conv3.weight"]).shape[0] == 380
    assert numpy_helper.to_array(w["conv4.weight"]).shape[1] == 190


def test_grouped_conv_removes_the_same_count_per_group():
    model = prepare(models.build("syn_grouped"))
    a = analyze(model, prepared=True)
    g1 = [g for g in a.groups if g.space == "conv1"]  # 8 channels, feeds a group-2 conv
    # Three channels in the first half, one in the second: only one per half can go.
    result = prune(zero_groups(model, [g1[0], g1[1], g1[2], g1[5]]), verify=2)
    w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert w["conv1.weight"].shape[0] == 6
    assert any("convolution groups" in k for k in result.report.kept)


@pytest.mark.parametrize("name, branches", [("resnet20", [0]), ("resnet56", [3, 10, 20])])
def test_zero_residual_branches_collapse(name, branches):
    model = prepare(models.build(name, batch=2))
    a = analyze(model, prepared=True)
    arrs = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    layer_w = {la.node: la.weight for la in a.layers}
    for k in branches:
        for layer in a.branches[k].layers:
            arrs[layer_w[layer]][...] = 0  # every conv of the branch; BN shifts stay
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrs[t.name], t.name))
    result = prune(model, verify=2)
    assert_same_outputs(model, result.model, seed=3)
    rep = report_of(result, "collapse-residual")
    assert len(rep.branches_removed) == len(branches)
    assert result.report.layers_after == result.report.layers_before - 2 * len(branches)
    # The non-zero BatchNorm shifts of the deleted branch became a constant Add.
    assert rep.constant_adds == len(branches)
    # The report says it in words, one line per pass, and no Python repr.
    removed = ", ".join(rep.branches_removed)
    line = next(x for x in result.report.to_text().splitlines()
                if x.startswith("pass collapse-residual: "))
    assert line == (f"pass collapse-residual: branches removed {len(branches)} ({removed}), "
                    f"layers removed {2 * len(branches)}, constant adds {len(branches)}"), line
    assert not [x for x in result.report.to_text().splitlines()
                if x.startswith("pass ") and ("{" in x or "[" in x or "'" in x)]


def test_near_miss_one_nonzero_element_blocks_removal():
    model = prepare(models.build("lenet"))
    a = analyze(model, prepared=True)
    g = next(g for g in a.groups if g.space == "conv2" and g.index == 7)
    z = zero_groups(model, [g])
    for t in z.graph.initializer:
        if t.name == "conv2.weight":
            w = numpy_helper.to_array(t).copy()
            w[7, 3, 2, 2] = 1e-3  # one element of the filter survives
            t.CopyFrom(numpy_helper.from_array(w, t.name))
        if t.name == "ip1.weight":
            w = numpy_helper.to_array(t).copy()
            w[11, 7 * 16 + 5] = 1e-3  # and one weight still reads the channel
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    result = prune(z, verify=1)
    assert not result.report.modified


@pytest.mark.parametrize("name, space", [("syn_block_output", "conv1"),
                                         ("syn_block_shared_weight", "shared_a")])
def test_near_miss_blocked_spaces_are_untouched(name, space):
    model = prepare(models.build(name))
    a = analyze(model, prepared=True)
    groups = [g for g in a.groups if g.space == space][:3]
    assert groups and not groups[0].prunable
    z = zero_groups(model, groups)
    result = prune(z, verify=1)
    assert not report_of(result, "remove-zero-channels").modified
    assert filters(result.model) == filters(z)


def test_input_features_nobody_reads_are_gathered():
    model = prepare(models.build("syn_mlp_input_gather", batch=2))
    arrs = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    arrs["fc1.weight"][:, [3, 10, 11, 40]] = 0  # transB=1: columns are input features
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrs[t.name], t.name))
    result = prune(model, verify=2)
    assert report_of(result, "remove-zero-channels").input_features_gathered == 4
    assert [d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim] == [2, 64]
    gathers = [n for n in result.model.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 1
    w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert w["fc1.weight"].shape == (32, 60)


def _padded_const(size: int, width: int) -> onnx.ModelProto:
    """conv1 (width) -> BN -> Relu -> padded 3x3 conv2 (4) on size x size images."""
    g = GraphBuilder("padded_const", 0)
    x = g.input("input", (2, 3, size, size))
    x = g.relu(g.bn(g.conv(x, width, 3, pad=1, name="conv1"), name="bn1"), name="relu1")
    return g.build({"output": g.conv(x, 4, 3, pad=1, name="conv2")})


def test_padded_conv_behind_constant_channel_gets_bias_map():
    # 4x4 images: the map k[1, 4, 4, 4] holds 64 params, fewer than the two channels.
    model = _padded_const(4, 16)
    a = analyze(model)
    # Zero only conv1's filters 1 and 4: BN shift + ReLU make them non-zero constants that a
    # padded 3x3 conv sees differently at the borders.
    chosen = [g for g in a.groups if g.space == "conv1" and g.index in (1, 4)]
    z = zero_groups(model, chosen, side="filter")
    result = prune(z, verify=2)
    rep = report_of(result, "remove-zero-channels")
    assert rep.channels_removed == 2 and rep.bias_maps_added == 1
    assert_same_outputs(z, result.model)
    assert float_params(result.model) == float_params(z) - 2 * (27 + 1 + 4 + 36) + 64
    # The report counts the map as conv2's params.
    conv2 = next(s for s in result.report.layers if s.node == "conv2")
    assert conv2.params_after == 4 * 14 * 9 + 4 + 64
    assert result.report.params_after == sum(s.params_after for s in result.report.layers)


def test_bias_map_that_costs_more_than_it_saves_keeps_the_channels():
    # 16x16 images: a map for conv2 would hold 8*16*16 = 2048 params, the two channels 208.
    model = prepare(models.build("syn_padded_const", batch=2))
    a = analyze(model, prepared=True)
    chosen = [g for g in a.groups if g.space == "conv1" and g.index in (1, 4)]
    z = zero_groups(model, chosen, side="filter")
    result = prune(z, verify=2)
    rep = report_of(result, "remove-zero-channels")
    assert rep.channels_removed == 0 and rep.bias_maps_added == 0
    assert any(k.startswith("conv1: keeps channel(s) [1, 4]") and "2048 params" in k
               for k in result.report.kept), result.report.kept
    assert float_params(result.model) == float_params(z)
    assert not prune(result.model, verify=1).report.modified


def test_threshold_is_reported_as_a_change_of_function():
    model = prepare(models.build("lenet", batch=2))
    arrs = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    arrs["conv1.weight"][[2, 5]] *= 1e-2
    arrs["conv1.bias"][[2, 5]] *= 1e-2
    arrs["conv2.weight"][:, [2, 5]] *= 1e-2
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrs[t.name], t.name))
    result = prune(model, threshold=0.1, verify=2)
    assert report_of(result, "zero-small-groups").groups_zeroed == 2
    assert result.report.threshold_effect and all(
        0 < d.max_abs for d in result.report.threshold_effect)
    w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert w["conv1.weight"].shape[0] == 18
    with pytest.raises(VerificationError):
        verify(model, result.model, n=1)  # the function did change, by a little


def test_unchanged_model_reports_no_change():
    result = prune(models.build("resnet20"), verify=1)
    assert not result.report.modified
    assert "no change" in result.report.to_text()


def test_report_json_and_text():
    model = prepare(models.build("lenet"))
    a = analyze(model, prepared=True)
    z = zero_groups(model, [g for g in a.groups if g.space == "conv1"][:15])
    r = prune(z, verify=1).report
    doc = r.to_json()
    conv1 = next(la for la in doc["layers"] if la["node"] == "conv1")
    assert conv1["filters_before"] == 20 and conv1["filters_after"] == 5
    conv2 = next(la for la in doc["layers"] if la["node"] == "conv2")
    assert conv2["channels_after"] == 5 and conv2["macs_after"] == conv2["macs_before"] // 4
    assert doc["verification"]["rtol"] == 1e-5
    assert "conv1" in r.to_text() and "20 -> 5" in r.to_text()


def test_bad_verification_is_refused(rng):
    # A model whose function differs must never pass the numeric check.
    inits = {"w": rand(rng, 2, 3, 1, 1)}
    m1 = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
                    [vi("x", [1, 3, 2, 2])], [vi("y", [1, 2, 2, 2])], inits)
    inits["w"] = inits["w"] * (1 + 1e-3)
    m2 = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
                    [vi("x", [1, 3, 2, 2])], [vi("y", [1, 2, 2, 2])], inits)
    with pytest.raises(VerificationError, match="output 'y' differs"):
        verify(m1, m2)
    assert np.isfinite(verify(m1, m1)[0].max_abs)


@pytest.mark.parametrize("space,balanced,unbalanced", [
    ("conv1", [1, 5], [1, 2]),            # conv2 (group 2) reads 4 channels per group
    ("conv2", [0, 2, 4, 6], [0, 1, 2, 3]),  # conv2 makes 4 per group, conv3 (group 4) reads 2
])
def test_grouped_convs_lose_channels_only_evenly(space, balanced, unbalanced):
    """syn_grouped: zeroed channels that each convolution group loses evenly are removed (and
    counted); an uneven choice is kept with its reason (the pass must not fire)."""
    model = prepare(models.build("syn_grouped", batch=2))
    a = analyze(model, prepared=True)
    groups = {g.index: g for g in a.groups if g.kind == "channel" and g.space == space}
    zeroed = zero_groups(model, [groups[i] for i in balanced])
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=3)
    assert report_of(result, "remove-zero-channels").channels_removed == len(balanced)
    assert not result.report.kept
    layer = {s.node: s for s in result.report.layers}[space]
    assert (layer.filters_before, layer.filters_after) == (8, 8 - len(balanced))
    odd = prune(zero_groups(model, [groups[i] for i in unbalanced]), verify=2)
    assert not odd.report.removed
    assert any("convolution groups loses the same number" in k for k in odd.report.kept)
    assert {s.node: s for s in odd.report.layers}[space].filters_after == 8


def _dead_conv_model(small_filter: bool) -> onnx.ModelProto:
    """x -> c1 (2 filters 3x3) -> Relu -> c2 -> y, and a conv ``dead`` on x that reaches no
    output (40 of the 59 params are c1 and dead). ``small_filter``: c1's filter 1 and its
    input slice of c2 are scaled by 1e-4 (a group a threshold of 1e-2 zeroes)."""
    rng = np.random.default_rng(0)
    w = {"c1.w": rand(rng, 2, 1, 3, 3), "c1.b": rand(rng, 2), "c2.w": rand(rng, 1, 2, 3, 3),
         "c2.b": rand(rng, 1), "dead.w": rand(rng, 2, 1, 3, 3), "dead.b": rand(rng, 2)}
    if small_filter:
        w["c1.w"][1] *= 1e-4
        w["c1.b"][1] *= 1e-4
        w["c2.w"][:, 1] *= 1e-4
    pads = {"pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["h"], name="c1", **pads),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "c2.w", "c2.b"], ["y"], name="c2", **pads),
             helper.make_node("Conv", ["x", "dead.w", "dead.b"], ["z"], name="dead", **pads)]
    return make_model(nodes, [vi("x", [1, 1, 4, 4])], [vi("y", [1, 1, 4, 4])], w)


def test_threshold_report_says_what_was_zeroed_and_what_was_removed():
    """Issue 7: with a dead conv, `prune --threshold` said "no change: nothing could be
    removed" while params went 40 -> 20, and "CHANGED the function: max output difference 0"
    (the threshold step's finish() cleaned the graph the passes then got)."""
    result = prune(_dead_conv_model(small_filter=False), threshold=1e-3, verify=2)
    rep = result.report
    assert (rep.params_before, rep.params_after) == (59, 39)
    assert rep.removed and rep.modified
    assert report_of(result, "zero-small-groups").groups_zeroed == 0
    assert all(d.max_abs == 0 for d in rep.threshold_effect)
    text = rep.to_text()
    assert "no change" not in text and "CHANGED" not in text
    assert "threshold 0.001 zeroed no group" in text
    assert "the outputs did not change (max output difference 0)" in text
    assert [n.name for n in result.model.graph.node] == ["c1", "relu", "c2"]


def test_threshold_that_changes_the_function_says_by_how_much():
    model = _dead_conv_model(small_filter=True)
    result = prune(model, threshold=1e-2, verify=2)
    rep = result.report
    assert report_of(result, "zero-small-groups").groups_zeroed == 1
    assert {s.node: s.filters_after for s in rep.layers} == {"c1": 1, "c2": 1, "dead": 0}
    worst = max(d.relative for d in rep.threshold_effect)
    assert 0 < worst < 1e-3
    text = rep.to_text()
    assert "threshold 0.01 zeroed 1 group(s) with L2 norm <= 0.01 (channel 1)" in text
    assert f"this CHANGED the function: max output difference {worst:.3g}" in text
    assert "no change" not in text
    # Without the numeric check the report cannot say by how much.
    blind = prune(model, threshold=1e-2, verify=0).report.to_text()
    assert "may have CHANGED the function (output difference not measured" in blind
