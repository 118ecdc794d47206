"""Attention heads as groups (onnx_ssl.heads) and their exact removal (RemoveHeadsPass).

The property on every exported transformer (both exporters, static and dynamic batch,
folded or not): zero some heads' members by the names the analysis gives, prune, and the
outputs are the same while the heads are gone. A hand-built decoder attention covers what
the exports here do not: grouped-query attention (K/V heads repeated by an Expand) with
rotary embeddings (Slice, Neg, Concat within a head), and the V-bias fold.
"""

from __future__ import annotations

import exported as X
import numpy as np
import onnx
import pytest
from helpers import arrays, assert_same_outputs, with_arrays, zero_groups
from onnx import TensorProto, helper, numpy_helper
from test_exported import model

from onnx_ssl import runtime
from onnx_ssl.analysis import analyze
from onnx_ssl.compiler import prune
from onnx_ssl.groups import Group

# Heads per network (layers x heads): all prunable.
HEADS = {"hf_vit": 8, "hf_bert": 2, "hf_gpt2": 8}
CASES = [c for c in X.cases() if c[0] in HEADS]


def _id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"




def heads_of(m: onnx.ModelProto) -> list[Group]:
    return [g for g in analyze(m).groups if g.kind == "head"]


def choose(groups: list[Group], seed: int) -> list[Group]:
    """About half of each attention's heads, never all of one."""
    rng = np.random.default_rng(seed)
    by_node: dict[str | None, list[Group]] = {}
    for g in groups:
        by_node.setdefault(g.node, []).append(g)
    out: list[Group] = []
    for gs_ in by_node.values():
        k = max(1, len(gs_) // 2)
        out += [gs_[i] for i in sorted(rng.choice(len(gs_), size=k, replace=False))]
    return out


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_every_head_is_a_prunable_group_with_members_of_the_input(case: tuple[str, str]
                                                                  ) -> None:
    m = model(*case)
    groups = heads_of(m)
    assert len(groups) == HEADS[case[0]]
    assert all(g.prunable and g.reason is None for g in groups)
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    for g in groups:
        roles = sorted(x.role for x in g.members)
        assert roles.count("in") == 1, g.id  # the output projection's rows
        for x in g.members:
            assert x.tensor in inits, (g.id, x.tensor)
            x.index(inits[x.tensor])  # a valid slice of that tensor
    # The units split each projection's channels: every head has as many as the others.
    sizes = {len(g.members[0].slice[1] or g.members[0].slice[0] or ()) for g in groups}
    assert len(sizes) == 1


@pytest.mark.parametrize("side", ["both", "in"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_zeroed_heads_are_pruned_exactly(case: tuple[str, str], side: str) -> None:
    m = model(*case)
    groups = heads_of(m)
    chosen = choose(groups, seed=len(case[1]) + (side == "in"))
    zeroed = zero_groups(m, chosen, side)
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=7)
    report = dict(result.report.passes)["remove-heads"]
    assert report.heads_removed == len(chosen)
    assert len(heads_of(result.model)) == len(groups) - len(chosen)
    assert result.report.macs_after < result.report.macs_before
    if case[1] in X.DYNAMIC_BATCH:
        x0 = result.model.graph.input[0]
        assert x0.type.tensor_type.shape.dim[0].dim_param
        ref, new = runtime.session(zeroed), runtime.session(result.model)
        rng = np.random.default_rng(0)
        for batch in (1, 3):
            feeds = {}
            for i in m.graph.input:
                shape = (batch, *(d.dim_value for d in i.type.tensor_type.shape.dim[1:]))
                kind = i.type.tensor_type.elem_type
                feeds[i.name] = (rng.standard_normal(shape).astype(np.float32)
                                 if kind == TensorProto.FLOAT
                                 else rng.integers(0, 8, shape).astype(np.int64))
            want, got = runtime.run(ref, feeds), runtime.run(new, feeds)
            for k, v in want.items():
                np.testing.assert_allclose(got[k], v, rtol=0,
                                           atol=1e-6 + 1e-5 * float(np.max(np.abs(v))))
    # Nothing left to do the second time.
    assert prune(result.model, verify=1).report.modified is False


# --- a hand-built decoder attention: grouped-query, rotary, biases ------------------------

B, T, C, HQ, HKV, D = 2, 5, 16, 4, 2, 4


def gqa_model(seed: int = 0, bias: bool = True, mask_input: bool = False,
              dynamic: bool = False) -> onnx.ModelProto:
    """x -> attention with 4 Q heads over 2 K/V heads (repeat_kv as the transformers export
    writes it: Unsqueeze, Expand, Reshape) and rotary embeddings on Q and K -> + x. With
    ``mask_input``, an additive mask [B, 1, 1, T] is a second graph input; with ``dynamic``,
    the batch is symbolic (targets copy it with 0, the Expand broadcasts it)."""
    nb = 0 if dynamic else B
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, v: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(v), name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def proj(x: str, name: str, cout: int) -> str:
        y = node("MatMul", [x, const(f"W{name}", rng.standard_normal((C, cout)) * 0.3)],
                 f"{name}_mm")
        if bias:
            y = node("Add", [y, const(f"b{name}", rng.standard_normal(cout) * 0.3)],
                     f"{name}_b")
        return y

    def split_heads(y: str, name: str, h: int) -> str:
        r = node("Reshape", [y, const(f"{name}_shape", np.array([nb, T, h, D]))],
                 f"{name}_heads")
        return node("Transpose", [r], f"{name}_t", perm=[0, 2, 1, 3])

    pos = np.arange(T)[:, None] * (1.0 / 10 ** (np.arange(D // 2) / (D // 2)))[None]
    cos = const("cos", np.concatenate([np.cos(pos)] * 2, axis=1).astype(np.float32))
    sin = const("sin", np.concatenate([np.sin(pos)] * 2, axis=1).astype(np.float32))

    def rope(t: str, name: str) -> str:
        half = D // 2
        a = node("Slice", [t, const(f"{name}_s0", np.array([0])),
                           const(f"{name}_e0", np.array([half])),
                           const(f"{name}_a0", np.array([3]))], f"{name}_x1")
        b = node("Slice", [t, const(f"{name}_s1", np.array([half])),
                           const(f"{name}_e1", np.array([D])),
                           const(f"{name}_a1", np.array([3]))], f"{name}_x2")
        rot = node("Concat", [node("Neg", [b], f"{name}_neg"), a], f"{name}_rot", axis=3)
        return node("Add", [node("Mul", [t, cos], f"{name}_cos"),
                            node("Mul", [rot, sin], f"{name}_sin")], f"{name}_rope")

    def repeat_kv(t: str, name: str) -> str:
        u = node("Unsqueeze", [t, const(f"{name}_ax", np.array([2]))], f"{name}_u")
        shape = np.array([1 if dynamic else B, HKV, HQ // HKV, T, D])
        e = node("Expand", [u, const(f"{name}_exp", shape)], f"{name}_e")
        return node("Reshape", [e, const(f"{name}_rs", np.array([nb, HQ, T, D]))],
                    f"{name}_rep")

    # The residual stream (made by a node, as in a real network) and its pre-norm.
    x = node("Mul", ["x", const("gain", np.array(1.5, dtype=np.float32))], "stream")
    h = node("LayerNormalization", [x, const("ln_w", np.ones(C)), const("ln_b", np.zeros(C))],
             "ln", axis=-1)
    q = rope(split_heads(proj(h, "q", HQ * D), "q", HQ), "q")
    k = repeat_kv(rope(split_heads(proj(h, "k", HKV * D), "k", HKV), "k"), "k")
    v = repeat_kv(split_heads(proj(h, "v", HKV * D), "v", HKV), "v")
    kt = node("Transpose", [k], "kT", perm=[0, 1, 3, 2])
    s = node("MatMul", [q, kt], "scores")
    s = node("Mul", [s, const("scale", np.array(D ** -0.5, dtype=np.float32))], "scaled")
    causal = np.triu(np.full((T, T), -1e9, dtype=np.float32), 1)[None, None]
    s = node("Add", [s, const("causal", causal)], "masked")
    if mask_input:
        s = node("Add", [s, "mask"], "padded")
    p = node("Softmax", [s], "probs", axis=-1)
    o = node("MatMul", [p, v], "ctx")
    o = node("Transpose", [o], "ctx_t", perm=[0, 2, 1, 3])
    o = node("Reshape", [o, const("merge", np.array([nb, T, HQ * D]))], "ctx_m")
    y = proj(o, "o", C)
    node("Add", [y, x], "y")
    for t in inits:
        if t.data_type == TensorProto.DOUBLE:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32),
                                               t.name))
    batch: int | str = "batch" if dynamic else B
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, T, C])]
    if mask_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B, 1, 1, T]))
    graph = helper.make_graph(
        nodes, "gqa", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, T, C])],
        inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def test_grouped_query_heads_are_units_of_a_kv_head_and_its_q_heads() -> None:
    groups = heads_of(gqa_model())
    assert len(groups) == HKV
    g = groups[1]
    cols = {x.tensor: x.slice for x in g.members}
    # K/V head 1 and Q heads 2 and 3 (with their rotary halves), output rows 8..15.
    assert cols["Wq"] == (None, tuple(range(8, 16)))
    assert cols["Wk"] == (None, tuple(range(4, 8)))
    assert cols["Wv"] == (None, tuple(range(4, 8)))
    assert cols["Wo"] == (tuple(range(8, 16)), None)
    assert cols["bq"] == (tuple(range(8, 16)),)


