"""Real networks exported from PyTorch by several exporters: the analysis finds the prunable
channel spaces (or blocks them with a reason), and pruning zeroed groups is exact.

The networks and exporters are in :mod:`exported` (TorchScript eval mode with and without
constant folding, TorchScript training mode, the dynamo exporter, and both with a dynamic
batch axis); exports are cached on disk. Every (network, exporter) case is checked for:

* the analysis: the same spaces whatever the exporter (a dynamic batch included), the spaces
  expected prunable are, every blocked space carries a reason naming the node and op type
  that blocks it, and every group member is a tensor of the model as exported;
* the property: zero ``k`` random prunable channel groups (both sides, the ``in`` side only,
  or only the producing layers' filters, which makes the channel a non-zero constant the
  pass must fold), prune, the outputs match the zeroed model and the layers lose at least one
  output channel per zeroed group; pruning the result again changes nothing;
* residual branches: zero one branch's layer weights, the branch is collapsed exactly.

Special cases: a channel under a data-dependent gate whose filters are zero is not a
constant and must be kept (with the reason); the dynamic-batch exports prune exactly and
stay batch-agnostic; groups zeroed by the analysis's names in the exported model prune.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import Counter

import exported as X
import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, embedding_tables, zero_groups
from onnx import numpy_helper

from onnx_ssl import runtime
from onnx_ssl.analysis import LAYER_OPS, analyze, prepare
from onnx_ssl.compiler import prune
from onnx_ssl.groups import Analysis, Group, Space
from onnx_ssl.reasons import ReasonCode

# Without torch (Python 3.13 here), X.load reads exports another environment left in the
# cache; it skips, or fails under $ONNX_SSL_REQUIRE_EXPORTS, when there are none.

CASES = X.cases()
STATIC = [c for c in CASES if c[1] not in X.DYNAMIC_BATCH]
DYNAMIC = [c for c in CASES if c[1] in X.DYNAMIC_BATCH]
# Per network, whatever the exporter: (spaces, prunable spaces, prunable channels).
EXPECTED: dict[str, tuple[int, int, int]] = {
    # 4 stages x (2 bottleneck inner spaces + 1 residual stream); input and logits blocked.
    "hf_resnet_bottleneck": (14, 12, 360),
    "hf_resnet_basic": (10, 8, 480),
    "hf_mobilenet_v2": (27, 25, 3296),
    "hf_regnet": (19, 17, 524),
    # Only the 4 MLP inner spaces: LayerNorm normalises the residual streams over channels.
    "hf_convnext": (10, 4, 640),
    "hf_efficientnet": (24, 22, 1396),
    # Only the FFN inner space (48): Q/K/V split into heads, LayerNorm on the residual.
    "hf_bert": (6, 1, 48),
    # Only the two MLP inner spaces (64 + 128): Q/K/V split into heads, LayerNorm elsewhere.
    "hf_swin": (12, 2, 192),
    # The two MLP inner spaces (2 x 128); the patch Conv's space is the residual stream (the
    # class token concatenated to it is sliced with it), LayerNorm on it; Q/K/V split into
    # heads.
    "hf_vit": (10, 2, 256),
    # The two MLP inner spaces (2 x 256): the fused Q/K/V splits into heads, LayerNorm on the
    # residual stream.
    "hf_gpt2": (5, 2, 512),
    "hand_resnet": (7, 5, 64),
    "hand_concat": (8, 4, 40),
    "hand_dense": (5, 2, 20),
    "hand_unet": (9, 5, 48),
    # The embedding's 16 columns and the hidden layer's 24 neurons.
    "hand_embed": (3, 2, 40),
}
# Networks in which every convolution's output space is prunable (residual streams included).
ALL_CONVS_PRUNABLE = {"hf_resnet_bottleneck", "hf_resnet_basic", "hf_mobilenet_v2", "hf_regnet",
                      "hf_efficientnet", "hand_resnet"}
# Reasons that must block some space of the network (substrings of Space.all_reasons).
REASONS: dict[str, tuple[str, ...]] = {
    "hf_convnext": ("(LayerNormalization): normalises over the channel axis",),
    "hf_bert": ("(LayerNormalization): normalises over the channel axis",
                "(Reshape): reshape", "splits or mixes the channel axis"),
    "hf_swin": ("(LayerNormalization): normalises over the channel axis",
                "(Reshape): reshape", "splits or mixes the channel axis"),
    "hf_vit": ("(LayerNormalization): normalises over the channel axis",
               "(Reshape): reshape", "splits or mixes the channel axis"),
    "hf_gpt2": ("(LayerNormalization): normalises over the channel axis",
                "(Reshape): reshape", "splits or mixes the channel axis"),
    "hand_concat": ("(Conv): grouped convolution of a concatenated or sliced input",),
    "hand_dense": ("(ReduceMean): reduces over the channel axis",),
    # TorchScript and dynamo both export GroupNorm as Reshape + InstanceNormalization.
    "hand_unet": ("(Reshape): reshape", "carries channels that are not tracked"),
}
# A reason names the node and op type, or is about a graph input, output or weight.
REASON_FORM = re.compile(r"^(.+ \([A-Za-z]+\): .+|graph input '.+'.*|reaches graph output "
                         r"'.+'|weight .+)$")
SIDES = ("both", "in", "filter")
K = 6


def _id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


@functools.cache
def model(name: str, exporter: str) -> onnx.ModelProto:
    if exporter.startswith("dynamo") and X.have_torch():
        pytest.importorskip("onnxscript")
    return X.load(name, exporter)


@functools.cache
def prepared(name: str, exporter: str) -> tuple[onnx.ModelProto, Analysis]:
    m = prepare(model(name, exporter))
    return m, analyze(m, prepared=True)


def out_channels(m: onnx.ModelProto, a: Analysis) -> int:
    """Output channels of the layers that produce channels: filters and neurons of the
    Conv/Gemm/MatMul layers, columns of the embedding tables."""
    return (sum(la.weight_shape[la.out_axis] for la in a.layers)
            + sum(embedding_tables(m).values()))


def balanced(space: Space, channel: int) -> list[int]:
    """``channel`` and the channels that must go with it so that every convolution group of
    the space loses the same number (see the prune pass's balancing)."""
    if not space.partitions:
        return [channel]
    g = math.lcm(*space.partitions)
    size = space.channels // g
    return [channel % size + j * size for j in range(g)]


def pick(a: Analysis, k: int, seed: int) -> list[Group]:
    """``k`` random prunable channel groups (each with its balancing partners), never every
    channel of a space (a layer keeps at least one)."""
    groups = {(g.space, g.index): g for g in a.groups if g.kind == "channel" and g.prunable}
    spaces = {s.id: s for s in a.spaces}
    keys = list(groups)
    rng = np.random.default_rng(seed)
    chosen: dict[tuple[str | None, int | None], Group] = {}
    per_space: Counter[str] = Counter()
    picks = 0
    for i in rng.permutation(len(keys)):
        sid, c = keys[i]
        assert sid is not None and c is not None
        sp = spaces[sid]
        extra = [(sid, j) for j in balanced(sp, c) if (sid, j) not in chosen]
        if not extra or per_space[sid] + len(extra) >= sp.channels:
            continue
        for key in extra:
            chosen[key] = groups[key]
        per_space[sid] += len(extra)
        picks += 1
        if picks == k:
            break
    return list(chosen.values())


def worst_optimiser_change(m: onnx.ModelProto, seed: int = 0) -> float:
    """How much ORT's own graph optimisations change the outputs, relative to max |output|."""
    plain, fused = runtime.session(m), runtime.session(m, optimize=True)
    feeds = runtime.random_inputs(plain, seed)
    a, b = runtime.run(plain, feeds), runtime.run(fused, feeds)
    return max(float(np.max(np.abs(a[k] - b[k]))) / max(float(np.max(np.abs(a[k]))), 1e-30)
               for k in a)


def skip_if_ill_conditioned(name: str, exporter: str, m: onnx.ModelProto) -> None:
    if exporter in X.NETS[name].ill_conditioned:
        change = worst_optimiser_change(m)
        if change > runtime.RTOL:
            pytest.skip(f"{name}/{exporter} is numerically ill-conditioned: ORT's own graph "
                        f"optimisations change its output by {change:.2g} x max|output|, "
                        f"beyond the exactness tolerance {runtime.RTOL:g}")


# --- the exports --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_export_is_valid_for_the_runtime(case: tuple[str, str]) -> None:
    m = model(*case)
    assert m.ir_version <= 10
    assert all(o.version <= 21 for o in m.opset_import if o.domain in ("", "ai.onnx"))
    onnx.checker.check_model(m)
    runtime.session(m)
    if case[1] == "ts_train":  # BatchNormalization in training form: batch statistics
        bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
        assert bns and all(len(n.output) == 3 for n in bns)
        assert all(a.i == 1 for n in bns for a in n.attribute if a.name == "training_mode")


# --- the analysis -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_analysis_finds_the_prunable_spaces(case: tuple[str, str]) -> None:
    name, exporter = case
    a = analyze(model(name, exporter))
    prunable = [s for s in a.spaces if s.prunable]
    assert (len(a.spaces), len(prunable), sum(s.channels for s in prunable)) == EXPECTED[name], (
        [(s.id, s.channels, s.reason) for s in a.spaces])
    blocked = [s for s in a.spaces if not s.prunable]
    for s in blocked:
        assert s.reason and s.all_reasons and s.reason == s.all_reasons[0], s
        for r in s.all_reasons:
            assert REASON_FORM.match(r.text), r
    # A float graph input (not token ids) and the graph outputs are blocked for what they are.
    m = model(name, exporter)
    if any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in m.graph.input):
        assert any(r.code is ReasonCode.GRAPH_INPUT for s in blocked for r in s.all_reasons)
    assert any(r.code is ReasonCode.GRAPH_OUTPUT for s in blocked for r in s.all_reasons)
    for want in REASONS.get(name, ()):
        assert any(want in r.text for s in blocked for r in s.all_reasons), (want, [
            s.all_reasons for s in blocked])
    spaces = {s.id: s for s in a.spaces}
    if name in ALL_CONVS_PRUNABLE:
        convs = [la for la in a.layers if la.op_type == "Conv"]
        assert convs and all(la.out_space and spaces[la.out_space].prunable for la in convs), [
            (la.node, la.out_space) for la in convs
            if not (la.out_space and spaces[la.out_space].prunable)]
    if name == "hf_resnet_bottleneck":
        # Per stage: the bottleneck's two inner spaces (one producer, one consumer each) and
        # the residual stream (the producers joined by the residual Adds) are all prunable.
        layer_weights = {la.weight for la in a.layers}
        shape = Counter()
        for s in prunable:
            producers = {r.node for r in s.refs if r.role == "out" and r.tensor in layer_weights}
            consumers = {r.node for r in s.refs if r.role == "in"}
            shape["inner" if len(producers) == 1 and len(consumers) == 1 else "stream"] += 1
            if len(producers) > 1:
                assert len(producers) >= 2 and s.channels in (16, 32, 64, 128)
        assert shape == {"inner": 8, "stream": 4}
    if name in ("hf_convnext", "hf_bert", "hf_vit", "hf_gpt2"):
        # What is prunable is an MLP's inner space: produced by one linear layer, read by one.
        for s in prunable:
            layers = [r for r in s.refs if r.is_weight and r.role in ("out", "in")]
            assert {r.role for r in layers} == {"out", "in"}


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "hf_swin"], ids=_id)
def test_shape_arithmetic_is_folded_to_its_fixpoint_in_one_preparation(
        case: tuple[str, str]) -> None:
    # Swin's window attention computes its reshapes from Shape nodes. One preparation folds
    # all of it that static shapes make constant (issue 9: 13 Shape nodes survived one and a
    # second removed them); with a symbolic batch, only the batch size stays computed.
    m = model(*case)
    once = prepare(m)
    twice = prepare(once)
    shapes = [sum(n.op_type == "Shape" for n in x.graph.node) for x in (m, once, twice)]
    assert shapes[0] > 0 and shapes[1] == shapes[2], shapes
    assert len(once.graph.node) == len(twice.graph.node)
    assert shapes[1] <= (1 if case[1] in X.DYNAMIC_BATCH else 0), shapes
    a = analyze(m)
    assert not [r for s in a.spaces for r in s.all_reasons if "computed at run time" in r.text]


