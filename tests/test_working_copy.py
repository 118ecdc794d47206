"""The working copy speaks of the user's model: node names, member tensors and the batch.

* Node names (issue 9): unnamed nodes (``onnx.helper.make_node``'s default) and nodes that
  share a name are analysed and pruned exactly like their named twin; the pruned model
  keeps the input's names, and the generated ones (``<OpType>_<index>`` for an unnamed
  node, ``<name>_<index>`` for the second node of a name: ONNX Runtime refuses two).
* Members (issue 9): every member of the analysis handed to the user is an initializer or
  a Constant node output of the model passed in, also when the working copy unshared a
  merged constant or folded one out of a Reshape/Unsqueeze/Gather; zeroing the members by
  those names in the input makes the channels removable.
* Batch (issue 8): a symbolic batch is bound for the analysis (the same spaces and MACs per
  sample as the static twin at batch 1) and stays symbolic in the pruned model, which
  matches the input at batch 1 and 3, also where folding had hard-coded the batch size.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, make_model, rand, vi, zero_groups
from onnx import TensorProto, helper

from onnx_ssl import models, runtime
from onnx_ssl.analysis import analyze, format_table, prepare
from onnx_ssl.compiler import prune
from onnx_ssl.groups import Analysis


def input_tensors(m: onnx.ModelProto) -> set[str]:
    return ({t.name for t in m.graph.initializer}
            | {o for n in m.graph.node if n.op_type == "Constant" for o in n.output})


def member_tensors(a: Analysis) -> set[str]:
    return {mem.tensor for g in a.groups for mem in g.members}


def prunable_channels(a: Analysis) -> int:
    return sum(s.channels for s in a.spaces if s.prunable)


def channels_removed(result) -> int:
    return dict(result.report.passes)["remove-zero-channels"].channels_removed


def at_batches(ref: onnx.ModelProto, new: onnx.ModelProto, batches=(1, 3)) -> None:
    """``new`` computes what ``ref`` does at each batch size (inputs' other dims static)."""
    rs, ns = runtime.session(ref), runtime.session(new)
    rng = np.random.default_rng(0)
    for b in batches:
        feeds = {}
        for i in ref.graph.input:
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            feeds[i.name] = rng.standard_normal((b, *dims[1:])).astype(np.float32)
        want, got = runtime.run(rs, feeds), runtime.run(ns, feeds)
        for k, v in want.items():
            assert got[k].shape == v.shape, (k, b)
            tol = runtime.ATOL + runtime.RTOL * float(np.max(np.abs(v)))
            np.testing.assert_allclose(got[k], v, rtol=0, atol=tol, err_msg=f"{k} batch {b}")


# --- node names ---------------------------------------------------------------------------

NAMES = ["c1", "r1", "c2", "r2", "gap", "flat", "fc"]


def classifier(rng, naming: str, batch: int | str = 2) -> onnx.ModelProto:
    """conv(3->10) -> relu -> conv(10->12) -> relu -> GAP -> Flatten -> Gemm(12->4), with 4
    filters of the first conv and 5 of the second zeroed (weights and biases): 40% of the
    filters. ``naming``: "named", "none" (every node unnamed) or "duplicate" (two names,
    each shared by several nodes)."""
    w1, b1, w2, b2 = rand(rng, 10, 3, 3, 3), rand(rng, 10), rand(rng, 12, 10, 3, 3), rand(rng, 12)
    w1[[1, 4, 5, 8]] = b1[[1, 4, 5, 8]] = 0
    w2[[0, 3, 6, 7, 11]] = b2[[0, 3, 6, 7, 11]] = 0
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "fc.w": rand(rng, 4, 12), "fc.b": rand(rng, 4)}
    names = {"named": NAMES, "none": [""] * 7, "duplicate": ["layer", "act"] * 3 + ["layer"]}
    n = names[naming]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name=n[0], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["a1"], name=n[1]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["h2"], name=n[2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["a2"], name=n[3]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"], name=n[4]),
        helper.make_node("Flatten", ["g"], ["f"], name=n[5]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name=n[6], transB=1),
    ]
    return make_model(nodes, [vi("x", [batch, 3, 8, 8])], [vi("y", [batch, 4])], inits)


