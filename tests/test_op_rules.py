"""The op table (:data:`onnx_ssl.rules.RULES`), entry by entry, on tiny ``onnx.parser`` graphs.

Every graph starts the same way: ``x[1,4,6,6] -> Conv w1 (1x1, 4 filters) -> Sigmoid -> h``,
then the op of the entry, then (usually) a consumer layer ``w2``. For each op the test checks

* its flow, through the analysis: channel ``1`` of ``w1``'s filters either reaches ``w2``
  (an ``in`` member of the same prunable group: the op passes channels through), or is
  blocked with a reason naming the op, or (a layer) the op reads it and makes a new space;
* its MACs: the analysis's total, against the number worked out by hand in the case;
* for every op that passes channels through: zeroing that channel in the original model and
  pruning it removes it and keeps the function (the prune verifies against ONNX Runtime, and
  the test compares again at float32 tolerances), and for an op with a ``rewrite`` the
  rewritten attribute or input is checked.

Every entry of the table must have a case here: adding an op means adding its entry and its
case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx.parser
import pytest
from helpers import assert_same_outputs, zero_groups
from onnx import numpy_helper

from onnx_ssl.analysis import analyze
from onnx_ssl.compiler import prune
from onnx_ssl.groups import Analysis, Group
from onnx_ssl.rules import RULES

W1_MACS = 1 * 4 * 6 * 6 * 4  # the 1x1 conv 4 -> 4 on 6x6 at the head of every graph
CONV2 = 3 * 36 * 4  # a 1x1 conv 4 -> 3 on 6x6 (the usual consumer)


@dataclass(frozen=True)
class Case:
    body: str  # nodes from ``h`` to the output ``y``
    flow: Literal["pass", "block", "layer"]
    macs: int
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    opset: int = 17
    run: bool = True  # whether ONNX Runtime 1.19 can run it (zero-and-prune check)
    reader: str | None = None  # the weight of the layer that reads the op's output
    x: str = "1,4,6,6"  # the input's dims


def _case(op: str, body: str, flow: Literal["pass", "block", "layer"] = "pass",
          macs: int = W1_MACS + CONV2, **kw: object) -> tuple[str, Case]:
    uses_w2 = re.search(r"\bw2\b", body) is not None
    params = {"w2": (3, 4, 1, 1), "b2": (3,)} if uses_w2 else {}
    params.update(kw.pop("params", {}))  # type: ignore[call-overload]
    kw.setdefault("reader", "w2" if uses_w2 else None)
    return op, Case(body, flow, macs, params, **kw)  # type: ignore[arg-type]


CONV_TAIL = "y = Conv(z, w2, b2)"
UNARY_ATTRS = {"Cast": "<to = 1>"}
UNARY_OPSET = {"Gelu": 20, "Mish": 18, "Swish": 24}
K = {"k": (4, 1, 1)}
GAP_FLAT = "g = GlobalAveragePool(h)\n f = Flatten(g)\n"
GEMM_TAIL = "y = Gemm(z, wg, bg)"
GEMM_PARAMS = {"wg": (4, 3), "bg": (3,)}


def _unary(op: str) -> tuple[str, Case]:
    return _case(op, f"z = {op} {UNARY_ATTRS.get(op, '')} (h)\n {CONV_TAIL}",
                 opset=UNARY_OPSET.get(op, 17), run=op != "Swish")


def _binary(op: str) -> tuple[str, Case]:
    # Div and Pow read their second operand as a statistic (never zeroed): keep it positive.
    k = "pos_k" if op in ("Div", "Pow") else "k"
    return _case(op, f"z = {op}(h, {k})\n {CONV_TAIL}", params={k: (4, 1, 1)})


def _pool(op: str) -> tuple[str, Case]:
    if op.startswith("Global"):
        return _case(op, f"z = {op}(h)\n {CONV_TAIL}", macs=W1_MACS + 3 * 4)
    return _case(op, f"z = {op} <kernel_shape = [2, 2], strides = [2, 2]> (h)\n {CONV_TAIL}",
                 macs=W1_MACS + 3 * 9 * 4)


def _reduce(op: str) -> tuple[str, Case]:
    return _case(op, "axes = Constant <value = int64[2] {2, 3}> ()\n"
                     f" z = {op} <keepdims = 1> (h, axes)\n {CONV_TAIL}",
                 macs=W1_MACS + 3 * 4, opset=18)


def _softmax(op: str) -> tuple[str, Case]:
    return _case(op, f"z = {op} <axis = -1> (h)\n {CONV_TAIL}")


def _block(op: str, body: str, macs: int = W1_MACS, **kw: object) -> tuple[str, Case]:
    return _case(op, body, "block", macs, **kw)


UNARY = [op for op, r in RULES.items() if r.flow.__name__ == "flow_unary"]
CASES: dict[str, Case] = dict([
    *(_unary(op) for op in UNARY),
    _case("PRelu", f"z = PRelu(h, k)\n {CONV_TAIL}", params=K),
    *(_binary(op) for op in "Add Sub Mul Div Pow Max Min Sum Mean".split()),
    _case("BatchNormalization", f"z = BatchNormalization(h, s, k4, m, pos_var)\n {CONV_TAIL}",
          params={"s": (4,), "k4": (4,), "m": (4,), "pos_var": (4,)}),
    _case("InstanceNormalization", f"z = InstanceNormalization(h, s, k4)\n {CONV_TAIL}",
          params={"s": (4,), "k4": (4,)}),
    *(_pool(op) for op in
      "MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split()),
    _case("Pad", "pads = Constant <value = int64[8] {0, 0, 1, 1, 0, 0, 1, 1}> ()\n"
                 f" z = Pad(h, pads)\n {CONV_TAIL}", macs=W1_MACS + 3 * 64 * 4),
    _case("Resize", "roi = Constant <value = float[0] {}> ()\n"
                    "scales = Constant <value = float[0] {}> ()\n"
                    "sizes = Constant <value = int64[4] {1, 4, 12, 12}> ()\n"
                    f" z = Resize <mode = \"nearest\"> (h, roi, scales, sizes)\n {CONV_TAIL}",
          macs=W1_MACS + 3 * 144 * 4),
    _case("Upsample", "scales = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()\n"
                      f" z = Upsample <mode = \"nearest\"> (h, scales)\n {CONV_TAIL}",
          macs=W1_MACS + 3 * 144 * 4, opset=9),
    *(_reduce(op) for op in RULES if op.startswith("Reduce")),
    *(_softmax(op) for op in ("Softmax", "LogSoftmax", "Hardmax")),
    _case("LayerNormalization", f"z = LayerNormalization <axis = -1> (h, s6, k6)\n {CONV_TAIL}",
          params={"s6": (6,), "k6": (6,)}),
    _case("Concat", "c2 = Conv(x, w1b)\n z = Concat <axis = 1> (h, c2)\n y = Conv(z, w2, b2)",
          macs=2 * W1_MACS + 3 * 36 * 8, params={"w1b": (4, 4, 1, 1), "w2": (3, 8, 1, 1)}),
    _case("Split", "split = Constant <value = int64[2] {2, 2}> ()\n"
                   " s1, s2 = Split <axis = 1> (h, split)\n"
                   f" z = Concat <axis = 1> (s2, s1)\n {CONV_TAIL}"),
    _case("Slice", "starts = Constant <value = int64[1] {1}> ()\n"
                   "ends = Constant <value = int64[1] {4}> ()\n"
                   "axes = Constant <value = int64[1] {1}> ()\n"
                   f" z = Slice(h, starts, ends, axes)\n {CONV_TAIL}",
          macs=W1_MACS + 3 * 36 * 3, params={"w2": (3, 3, 1, 1)}),
    _case("Gather", "idx = Constant <value = int64[3] {0, 2, 4}> ()\n"
                    f" z = Gather <axis = 2> (h, idx)\n {CONV_TAIL}",
          macs=W1_MACS + 3 * 18 * 4),
    _case("Transpose", "z = Transpose <perm = [0, 2, 3, 1]> (h)\n y = MatMul(z, wm)",
          macs=W1_MACS + 36 * 3 * 4, params={"wm": (4, 3)}, reader="wm"),
    _case("Squeeze", "g = GlobalAveragePool(h)\n axes = Constant <value = int64[2] {2, 3}> ()\n"
                     f" z = Squeeze(g, axes)\n {GEMM_TAIL}", macs=W1_MACS + 3 * 4,
          params=GEMM_PARAMS, reader="wg"),
    _case("Unsqueeze", GAP_FLAT + " axes = Constant <value = int64[1] {0}> ()\n"
                                  " z = Unsqueeze(f, axes)\n y = MatMul(z, wm)",
          macs=W1_MACS + 3 * 4, params={"wm": (4, 3)}, reader="wm"),
    _case("Reshape", "shape = Constant <value = int64[2] {1, 144}> ()\n"
                     " z = Reshape(h, shape)\n y = Gemm(z, wr)",
          macs=W1_MACS + 144 * 3, params={"wr": (144, 3)}, reader="wr"),
    _case("Flatten", "z = Flatten <axis = 1> (h)\n y = Gemm(z, wr)",
          macs=W1_MACS + 144 * 3, params={"wr": (144, 3)}, reader="wr"),
    # Layers: the depthwise conv keeps the space (``group`` is rewritten); the others read it.
    _case("Conv", "z = Conv <group = 4, pads = [1, 1, 1, 1]> (h, wd, k4)\n y = Conv(z, w2, b2)",
          macs=W1_MACS + 4 * 36 * 9 + CONV2, params={"wd": (4, 1, 3, 3), "k4": (4,)}),
    _case("ConvTranspose", "z = ConvTranspose <strides = [2, 2]> (h, wt, k5)\n"
                           " y = Conv(z, w2, b2)", "layer",
          macs=W1_MACS + 36 * 4 * (5 * 2 * 2) + 3 * 144 * 5,
          params={"wt": (4, 5, 2, 2), "k5": (5,), "w2": (3, 5, 1, 1)}, reader="wt"),
    _case("Gemm", GAP_FLAT + " y = Gemm <transB = 1> (f, wgt, bg)", "layer",
          macs=W1_MACS + 3 * 4, params={"wgt": (3, 4), "bg": (3,)}, reader="wgt"),
    _case("MatMul", GAP_FLAT + " y = MatMul(f, wm)", "layer", macs=W1_MACS + 3 * 4,
          params={"wm": (4, 3)}, reader="wm"),
    # Ops that block the channels they touch.
    _block("LRN", f"z = LRN <size = 3> (h)\n {CONV_TAIL}", macs=W1_MACS + CONV2),
    _block("GroupNormalization", "y = GroupNormalization <num_groups = 2> (h, s, k4)",
           params={"s": (4,), "k4": (4,)}, opset=21),
    # A static shape is folded away: Shape stays (and blocks) only where the shape is dynamic,
    # and then no MACs are known.
    _block("Shape", "y = Shape(h)", macs=0, x="1,4,H,W"),
    _block("Size", "y = Size(h)"),
    _block("DepthToSpace", "z = DepthToSpace <blocksize = 2> (h)\n y = Conv(z, w2, b2)",
           macs=W1_MACS + 3 * 144 * 1, params={"w2": (3, 1, 1, 1)}),
    _block("SpaceToDepth", "z = SpaceToDepth <blocksize = 2> (h)\n y = Conv(z, w2, b2)",
           macs=W1_MACS + 3 * 9 * 16, params={"w2": (3, 16, 1, 1)}),
    _block("Einsum", "y = Einsum <equation = \"bchw,dc->bdhw\"> (h, wm34)",
           params={"wm34": (3, 4)}),
    # An in-place partial add, ``h[:, 0:2] = relu(h[:, 0:2])`` as TorchScript writes it.
    _case("ScatterND", "idx = Constant <value = int64[1, 2, 2] {0, 0, 0, 1}> ()\n"
                       " st = Constant <value = int64[1] {0}> ()\n"
                       " en = Constant <value = int64[1] {2}> ()\n"
                       " ax = Constant <value = int64[1] {1}> ()\n"
                       " u = Slice(h, st, en, ax)\n v = Relu(u)\n"
                       f" z = ScatterND(h, idx, v)\n {CONV_TAIL}"),
    _block("Expand", "shp = Constant <value = int64[4] {2, 4, 6, 6}> ()\n"
                     f" z = Expand(h, shp)\n {CONV_TAIL}", macs=W1_MACS + 2 * CONV2),
    _block("Tile", "reps = Constant <value = int64[4] {1, 2, 1, 1}> ()\n"
                   f" z = Tile(h, reps)\n {CONV_TAIL}", macs=W1_MACS + 3 * 36 * 8,
           params={"w2": (3, 8, 1, 1)}),
    _block("Where", "cond = Constant <value = bool[1] {1}> ()\n"
                    f" z = Where(cond, h, k)\n {CONV_TAIL}", macs=W1_MACS + CONV2, params=K),
    _block("TopK", "kk = Constant <value = int64[1] {2}> ()\n"
                   f" z, i = TopK <axis = 3> (h, kk)\n {CONV_TAIL}",
           macs=W1_MACS + 3 * 12 * 4),
    _block("ArgMax", "y = ArgMax <axis = 3> (h)"),
    _block("ArgMin", "y = ArgMin <axis = 3> (h)"),
])


def build(case: Case, seed: int = 0) -> onnx.ModelProto:
    """The case's graph, its parameters random initializers (``pos_*`` positive)."""
    decl = "".join(f", float[{','.join(map(str, s))}] {n}" for n, s in case.params.items())
    text = (f'<ir_version: 8, opset_import: ["" : {case.opset}]>\n'
            f"g (float[{case.x}] x, float[4,4,1,1] w1, float[4] b1{decl}) => (y) {{\n"
            f" c = Conv(x, w1, b1)\n h = Sigmoid(c)\n {case.body}\n}}")
    m = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    params = {"w1": (4, 4, 1, 1), "b1": (4,), **case.params}
    keep = [i for i in m.graph.input if i.name not in params]
    for name, shape in params.items():
        v = rng.standard_normal(shape).astype(np.float32)
        if name.startswith("pos_"):
            v = (np.abs(v) + 0.5).astype(np.float32)
        m.graph.initializer.append(numpy_helper.from_array(v, name))
    del m.graph.input[:]
    m.graph.input.extend(keep)
    inferred = onnx.shape_inference.infer_shapes(m)
    del m.graph.output[:]
    m.graph.output.extend(inferred.graph.output)
    return m