@pytest.mark.parametrize("case", DYNAMIC, ids=_id)
def test_dynamic_batch_is_analysed_like_the_static_export(case: tuple[str, str]) -> None:
    """A symbolic batch is bound for the analysis: the same spaces as the static twin (same
    exporter, batch 2), the MACs per sample (half the twin's)."""
    name, exporter = case
    static = analyze(model(name, exporter.replace("_dynbatch", "")))
    dynamic = analyze(model(name, exporter))
    assert [(s.channels, s.prunable) for s in dynamic.spaces] == [
        (s.channels, s.prunable) for s in static.spaces]
    assert dynamic.macs_per_sample and not static.macs_per_sample
    assert 2 * dynamic.macs == static.macs > 0


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_members_are_tensors_of_the_input(case: tuple[str, str]) -> None:
    """The analysis names the input's tensors (initializers, Constant node outputs), not the
    working copy's unshared copies or folded constants; each (tensor, slice) once a group."""
    m = model(*case)
    names = ({t.name for t in m.graph.initializer}
             | {o for n in m.graph.node if n.op_type == "Constant" for o in n.output})
    a = analyze(m)
    assert {mem.tensor for g in a.groups for mem in g.members} <= names
    assert {la.weight for la in a.layers} <= names
    for g in a.groups:
        assert len({(x.tensor, x.slice) for x in g.members}) == len(g.members), g.id


