"""The training and inference forms as onnx-graphsurgeon passes: BatchNorm, Dropout and
LayerNormalization put in training form and back, each pass run twice reporting no change
the second time, and the round trip computing the original function."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_ssl.errors import UnsupportedModelError
from onnx_ssl.io import ModelMeta, from_graph, to_graph
from onnx_ssl.runtime import session
from onnx_ssl.training.forms import ToInferenceFormPass, ToTrainingFormPass, fix_eval_model
from onnx_ssl.training.params import classify_parameters

C = 4


def _model(opset: int = 17, flag: bool | None = None) -> onnx.ModelProto:
    """conv -> BatchNorm -> Dropout(ratio[, flag]) -> LayerNorm over the last axis."""
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.standard_normal((C, 3, 3, 3)).astype(np.float32),
        "s": rng.uniform(0.5, 2, C).astype(np.float32),
        "b": rng.standard_normal(C).astype(np.float32),
        "mean": rng.standard_normal(C).astype(np.float32),
        "var": rng.uniform(0.5, 2, C).astype(np.float32),
        "ratio": np.array(0.5, np.float32),
        "g": rng.uniform(0.5, 2, 5).astype(np.float32),
        "be": rng.standard_normal(5).astype(np.float32),
    }
    drop_in = ["n", "ratio"]
    if flag is not None:
        inits["own_flag"] = np.array(flag)
        drop_in.append("own_flag")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "mean", "var"], ["n"],
                         name="bn"),
        helper.make_node("Dropout", drop_in, ["d"], name="drop"),
        helper.make_node("LayerNormalization", ["d", "g", "be"], ["y"], name="ln", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3, 5, 5))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2, C, 5, 5))],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def test_training_form_then_inference_form_round_trips():
    model = _model()
    graph = to_graph(model)
    result = ToTrainingFormPass({"mean", "var"})(graph)
    assert result.graph is graph and result.modified
    rep = result.report
    assert (rep.batchnorms, rep.dropouts, rep.layernorms) == (("bn",), ("drop",), ("ln",))
    bn, drop, ln = _node(graph, "bn"), _node(graph, "drop"), _node(graph, "ln")
    assert bn.attrs["training_mode"] == 1
    assert [o.name for o in bn.outputs] == ["n", "bn.ssl_running_mean", "bn.ssl_running_var"]
    assert rep.stats == (("bn.ssl_running_mean", "mean"), ("bn.ssl_running_var", "var"))
    flag = drop.inputs[2]
    assert isinstance(flag, gs.Constant) and flag.values.dtype == np.bool_ and bool(flag.values)
    assert [o.name for o in drop.outputs] == ["d", "d.ssl_mask"]
    assert [o.name for o in ln.outputs] == ["y", "y.ssl_ln_1", "y.ssl_ln_2"]

    again = ToTrainingFormPass({"mean", "var"})(graph)
    assert not again.modified and again.report.stats == rep.stats  # a fixpoint
    trained = from_graph(graph, ModelMeta.of(model))
    onnx.checker.check_model(trained, full_check=True)

    back = ToInferenceFormPass()(graph)
    assert back.report.batchnorms == ("bn",) and back.report.dropouts == ("drop",)
    assert bn.attrs["training_mode"] == 0 and [o.name for o in bn.outputs] == ["n"]
    assert [t.name for t in drop.inputs] == ["n", "ratio"]
    assert not ToInferenceFormPass()(graph).modified
    inference = from_graph(graph, ModelMeta.of(model))
    onnx.checker.check_model(inference, full_check=True)
    assert "ssl_dropout_training" not in {t.name for t in inference.graph.initializer}

    x = np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(np.float32)
    want = session(model).run(None, {"x": x})[0]
    got = session(inference).run(None, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_training_form_differs_from_inference_form_in_ort():
    """BatchNorm in training mode normalises with the batch statistics: the training form
    computes another function than the model (the pass did change the graph's meaning)."""
    model = _model()
    model.graph.output.append(helper.make_tensor_value_info("n", TensorProto.FLOAT,
                                                            (2, C, 5, 5)))
    graph = to_graph(model)
    ToTrainingFormPass(())(graph)
    trained = from_graph(graph, ModelMeta.of(model))
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(np.float32)
    want = session(model).run(["n"], {"x": x})[0]
    got = session(trained).run(["n"], {"x": x})[0]
    assert got.shape == want.shape and not np.allclose(got, want, atol=1e-3)
    # batch statistics: each channel of the batch normalised to mean b[c], std s[c]
    s, b = (numpy_helper.to_array(t) for t in model.graph.initializer[1:3])
    np.testing.assert_allclose(got.mean(axis=(0, 2, 3)), b, atol=1e-4)
    np.testing.assert_allclose(got.std(axis=(0, 2, 3)), s, rtol=1e-3)


def test_statistics_not_frozen_are_not_reported():
    graph = to_graph(_model())
    assert ToTrainingFormPass({"mean"})(graph).report.stats == (("bn.ssl_running_mean", "mean"),)


def test_dropout_keeping_its_own_true_flag_is_left_alone():
    graph = to_graph(_model(flag=True))
    drop = _node(graph, "drop")
    drop.outputs.append(gs.Variable("own_mask"))
    rep = ToTrainingFormPass(())(graph).report
    assert rep.dropouts == () and drop.inputs[2].name == "own_flag"


def test_dropout_with_a_false_flag_gets_the_training_flag():
    graph = to_graph(_model(flag=False))
    rep = ToTrainingFormPass(())(graph).report
    drop = _node(graph, "drop")
    assert rep.dropouts == ("drop",) and drop.inputs[2].name == "ssl_dropout_training"


def test_batchnorm_before_opset_14_is_refused():
    graph = to_graph(_model(opset=13))
    with pytest.raises(UnsupportedModelError, match="bn.*opset 13 < 14"):
        ToTrainingFormPass(())(graph)


def test_inference_form_keeps_a_statistic_output_that_is_read():
    graph = to_graph(_model())
    ToTrainingFormPass(())(graph)
    bn = _node(graph, "bn")
    graph.outputs.append(bn.outputs[1].to_variable(dtype=np.float32, shape=[C]))
    rep = ToInferenceFormPass()(graph).report
    assert bn.attrs["training_mode"] == 0 and len(bn.outputs) == 3
    assert rep.batchnorms == ("bn",)
    # ... unless it is one of the statistics outputs the eval model drops
    rep = ToInferenceFormPass({"bn.ssl_running_mean"})(graph).report
    assert rep.outputs_removed == ("bn.ssl_running_mean",) and len(bn.outputs) == 1


def test_fix_eval_model_drops_statistics_outputs():
    model = _model()
    graph = to_graph(model)
    stats = ToTrainingFormPass({"mean", "var"})(graph).report.stats
    bn = _node(graph, "bn")
    for o in bn.outputs[1:]:
        graph.outputs.append(o.to_variable(dtype=np.float32, shape=[C]))
    fixed = fix_eval_model(from_graph(graph, ModelMeta.of(model)), {s for s, _ in stats})
    assert [o.name for o in fixed.graph.output] == ["y"]
    assert [list(n.output) for n in fixed.graph.node if n.op_type == "BatchNormalization"] \
        == [["n"]]
    onnx.checker.check_model(fixed, full_check=True)


def test_classify_parameters_on_the_graph():
    graph = to_graph(_model())
    trainable, frozen = classify_parameters(graph, "y")
    assert trainable == ["w", "s", "b", "g", "be"]
    assert frozen == ["mean", "var"]
    # nothing reaches an output the parameters do not feed
    assert classify_parameters(graph, "x") == ([], [])