@pytest.mark.parametrize("side", ["both", "in"])
def test_grouped_query_heads_prune_exactly(side: str) -> None:
    m = gqa_model()
    groups = heads_of(m)
    zeroed = zero_groups(m, groups[:1], side)
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=3)
    assert dict(result.report.passes)["remove-heads"].heads_removed == 1
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert shapes["Wq"] == (C, 8) and shapes["Wk"] == (C, 4) and shapes["Wo"] == (8, C)


def test_a_head_with_a_zero_v_slice_folds_its_v_bias_into_the_output_bias() -> None:
    """V weight rows zero, V bias not: the head outputs its V bias at every position (the
    softmax's weights sum to one), a constant that goes into the output projection's bias."""
    m = gqa_model(seed=1)
    g = heads_of(m)[0]
    arrs = arrays(m)
    wv = next(x for x in g.members if x.tensor == "Wv")
    arrs["Wv"][wv.index(arrs["Wv"].shape)] = 0
    zeroed = with_arrays(m, arrs)
    result = prune(zeroed, verify=2)
    report = dict(result.report.passes)["remove-heads"]
    assert (report.heads_removed, report.biases_folded) == (1, 1)
    assert_same_outputs(zeroed, result.model, seed=4)
    bo = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}["bo"]
    assert not np.allclose(bo, arrs["bo"])  # the constant went into the bias