@pytest.mark.parametrize("case", [("hf_efficientnet", "ts"), ("hand_dense", "ts_nofold"),
                                  ("hand_resnet", "dynamo_dynbatch")], ids=_id)
def test_groups_zeroed_by_name_in_the_input_are_pruned(case: tuple[str, str]) -> None:
    """The contract on the input model itself: zero the members the analysis lists (a merged
    squeeze-excitation bias the working copy unshared, a PReLU slope it folded out of an
    Unsqueeze) by those names in the model as exported, and the groups are pruned exactly."""
    m = model(*case)
    a = analyze(m)
    p, ap = prepared(*case)  # the working copy's names, where they differ
    working = {g.id: {x.tensor for x in g.members} for g in ap.groups}
    mapped = [g for g in a.groups if g.kind == "channel" and g.prunable
              and {x.tensor for x in g.members} != working[g.id]]
    assert mapped or case[1] == "dynamo_dynbatch"
    chosen = pick(dataclasses.replace(a, groups=tuple(mapped or a.groups)), K, seed=3)
    assert chosen
    zeroed = zero_groups(m, chosen, "both")
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=5)
    assert dict(result.report.passes)["remove-zero-channels"].channels_removed >= len(chosen)


def test_merged_constants_of_the_dynamo_export_are_unshared() -> None:
    """The dynamo exporter merges equal initializers (ConvNeXt's zero biases of unrelated
    layers become one tensor); prepare gives each reader its own copy, so the MLP spaces stay
    prunable, as in the TorchScript export."""
    raw = model("hf_convnext", "dynamo")
    readers: Counter[str] = Counter(i for n in raw.graph.node for i in set(n.input))
    floats = {t.name for t in raw.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT and math.prod(t.dims) > 1}
    assert any(readers[t] > 1 for t in floats), "the exporter no longer merges constants"
    m, a = prepared("hf_convnext", "dynamo")
    readers = Counter(i for n in m.graph.node for i in set(n.input))
    weights = {n.input[1] for n in m.graph.node if n.op_type in LAYER_OPS}
    shared = [t.name for t in m.graph.initializer if readers[t.name] > 1
              and t.data_type == onnx.TensorProto.FLOAT and math.prod(t.dims) > 1
              and t.name not in weights]
    assert not shared
    assert sum(s.prunable for s in a.spaces) == EXPECTED["hf_convnext"][1]