@pytest.mark.parametrize("naming", ["none", "duplicate"])
def test_unnamed_and_duplicate_nodes_are_analysed_like_named_ones(rng, naming):
    named = analyze(classifier(np.random.default_rng(0), "named"))
    a = analyze(classifier(np.random.default_rng(0), naming))
    assert [(s.channels, s.prunable) for s in a.spaces] == [
        (s.channels, s.prunable) for s in named.spaces]
    assert [(la.op_type, la.weight_shape, la.macs) for la in a.layers] == [
        (la.op_type, la.weight_shape, la.macs) for la in named.layers]
    ids = [s.id for s in a.spaces]
    assert len(set(ids)) == len(ids)
    if naming == "none":  # <OpType>_<position in the input>
        assert ids == ["input:x", "Conv_0", "Conv_2", "Gemm_6"]
    else:  # the first node with a name keeps it, the others get <name>_<position>
        assert ids == ["input:x", "layer", "layer_2", "layer_6"]


@pytest.mark.parametrize("naming", ["none", "duplicate"])
def test_unnamed_and_duplicate_nodes_are_pruned_like_named_ones(naming):
    named = prune(classifier(np.random.default_rng(0), "named"), verify=2)
    model = classifier(np.random.default_rng(0), naming)
    result = prune(model, verify=2)
    # ONNX Runtime does not load the input with duplicate names; its named twin computes it.
    assert_same_outputs(classifier(np.random.default_rng(0), "named"), result.model)
    assert channels_removed(result) == channels_removed(named) == 9
    r, n = result.report, named.report
    assert (r.macs_before, r.macs_after) == (n.macs_before, n.macs_after)
    assert r.macs_after < 0.45 * r.macs_before  # both convs and the FC lose 40% of channels
    # The report pairs each layer with itself: filters and channels per layer as named.
    assert [(s.op, s.filters_before, s.filters_after, s.channels_before, s.channels_after)
            for s in r.layers] == [
        (s.op, s.filters_before, s.filters_after, s.channels_before, s.channels_after)
        for s in n.layers] == [("Conv", 10, 6, 3, 3), ("Conv", 12, 7, 10, 6),
                               ("Gemm", 4, 4, 12, 7)]
    out = [nd.name for nd in result.model.graph.node]
    if naming == "none":  # generated names, kept: the report's layer names find their nodes
        assert out == ["Conv_0", "Relu_1", "Conv_2", "Relu_3", "GlobalAveragePool_4",
                       "Flatten_5", "Gemm_6"]
        assert [s.node for s in r.layers] == ["Conv_0", "Conv_2", "Gemm_6"]
    else:  # the input's names, where they were unique
        assert out == ["layer", "act", "layer_2", "act_3", "layer_4", "act_5", "layer_6"]
    # Pruning again changes nothing.
    assert not prune(result.model, verify=1).report.modified


def test_named_nodes_keep_their_names_and_generated_ones_avoid_clashes(rng):
    """An unnamed node's generated name must not take a name another node has."""
    inits = {"w": rand(rng, 4, 3, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="Relu_1"),
             helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y", [1, 4, 2, 2])], inits)
    assert [n.name for n in prepare(model).graph.node] == ["Relu_1", "Relu_1_2"]
    assert [n.name for n in prune(model, verify=1).model.graph.node] == ["Relu_1", "Relu_1_2"]


# --- members name tensors of the input -----------------------------------------------------


@pytest.mark.parametrize("name", models.names())
def test_members_of_builtin_models_are_tensors_of_the_input(name):
    m = models.build(name)
    a = analyze(m)
    assert member_tensors(a) <= input_tensors(m)
    assert {la.weight for la in a.layers} <= input_tensors(m)


def shared_bias_and_unsqueezed_slope(rng) -> onnx.ModelProto:
    """Two convs reading one merged zero bias (the dynamo exporter's optimiser merges equal
    initializers), and a PReLU whose slope is Unsqueeze(slope, [1, 2]) (as TorchScript
    without constant folding exports it)."""
    inits = {"w1": rand(rng, 6, 3, 3, 3), "w2": rand(rng, 6, 6, 3, 3), "zero": np.zeros(6),
             "slope": rand(rng, 6), "axes": np.array([1, 2], dtype=np.int64),
             "w3": rand(rng, 2, 6, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "zero"], ["h1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Unsqueeze", ["slope", "axes"], ["slope3"], name="unsq"),
        helper.make_node("PRelu", ["h1", "slope3"], ["a1"], name="prelu"),
        helper.make_node("Conv", ["a1", "w2", "zero"], ["h2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["a2"], name="r2"),
        helper.make_node("Conv", ["a2", "w3"], ["y"], name="c3"),
    ]
    return make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, 2, 6, 6])], inits)