def test_a_head_whose_only_zero_part_is_q_and_k_stays() -> None:
    """Zero Q and K rows make the attention uniform, not zero: the head still averages V."""
    m = gqa_model(seed=2)
    g = heads_of(m)[0]
    part = Group(g.id, g.kind, g.space, g.index, g.prunable, g.reason,
                 tuple(x for x in g.members if x.tensor in ("Wq", "bq", "Wk", "bk")), g.node)
    result = prune(zero_groups(m, [part], "both"), verify=2)
    assert dict(result.report.passes)["remove-heads"].heads_removed == 0


def test_an_attention_that_reads_a_mask_input_is_a_residual_branch_that_collapses() -> None:
    """The branch reads a second graph input (the padding mask) besides its fork: it is still
    a depth group, and with its output projection zeroed it collapses into its bias."""
    m = gqa_model(seed=3, mask_input=True)
    a = analyze(m)
    depth = [g for g in a.groups if g.kind == "depth"]
    assert len(depth) == 1 and depth[0].prunable
    assert len([g for g in a.groups if g.kind == "head"]) == HKV
    zeroed = zero_groups(m, heads_of(m), "in")  # every head's output rows: Wo is zero
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=5)
    assert dict(result.report.passes)["collapse-residual"].branches_removed
    assert not any(n.op_type == "MatMul" for n in result.model.graph.node)