# --- the property -------------------------------------------------------------------------


def only_costly_maps_kept(kept: tuple[str, ...]) -> bool:
    """Whether zeroed channels were kept, asserting that the only reason is a bias map that
    would cost more params than the channels save (filters zeroed in front of a padded conv;
    the model never grows), with the group balance that keeping them can entail."""
    assert all("bias map" in k or "convolution groups" in k for k in kept), kept
    assert not kept or any("bias map" in k for k in kept), kept
    return bool(kept)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", STATIC, ids=_id)
def test_zeroed_groups_are_pruned_exactly(case: tuple[str, str], side: str) -> None:
    name, exporter = case
    m, a = prepared(name, exporter)
    skip_if_ill_conditioned(name, exporter, m)
    chosen = pick(a, K, seed=len(name) + SIDES.index(side))
    assert chosen, f"{name}: no prunable channel group"
    zeroed = zero_groups(m, chosen, side)
    result = prune(zeroed, verify=2)  # raises VerificationError beyond the tolerance
    assert_same_outputs(zeroed, result.model, seed=11)
    report = dict(result.report.passes)["remove-zero-channels"]
    if not only_costly_maps_kept(result.report.kept):
        assert report.channels_removed >= len(chosen)
        after = analyze(result.model)
        # Each zeroed group takes at least one output channel of a Conv/Gemm/MatMul with it.
        assert out_channels(result.model, after) <= out_channels(m, a) - len(chosen)
        assert result.report.macs_after < result.report.macs_before
    # Pruning the pruned model again finds nothing to do.
    again = prune(result.model, verify=1)
    assert again.report.modified is False