def layer(a: Analysis, weight: str):
    return next(la for la in a.layers if la.weight == weight)


def head_group(a: Analysis, channel: int = 1) -> Group:
    """The channel group of ``w1``'s filter ``channel``."""
    space = layer(a, "w1").out_space
    return next(g for g in a.groups if g.kind == "channel" and g.space == space
                and g.index == channel)


def reads(g: Group, weight: str) -> bool:
    return any(m.tensor == weight and m.role == "in" for m in g.members)


def test_every_op_in_the_table_has_a_case():
    assert set(CASES) == set(RULES), (
        f"ops without a case: {sorted(set(RULES) - set(CASES))}; "
        f"cases without an op: {sorted(set(CASES) - set(RULES))}")


@pytest.mark.parametrize("op", sorted(CASES))
def test_flow_and_macs(op):
    case = CASES[op]
    model = build(case)
    assert any(n.op_type == op for n in model.graph.node), op
    a = analyze(model)
    assert a.macs == case.macs, (a.macs, case.macs)
    g = head_group(a)
    w = case.reader
    if case.flow == "block":
        assert not g.prunable
        space = a.space(layer(a, "w1").out_space)
        assert any(f"({op})" in r.text for r in space.all_reasons), (
            space.reason, space.all_reasons)
    elif case.flow == "layer":
        # The layer reads the head's channels and makes its own space.
        assert w is not None
        la = layer(a, w)
        assert la.op_type == op and g.prunable and reads(g, w)
        assert la.in_space == layer(a, "w1").out_space != la.out_space
        slots = RULES[op].layer
        assert slots is not None and (la.out_axis, la.in_axis) == slots.axes(
            next(n for n in _gs_nodes(model) if n.op == op))
    else:
        assert g.prunable, g.reason
        assert w is not None and reads(g, w), [(m.tensor, m.role) for m in g.members]