@pytest.mark.parametrize("which", ["gqa", "hf_gpt2-ts", "hf_vit-dynamo"])
def test_the_head_penalty_has_one_group_per_head_with_its_members(which: str) -> None:
    """``--lambda-head``: one coupled term per attention whose group norms are the head
    groups' norms (Q, K and V rows of a fused projection are three runs of one tensor)."""
    from onnx_ssl.norms import group_norm
    from onnx_ssl.training.penalty import Lambdas, build_penalty

    m = gqa_model() if which == "gqa" else model(*which.split("-"))
    a = analyze(m)
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    rng = np.random.default_rng(0)
    values = {k: v + rng.standard_normal(v.shape) if v.dtype.kind == "f" else v
              for k, v in values.items()}  # no zero biases: every member counts
    pen = build_penalty(a, Lambdas(head=1e-3), {k: v.shape for k, v in values.items()})
    terms = [t for t in pen.terms if t.structure == "head"]
    heads = [g for g in a.groups if g.kind == "head"]
    assert sum(t.groups for t in terms) == len(heads)
    for t in terms:
        mine = sorted((g for g in heads if g.node == t.label), key=lambda g: g.index or 0)
        np.testing.assert_allclose(pen.norms(t, values),
                                   [group_norm(g, values) for g in mine], rtol=1e-12)


def test_a_mac_budget_takes_heads_and_lands_on_bert() -> None:
    """The one-shot budget ranks heads with channels and branches: BERT's attention holds
    most of its MACs, so without heads 0.5 could not be met within 2 points (43.9%)."""
    m = model("hf_bert", "ts")
    result = prune(m, target_macs=0.5, verify=1)
    rep = result.report
    assert 0.48 * rep.macs_before <= rep.macs_after <= 0.5 * rep.macs_before
    zero = dict(rep.passes)["zero-groups-to-budget"]
    assert dict(zero.by_kind).get("head", 0) >= 1
    assert dict(rep.passes)["remove-heads"].heads_removed == dict(zero.by_kind)["head"]


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_the_budget_scores_heads_with_both_importances(importance: str) -> None:
    m = gqa_model(seed=4)
    heads = heads_of(m)
    # Head 0's output rows scaled down: the least important unit by either score.
    arrs = arrays(m)
    wo = next(x for x in heads[0].members if x.tensor == "Wo")
    arrs["Wo"][wo.index(arrs["Wo"].shape)] *= 0.01
    small = with_arrays(m, arrs)
    calib = {"x": np.random.default_rng(0).standard_normal((8, T, C)).astype(np.float32)[:B]}
    result = prune(small, target_macs=0.8, importance=importance,
                   calib=calib if importance == "activation" else None, verify=1)
    zero = dict(result.report.passes)["zero-groups-to-budget"]
    assert zero.zeroed == (heads[0].id,)
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert shapes["Wq"] == (C, 8) and shapes["Wo"] == (8, C)


def test_a_model_after_the_ort_transformers_optimizer_prunes_heads_and_mlp(tmp_path) -> None:
    """Deployment toolchains hand in models that ONNX Runtime's transformers optimizer
    rewrote: com.microsoft SkipLayerNormalization and BiasGelu around the attention. Their
    shapes are inferred, the BiasGelu's bias is sliced with the MLP channels, and heads and
    channels prune exactly. (On transformers 5 exports the optimizer leaves the attention
    itself unfused.)"""
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:  # the [export] extra brings what it imports
        pytest.skip(f"onnxruntime.transformers.optimizer does not import: {e}")
    src = tmp_path / "bert.onnx"
    onnx.save(model("hf_bert", "ts"), str(src))
    try:
        optimize_model(str(src), model_type="bert", num_heads=2, hidden_size=32,
                       opt_level=0).save_model_to_file(str(tmp_path / "opt.onnx"))
    except ImportError as e:  # newer runtimes' optimizer also wants sympy
        pytest.skip(f"onnxruntime.transformers.optimizer needs a package: {e}")
    m = onnx.load(str(tmp_path / "opt.onnx"))
    domains = {(n.domain, n.op_type) for n in m.graph.node}
    assert ("com.microsoft", "SkipLayerNormalization") in domains
    assert ("com.microsoft", "BiasGelu") in domains
    a = analyze(m)
    assert a.macs == analyze(model("hf_bert", "ts")).macs  # static: shapes got through
    heads = [g for g in a.groups if g.kind == "head"]
    mlp = [g for g in a.groups if g.kind == "channel" and g.prunable]
    assert len(heads) == 2 and all(g.prunable for g in heads) and len(mlp) == 48
    zeroed = zero_groups(m, [heads[1], *mlp[::3]], "both")
    result = prune(zeroed, verify=2)
    assert_same_outputs(zeroed, result.model, seed=2)
    passes = dict(result.report.passes)
    assert passes["remove-heads"].heads_removed == 1
    assert passes["remove-zero-channels"].channels_removed == len(mlp[::3])