DEPTH = [c for c in STATIC if c[0] in EXPECTED and c[0] not in (
    "hf_efficientnet", "hand_concat", "hand_dense", "hand_unet", "hand_embed")]


@pytest.mark.parametrize("case", DEPTH, ids=_id)
def test_zeroed_residual_branch_is_collapsed_exactly(case: tuple[str, str]) -> None:
    """Zero the layer weights of one residual branch (biases and norm parameters stay, so
    the branch is a non-zero constant): the branch goes, the Add keeps the constant."""
    name, exporter = case
    m, a = prepared(name, exporter)
    skip_if_ill_conditioned(name, exporter, m)
    depth = [g for g in a.groups if g.kind == "depth" and g.prunable]
    assert depth, f"{name}: no prunable residual branch"
    group = depth[len(depth) // 2]
    branch = next(b for b in a.branches if f"{b.add}/depth" == group.id)
    zeroed = zero_groups(m, [group], "filter")
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=13)
    collapsed = dict(result.report.passes)["collapse-residual"]
    assert collapsed.branches_removed == (branch.add,)
    assert result.report.layers_after <= result.report.layers_before - len(branch.layers)
    assert prune(result.model, verify=1).report.modified is False


def test_zero_filters_under_a_data_dependent_gate_are_kept() -> None:
    """In hand_dense a channel is multiplied by a data-dependent scalar gate: with its
    filters zeroed (bias and BatchNorm kept) it is *not* constant, so the pass must keep it,
    say why, and still produce the same outputs."""
    m, a = prepared("hand_dense", "ts")
    gated = next(s for s in a.spaces if s.prunable and s.channels == 8)
    group = next(g for g in a.groups if g.space == gated.id and g.index == 0)
    dense = {la.weight for la in a.layers if la.conv_groups == 1}
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(m)
    inits = {t.name: t for t in zeroed.graph.initializer}
    hit = 0
    for mem in group.members:
        if mem.role == "out" and mem.tensor in dense:
            v = numpy_helper.to_array(inits[mem.tensor]).copy()
            v[mem.index(v.shape)] = 0
            inits[mem.tensor].CopyFrom(numpy_helper.from_array(v, mem.tensor))
            hit += 1
    assert hit == 2  # the two convs whose outputs are added
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=3)
    assert any("still depend on the input" in k for k in result.report.kept), (
        result.report.kept)
    assert dict(result.report.passes)["remove-zero-channels"].channels_removed == 0


