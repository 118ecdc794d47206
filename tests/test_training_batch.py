"""Static-batch exports train at any batch size: the training graph gets a symbolic batch
(Reshape targets that hard-code it are freed), the inference model keeps the input's shapes;
and a training graph at any batch computes what the model computes on each sample alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ssl.analysis import prepare
from onnx_ssl.runtime import session
from onnx_ssl.training.artifacts import build_artifacts
from onnx_ssl.training.data import Dataset
from onnx_ssl.training.distill import teacher_targets
from onnx_ssl.training.probe import BatchCheck, runs_with_batch, set_batch
from onnx_ssl.training.spec import BATCH_PARAM, ArtifactOptions
from onnx_ssl.training.trainer import TrainConfig, Trainer

B0 = 2


def _static(targets: list[list[int]], allowzero: int = 0) -> onnx.ModelProto:
    """x[B0,3,4,4] -> conv 4 -> Reshape(t) for t in targets -> Gemm 10 (a static export of
    ``fc(conv(x).view(x.size(0), -1))`` with the view folded to a literal)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
        numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32) * 0.1, "fw"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fb"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], name="conv", pads=[1, 1, 1, 1])]
    for k, t in enumerate(targets):
        inits.append(numpy_helper.from_array(np.array(t, np.int64), f"shape{k}"))
        nodes.append(helper.make_node("Reshape", [f"t{k}", f"shape{k}"], [f"t{k + 1}"],
                                      name=f"view{k}", allowzero=allowzero))
    nodes.append(helper.make_node("Gemm", [f"t{len(targets)}", "fw", "fb"], ["logits"],
                                  name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "static", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (B0, 3, 4, 4))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, (B0, 10))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(n: int) -> Dataset:
    rng = np.random.default_rng(1)
    return Dataset({"x": rng.standard_normal((n, 3, 4, 4)).astype(np.float32)},
                   rng.integers(0, 10, n).astype(np.int64), "random")