def fused_attention_model(seed: int = 0, mask: bool = False) -> onnx.ModelProto:
    """x -> com.microsoft Attention (packed Q/K/V weight, 4 heads) -> output projection ->
    + x: what ONNX Runtime's transformers optimizer writes for an encoder's attention."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((C, 3 * C)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(3 * C) * 0.3).astype(np.float32)
    wo = (rng.standard_normal((C, C)) * 0.3).astype(np.float32)
    bo = (rng.standard_normal(C) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for v, n in ((w, "Wqkv"), (b, "bqkv"),
                                                         (wo, "Wo"), (bo, "bo"))]
    ins = ["x", "Wqkv", "bqkv"] + (["mask"] if mask else [])
    nodes = [helper.make_node("Attention", ins, ["ctx"], name="attn", domain="com.microsoft",
                              num_heads=HQ),
             helper.make_node("MatMul", ["ctx", "Wo"], ["o"], name="o_mm"),
             helper.make_node("Add", ["o", "bo"], ["ob"], name="o_b"),
             helper.make_node("Add", ["ob", "x"], ["y"], name="res")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", T, C])]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, ["batch", T]))
    graph = helper.make_graph(
        nodes, "fused", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", T, C])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m


@pytest.mark.parametrize("mask", [False, True])
def test_heads_of_a_fused_com_microsoft_attention_prune_exactly(mask: bool) -> None:
    m = fused_attention_model(mask=mask)
    heads = heads_of(m)
    assert len(heads) == HQ and all(g.prunable for g in heads)
    cols = {x.tensor: x.slice for x in heads[1].members}
    d = C // HQ  # head 1: its columns of Q, K and V in the packed weight, its rows of Wo
    assert cols["Wqkv"] == (None, (*range(d, 2 * d), *range(C + d, C + 2 * d),
                                   *range(2 * C + d, 2 * C + 2 * d)))
    assert cols["Wo"] == (tuple(range(d, 2 * d)), None)
    # Head 1 entirely zero; head 2 with only its V columns zero (its V bias is folded).
    arrs = arrays(m)
    for x in heads[1].members:
        arrs[x.tensor][x.index(arrs[x.tensor].shape)] = 0
    arrs["Wqkv"][:, 2 * C + 2 * d:2 * C + 3 * d] = 0
    zeroed = with_arrays(m, arrs)
    result = prune(zeroed, verify=2)
    report = dict(result.report.passes)["remove-heads"]
    assert (report.heads_removed, report.biases_folded) == (2, 1)
    node = next(n for n in result.model.graph.node if n.op_type == "Attention")
    assert helper.get_attribute_value(next(a for a in node.attribute
                                           if a.name == "num_heads")) == HQ - 2
    ref, new = runtime.session(zeroed), runtime.session(result.model)
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        feeds = {"x": rng.standard_normal((batch, T, C)).astype(np.float32)}
        if mask:
            feeds["mask"] = np.ones((batch, T), dtype=np.int32)
            feeds["mask"][0, -2:] = 0
        want, got = runtime.run(ref, feeds), runtime.run(new, feeds)
        np.testing.assert_allclose(got["y"], want["y"], rtol=0,
                                   atol=1e-6 + 1e-5 * float(np.abs(want["y"]).max()))


@pytest.mark.parametrize("which", ["llama_mask-ts_dyn", "qwen2-dynamo_dyn"])
def test_grouped_query_decoders_from_transformers_prune_heads_and_blocks(which: str) -> None:
    """LLaMA and Qwen2 (2 layers, 4 Q heads over 2 K/V heads, rotary embeddings, RMSNorm),
    exported as benchmarks/bench_transformers.py exports them: every K/V unit is a head group,
    every attention and MLP branch a depth group (the folded rotary tables the TorchScript
    export leaves in a branch are no parameter of it), and both prune exactly."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_transformers as bt

    name, exporter = which.split("-")
    m = bt.export(bt.SPECS[name], exporter)
    a = analyze(m)
    heads = [g for g in a.groups if g.kind == "head"]
    depth = [g for g in a.groups if g.kind == "depth"]
    assert len(heads) == 4 and all(g.prunable for g in heads)
    assert len(depth) == 4 and all(g.prunable for g in depth), [g.reason for g in depth]
    # One K/V unit of layer 0 by its output rows; layer 1's attention branch entirely.
    layer1 = [g for g in heads if g.node != heads[0].node]
    zeroed = zero_groups(m, [heads[0]], "in")
    zeroed = zero_groups(zeroed, layer1, "in")
    result = prune(zeroed, verify=2)
    passes = dict(result.report.passes)
    assert passes["remove-heads"].heads_removed == 1
    assert len(passes["collapse-residual"].branches_removed) == 1
    assert_same_outputs(zeroed, result.model, seed=1)
    x0 = result.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert x0.dim_param  # the batch stays dynamic