@pytest.mark.parametrize("side", ["both", "filter", "branch"])
@pytest.mark.parametrize("case", DYNAMIC, ids=_id)
def test_dynamic_batch_prunes_exactly(case: tuple[str, str], side: str) -> None:
    """A dynamic batch axis: the working copy binds it to 1 (constants of folded channels and
    collapsed branches are evaluated there), the pruned model keeps it symbolic (a target
    that folding made batch-sized is written back without it), and the result matches at
    batch 1 and 3 (the prune's own numeric check runs at a third size)."""
    name, exporter = case
    m, a = prepared(name, exporter)
    if side == "branch":
        depth = [g for g in a.groups if g.kind == "depth" and g.prunable]
        if len(depth) < 2:
            pytest.skip(f"{name} has no second prunable residual branch")
        zeroed = zero_groups(m, depth[1:2], "filter")
    else:
        chosen = pick(a, K, seed=5)
        zeroed = zero_groups(m, chosen, side)
    result = prune(zeroed, verify=2)
    kept = only_costly_maps_kept(result.report.kept)
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    if side == "branch":
        assert len(dict(result.report.passes)["collapse-residual"].branches_removed) == 1
    elif not kept:
        after = analyze(result.model)
        assert out_channels(result.model, after) <= out_channels(m, a) - len(chosen)
    ref, new = runtime.session(zeroed), runtime.session(result.model)
    rng = np.random.default_rng(0)
    x0 = m.graph.input[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(x0.type.tensor_type.elem_type)
    for batch in (1, 3):
        shape = (batch, *(d.dim_value for d in x0.type.tensor_type.shape.dim[1:]))
        x = {x0.name: (rng.standard_normal(shape).astype(np.float32) if dtype.kind == "f"
                       else rng.integers(0, 8, shape).astype(dtype))}  # token ids
        want, got = runtime.run(ref, x), runtime.run(new, x)
        for k, v in want.items():
            tol = runtime.ATOL + runtime.RTOL * float(np.max(np.abs(v)))
            np.testing.assert_allclose(got[k], v, rtol=0, atol=tol)


@pytest.mark.parametrize("case", [c for c in CASES if c == ("hf_swin", "ts_dynbatch")],
                         ids=_id)
def test_prune_prints_its_report_and_nothing_else(case: tuple[str, str], tmp_path) -> None:
    """The sessions onnx-graphsurgeon's constant fold opens log a warning for every Unsqueeze
    ONNX Runtime's optimisers cannot remove, and onnx-graphsurgeon warns of its own: on this
    Swin that was 110 lines around prune's report (hundreds on a larger one)."""
    import subprocess
    import sys

    src = tmp_path / "m.onnx"
    onnx.save(model(*case), str(src))
    r = subprocess.run([sys.executable, "-m", "onnx_ssl", "prune", str(src), "-o",
                        str(tmp_path / "o.onnx"), "--no-verify"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [ln for ln in r.stderr.splitlines() if not ln.startswith("wrote ")] == [], \
        r.stderr[:2000]
    assert r.stdout.startswith("layer ") and "[W]" not in r.stdout, r.stdout[:2000]


def test_macs_that_are_not_static_are_reported_so() -> None:
    from onnx_ssl.compiler import LayerStat, PruneReport

    rep = PruneReport("m", (LayerStat("mm", "MatMul", 8, 8, 8, 8, 64, 64, 0, 0),), 1, 1, 64,
                      64, 0, 0, ())
    text = rep.to_text()
    assert "MACs not static" in text and "inf" not in text and "(0.0%" not in text, text


# --- issue 18: transformer exports ----------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "hf_gpt2" and c[1].startswith(
    "ts")], ids=_id)
def test_members_folded_from_scalars_are_the_scalars(case: tuple[str, str]) -> None:
    """GPT-2's eager causal mask, exported by TorchScript, is a Where of two scalar
    constants, folded into a constant that each residual branch reads: tracing it back to the
    scalars failed with 'multiple indices are not supported for 0d arrays' (issue 18). The
    depth groups list them whole."""
    m = model(*case)
    scalars = ({t.name for t in m.graph.initializer if not t.dims}
               | {n.output[0] for n in m.graph.node if n.op_type == "Constant"
                  and n.attribute and n.attribute[0].name == "value"
                  and not n.attribute[0].t.dims})
    a = analyze(m)
    found = [x for g in a.groups if g.kind == "depth" for x in g.members if x.tensor in scalars]
    assert found and all(x.slice == () for x in found), found


