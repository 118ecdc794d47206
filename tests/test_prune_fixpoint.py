"""Regressions of issue 9 (found by the fuzzer, tests/fuzz_graphs.py), one graph each.

Prune to the fixpoint (removing a channel can leave a filter nobody reads, or an upstream
channel only that filter read), never grow (a bias map that costs more than the channels it
replaces keeps them), never hang (a tensor never loses all its channels: ONNX Runtime does
not return on a Conv with 0 input channels).
"""

from __future__ import annotations

import onnx
import pytest
from fuzz_graphs import Block, Case, Worker, float_params
from helpers import arrays, assert_same_outputs, with_arrays, zero_groups
from onnx import numpy_helper

from onnx_ssl import models
from onnx_ssl.analysis import analyze
from onnx_ssl.compiler import prune
from onnx_ssl.models._builder import GraphBuilder


def removed(result) -> int:
    return dict(result.report.passes)["remove-zero-channels"].channels_removed


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def test_a_removal_that_leaves_a_channel_unread_is_followed_to_the_fixpoint():
    # conv2's filter 5 is the only reader of conv1's channel 2, and nobody reads conv2's
    # channel 5: removing that filter leaves conv1's channel 2 unread, in a second round.
    g = GraphBuilder("chain", 0)
    x = g.input("input", (1, 3, 6, 6))
    x = g.relu(g.conv(x, 8, 3, pad=1, name="conv1"), name="relu1")
    x = g.relu(g.conv(x, 8, 3, pad=1, name="conv2"), name="relu2")
    model = g.build({"output": g.conv(x, 4, 1, name="conv3")})
    arrs = arrays(model)
    arrs["conv3.weight"][:, 5] = 0
    arrs["conv2.weight"][[n for n in range(8) if n != 5], 2] = 0
    z = with_arrays(model, arrs)
    result = prune(z, verify=2)
    assert_same_outputs(z, result.model)
    w = arrays(result.model)
    assert w["conv1.weight"].shape[0] == 7 and w["conv2.weight"].shape[:2] == (7, 7)
    assert removed(result) == 2
    assert {(s.space, s.before, s.after) for s in
            dict(result.report.passes)["remove-zero-channels"].spaces} == {
        ("conv1", 8, 7), ("conv2", 8, 7)}
    assert not prune(result.model, verify=1).report.modified


def test_channels_are_removed_in_the_prune_that_collapses_a_branch():
    # The collapse rewrites the graph; the channel pass then analyses it and must see its
    # shapes (not block every space for an "operand of unknown rank").
    model = models.build("resnet20", batch=1)
    a = analyze(model)
    arrs = arrays(model)
    layer_w = {la.node: la.weight for la in a.layers}
    for layer in a.branches[0].layers:
        arrs[layer_w[layer]][...] = 0
    z = with_arrays(model, arrs)
    # Channels of the last stage's stream, which runs through residual Adds.
    chosen = [g for g in a.groups if g.space == "layer3.0.conv2"][:3]
    z = zero_groups(z, chosen)
    result = prune(z, verify=2)
    assert dict(result.report.passes)["collapse-residual"].branches_removed
    assert removed(result) == 3
    assert not prune(result.model, verify=1).report.modified


def _split_model(consumer: str) -> onnx.ModelProto:
    """conv(8) -> Split [4, 4] -> a conv (or a GAP) on each half -> Concat -> conv."""
    g = GraphBuilder("split_halves", 0)
    x = g.input("input", (1, 3, 6, 6))
    x = g.relu(g.conv(x, 8, 3, pad=1, name="conv"), name="relu")
    a, b = g.split(x, [4, 4], name="split")
    if consumer == "conv":
        a, b = g.conv(a, 4, 3, pad=1, name="conv_a"), g.conv(b, 4, 3, pad=1, name="conv_b")
        y = g.conv(g.concat([a, b], name="concat"), 4, 1, name="conv_out")
    else:
        a, b = g.gap(a, name="gap_a"), g.gap(b, name="gap_b")
        y = g.gemm(g.flatten(g.concat([a, b], name="concat"), name="flatten"), 4, name="fc")
    return g.build({"output": y})


def prune_split_halves(consumer: str) -> tuple[list[str], list[int], float]:
    """Zero channels 4-7 of the split conv, prune; (kept, split sizes, max difference)."""
    from onnx_ssl.runtime import compare

    model = _split_model(consumer)
    groups = [g for g in analyze(model).groups if g.space == "conv" and g.index >= 4]
    z = zero_groups(model, groups)
    result = prune(z, verify=2)
    sizes = [int(v) for t in result.model.graph.initializer if t.name.startswith("split")
             for v in numpy_helper.to_array(t)]
    worst = max(d.max_abs for d in compare(z, result.model, n=2, seed=5))
    return list(result.report.kept), sizes, worst


@pytest.mark.parametrize("consumer", ["conv", "gap"])
def test_a_split_part_that_loses_every_channel_keeps_one(worker, consumer):
    # A [N, 0, H, W] half made ONNX Runtime hang on the conv (never return) and fail on the
    # GlobalAveragePool ("Only N can be zero"). Run in a child with a time limit.
    kept, sizes, worst = worker.call(prune_split_halves, consumer, timeout=120)
    assert sizes == [4, 1]
    tensor = "split.1" if consumer == "conv" else "gap_b"
    assert any(k.startswith(f"conv: every channel of tensor '{tensor}' is zero") and
               "channel 4 is kept" in k for k in kept), kept
    assert worst <= 1e-5


