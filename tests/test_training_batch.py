"""Static-batch exports train at any batch size: the training graph gets a symbolic batch
(Reshape targets that hard-code it are freed), the inference model keeps the input's shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ssl.runtime import session
from onnx_ssl.training.artifacts import build_artifacts
from onnx_ssl.training.data import Dataset
from onnx_ssl.training.spec import BATCH_PARAM
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