def _declared_dynamic(m: onnx.ModelProto) -> onnx.ModelProto:
    """``m`` (exported at batch 1) with its batch axis declared symbolic, as an exporter that
    bakes the example's batch into the shapes leaves it."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for vi in [*out.graph.input, *out.graph.output]:
        d = vi.type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_param = "batch"
    return out


def test_a_batch_declared_dynamic_that_is_not_is_refused_in_one_line(tmp_path) -> None:
    """A GPT-2 export whose batch is declared dynamic but does not run at batch 2: analyze
    reported it prunable and prune failed with raw ONNX Runtime logs and an internal error
    (issue 18). Both say so in one line (exit 2) with the way out, and --bind-batch 1
    analyses and prunes it as the static model it is."""
    import subprocess
    import sys

    from onnx_ssl.errors import InputError

    if X.have_torch():
        pytest.importorskip("onnxscript")
    m = _declared_dynamic(X.load("hf_gpt2_batch1", "dynamo"))
    with pytest.raises(InputError, match=r"does not run at batch 2 .*--bind-batch 1") as e:
        analyze(m)
    assert "\n" not in str(e.value)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(m, str(src))
    for cmd in (["analyze", str(src)], ["prune", str(src), "-o", str(out)]):
        r = subprocess.run([sys.executable, "-m", "onnx_ssl", *cmd], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2, (cmd, r.returncode, r.stderr[-2000:])
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnx-ssl: error: the input model does "
                                                       "not run at batch 2"), r.stderr[-2000:]
        assert not r.stdout
    r = subprocess.run([sys.executable, "-m", "onnx_ssl", "prune", str(src), "-o", str(out),
                        "--bind-batch", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_weights_moved_by_an_unfolded_transpose_map_to_their_initializers(monkeypatch) -> None:
    """Without constant folding, nn.Linear is MatMul(x, Transpose(W)). The numeric trace of
    folded constants numbers the elements of their sources in their own float type, which
    holds 2^24 numbers exactly in float32: beyond that every such weight was blocked as
    'folded from tensors too large to trace' (issue 18: 0 of 27,941 channels of a ConvNeXt).
    A chain of element moves is traced by numpy in int64 at any size; the limit is lowered
    here so that the tiny ConvNeXt is over it, as a real one is."""
    from onnx_ssl import analysis

    monkeypatch.setattr(analysis, "_exact_integers", lambda dtype: 256)
    raw = model("hf_convnext", "ts_nofold")
    a, folded = analyze(raw), analyze(model("hf_convnext", "ts"))
    assert [(s.channels, s.prunable) for s in a.spaces] == [
        (s.channels, s.prunable) for s in folded.spaces]
    inits = {t.name: tuple(t.dims) for t in raw.graph.initializer}
    transposed = {n.input[0] for n in raw.graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits}
    matmuls = [la for la in a.layers if la.op_type == "MatMul"]
    assert matmuls and all(la.weight in transposed for la in matmuls), matmuls
    # torch's W is [out, in]: the layer and its members speak of it, axes permuted.
    assert all((la.out_axis, la.in_axis) == (0, 1) and la.weight_shape == inits[la.weight]
               for la in matmuls)
    hit = 0
    for g in a.groups:
        for x in g.members:
            if g.kind == "channel" and g.prunable and x.tensor in transposed:
                axis = 0 if x.role == "out" else 1  # a row of W for an output channel
                picked = x.slice[axis]
                assert picked is not None and len(picked) == 1, x
                assert x.slice[1 - axis] is None, x
                hit += 1
    assert hit
    # The property, on the model as exported: zero groups by the members, prune, same outputs.
    chosen = pick(a, K, seed=7)
    zeroed = zero_groups(raw, chosen, "both")
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=5)
    assert dict(result.report.passes)["remove-zero-channels"].channels_removed >= len(chosen)


@pytest.mark.parametrize("name", ["hf_vit", "hf_bert", "hf_gpt2"])
@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
def test_transformer_macs_per_sample_with_a_dynamic_batch(name: str, exporter: str) -> None:
    """A class token expanded to the batch (ViT), masks expanded to it (BERT, GPT-2): folded
    at batch 1 they are constants that repeat per sample, which kept the batch symbolic and
    the MACs 'not static' (issue 18). They are bound like the other batch-derived shapes:
    MACs per sample, half the static batch-2 export's, from both exporters."""
    static = analyze(model(name, exporter))
    dynamic = analyze(model(name, f"{exporter}_dynbatch"))
    assert dynamic.macs_per_sample and 2 * dynamic.macs == static.macs > 0, dynamic.notes
    assert not [n for n in dynamic.notes if "stays symbolic" in n], dynamic.notes
    other = analyze(model(name, "dynamo_dynbatch" if exporter == "ts" else "ts_dynbatch"))
    assert other.macs == dynamic.macs