def _gs_nodes(model: onnx.ModelProto):
    import onnx_graphsurgeon as gs
    return gs.import_onnx(model).nodes


PRUNABLE = sorted(op for op, c in CASES.items() if c.flow != "block" and c.run)


@pytest.mark.parametrize("op", PRUNABLE)
def test_pruning_a_zeroed_channel_through_the_op_keeps_the_function(op):
    case = CASES[op]
    model = build(case)
    g = head_group(analyze(model))
    zeroed = zero_groups(model, [g], "both")
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=3)
    after = analyze(result.model)
    # The zeroed filter is gone (and so is filter 0 behind a Slice that drops it).
    assert layer(after, "w1").weight_shape[0] == (2 if op == "Slice" else 3)
    assert result.report.macs_after < result.report.macs_before
    nodes = {n.op_type: n for n in result.model.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    if RULES[op].rewrite is None:
        return
    if op == "Slice":
        # Rewritten to 0:2 of 2 (channels 1:4 of 4; 0, unread, and 1, zeroed, gone), it
        # selects the whole axis: SimplifyContiguousIndexingPass removed it.
        assert op not in nodes
        return
    # The op's rewrite followed the removal.
    node = nodes[op]
    if op == "Split":
        assert sorted(inits[node.input[1]].tolist()) == [1, 2]
    elif op == "Reshape":
        assert inits[node.input[1]].tolist() == [1, 108]
    elif op in ("Resize", "Upsample"):
        assert op == "Upsample" or inits[node.input[3]].tolist() == [1, 3, 12, 12]
    elif op == "Conv":
        dw = next(n for n in result.model.graph.node if n.op_type == "Conv"
                  and any(a.name == "group" for a in n.attribute))
        assert next(a.i for a in dw.attribute if a.name == "group") == 3


# Near misses and variants of the flows that look at axes (issue 7: Pad, Resize, Reduce*,
# Softmax, Squeeze and Unsqueeze had no tiny tests): (case, reason the head's channels are
# blocked with, or None when they must reach the reader).
VARIANTS: dict[str, tuple[Case, str | None]] = {
    "pad-channel-axis": (_case("Pad", "pads = Constant <value = int64[8] "
                                      "{0, 1, 0, 0, 0, 1, 0, 0}> ()\n"
                                      " z = Pad(h, pads)\n y = Conv(z, w2, b2)",
                               macs=W1_MACS + 3 * 36 * 6, params={"w2": (3, 6, 1, 1)})[1],
                         "pads the channel axis"),
    "resize-channel-axis": (_case("Resize", "roi = Constant <value = float[0] {}> ()\n"
                                            "scales = Constant <value = float[0] {}> ()\n"
                                            "sizes = Constant <value = int64[4] {1, 8, 6, 6}> ()\n"
                                            " z = Resize <mode = \"nearest\"> "
                                            "(h, roi, scales, sizes)\n y = Conv(z, w2, b2)",
                                  macs=W1_MACS + 3 * 36 * 8, params={"w2": (3, 8, 1, 1)})[1],
                            "resizes the channel axis"),
    "reduce-channel-axis": (_case("ReduceMean", "axes = Constant <value = int64[1] {1}> ()\n"
                                                " z = ReduceMean <keepdims = 1> (h, axes)\n"
                                                " y = Conv(z, w2, b2)",
                                  macs=W1_MACS + 3 * 36, params={"w2": (3, 1, 1, 1)},
                                  opset=18)[1], "reduces over the channel axis"),
    "reduce-no-keepdims": (_case("ReduceMax", "axes = Constant <value = int64[2] {2, 3}> ()\n"
                                              " z = ReduceMax <keepdims = 0> (h, axes)\n"
                                              f" {GEMM_TAIL}", macs=W1_MACS + 3 * 4,
                                 params=GEMM_PARAMS, opset=18, reader="wg")[1], None),
    "softmax-channel-axis": (_case("Softmax", f"z = Softmax <axis = 1> (h)\n {CONV_TAIL}")[1],
                             "normalises over the channel axis"),
    "logsoftmax-opset-11-flattens-from-axis": (
        _case("LogSoftmax", f"z = LogSoftmax <axis = 2> (h)\n {CONV_TAIL}", opset=11)[1],
        None),
    "logsoftmax-opset-11-over-channels": (
        _case("LogSoftmax", f"z = LogSoftmax <axis = 1> (h)\n {CONV_TAIL}", opset=11)[1],
        "normalises over the channel axis"),
    "squeeze-channel-axis": (_case("Squeeze", "starts = Constant <value = int64[1] {0}> ()\n"
                                              "ends = Constant <value = int64[1] {1}> ()\n"
                                              "axes = Constant <value = int64[1] {1}> ()\n"
                                              " s = Slice(h, starts, ends, axes)\n"
                                              " y = Squeeze(s, axes)", macs=W1_MACS)[1],
                             "squeezes the channel axis"),
    "unsqueeze-before-channel-axis": (
        _case("Unsqueeze", "axes = Constant <value = int64[1] {1}> ()\n"
                           " u = Unsqueeze(h, axes)\n z = Squeeze(u, axes)\n"
                           f" {CONV_TAIL}")[1], None),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_flow_variants(name):
    case, reason = VARIANTS[name]
    a = analyze(build(case))
    assert a.macs == case.macs, (a.macs, case.macs)
    g = head_group(a)
    if reason is None:
        assert g.prunable, g.reason
        assert case.reader is not None and reads(g, case.reader)
        result = prune(zero_groups(build(case), [g], "both"), verify=2)
        assert layer(analyze(result.model), "w1").weight_shape[0] == 3
    else:
        space = a.space(layer(a, "w1").out_space)
        assert not g.prunable
        assert any(reason in r.text for r in space.all_reasons), (
            space.reason, space.all_reasons)