def _declared(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _steps(art, batch: int, n: int = 20) -> list[int]:
    """Train one epoch at ``batch``; the batch sizes the training model was fed."""
    t = Trainer(art, TrainConfig(epochs=1, lr=0.01, batch_size=batch, save_state=False,
                                 val_fraction=0))
    fed: list[int] = []
    module = t.module
    real = module.__call__

    class Spy:
        def __getattr__(self, name):  # everything else goes to the real module
            return getattr(module, name)

        def __call__(self, *args):
            fed.append(int(np.shape(args[0])[0]))
            return real(*args)

    t.module = Spy()
    res = t.fit(_data(n))
    assert res.history and np.isfinite(res.history[-1].loss)
    assert res.model is not None
    return fed


def test_static_export_trains_at_any_batch(tmp_path, caplog):
    model = _static([[B0, -1]])
    art = build_artifacts(model, tmp_path / "a")
    assert art.info.fixed_batch is None
    assert "fixed batch" not in caplog.text
    training = onnx.load(str(art.training_model))
    assert _declared(training.graph.input[0])[0] == BATCH_PARAM
    assert _steps(art, 8) == [8, 8, 4]  # --batch-size honoured, last batch short
    # The inference model keeps the original's declared shapes and Reshape literal.
    inference = onnx.load(str(art.inference_model))
    assert _declared(inference.graph.input[0]) == [B0, 3, 4, 4]
    assert _declared(inference.graph.output[0]) == [B0, 10]
    x = _data(B0).x["x"]
    np.testing.assert_allclose(session(inference).run(None, {"x": x})[0],
                               session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_chained_views_are_all_freed(tmp_path):
    # [B0, 4, 16] then [B0, 64]: the second is freed only once the first is.
    art = build_artifacts(_static([[B0, 4, 16], [B0, 64]]), tmp_path / "a")
    assert art.info.fixed_batch is None
    assert _steps(art, 5, 10) == [5, 5]


@pytest.mark.parametrize("target", [[B0, 64], [B0, -1]])
def test_allowzero_view_is_freed(tmp_path, target):
    # The dynamo exporter writes Reshape(allowzero=1) with [B0, -1].
    art = build_artifacts(_static([target], allowzero=1), tmp_path / "a")
    assert art.info.fixed_batch is None
    assert _steps(art, 3, 6) == [3, 3]


def test_view_mixing_the_batch_keeps_the_fixed_batch(tmp_path, caplog):
    # [B0*4, 16]: the batch is folded into another dim; no literal to free, so the
    # model trains at its own batch size, with the warning.
    art = build_artifacts(_static([[B0 * 4, 16], [B0, 64]]), tmp_path / "a")
    assert art.info.fixed_batch == B0
    assert "fixed batch size of 2" in caplog.text
    assert _steps(art, 8, 6) == [2, 2, 2]


# --- samples must not mix along the batch ----------------------------------------------------

S, C, K = 5, 4, 3


def _masked(static: int | None, index: str = "literal") -> onnx.ModelProto:
    """x[b,S,C], mask[b,S] -> sum_s mask[b,s] (x W)[b,s]: BERT's attention-mask gather of
    ``mask.flatten()[arange(b)[:, None] * S + arange(S)]``, with ``arange(b)`` computed from
    the batch size (``static`` None), or in a batch-``static`` export the literal
    ``arange(static)`` (``index="literal"``, as TorchScript traces it) or the whole index
    folded (``"folded"``)."""
    rng = np.random.default_rng(0)
    b: int | str = static if static else "n"
    inits = [numpy_helper.from_array(rng.standard_normal((C, K)).astype(np.float32), "w"),
             numpy_helper.from_array(np.arange(S, dtype=np.int64).reshape(1, S), "pos"),
             numpy_helper.from_array(np.array(S, np.int64), "seq"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    nodes = []
    if not static:
        inits += [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                  numpy_helper.from_array(np.array(1, np.int64), "one")]
        nodes += [helper.make_node("Shape", ["mask"], ["shp"], end=1),
                  helper.make_node("Squeeze", ["shp"], ["nb"]),
                  helper.make_node("Range", ["zero", "nb", "one"], ["r"]),
                  helper.make_node("Unsqueeze", ["r", "ax1"], ["rows"])]
    elif index == "literal":
        inits.append(numpy_helper.from_array(
            np.arange(static, dtype=np.int64).reshape(static, 1), "rows"))
    if static and index == "folded":
        inits.append(numpy_helper.from_array(
            np.arange(static * S, dtype=np.int64).reshape(static, S), "idx"))
    else:
        nodes += [helper.make_node("Mul", ["rows", "seq"], ["base"]),
                  helper.make_node("Add", ["base", "pos"], ["idx"])]
    nodes += [helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
              helper.make_node("Reshape", ["mf", "flat"], ["mflat"]),
              helper.make_node("Gather", ["mflat", "idx"], ["m"]),
              helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
              helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
              helper.make_node("Mul", ["h", "m3"], ["hm"]),
              helper.make_node("ReduceSum", ["hm", "ax1"], ["y"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (b, S, C)),
         helper.make_tensor_value_info("mask", TensorProto.INT64, (b, S))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (b, K))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _masked_data(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((n, S, C)).astype(np.float32),
            "mask": rng.integers(0, 2, (n, S)).astype(np.int64)}


def _per_sample(model: onnx.ModelProto, x: dict[str, np.ndarray], own: int = 1) -> np.ndarray:
    """The model on each sample alone (fed ``own`` copies of it at its own batch size)."""
    s = session(model)
    n = len(next(iter(x.values())))
    return np.concatenate([s.run(None, {k: np.repeat(v[i:i + 1], own, 0)
                                        for k, v in x.items()})[0][:1] for i in range(n)])


def _eval_outputs(art, x: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """The eval model's outputs at ``batch`` (the teacher: the batch-free model, which
    computes the same function as every ``_masked``)."""
    data = teacher_targets(_masked(None), Dataset(x, None, "masked"))
    t = Trainer(art, TrainConfig(epochs=0, batch_size=batch, save_state=False))
    return t.outputs(t.prepare_data(data), ["y"])[1]["y"]


@pytest.mark.parametrize("batch", [4, 8])
def test_mask_gather_does_not_mix_samples(tmp_path, batch):
    # Prepared at batch 1, the gather index folds to the constant of batch 1, which
    # broadcasts to any batch: every sample would read sample 0's mask (runs, wrong values).
    model = _masked(None)
    art = build_artifacts(model, tmp_path / "a", ArtifactOptions(distill="mse"))
    assert art.info.fixed_batch is None
    x = _masked_data(13)
    np.testing.assert_allclose(_eval_outputs(art, x, batch), _per_sample(model, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("own", [1, 2])
def test_literal_batch_index_is_freed(tmp_path, own):
    # A static export with arange(own) baked in runs at any batch size (own 1: the index
    # broadcasts) but is right at its own only, until the index is computed again.
    model = _masked(own)
    art = build_artifacts(model, tmp_path / "a", ArtifactOptions(distill="mse"))
    assert art.info.fixed_batch is None
    x = _masked_data(11)
    np.testing.assert_allclose(_eval_outputs(art, x, 4), _per_sample(model, x, own),
                               rtol=1e-5, atol=1e-5)


def test_folded_batch_index_trains_at_its_own_batch(tmp_path, caplog):
    # The index folded whole: no form is right at another batch size, the fallback batch
    # size included (it runs there), so the model trains at its own, with the warning.
    model = _masked(1, "folded")
    art = build_artifacts(model, tmp_path / "a",
                          ArtifactOptions(distill="mse", fallback_batch=4))
    assert art.info.fixed_batch == 1
    assert "fixed batch size of 1" in caplog.text
    x = _masked_data(6)
    np.testing.assert_allclose(_eval_outputs(art, x, 4), _per_sample(model, x),
                               rtol=1e-5, atol=1e-5)


def test_batch_check_sees_what_running_does_not():
    model = _masked(None)
    folded = set_batch(prepare(set_batch(model, 1)), BATCH_PARAM)
    assert runs_with_batch(folded, 3)  # all-zero inputs: runs, and looks right
    check = BatchCheck(model, 1)
    assert "differs from the model's on that sample alone" in (check.mismatch(folded, 3) or "")
    assert check.mismatch(prepare(set_batch(model, BATCH_PARAM)), 3) is None
    # A form that does not run at the batch says so.
    assert "does not run at batch 3" in (check.mismatch(set_batch(_masked(2), BATCH_PARAM), 3)
                                         or "")


def test_ssl_writes_models_that_keep_the_samples_apart(tmp_path):
    # The chain's thresholded and final models declare the input's symbolic batch: each
    # sample must get what it gets alone (a batch index folded at batch 1 would give every
    # sample sample 0's mask: such a model runs at any batch, with wrong values).
    from onnx_ssl.training.chain import SslOptions, run_ssl

    model = _masked(None)
    res = run_ssl(model, Dataset(_masked_data(40), None, "masked"),
                  SslOptions(epochs=1, finetune_epochs=1, batch_size=8, verify=1),
                  output=tmp_path / "out.onnx")
    x = _masked_data(7)
    for m in (res.thresholded, onnx.load(str(tmp_path / "out.onnx"))):
        assert m is not None
        assert _declared(m.graph.input[0])[0] == "n"
        np.testing.assert_allclose(session(m).run(None, x)[0], _per_sample(m, x),
                                   rtol=1e-5, atol=1e-5)
