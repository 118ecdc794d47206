"""The group-Lasso term: the ONNX loss graph, its gradient and the numpy versions against a
group-by-group reference; the proximal step; the artifacts ONNX Runtime loads."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from penalty_oracle import reference_groups, reference_value_and_grad
from test_training_helpers import tiny_cnn

from onnx_ssl import analysis, models
from onnx_ssl.errors import UnsupportedModelError
from onnx_ssl.training import _ort
from onnx_ssl.training.artifacts import build_artifacts
from onnx_ssl.training.penalty import (
    STRUCTURES,
    Lambdas,
    Penalty,
    build_penalty,
)
from onnx_ssl.training.spec import OUT_PENALTY, PENALTY_SCALE, ArtifactOptions, load_artifacts

ALL = Lambdas(
    filter=0.011,
    channel=0.023,
    shape=0.031,
    filter2d=0.043,
    neuron=0.052,
    depth=0.061,
    coupled=0.073,
)
KINDS = ("channel", "depth", "shape", "filter2d", "neuron")


def _analysis(model: onnx.ModelProto) -> analysis.Analysis:
    return analysis.analyze(analysis.prepare(model), kinds=KINDS, prepared=True)


def _step(module, state, art, feeds, scale, names):
    """One forward/backward; returns (outputs, gradients of the trainable parameters)."""
    module.lazy_reset_grad()
    feeds = dict(feeds)
    feeds[PENALTY_SCALE] = np.array([scale], np.float32)
    out = module(*[feeds[n] for n in module.input_names()])
    grads = {p: np.array(state.parameters[p].grad, dtype=np.float64) for p in names}
    return out, grads


@pytest.mark.parametrize("scale_by_size", [False, True])
def test_loss_and_gradient_match_numpy(tmp_path, scale_by_size):
    model = tiny_cnn(grouped=True)
    art = build_artifacts(
        model, tmp_path / "a", ArtifactOptions(lambdas=ALL, scale_by_size=scale_by_size)
    )
    structures = {t.structure for t in art.info.penalty.active_terms}
    assert structures == {s for s in STRUCTURES if ALL.get(s) > 0}
    api = _ort.load().api
    state = api.CheckpointState.load_checkpoint(str(art.checkpoint))
    module = api.Module(str(art.training_model), state, str(art.eval_model))
    # Groups already at zero: a filter, an input channel, a whole coupled channel.
    w3 = state.parameters["c3.weight"].data
    w3[1] = 0
    state.parameters["c2.weight"].data[:, 2] = 0
    for name in (
        "c1.weight",
        "c1.bias",
        "bn1.scale",
        "bn1.bias",
        "c2.weight",
        "c2.bias",
        "bn2.scale",
        "bn2.bias",
    ):
        arr = state.parameters[name].data
        arr[4] = 0
    state.parameters["c2.weight"].data[:, 4] = 0
    state.parameters["c3.weight"].data[4:8, 1] = 0  # channel 4 = group 1, index 1 (2 groups)
    rng = np.random.default_rng(0)
    feeds = {
        "input": rng.standard_normal((5, 1, 8, 8)).astype(np.float32),
        "labels": rng.integers(0, 10, 5).astype(np.int64),
    }
    trainable = art.info.trainable
    out1, g1 = _step(module, state, art, feeds, 1.0, trainable)
    out0, g0 = _step(module, state, art, feeds, 0.0, trainable)
    params = {p: np.array(state.parameters[p].data, dtype=np.float64) for p in trainable}

    groups = reference_groups(_analysis(model), ALL, {k: v.shape for k, v in params.items()})
    value, grad = reference_value_and_grad(groups, params, scale_by_size=scale_by_size)
    names = module.output_names()
    onnx_value = float(np.asarray(out1[names.index(OUT_PENALTY)]).reshape(-1)[0])
    assert onnx_value == pytest.approx(value, rel=1e-5)
    assert art.info.penalty.value(params) == pytest.approx(value, rel=1e-9)
    # Gradient of the penalty alone: the step with scale 1 minus the step with scale 0.
    for name in trainable:
        assert np.all(np.isfinite(g1[name])), name
        np.testing.assert_allclose(
            g1[name] - g0[name], grad[name], rtol=1e-4, atol=1e-5, err_msg=name
        )
    assert max(float(np.abs(grad[n]).max()) for n in grad) > 1e-2  # the check can fail
    # A group at zero contributes no gradient (no NaN from sqrt at 0).
    assert np.all(grad["c3.weight"][1] == 0)
    assert np.all(grad["bn1.scale"][4] == 0) and np.all(grad["c2.weight"][:, 4] == 0)


@pytest.mark.parametrize(
    "name", ["syn_grouped", "syn_depthwise", "syn_flatten_fc", "syn_concat", "resnet20"]
)
def test_vectorised_penalty_matches_reference(name):
    model = models.build(name)
    an = _analysis(analysis.prepare(model))
    prepared = analysis.prepare(model)
    inits = {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in prepared.graph.initializer
    }
    rng = np.random.default_rng(1)
    params = {
        k: v + rng.standard_normal(v.shape) * 0.01
        for k, v in inits.items()
        if v.dtype.kind == "f" and v.ndim >= 1
    }
    shapes = {k: v.shape for k, v in params.items()}
    stats = {m.tensor for g in an.groups for m in g.members if m.role == "stat"}
    trainable = {k: v for k, v in shapes.items() if k not in stats}
    pen = build_penalty(an, ALL, trainable)
    groups = reference_groups(an, ALL, trainable)
    value, _ = reference_value_and_grad(groups, params)
    assert pen.value(params) == pytest.approx(value, rel=1e-9)
    assert len(groups) == sum(t.groups for t in pen.active_terms)
    # JSON round trip keeps the penalty, and its channel references whole.
    assert Penalty.from_json(pen.to_json()) == pen
    assert Penalty.from_json(pen.to_json()).value(params) == pytest.approx(value, rel=1e-12)
    # A file written before the parts kept the whole reference (without role, space, node,
    # is_weight) still gives the same penalty.
    old = pen.to_json()
    for t in old["terms"]:
        for p in t.get("parts", ()):
            for k in ("role", "space", "node", "is_weight"):
                del p[k]
    assert Penalty.from_json(old).value(params) == pytest.approx(value, rel=1e-12)
    # A depth term is named after the Add that joins its branch.
    assert {t.label for t in pen.terms if t.structure == "depth"} <= {
        b.add for b in an.branches}


def test_proximal_step_is_group_soft_thresholding():
    w = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=np.float32)  # norms 5, 0.5, 0
    an = analysis.Analysis(
        model="m",
        spaces=(),
        groups=(),
        layers=(analysis.Layer("fc", "Gemm", "W", None, 0, 1, 1, (3, 2), 6, 6, None, None),),
    )
    pen = build_penalty(an, Lambdas(neuron=1.0), {"W": (3, 2)})
    rows = next(t for t in pen.terms if t.label == "fc/rows")
    pen2 = Penalty((rows,), pen.lambdas)
    params = {"W": w.copy()}
    zero = pen2.prox(params, step=0.6)
    # row 0: 5 -> 5 - 0.6; row 1: norm 0.5 <= 0.6 -> exactly 0; row 2 stays 0.
    np.testing.assert_allclose(params["W"][0], w[0] * (1 - 0.6 / 5), rtol=1e-6)
    assert np.all(params["W"][1:] == 0)
    assert zero == 2
    # Thresholding by RMS: row 0 has RMS 5/sqrt(2).
    params = {"W": w.copy()}
    assert pen2.zero_groups(params, threshold=0.51 / math.sqrt(2)) == 2
    assert np.all(params["W"][0] == w[0])


def test_artifacts_load_in_ort_with_fixed_ir(tmp_path):
    art = build_artifacts(
        tiny_cnn(), tmp_path / "a", ArtifactOptions(lambdas=Lambdas(coupled=0.01), optimizer="sgd")
    )
    for f in (
        "training_model.onnx",
        "eval_model.onnx",
        "optimizer_model.onnx",
        "inference_model.onnx",
    ):
        m = onnx.load(str(tmp_path / "a" / f))
        assert m.ir_version <= 10, f
        assert all(o.version <= 21 for o in m.opset_import if o.domain in ("", "ai.onnx"))
    info = load_artifacts(tmp_path / "a").info
    assert set(info.frozen) == {"bn1.mean", "bn1.var", "bn2.mean", "bn2.var"}
    assert "bn1.scale" in info.trainable and "c1.weight" in info.trainable
    assert [o for o, _ in info.bn_stats]
    ev = onnx.load(str(art.eval_model))
    assert all(len(n.output) == 1 for n in ev.graph.node if n.op_type == "BatchNormalization")
    assert not {o.name for o in ev.graph.output} & {o for o, _ in info.bn_stats}


def test_unsupported_gradient_op_is_named(tmp_path):
    model = tiny_cnn(bn=False, residual=False)
    for n in model.graph.node:
        if n.name == "r3":
            n.op_type = "ThresholdedRelu"  # neither differentiable nor lowered
    with pytest.raises(UnsupportedModelError, match="no gradient for ThresholdedRelu"):
        build_artifacts(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_no_trainable_parameters(tmp_path):
    model = onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1, 4] input) => (float[1, 4] logits) { logits = Relu(input) }
    """)
    with pytest.raises(UnsupportedModelError, match="no trainable parameters"):
        build_artifacts(model, tmp_path / "a")