def test_unshared_and_folded_members_name_the_input_tensors(rng):
    m = shared_bias_and_unsqueezed_slope(rng)
    a = analyze(m)
    assert member_tensors(a) <= input_tensors(m)
    g = next(g for g in a.groups if g.space == "c1" and g.index == 4)
    assert {(x.tensor, x.role, x.slice) for x in g.members} == {
        ("w1", "out", ((4,), None, None, None)), ("zero", "out", ((4,),)),
        ("slope", "out", ((4,),)), ("w2", "in", (None, (4,), None, None))}
    g = next(g for g in a.groups if g.space == "c2" and g.index == 1)
    assert ("zero", "out", ((1,),)) in {(x.tensor, x.role, x.slice) for x in g.members}
    # The working copy itself has a copy of the bias and the folded slope.
    p = prepare(m)
    assert {"zero.1", "slope3"} <= {t.name for t in p.graph.initializer}
    # Zeroing the groups by the names the analysis gives, in the input itself, prunes them.
    chosen = [g for g in a.groups if g.prunable and g.index in (1, 4)]
    zeroed = zero_groups(m, chosen)
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model)
    assert channels_removed(result) == 4


def test_one_input_tensor_reached_through_two_copies_is_listed_once(rng):
    """Both readers of a merged bias in one space (a residual Add joins them): the group lists
    the bias once per distinct slice."""
    inits = {"w1": rand(rng, 4, 3, 1, 1), "w2": rand(rng, 4, 3, 1, 1), "b": rand(rng, 4),
             "w3": rand(rng, 2, 4, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b"], ["p"], name="c1"),
        helper.make_node("Conv", ["x", "w2", "b"], ["q"], name="c2"),
        helper.make_node("Add", ["p", "q"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "w3"], ["y"], name="c3"),
    ]
    m = make_model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y", [1, 2, 2, 2])], inits)
    g = next(g for g in analyze(m).groups if g.space == "c1" and g.index == 2)
    assert sorted((x.tensor, x.slice) for x in g.members) == [
        ("b", ((2,),)), ("w1", ((2,), None, None, None)), ("w2", ((2,), None, None, None)),
        ("w3", (None, (2,), None, None))]


def test_member_folded_by_arithmetic_blocks_its_space(rng):
    """A per-channel scale computed from two constants (Mul folded) is no slice of an input
    tensor: its space is blocked, with the reason, and no member names a working tensor."""
    inits = {"w1": rand(rng, 4, 3, 1, 1), "s": rand(rng, 1, 4, 1, 1), "two": np.array(2.0),
             "w2": rand(rng, 2, 4, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="c1"),
        helper.make_node("Mul", ["s", "two"], ["s2"], name="double"),
        helper.make_node("Mul", ["h", "s2"], ["hs"], name="scale"),
        helper.make_node("Conv", ["hs", "w2"], ["y"], name="c2"),
    ]
    m = make_model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y", [1, 2, 2, 2])], inits)
    a = analyze(m)
    s = next(s for s in a.spaces if s.id == "c1")
    assert not s.prunable and s.reason.startswith("weight s2 is computed from s, two by "
                                                  "arithmetic")
    assert member_tensors(a) <= input_tensors(m)
    # The prune passes work on the working copy and still prune it.
    z = zero_groups(prepare(m), [g for g in analyze(prepare(m), prepared=True).groups
                                 if g.space == "c1" and g.index == 0])
    assert channels_removed(prune(z, verify=1)) == 1


def test_json_members_are_tensors_of_the_input(rng):
    m = shared_bias_and_unsqueezed_slope(rng)
    doc = analyze(m).to_json()
    assert {mem["tensor"] for g in doc["groups"] for mem in g["members"]} <= input_tensors(m)


# --- a symbolic batch ----------------------------------------------------------------------


def test_symbolic_batch_is_analysed_like_batch_one():
    dyn, one = (analyze(classifier(np.random.default_rng(0), "named", batch=b))
                for b in ("N", 1))
    assert [(s.channels, s.prunable) for s in dyn.spaces] == [
        (s.channels, s.prunable) for s in one.spaces]
    assert [la.macs for la in dyn.layers] == [la.macs for la in one.layers]
    assert dyn.macs > 0 and dyn.macs_per_sample and not one.macs_per_sample
    text = format_table(dyn)
    assert f"MACs {format_table(one).split('MACs ')[1].split(')')[0]}) per sample" in text
    assert "binds it to 1" in text


def view_n_minus_1(rng, target: str) -> onnx.ModelProto:
    """conv -> relu -> Reshape(h, Concat(Shape(h)[:1], REST)) -> Gemm, batch "N": folding at a
    bound batch hard-codes it in the target. ``target``: "-1" (``view(n, -1)``) or "static"
    (``view(n, 24)``)."""
    rest = [-1] if target == "-1" else [24]
    inits = {"w": rand(rng, 6, 3, 3, 3), "b": rand(rng, 6), "fc.w": rand(rng, 24, 5),
             "rest": np.array(rest, dtype=np.int64)}
    inits["w"][[1, 4]] = inits["b"][[1, 4]] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Shape", ["a"], ["n"], name="shape", end=1),
        helper.make_node("Concat", ["n", "rest"], ["tgt"], name="tgt", axis=0),
        helper.make_node("Reshape", ["a", "tgt"], ["f"], name="view"),
        helper.make_node("MatMul", ["f", "fc.w"], ["y"], name="fc"),
    ]
    return make_model(nodes, [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 5])], inits)