def fused_mha_model(seed: int = 0, packed_bias: bool = True) -> onnx.ModelProto:
    """x -> Q, K, V projections -> com.microsoft MultiHeadAttention (4 heads; the Q/K/V
    biases packed into its bias input, as the optimizer writes them) -> output projection."""
    rng = np.random.default_rng(seed)

    def arr(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    inits = [numpy_helper.from_array(v, n) for v, n in (
        (arr(C, C), "Wq"), (arr(C, C), "Wk"), (arr(C, C), "Wv"), (arr(3 * C), "bqkv"),
        (arr(C, C), "Wo"), (arr(C), "bo"))]
    nodes = [helper.make_node("MatMul", ["x", f"W{r}"], [r], name=f"{r}_mm") for r in "qkv"]
    ins = ["q", "k", "v"] + (["bqkv"] if packed_bias else [])
    nodes += [helper.make_node("MultiHeadAttention", ins, ["ctx"], name="mha",
                               domain="com.microsoft", num_heads=HQ),
              helper.make_node("MatMul", ["ctx", "Wo"], ["o"], name="o_mm"),
              helper.make_node("Add", ["o", "bo"], ["y"], name="o_b")]
    graph = helper.make_graph(
        nodes, "mha", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", T, C])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", T, C])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m


def test_heads_of_a_fused_multi_head_attention_prune_exactly() -> None:
    m = fused_mha_model()
    heads = heads_of(m)
    assert len(heads) == HQ and all(g.prunable for g in heads)
    d = C // HQ
    arrs = arrays(m)
    arrs["Wo"][d:2 * d] = 0  # head 1: nothing reaches the output
    arrs["Wv"][:, 2 * d:3 * d] = 0  # head 2: V weight zero, but its packed V bias is not
    zeroed = with_arrays(m, arrs)
    result = prune(zeroed, verify=2)
    assert dict(result.report.passes)["remove-heads"].heads_removed == 1  # head 2 stays
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert shapes["Wq"] == (C, C - d) and shapes["bqkv"] == (3 * (C - d),)
    ref, new = runtime.session(zeroed), runtime.session(result.model)
    feeds = {"x": np.random.default_rng(2).standard_normal((3, T, C)).astype(np.float32)}
    want, got = runtime.run(ref, feeds), runtime.run(new, feeds)
    np.testing.assert_allclose(got["y"], want["y"], rtol=0,
                               atol=1e-6 + 1e-5 * float(np.abs(want["y"]).max()))


def test_a_zero_v_slice_behind_an_unrecognised_constant_keeps_the_head() -> None:
    """V's bias as a [1, 1, C] constant: not the projection's own bias vector, so a zero V
    weight slice proves nothing about the head's output, and the head stays."""
    m = gqa_model(seed=5)
    arrs = arrays(m)
    arrs["bv"] = arrs["bv"].reshape(1, 1, -1)
    m = with_arrays(m, arrs)
    g = heads_of(m)[0]
    wv = next(x for x in g.members if x.tensor == "Wv")
    arrs["Wv"][wv.index(arrs["Wv"].shape)] = 0
    zeroed = with_arrays(m, arrs)
    result = prune(zeroed, verify=2)
    assert dict(result.report.passes)["remove-heads"].heads_removed == 0
    assert_same_outputs(zeroed, result.model, seed=6)