def _padded_branch(size: int) -> onnx.ModelProto:
    """stem -> residual block whose first conv is zero; its padded second conv turns the
    constant into a map that varies at the borders."""
    g = GraphBuilder("padded_branch", 0)
    x = g.input("input", (1, 3, size, size))
    x = g.relu(g.conv(x, 4, 3, pad=1, name="stem"), name="stem_relu")
    h = g.relu(g.bn(g.conv(x, 4, 3, pad=1, bias=False, name="conv1"), name="bn1"), name="r1")
    h = g.bn(g.conv(h, 4, 3, pad=1, bias=False, name="conv2"), name="bn2")
    y = g.relu(g.add(x, h, name="add"), name="relu")
    return g.build({"output": g.conv(y, 4, 1, name="head")})


@pytest.mark.parametrize("size, collapsed", [(4, True), (16, False)])
def test_a_constant_branch_collapses_only_when_its_map_is_cheaper(size, collapsed):
    model = _padded_branch(size)
    arrs = arrays(model)
    arrs["conv1.weight"][...] = 0
    z = with_arrays(model, arrs)
    result = prune(z, verify=2)
    assert_same_outputs(z, result.model)
    rep = dict(result.report.passes)["collapse-residual"]
    assert bool(rep.branches_removed) == collapsed
    assert float_params(result.model) <= float_params(z)
    if not collapsed:  # 4*16*16 = 1024 params for the map, 2*144 + 16 in the branch
        assert any(k.startswith("add: keeps its constant residual branch") for k in
                   result.report.kept), result.report.kept
    assert not prune(result.model, verify=1).report.modified


# Cases the fuzzer found (scripts/fuzz_prune.py), shrunk: each failed before issue 9's fixes,
# in the way its name says.
SHRUNK: dict[str, Case] = {
    "hang_split_part_zero": Case(
        seed=3, batch=1, size=6, stem=8, blocks=(
            Block(kind="split", ch=8, bn=False, opt=1028754829),
            Block(kind="split", ch=8, bn=False, opt=1109691092)),
        head="gap_fc", extra_output=None, scheme="in", zero_seed=1688352592),
    "params_grew_grouped_bias_map": Case(
        seed=284, batch=1, size=10, stem=16, blocks=(
            Block(kind="grouped", ch=8, bn=False, opt=39122186),),
        head="gap_fc", extra_output=None, scheme="direct", zero_seed=2037163351),
    "params_grew_residual_maps": Case(
        seed=12, batch=1, size=8, stem=8, blocks=(
            Block(kind="res_block", ch=8, bn=True, opt=2033136463),
            Block(kind="res_proj", ch=8, bn=False, opt=1036628920),
            Block(kind="res_proj", ch=64, bn=True, opt=1439771269),
            Block(kind="res_proj", ch=8, bn=False, opt=1688508312)),
        head="gap", extra_output=None, scheme="filter", zero_seed=553954055),
    "params_grew_pad_and_branch": Case(
        seed=7, batch=1, size=10, stem=8, blocks=(
            Block(kind="grouped", ch=8, bn=False, opt=1926751966),
            Block(kind="pad", ch=8, bn=False, opt=11307155),
            Block(kind="res_block", ch=8, bn=False, opt=597914449)),
        head="gap_fc", extra_output=None, scheme="filter", zero_seed=1336119721),
    "zero_left_after_collapse": Case(
        seed=41, batch=1, size=6, stem=8, blocks=(
            Block(kind="res_block", ch=8, bn=False, opt=378929717),
            Block(kind="conv", ch=8, bn=False, opt=2118262672)),
        head="gap_fc", extra_output=None, scheme="out", zero_seed=921891633),
    "zero_left_se_then_branch": Case(
        seed=45, batch=1, size=6, stem=8, blocks=(
            Block(kind="se", ch=8, bn=False, opt=910213153),
            Block(kind="res_block", ch=8, bn=False, opt=1102197908)),
        head="gap_fc", extra_output=None, scheme="both", zero_seed=1352577398),
    "not_idempotent_depthwise_chain": Case(
        seed=2, batch=1, size=6, stem=8, blocks=(
            Block(kind="depthwise", ch=8, bn=False, opt=656492380),
            Block(kind="depthwise", ch=8, bn=False, opt=322256256),
            Block(kind="grouped", ch=32, bn=False, opt=471880638)),
        head="gap_fc", extra_output=None, scheme="filter", zero_seed=841007925),
    "not_idempotent_grouped_keep_one": Case(
        seed=5, batch=1, size=6, stem=8, blocks=(
            Block(kind="grouped", ch=32, bn=False, opt=503606823),),
        head="gap_fc", extra_output=None, scheme="both", zero_seed=248528775),
}


@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_shrunk_fuzzer_case(worker, name):
    case = SHRUNK[name]
    fails = worker.run(case)
    assert not fails, f"{case.describe()}: {fails}"

