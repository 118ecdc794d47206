"""The coupled-group analysis on tiny hand-built graphs, with the expected spaces written out."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import make_model, rand, vi
from onnx import TensorProto, helper

from onnx_ssl import models
from onnx_ssl.analysis import analyze, format_table
from onnx_ssl.groups import Analysis, Member
from onnx_ssl.reasons import ReasonCode
from onnx_ssl.rules import RULES


def space_of(a: Analysis, node: str):
    return next(s for s in a.spaces if s.id == node)


def members(a: Analysis, space: str, index: int) -> set[tuple[str, str, tuple]]:
    g = next(g for g in a.groups if g.kind == "channel" and g.space == space and g.index == index)
    return {(m.tensor, m.role, m.slice) for m in g.members}


def conv_chain(rng, bias: bool = True, group2: int = 1, c1: int = 4) -> onnx.ModelProto:
    inits = {"w1": rand(rng, c1, 3, 3, 3), "w2": rand(rng, 6, c1 // group2, 3, 3)}
    ins1 = ["x", "w1"] + (["b1"] if bias else [])
    if bias:
        inits["b1"] = rand(rng, c1)
    nodes = [
        helper.make_node("Conv", ins1, ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", group=group2),
    ]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 6, 6, 6])], inits)


@pytest.mark.parametrize("bias", [True, False])
def test_filter_of_one_layer_is_channel_of_next(rng, bias):
    a = analyze(conv_chain(rng, bias))
    s = space_of(a, "conv1")
    assert s.channels == 4 and s.prunable and s.reason is None
    expected = {("w1", "out", ((2,), None, None, None)), ("w2", "in", (None, (2,), None, None))}
    if bias:
        expected.add(("b1", "out", ((2,),)))
    assert members(a, "conv1", 2) == expected
    # The output space reaches the graph output: blocked, with the reason.
    out = space_of(a, "conv2")
    assert not out.prunable and "graph output 'y'" in out.reason.text
    assert out.reason.code is ReasonCode.GRAPH_OUTPUT and out.reason.tensor == "y"
    assert out.to_json()["reason_code"] == "graph_output"
    assert out.to_json()["reason"] == out.reason.text
    assert s.to_json()["reason"] is None and s.to_json()["reason_code"] is None
    inp = space_of(a, "input:x")
    assert not inp.prunable and "graph input" in inp.reason.text
    assert inp.reason.code is ReasonCode.GRAPH_INPUT


def test_grouped_conv_keeps_group_structure(rng):
    a = analyze(conv_chain(rng, group2=2))
    s = space_of(a, "conv1")
    assert s.partitions == (2,)
    # Channel 3 is in conv group 1 (channels 2..3): filters 3..5 of w2, position 1.
    assert ("w2", "in", ((3, 4, 5), (1,), None, None)) in members(a, "conv1", 3)
    assert space_of(a, "conv2").partitions == (2,)


def test_residual_add_unites_spaces_and_bn_stats(rng):
    c = 4
    inits = {
        "w1": rand(rng, c, 3, 3, 3), "w2": rand(rng, c, c, 3, 3), "w3": rand(rng, 5, c, 1, 1),
        "s": rand(rng, c), "b": rand(rng, c), "m": rand(rng, c),
        "v": np.abs(rand(rng, c)) + 1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="r0"),
        helper.make_node("Conv", ["ar", "w2"], ["c2"], name="branch", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "s", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Add", ["ar", "bn"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["sr"], name="r1"),
        helper.make_node("Conv", ["sr", "w3"], ["y"], name="head"),
    ]
    a = analyze(make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 5, 8, 8])], inits))
    stream = space_of(a, "stem")
    assert stream.prunable and {"stem", "branch", "bn", "add", "head"} <= set(stream.nodes)
    assert "branch" not in {s.id for s in a.spaces}  # united into the stem's space
    ms = members(a, "stem", 1)
    assert ("w2", "out", ((1,), None, None, None)) in ms  # branch filter
    assert ("w2", "in", (None, (1,), None, None)) in ms  # branch reads the stream
    assert ("m", "stat", ((1,),)) in ms and ("v", "stat", ((1,),)) in ms
    assert ("s", "out", ((1,),)) in ms and ("w3", "in", (None, (1,), None, None)) in ms
    # One residual branch, the conv+bn side, as a depth group.
    (br,) = a.branches
    assert br.add == "add" and br.layers == ("branch",) and br.prunable
    depth = [g for g in a.groups if g.kind == "depth"]
    assert {m.tensor for m in depth[0].members} == {"w2", "s", "b", "m", "v"}


def test_concat_maps_offsets_and_split_back(rng):
    inits = {"wa": rand(rng, 2, 3, 1, 1), "wb": rand(rng, 3, 3, 1, 1),
             "wc": rand(rng, 4, 5, 1, 1), "split": np.array([1, 4], dtype=np.int64),
             "wd": rand(rng, 2, 1, 1, 1), "we": rand(rng, 2, 4, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="ca"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="cb"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "wc"], ["c"], name="cc"),
        helper.make_node("Split", ["cat", "split"], ["s0", "s1"], name="split", axis=1),
        helper.make_node("Conv", ["s0", "wd"], ["d"], name="cd"),
        helper.make_node("Conv", ["s1", "we"], ["e"], name="ce"),
    ]
    m = make_model(nodes, [vi("x", [1, 3, 4, 4])],
                   [vi("c", [1, 4, 4, 4]), vi("d", [1, 2, 4, 4]), vi("e", [1, 2, 4, 4])], inits)
    a = analyze(m)
    # Channel 1 of cb sits at position 3 of the concat: column 3 of wc, column 2 of we.
    ms = members(a, "cb", 1)
    assert ("wc", "in", (None, (3,), None, None)) in ms
    assert ("we", "in", (None, (2,), None, None)) in ms
    assert ("wb", "out", ((1,), None, None, None)) in ms
    # Channel 0 of ca goes to position 0 of the concat and into the first split output.
    assert ("wd", "in", (None, (0,), None, None)) in members(a, "ca", 0)


def test_flatten_to_fc_makes_blocks_of_columns(rng):
    inits = {"w": rand(rng, 3, 1, 3, 3), "fc": rand(rng, 5, 3 * 2 * 2), "fb": rand(rng, 5)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], name="fc", transB=1),
    ]
    a = analyze(make_model(nodes, [vi("x", [1, 1, 4, 4])], [vi("y", [1, 5])], inits))
    assert ("fc", "in", (None, (4, 5, 6, 7))) in members(a, "conv", 1)


def test_depthwise_ties_input_and_output(rng):
    inits = {"w1": rand(rng, 4, 3, 1, 1), "dw": rand(rng, 8, 1, 3, 3), "w2": rand(rng, 2, 8, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="pw1"),
        helper.make_node("Conv", ["a", "dw"], ["b"], name="dw", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w2"], ["y"], name="pw2"),
    ]
    a = analyze(make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 2, 5, 5])], inits))
    # Multiplier 2: channel 1 of pw1 owns depthwise filters 2, 3 and pw2 columns 2, 3.
    ms = members(a, "pw1", 1)
    assert ("dw", "out", ((2, 3), None, None, None)) in ms
    assert ("w2", "in", (None, (2, 3), None, None)) in ms
    assert "dw" not in {s.id for s in a.spaces}


def test_squeeze_excitation_joins_the_stream(rng):
    a = analyze(models.build("syn_se"))
    stream = space_of(a, "conv1")
    assert stream.prunable
    tensors = {m[0] for m in members(a, "conv1", 0)}
    assert {"se.reduce.weight", "se.expand.weight", "se.expand.bias"} <= tensors


def test_transpose_and_matmul_with_constant_weight():
    a = analyze(models.build("syn_transpose"))
    ms = members(a, "conv1", 0)
    assert any(t == "proj.weight" and r == "in" for t, r, _ in ms)
    assert space_of(a, "proj").prunable


@pytest.mark.parametrize("name, reason", [
    ("syn_block_output", "graph output 'features'"),
    ("syn_block_layernorm", "LayerNormalization"),
    ("syn_block_reshape_split", "splits or mixes the channel axis"),
    ("syn_block_shared_weight", "shared"),
    ("syn_block_unknown_op", "(Hardmax)"),
])
def test_blocked_spaces_say_why(name, reason):
    a = analyze(models.build(name))
    blocked = [s for s in a.spaces if not s.prunable and s.reason and reason in s.reason.text]
    assert blocked, [(s.id, s.reason) for s in a.spaces]
    assert all(g.reason for g in a.groups if not g.prunable)


def test_unknown_op_is_never_elementwise(rng):
    assert "NonZero" not in RULES
    inits = {"w1": rand(rng, 4, 3, 1, 1), "w2": rand(rng, 2, 4, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Mish", ["a"], ["m"], name="mish"),  # in the table: element-wise
        helper.make_node("LpNormalization", ["m"], ["n"], name="lpn", axis=1),  # not in table
        helper.make_node("Conv", ["n", "w2"], ["y"], name="c2"),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 2, 4, 4])], inits, opset=18)
    s = space_of(analyze(model), "c1")
    assert not s.prunable and s.reason.text == "lpn (LpNormalization): no channel rule for this op"
    assert s.reason.code is ReasonCode.UNKNOWN_OP and s.reason.node == "lpn"


def flatten_by_shape(rng, x_shape) -> onnx.ModelProto:
    """conv -> Reshape(c, Concat(Shape(c)[:1], [-1])) -> MatMul: ``view(n, -1)``."""
    inits = {"w": rand(rng, 3, 1, 3, 3), "fc": rand(rng, 12, 5)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Shape", ["c"], ["shp"], name="shape", end=1),
        helper.make_node("Constant", [], ["m1"], name="m1",
                         value=helper.make_tensor("m1v", TensorProto.INT64, [1], [-1])),
        helper.make_node("Concat", ["shp", "m1"], ["tgt"], name="tgt", axis=0),
        helper.make_node("Reshape", ["c", "tgt"], ["f"], name="reshape"),
        helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc"),
    ]
    return make_model(nodes, [vi("x", x_shape)], [vi("y", [x_shape[0], 5])], inits)


def test_dynamic_shape_blocks(rng):
    model = flatten_by_shape(rng, ["N", 1, "H", "W"])  # spatial dims only known at run time
    s = space_of(analyze(model), "conv")
    assert not s.prunable and "not static" in s.reason.text


@pytest.mark.parametrize("batch", [2, "N"])
def test_shape_with_a_range_is_folded_right(rng, batch):
    """Shape(c, end=1) is the batch size alone (onnx-graphsurgeon's folding alone would fold
    the whole shape); a symbolic batch is bound for the analysis and does not block."""
    a = analyze(flatten_by_shape(rng, [batch, 1, 4, 4]))
    assert space_of(a, "conv").prunable
    assert [la.macs for la in a.layers] == [3 * 4 * 9 * (2 if batch == 2 else 1),
                                            5 * 12 * (2 if batch == 2 else 1)]


def test_static_shape_arithmetic_is_folded():
    a = analyze(models.build("syn_same_pad"))
    assert space_of(a, "conv1").prunable and space_of(a, "conv2").prunable


def test_constant_node_weights_are_named_by_their_output():
    model = models.build("syn_constant_nodes")
    const_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    a = analyze(model)
    names = {m.tensor for g in a.groups for m in g.members}
    assert names and names <= const_outputs


def test_control_flow_blocks_what_subgraphs_read(rng):
    inits = {"w1": rand(rng, 4, 3, 1, 1), "w2": rand(rng, 2, 4, 1, 1)}
    then_g = helper.make_graph([helper.make_node("Relu", ["a"], ["t"], name="then_relu")],
                               "then", [], [vi("t", [1, 4, 4, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["a"], ["e"], name="else_neg")],
                               "else", [], [vi("e", [1, 4, 4, 4])])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("If", ["cond"], ["b"], name="if", then_branch=then_g,
                         else_branch=else_g),
        helper.make_node("Conv", ["b", "w2"], ["y"], name="c2"),
    ]
    # The condition is an input: a constant one is folded away (exactly) by `prepare`.
    graph = helper.make_graph(nodes, "cf",
                              [vi("x", [1, 3, 4, 4]), vi("cond", [], TensorProto.BOOL)],
                              [vi("y", [1, 2, 4, 4])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    a = analyze(model)
    s = space_of(a, "c1")
    assert not s.prunable and "control flow" in s.reason.text
    assert any("control flow" in n for n in a.notes)


def test_resnet20_spaces_and_depth_groups():
    a = analyze(models.build("resnet20"))
    assert len(a.layers) == 22
    assert len(a.branches) == 9 and all(b.prunable and len(b.layers) == 2 for b in a.branches)
    streams = [s for s in a.spaces if s.prunable and len(s.nodes) > 8]
    assert {s.channels for s in streams} == {16, 32, 64}
    assert a.macs == sum(la.macs for la in a.layers) > 40_000_000


def test_lenet_layers_and_macs():
    a = analyze(models.build("lenet"))
    by = {la.node: la for la in a.layers}
    assert by["conv1"].macs == 20 * 24 * 24 * 25
    assert by["conv2"].macs == 50 * 8 * 8 * 20 * 25
    assert by["ip1"].macs == 800 * 500 and by["ip1"].params == 800 * 500 + 500
    assert [s.channels for s in a.spaces if s.prunable] == [20, 50, 500]


def test_alexnet_lrn_blocks_and_groups():
    a = analyze(models.build("alexnet"))
    assert "LRN" in space_of(a, "conv1").reason.text
    assert space_of(a, "conv3").prunable and space_of(a, "conv3").partitions == (2,)


def test_finer_kinds_and_json_contract(tmp_path):
    a = analyze(models.build("lenet"), kinds=["channel", "depth", "shape", "filter2d", "neuron"])
    kinds = {g.kind for g in a.groups}
    assert {"channel", "shape", "filter2d", "neuron"} <= kinds
    n_shape = sum(1 for g in a.groups if g.kind == "shape")
    assert n_shape == 1 * 5 * 5 + 20 * 5 * 5
    n_f2d = sum(1 for g in a.groups if g.kind == "filter2d")
    assert n_f2d == 20 * 1 + 50 * 20
    n_neuron = sum(1 for g in a.groups if g.kind == "neuron")
    assert n_neuron == (500 + 800) + (10 + 500)
    doc = json.loads(json.dumps(a.to_json()))
    assert set(doc) == {"model", "spaces", "groups"}
    for s in doc["spaces"]:
        assert set(s) == {"id", "channels", "prunable", "reason", "reason_code", "nodes",
                          "conv_groups",
                          "constraint"}
    for g in doc["groups"]:
        assert set(g) == {"id", "kind", "space", "index", "prunable", "reason", "reason_code",
                          "members"}
        for m in g["members"]:
            assert m["role"] in ("out", "in", "stat")
            assert all(x is None or all(isinstance(i, int) for i in x) for x in m["slice"])
    fiber = next(g for g in a.groups if g.kind == "shape")
    assert fiber.members[0].slice == (None, (0,), (0,), (0,))


def test_member_index_selects_outer_product():
    w = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    m = Member("w", "in", (None, (1, 2), (0,), (3,)))
    assert w[m.index(w.shape)].shape == (2, 2, 1, 1)
    assert w[m.index(w.shape)][1, 1, 0, 0] == w[1, 2, 0, 3]


def test_table_names_layers_and_reasons():
    text = format_table(analyze(models.build("syn_block_layernorm")))
    assert "conv1" in text and "LayerNormalization" in text and "MACs" in text