@pytest.mark.parametrize("target", ["-1", "static"])
def test_pruned_model_keeps_a_symbolic_batch(rng, target):
    m = view_n_minus_1(rng, target)
    a = analyze(m)
    assert next(s for s in a.spaces if s.id == "conv").prunable
    result = prune(m, verify=2)  # checked at runtime.DYNAMIC_BATCH
    assert channels_removed(result) == 2
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N"
    assert result.model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    at_batches(m, result.model)
    assert result.report.macs_after == result.report.macs_before * 4 // 6
    # The model prepare returns keeps it too, and analyses the same.
    p = prepare(m)
    assert p.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    at_batches(m, p)
    assert prunable_channels(analyze(p, prepared=True)) == prunable_channels(a)
    assert not prune(result.model, verify=1).report.modified


def test_batch_sized_constant_keeps_the_batch_symbolic(rng):
    """A float constant of the batch's size (ConstantOfShape(Shape(x)[:1])) cannot be written
    back batch-agnostic: the analysis leaves the batch symbolic and says why."""
    inits = {"w": rand(rng, 4, 3, 1, 1), "w2": rand(rng, 2, 4, 1, 1)}
    nodes = [
        helper.make_node("Shape", ["x"], ["n"], name="shape", end=1),
        helper.make_node("ConstantOfShape", ["n"], ["ones"], name="ones",
                         value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
        helper.make_node("Conv", ["h", "w2"], ["c2"], name="conv2"),
        helper.make_node("ReduceMean", ["c2"], ["r"], name="mean", keepdims=0,
                         axes=[1, 2, 3]),
        helper.make_node("Mul", ["r", "ones"], ["y"], name="mul"),
    ]
    m = make_model(nodes, [vi("x", ["N", 3, 2, 2])], [vi("y", ["N"])], inits, opset=15)
    a = analyze(m)
    assert any("stays symbolic" in n and "computed from the batch size" in n
               for n in a.notes), a.notes
    assert not a.macs_per_sample
    result = prune(m, verify=2)
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    at_batches(m, result.model)