def test_lambda_scales_multiply_one_term():
    """``Lambdas.scales`` multiplies one term's lambda (key ``structure:layer``): its value and
    its proximal step change by that factor, every other term is untouched, the scales survive
    JSON and the budget's scaling, and a key the model lacks is a one-line error."""
    from onnx_ssl.errors import InputError

    model = models.build("lenet")
    an = _analysis(model)
    prepared = analysis.prepare(model)
    rng = np.random.default_rng(0)
    params = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64)
              + rng.standard_normal(tuple(t.dims)) * 0.01
              for t in prepared.graph.initializer if len(t.dims) >= 2}
    shapes = {k: v.shape for k, v in params.items()}
    plain = build_penalty(an, Lambdas(filter=0.02, channel=0.01), shapes)
    keys = [f"{t.structure}:{t.label}" for t in plain.active_terms]
    conv = [k for k in keys if k.startswith("filter:")]
    assert len(conv) == 2, keys
    c0 = "channel:" + conv[0].split(":", 1)[1]  # the first conv's other term on its weight
    assert c0 in keys
    lam = Lambdas(filter=0.02, channel=0.01,
                  scales=((conv[1], 3.0), (conv[0], 0.0), (c0, 0.0)))
    pen = build_penalty(an, lam, shapes)
    by_key = {f"{t.structure}:{t.label}": t for t in pen.terms}
    for t in plain.terms:
        k = f"{t.structure}:{t.label}"
        want = {conv[1]: 3.0, conv[0]: 0.0, c0: 0.0}.get(k, 1.0) * t.lam
        assert by_key[k].lam == pytest.approx(want), k
    # value: the scaled term counts 3 times, the zeroed one not at all
    v = {f"{t.structure}:{t.label}": float(np.sum(plain.weights(t)
                                                  * np.sqrt(t.sumsq(params) + plain.eps)))
         for t in plain.active_terms}
    want = sum(v.values()) + 2 * v[conv[1]] - v[conv[0]] - v[c0]
    assert pen.value(params) == pytest.approx(want, rel=1e-12)
    # the proximal step leaves the zero-scaled layer's weights alone
    w0 = by_key[conv[0]].tensor
    p2 = {k: x.copy() for k, x in params.items()}
    pen.prox(p2, step=1.0)
    np.testing.assert_array_equal(p2[w0], params[w0])
    assert not np.array_equal(p2[by_key[conv[1]].tensor], params[by_key[conv[1]].tensor])
    # JSON and the budget controller's scaling keep the scales
    assert Penalty.from_json(pen.to_json()).value(params) == pytest.approx(pen.value(params))
    assert lam.scaled(2.0).scales == lam.scales
    assert conv[1] in lam.describe()
    with pytest.raises(InputError, match="no such term; its terms are"):
        build_penalty(an, Lambdas(filter=0.02, scales=(("filter:nope", 2.0),)), shapes)
    with pytest.raises(InputError, match="STRUCTURE:LAYER"):
        Lambdas(scales=(("conv2", 2.0),))
    with pytest.raises(InputError, match=">= 0"):
        Lambdas(scales=(("filter:conv2", -1.0),))
