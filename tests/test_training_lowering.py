"""Lowerings of ops without a gradient in onnxruntime-training 1.19.2: each is numerically the
original op, its gradient builds, and the trained inference model keeps the original op."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ssl.errors import UnsupportedModelError
from onnx_ssl.io import ModelMeta, from_graph, shaped_graph, to_graph
from onnx_ssl.runtime import session
from onnx_ssl.training.artifacts import build_artifacts
from onnx_ssl.training.data import Dataset
from onnx_ssl.training.lowering import LOWERINGS, LowerForTrainingPass
from onnx_ssl.training.trainer import TrainConfig, Trainer

SHAPE = (2, 6, 5, 5)
# op, attributes, extra initializers (name -> array)
CASES: list[tuple[str, dict[str, Any], dict[str, np.ndarray]]] = [
    ("HardSwish", {}, {}),
    ("HardSigmoid", {}, {}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, {}),
    ("Elu", {}, {}),
    ("Elu", {"alpha": 0.5}, {}),
    ("Selu", {}, {}),
    ("Selu", {"alpha": 1.5, "gamma": 1.2}, {}),
    ("Softplus", {}, {}),
    ("PRelu", {}, {"slope": np.linspace(0.1, 0.6, 6, dtype=np.float32).reshape(6, 1, 1)}),
    ("PRelu", {}, {"slope": np.array([0.25], np.float32)}),
    ("GlobalMaxPool", {}, {}),
    ("InstanceNormalization", {"epsilon": 1e-3},
     {"scale": np.linspace(0.5, 2.0, 6, dtype=np.float32),
      "bias": np.linspace(-1.0, 1.0, 6, dtype=np.float32)}),
    ("LRN", {"size": 3}, {}),
    ("LRN", {"size": 5, "alpha": 0.01, "beta": 0.5, "bias": 2.0}, {}),  # ORT: odd sizes
]
IDS = [f"{op}-{k}" for k, (op, _, _) in enumerate(CASES)]


def _single(op: str, attrs: dict[str, Any], extra: dict[str, np.ndarray],
            opset: int = 17) -> onnx.ModelProto:
    node = helper.make_node(op, ["x", *extra], ["y"], name="the_node", **attrs)
    graph = helper.make_graph(
        [node], "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, SHAPE[:2] + (1, 1) if op == "GlobalMaxPool" else SHAPE)],
        [numpy_helper.from_array(v, k) for k, v in extra.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _in_cnn(op: str, attrs: dict[str, Any], extra: dict[str, np.ndarray]) -> onnx.ModelProto:
    """conv -> op -> GlobalAveragePool -> Flatten -> Gemm 10: the op on the gradient path."""
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.3,
        "b": rng.standard_normal(6).astype(np.float32) * 0.1,
        "fw": rng.standard_normal((10, 6)).astype(np.float32) * 0.3,
        "fb": np.zeros(10, np.float32),
        **extra,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(op, ["c", *extra], ["a"], name="the_node", **attrs),
        helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3, 5, 5))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, (2, 10))],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _lower(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    graph = shaped_graph(model)
    result = LowerForTrainingPass()(graph)
    assert result.graph is graph  # in place
    again = LowerForTrainingPass()(graph)
    assert not again.modified  # nothing is left to lower
    return from_graph(graph, ModelMeta.of(model)), list(result.report.lowered)


def test_table_has_one_entry_per_op():
    assert sorted(LOWERINGS) == sorted({op for op, _, _ in CASES})
    assert all(lw.op_type == op and lw.math for op, lw in LOWERINGS.items())


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize(("op", "attrs", "extra"), CASES, ids=IDS)
def test_lowering_matches_the_op(op, attrs, extra, opset):
    model = _single(op, attrs, extra, opset)
    lowered, done = _lower(model)
    assert done == [("the_node", op)]
    assert op not in {n.op_type for n in lowered.graph.node}
    onnx.checker.check_model(lowered, full_check=True)
    # both sides of zero, large magnitudes (exp overflow in an unselected branch) included
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32) * 4
    x.flat[:4] = [0.0, 90.0, -90.0, 3.0]
    want = session(model).run(None, {"x": x})[0]
    got = session(lowered).run(None, {"x": x})[0]
    assert got.shape == want.shape
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("op", "attrs", "extra"), CASES[::2] + [CASES[9]],
                         ids=IDS[::2] + [IDS[9]])
def test_lowered_op_trains_and_exports_the_original(tmp_path, op, attrs, extra):
    model = _in_cnn(op, attrs, extra)
    art = build_artifacts(model, tmp_path / "a")  # the gradient graph builds
    for name in extra:
        if op == "PRelu" or name in ("scale", "bias"):
            assert name in art.info.trainable  # parameters of the op stay trainable
    training = onnx.load(str(art.training_model))
    assert op not in {n.op_type for n in training.graph.node}
    inference = onnx.load(str(art.inference_model))
    assert [n.op_type for n in inference.graph.node if n.name == "the_node"] == [op]

    rng = np.random.default_rng(0)
    data = Dataset({"x": rng.standard_normal((16, 3, 5, 5)).astype(np.float32)},
                   rng.integers(0, 10, 16).astype(np.int64), "random")
    res = Trainer(art, TrainConfig(epochs=2, lr=0.05, batch_size=2, save_state=False)).fit(data)
    assert res.model is not None
    assert [n.op_type for n in res.model.graph.node if n.name == "the_node"] == [op]
    y = session(res.model).run(None, {"x": data.x["x"][:2]})[0]
    assert y.shape == (2, 10) and np.all(np.isfinite(y))
    before = session(model).run(None, {"x": data.x["x"][:2]})[0]
    assert not np.allclose(y, before)  # the weights changed


def test_rank_unknown_is_refused_with_the_node():
    model = _single("InstanceNormalization", {},
                    {"scale": np.ones(6, np.float32), "bias": np.zeros(6, np.float32)})
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(UnsupportedModelError, match="the_node.*InstanceNormalization.*rank"):
        LowerForTrainingPass()(to_graph(model))


def test_graph_without_such_ops_is_left_unchanged():
    model = _single("Relu", {}, {})
    graph = to_graph(model)
    nodes = list(graph.nodes)
    result = LowerForTrainingPass()(graph)
    assert not result.modified and result.report.lowered == ()
    assert graph.nodes == nodes and [n.op for n in graph.nodes] == ["Relu"]
