"""Channel coverage on the constructs of CSPDarknet, GhostNet, ReXNet and ShuffleNetV2, and
the grouped-convolution constraint of the analysis JSON.

Each construct is a tiny ``onnx.helper`` graph. The property checked on each: every conv's
filters are in a prunable space; zeroing random channel groups (out and in members) and
pruning removes exactly those filters with the outputs of the zeroed model unchanged; and
pruning the result again changes nothing. Near misses (a transpose that is not a channel
shuffle, a shuffle whose inner tensor is read elsewhere) must stay blocked.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import (
    arrays,
    assert_same_outputs,
    make_model,
    rand,
    vi,
    with_arrays,
    zero_groups,
)
from onnx import helper

from onnx_ssl.analysis import analyze
from onnx_ssl.compiler import prune
from onnx_ssl.groups import Analysis, Group

N, H = 1, 6


class Net:
    """A tiny NCHW graph under construction: convs (with bias), relus, and any other node."""

    def __init__(self, c_in: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.c_in = c_in
        self.k = 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def conv(self, x: str, c_in: int, c_out: int, group: int = 1, k: int = 3,
             name: str | None = None) -> str:
        n = name or self.name("conv")
        self.inits[f"{n}.w"] = rand(self.rng, c_out, c_in // group, k, k)
        self.inits[f"{n}.b"] = rand(self.rng, c_out)
        self.nodes.append(helper.make_node("Conv", [x, f"{n}.w", f"{n}.b"], [n], name=n,
                                           group=group, pads=[k // 2] * 4))
        return n

    def op(self, op: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> list[str]:
        n = self.name(op.lower())
        outs = [f"{n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=n, **attrs))
        return outs

    def const(self, v: list[int]) -> str:
        n = self.name("c")
        self.inits[n] = np.array(v, dtype=np.int64)
        return n

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])[0]

    def model(self, y: str, c: int) -> onnx.ModelProto:
        """The graph ending in ``y`` (``c`` channels) -> conv(4) -> GlobalAveragePool."""
        head = self.conv(y, c, 4, name="head")
        out = self.op("GlobalAveragePool", [head])[0]
        return make_model(self.nodes, [vi("x", [N, self.c_in, H, H])],
                          [vi(out, [N, 4, 1, 1])], self.inits)


def shuffle(net: Net, x: str, c: int, g: int = 2) -> str:
    r = net.op("Reshape", [x, net.const([N, g, c // g, H, H])])[0]
    t = net.op("Transpose", [r], perm=[0, 2, 1, 3, 4])[0]
    return net.op("Reshape", [t, net.const([N, c, H, H])])[0]


def conv_filters(a: Analysis) -> tuple[int, int]:
    """(filters in prunable spaces, all filters) over the Conv layers but the head."""
    convs = {la.node: la for la in a.layers if la.op_type == "Conv" and la.node != "head"}
    total = sum(la.weight_shape[0] for la in convs.values())
    ok = sum(r.length * r.block for sp in a.spaces if sp.prunable for r in sp.refs
             if r.role == "out" and r.is_weight and r.node in convs
             and r.tensor == convs[r.node].weight)
    return ok, total


def all_filters(m: onnx.ModelProto) -> int:
    return sum(la.weight_shape[0] for la in analyze(m).layers if la.op_type == "Conv")


def pick(a: Analysis, rng: np.random.Generator, frac: float = 0.4) -> list[Group]:
    """A random ``frac`` of the channels of every prunable space (never all of them)."""
    out = []
    for sp in a.spaces:
        if not sp.prunable or sp.channels < 2:
            continue
        k = max(1, min(sp.channels - 1, round(frac * sp.channels)))
        chans = set(int(c) for c in rng.permutation(sp.channels)[:k])
        out += [g for g in a.groups if g.kind == "channel" and g.space == sp.id
                and g.index in chans]
    return out


def zeroed_filters(a: Analysis, groups: list[Group]) -> int:
    layers = {la.weight for la in a.layers if la.op_type == "Conv"}
    return sum(len(m.slice[0]) for g in groups for m in g.members  # type: ignore[arg-type]
               if m.role == "out" and m.tensor in layers and m.slice[0] is not None)


def check_prunes_exactly(m: onnx.ModelProto, seed: int = 0) -> None:
    a = analyze(m)
    ok, total = conv_filters(a)
    assert ok == total, [(s.id, s.reason) for s in a.spaces if not s.prunable]
    chosen = pick(a, np.random.default_rng(seed))
    zeroed = zero_groups(m, chosen)
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=3)
    assert all_filters(m) - all_filters(result.model) == zeroed_filters(a, chosen), \
        result.report.to_text()
    assert not prune(result.model, verify=1).report.modified


# --- ShuffleNetV2: channel shuffle ------------------------------------------------------------


def shuffle_unit(c: int = 8) -> onnx.ModelProto:
    """Two convs concatenated, shuffled, split into halves; one half through a conv, concat,
    shuffled again (a ShuffleNetV2 unit after a stride-2 one)."""
    net = Net(3)
    a = net.relu(net.conv("x", 3, c // 2))
    b = net.relu(net.conv("x", 3, c // 2))
    y = shuffle(net, net.op("Concat", [a, b], axis=1)[0], c)
    x1, x2 = net.op("Split", [y, net.const([c // 2, c // 2])], 2, axis=1)
    z = net.relu(net.conv(x2, c // 2, c // 2, k=1))
    z = net.conv(z, c // 2, c // 2, group=c // 2)  # depthwise
    y = shuffle(net, net.op("Concat", [x1, z], axis=1)[0], c)
    return net.model(y, c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_channel_shuffle_is_a_permutation(seed):
    check_prunes_exactly(shuffle_unit(), seed)


def test_channel_shuffle_layout():
    """After the shuffle, position p holds channel perm[p] of the concatenation: the head's
    in members of a channel of conv ``a`` sit at the shuffled positions."""
    a = analyze(shuffle_unit())
    first = next(s for s in a.spaces if s.id == "conv1")
    head = [m for g in a.groups if g.space == first.id and g.index == 1 for m in g.members
            if m.tensor == "head.w"]
    # Concat [a0..a3, b0..b3] -> shuffle -> [a0 b0 a1 b1 a2 b2 a3 b3]: a1 at 2 -> split ->
    # first half position 2 -> concat -> 2 -> shuffle [h0 z0 h1 z1 h2 ...]: h2 at 4.
    assert [m.slice[1] for m in head] == [(4,)]


def test_pruned_shuffle_prunes_again():
    """A pruned shuffle is a Gather of the kept channels; channels zeroed in the pruned
    model are removed through it."""
    m = shuffle_unit()
    a = analyze(m)
    first = pick(a, np.random.default_rng(5), 0.25)
    once = prune(zero_groups(m, first), verify=1).model
    assert any(n.op_type == "Gather" for n in once.graph.node)
    check_prunes_exactly(once, seed=6)


@pytest.mark.parametrize("cut", ["shuffle", "split"])
def test_unread_input_features_before_a_shuffle_or_split(cut):
    """Input features nobody reads are gathered away after the graph input; a shuffle or
    Split right after the input is rewritten for the gathered tensor."""
    net = Net(8)
    if cut == "shuffle":
        y, c = shuffle(net, "x", 8), 8
    else:
        y, c = net.op("Split", ["x", net.const([4, 4])], 2, axis=1)[1], 4
    w = net.conv(y, c, 6)
    m = net.model(net.relu(w), 6)
    arrs = arrays(m)
    arrs[f"{w}.w"][:, [1, 2]] = 0
    zeroed = with_arrays(m, arrs)
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model)
    w_after = next(t for t in result.model.graph.initializer if t.name == f"{w}.w")
    assert w_after.dims[1] == c - 2
    assert not prune(result.model, verify=1).report.modified


@pytest.mark.parametrize("case", ["spatial_transpose", "inner_read"])
def test_not_a_shuffle_stays_blocked(case):
    net = Net(3)
    y = net.relu(net.conv("x", 3, 8))
    r = net.op("Reshape", [y, net.const([N, 2, 4, H, H])])[0]
    perm = [0, 1, 2, 4, 3] if case == "spatial_transpose" else [0, 2, 1, 3, 4]
    t = net.op("Transpose", [r], perm=perm)[0]
    z = net.op("Reshape", [t, net.const([N, 8, H, H])])[0]
    m = net.model(z, 8)
    if case == "inner_read":  # the 5-D tensor is also a graph output
        m.graph.output.append(vi(r, [N, 2, 4, H, H]))
    sp = next(s for s in analyze(m).spaces if s.id == "conv1")
    assert not sp.prunable and sp.reason is not None and "Reshape" in sp.reason.text


# --- GhostNet: ghost modules --------------------------------------------------------------


def ghost_block(width: int, mid: int = 4, se: bool = True) -> onnx.ModelProto:
    """ghost(x) = cat([p, dw(p)])[:, :width] with p = conv(x) (``mid`` filters), plus a conv
    shortcut of ``width`` filters; squeeze-excitation on the sum."""
    net = Net(3)
    x = net.relu(net.conv("x", 3, 6))
    p = net.relu(net.conv(x, 6, mid, k=1))
    d = net.relu(net.conv(p, mid, mid, group=mid))
    g = net.op("Concat", [p, d], axis=1)[0]
    g = net.op("Slice", [g, net.const([0]), net.const([width]), net.const([1])])[0]
    s = net.conv(x, 6, width, k=1)
    y = net.op("Add", [g, s])[0]
    if se:
        q = net.op("GlobalAveragePool", [y])[0]
        q = net.op("Sigmoid", [net.conv(net.relu(net.conv(q, width, 2, k=1)), 2, width,
                                        k=1)])[0]
        y = net.op("Mul", [y, q])[0]
    return net.model(y, width)


@pytest.mark.parametrize(("width", "se", "seed"), [(8, True, 0), (8, False, 1), (6, True, 2),
                                                   (6, False, 3)])
def test_ghost_module(width, se, seed):
    check_prunes_exactly(ghost_block(width, se=se), seed)


def test_ghost_shortcut_is_split_into_pieces():
    """The shortcut conv's channel i and 4+i are both tied to the primary conv's channel i:
    one channel group holds both filters of the shortcut."""
    a = analyze(ghost_block(8, se=False))
    g = next(g for g in a.groups if g.kind == "channel" and any(
        m.tensor == "conv3.w" and m.role == "out" and m.slice[0] == (1,) for m in g.members))
    shortcut = sorted(m.slice[0] for m in g.members  # type: ignore[type-var]
                      if m.tensor == "conv12.w" and m.role == "out")
    assert shortcut == [(1,), (5,)]
    # Both halves of the shortcut's space were united with the primary conv's.
    assert not any(s.id.startswith("conv12") for s in a.spaces)


# --- CSPDarknet: partial residuals on a split ----------------------------------------------


def csp_stage(cut: str) -> onnx.ModelProto:
    """conv(8) -> halves (Split or Slices) -> residual block on the second half -> concat."""
    net = Net(3)
    e = net.relu(net.conv("x", 3, 8, k=1))
    if cut == "split":
        xs, xb = net.op("Split", [e, net.const([4, 4])], 2, axis=1)
    else:
        xs = net.op("Slice", [e, net.const([0]), net.const([4]), net.const([1])])[0]
        xb = net.op("Slice", [e, net.const([4]), net.const([8]), net.const([1])])[0]
    for _ in range(2):
        r = net.conv(net.relu(net.conv(xb, 4, 4, k=1)), 4, 4)
        xb = net.op("Add", [xb, r])[0]
    xb = net.relu(net.conv(xb, 4, 4, k=1))
    y = net.relu(net.conv(net.op("Concat", [xs, xb], axis=1)[0], 8, 8, k=1))
    return net.model(y, 8)


@pytest.mark.parametrize(("cut", "seed"), [("split", 0), ("split", 1), ("slice", 2)])
def test_csp_partial_residual(cut, seed):
    check_prunes_exactly(csp_stage(cut), seed)


# --- ReXNet: partial-channel residual adds --------------------------------------------------


def rexnet_block(c_in: int = 4, c_out: int = 6) -> onnx.ModelProto:
    """out = conv(x) with c_out filters; cat([out[:, :c_in] + x, out[:, c_in:]])."""
    net = Net(3)
    x = net.relu(net.conv("x", 3, c_in))
    h = net.relu(net.conv(x, c_in, 12, k=1))
    o = net.conv(net.relu(net.conv(h, 12, 12, group=12)), 12, c_out, k=1)
    lo = net.op("Slice", [o, net.const([0]), net.const([c_in]), net.const([1])])[0]
    hi = net.op("Slice", [o, net.const([c_in]), net.const([c_out]), net.const([1])])[0]
    y = net.op("Concat", [net.op("Add", [lo, x])[0], hi], axis=1)[0]
    return net.model(y, c_out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rexnet_partial_add(seed):
    check_prunes_exactly(rexnet_block(), seed)


def rexnet_inplace(form: str, c_in: int = 4, c_out: int = 6) -> onnx.ModelProto:
    """``out[:, :c_in] += x`` as the exporters write it (``form``): ScatterND of the sum into
    ``out``, with index tuples (batch, channel) after a no-op Expand and Reshape ("ts"), or
    of channel rows between Transposes ("dynamo"); "reduction" is the "ts" form with
    ``reduction = "add"`` (a near miss: it adds instead of writing)."""
    net = Net(3)
    x = net.relu(net.conv("x", 3, c_in))
    o = net.conv(net.relu(net.conv(x, c_in, 12, k=1)), 12, c_out, k=1)
    lo = net.op("Slice", [o, net.const([0]), net.const([c_in]), net.const([1])])[0]
    add = net.op("Add", [lo, x])[0]
    if form == "dynamo":
        t_add = net.op("Transpose", [add], perm=[1, 0, 2, 3])[0]
        t_o = net.op("Transpose", [o], perm=[1, 0, 2, 3])[0]
        idx = net.name("idx")
        net.inits[idx] = np.arange(c_in, dtype=np.int64).reshape(c_in, 1)
        s = net.op("ScatterND", [t_o, idx, t_add])[0]
        y = net.op("Transpose", [s], perm=[1, 0, 2, 3])[0]
    else:
        e = net.op("Expand", [add, net.const([N, c_in, H, H])])[0]
        r = net.op("Reshape", [e, net.const([N, c_in, H, H])])[0]
        idx = net.name("idx")
        net.inits[idx] = np.stack([np.zeros(c_in), np.arange(c_in)], axis=1).astype(
            np.int64).reshape(1, c_in, 2)
        attrs: dict[str, Any] = {"reduction": "add"} if form == "reduction" else {}
        y = net.op("ScatterND", [o, idx, r], **attrs)[0]
    return net.model(y, c_out)


@pytest.mark.parametrize(("form", "seed"), [("ts", 0), ("ts", 1), ("dynamo", 2),
                                            ("dynamo", 3)])
def test_rexnet_inplace_add(form, seed):
    check_prunes_exactly(rexnet_inplace(form), seed)


def test_scatter_nd_with_reduction_stays_blocked():
    a = analyze(rexnet_inplace("reduction"))
    sp = next(s for s in a.spaces if s.id == "conv1")
    assert not sp.prunable and sp.reason is not None and "(ScatterND)" in sp.reason.text


# --- grouped convolutions: the JSON states the constraint -----------------------------------


def grouped_net() -> onnx.ModelProto:
    net = Net(3)
    y = net.relu(net.conv("x", 3, 8, k=1))
    y = net.relu(net.conv(y, 8, 8, group=4))
    return net.model(y, 8)


def test_grouped_conv_constraint_in_json():
    a = analyze(grouped_net())
    doc = json.loads(a.dumps())
    sp = next(s for s in doc["spaces"] if s["id"] == "conv1")
    assert sp["prunable"] and sp["conv_groups"] == [4]
    assert "4 blocks of 2" in sp["constraint"]
    free = next(s for s in doc["spaces"] if s["id"] == "head")
    assert free["conv_groups"] == [] and free["constraint"] is None


@pytest.mark.parametrize("balanced", [True, False])
def test_grouped_conv_constraint_is_what_prune_removes(balanced):
    """Channels zeroed as the constraint says (channel 0 of every block) are all removed;
    zeroed otherwise (one block only) they stay, and "kept:" says why."""
    m = grouped_net()
    a = analyze(m)
    chans = [0, 2, 4, 6] if balanced else [0, 1]
    chosen = [g for g in a.groups if g.space == "conv1" and g.index in chans]
    zeroed = zero_groups(m, chosen)
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model)
    w = {t.name: t for t in result.model.graph.initializer}
    left = w["conv1.w"].dims[0] if "conv1.w" in w else None
    kept = [k for k in result.report.kept if k.startswith("conv1:")]
    if balanced:
        assert left == 4 and not kept
    else:
        assert left == 8 and kept and "4 blocks of 2" in kept[0], result.report.kept


def test_regnet_export_constraint():
    """HF RegNet (grouped 3x3 convs): zeroing by the JSON's constraint removes every zeroed
    filter of the constrained spaces."""
    import exported as X

    m = X.load("hf_regnet", "ts")
    a = analyze(m)
    doc = json.loads(a.dumps())
    constrained = [s for s in doc["spaces"] if s["prunable"] and s["conv_groups"]]
    assert constrained and all(s["constraint"] for s in constrained)
    spaces = {s.id: s for s in a.spaces}
    chosen = []
    for s in constrained[:4]:
        sp = spaces[s["id"]]
        blocks = int(np.lcm.reduce(s["conv_groups"]))
        size = sp.channels // blocks
        chans = {j * size for j in range(blocks)}  # channel 0 of every block
        chosen += [g for g in a.groups if g.space == sp.id and g.index in chans]
    zeroed = zero_groups(m, chosen)
    result = prune(zeroed, verify=1)
    report = result.report.to_text()
    for s in constrained[:4]:
        assert not any(k.startswith(f"{s['id']}:") for k in result.report.kept), report
    assert all_filters(m) - all_filters(result.model) >= zeroed_filters(a, chosen)


# --- the benchmark against Torch-Pruning, TorchScript exports only ------------------------


def test_bench_coverage_matches_torch_pruning():
    """``benchmarks/bench_coverage.py`` on the TorchScript exports: every conv filter of the
    networks is prunable for us as for Torch-Pruning, and the check prunes every zeroed
    filter with the outputs unchanged (prune raises otherwise)."""
    pytest.importorskip("torch")
    pytest.importorskip("torch_pruning")
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_coverage.py"
    nets = ["cspdarknet", "ghostnet", "rexnet", "rexnet_inplace", "shufflenetv2"]
    r = subprocess.run([sys.executable, str(script), "--exporters", "ts", "--nets", *nets],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines()
            if line.startswith("| ") and " ts " in line]
    assert [row[0].strip("| ") for row in rows] == nets
    for row in rows:
        ours, theirs, check = row[2], row[3], row[4]
        assert ours.startswith("100.0% "), row
        assert theirs.startswith("100.0% "), row
        m = re.fullmatch(r"(\d+) of (\d+) zeroed filters removed, outputs equal", check)
        assert m is not None and m.group(1) == m.group(2) and int(m.group(1)) > 0, row
