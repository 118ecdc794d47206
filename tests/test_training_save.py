"""Saving trained models: external data only when a tensor needs it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ssl.io import EXTERNAL_MARK, load_model, save_model
from onnx_ssl.runtime import session


def _model(n: int) -> onnx.ModelProto:
    """x[1, n] @ w[n, n] + b: one weight of 4*n*n bytes, a bias of 4*n."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, n))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, n))],
        [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("marked", [True, False])
@pytest.mark.parametrize(("n", "external"), [(4, False), (32, True)])  # 64 B / 4 KiB weight
def test_external_data_only_when_a_tensor_needs_it(tmp_path, n, external, marked):
    model = _model(n)
    if marked:  # as a model loaded with external data is: its outputs keep it if they can
        model.metadata_props.add(key=EXTERNAL_MARK, value="1")
    out = save_model(model, tmp_path / "trained_model.onnx", external_data=None if marked
                     else True)
    data = tmp_path / "trained_model.onnx.data"
    assert out.is_file()
    assert data.is_file() == external
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["trained_model.onnx"] + (["trained_model.onnx.data"] if external else []))
    back = load_model(out)
    x = np.ones((1, n), np.float32)
    np.testing.assert_array_equal(session(back).run(None, {"x": x})[0],
                                  session(_model(n)).run(None, {"x": x})[0])
    assert not any(p.key == EXTERNAL_MARK for p in onnx.load(str(out)).metadata_props)


def test_small_model_without_the_mark_is_one_file(tmp_path):
    out = save_model(_model(32), tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert onnx.load(str(out)).graph.initializer[0].data_location == TensorProto.DEFAULT
