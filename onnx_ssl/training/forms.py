"""The training and inference forms of a model, and the opset it trains at.

The forms are in-place passes on onnx-graphsurgeon graphs (the IR of the compiler):
:class:`ToTrainingFormPass` puts BatchNorm in ``training_mode=1`` with its
running-statistics outputs (frozen parameters the trainer updates from them), gives Dropout
its ``training_mode`` input and mask output, and LayerNormalization its Mean and InvStdDev
outputs (its gradient needs them). :class:`ToInferenceFormPass` undoes that, for the
inference model (:func:`export_template`) and for the eval model that onnxblock hands back
(:func:`fix_eval_model`, which also drops the running statistics from the outputs).

:func:`to_training_opset` converts a model newer than the training runtime runs and
:func:`export_inference_model` writes trained weights into the inference model's
initializers: both stay on the protobuf at the door (:func:`onnx_ssl.io.convert_opset`,
loading and writing a model file), since neither rewrites the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.importers.onnx_importer import (
    get_onnx_tensor_dtype,
    get_onnx_tensor_shape,
)

from onnx_ssl import env
from onnx_ssl.errors import InputError, UnsupportedModelError
from onnx_ssl.io import ModelMeta, convert_opset, default_opset, from_graph, to_graph
from onnx_ssl.names import fresh_name
from onnx_ssl.pipeline import PassBase, PassResult, Report

from .proto import fix_ir
from .spec import Artifacts

log = logging.getLogger(__name__)


def _is_true_flag(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) and t.values.dtype == np.bool_ and bool(t.values)


@dataclass(frozen=True)
class TrainingFormReport(Report):
    """The nodes :class:`ToTrainingFormPass` put in training form, and (``info``, the same
    on every run) the (running-statistic output, parameter) pairs of the BatchNorms whose
    running statistics are frozen parameters."""

    batchnorms: tuple[str, ...] = ()
    dropouts: tuple[str, ...] = ()
    layernorms: tuple[str, ...] = ()
    stats: tuple[tuple[str, str], ...] = field(default=(), metadata={"info": True})


class ToTrainingFormPass(PassBase[TrainingFormReport]):
    """BatchNorm in training mode with its running-statistics outputs, Dropout with its
    training-mode input (one shared constant ``True``) and mask, LayerNormalization with its
    Mean and InvStdDev outputs; in place. ``frozen`` names the initializers that are frozen
    parameters: a BatchNorm running statistic among them is reported with the output that
    updates it."""

    name = "to-training-form"
    in_place = True

    def __init__(self, frozen: Collection[str]) -> None:
        self.frozen = frozenset(frozen)

    def call(self, graph: gs.Graph) -> PassResult[TrainingFormReport]:
        opset = int(graph.opset)
        taken = set(graph.tensors().keys())
        stats: list[tuple[str, str]] = []
        changed: dict[str, list[str]] = {"bn": [], "drop": [], "ln": []}
        train_flag: gs.Constant | None = None
        for node in graph.nodes:
            if node.op == "BatchNormalization":
                if opset < 14:
                    raise UnsupportedModelError(
                        f"node {node.name or '?'} (BatchNormalization): opset {opset} < 14 has "
                        f"no training mode; convert the model to opset >= 14"
                    )
                if self._batchnorm(node, taken):
                    changed["bn"].append(node.name)
                for k in (1, 2):
                    if node.inputs[k + 2].name in self.frozen:
                        stats.append((node.outputs[k].name, node.inputs[k + 2].name))
            elif node.op == "Dropout" and opset >= 12:
                if len(node.inputs) > 2 and _is_true_flag(node.inputs[2]) \
                        and len(node.outputs) > 1:
                    continue
                if train_flag is None:
                    train_flag = gs.Constant(fresh_name(taken, "ssl_dropout_training"),
                                             np.array(True))
                while len(node.inputs) < 2:
                    node.inputs.append(gs.Variable.empty())
                if len(node.inputs) < 3:
                    node.inputs.append(train_flag)
                else:
                    node.inputs[2] = train_flag
                if len(node.outputs) < 2:
                    node.outputs.append(
                        gs.Variable(fresh_name(taken, f"{node.outputs[0].name}.ssl_mask")))
                changed["drop"].append(node.name)
            elif node.op == "LayerNormalization" and len(node.outputs) < 3:
                while len(node.outputs) < 3:
                    node.outputs.append(gs.Variable(fresh_name(
                        taken, f"{node.outputs[0].name}.ssl_ln_{len(node.outputs)}")))
                changed["ln"].append(node.name)
        report = TrainingFormReport(tuple(changed["bn"]), tuple(changed["drop"]),
                                    tuple(changed["ln"]), tuple(stats))
        return PassResult(graph, report)

    @staticmethod
    def _batchnorm(node: gs.Node, taken: set[str]) -> bool:
        """Training mode with three named outputs; whether anything changed."""
        changed = node.attrs.get("training_mode") != 1
        node.attrs["training_mode"] = 1
        base = node.name or node.outputs[0].name
        while len(node.outputs) < 3:
            what = "mean" if len(node.outputs) == 1 else "var"
            node.outputs.append(gs.Variable(fresh_name(taken, f"{base}.ssl_running_{what}")))
            changed = True
        for k in (1, 2):
            if node.outputs[k].name == "":
                node.outputs[k] = gs.Variable(fresh_name(taken, f"{base}.ssl_running_{k}"))
                changed = True
        return changed


@dataclass(frozen=True)
class InferenceFormReport(Report):
    """The nodes :class:`ToInferenceFormPass` put back in inference form, and the graph
    outputs it removed."""

    batchnorms: tuple[str, ...] = ()
    dropouts: tuple[str, ...] = ()
    outputs_removed: tuple[str, ...] = ()


class ToInferenceFormPass(PassBase[InferenceFormReport]):
    """BatchNorm with ``training_mode=0`` and one output (when nothing reads the others),
    Dropout without its training-mode input; in place. ``stat_outputs`` (the BatchNorm
    running-statistics outputs that training adds to the graph outputs, as in the eval model)
    are removed from the graph outputs first. Constants no node reads any more are not
    exported (onnx-graphsurgeon exports only the tensors the graph uses)."""

    name = "to-inference-form"
    in_place = True

    def __init__(self, stat_outputs: Collection[str] = ()) -> None:
        self.stat_outputs = frozenset(stat_outputs)

    def call(self, graph: gs.Graph) -> PassResult[InferenceFormReport]:
        removed = tuple(t.name for t in graph.outputs if t.name in self.stat_outputs)
        if removed:
            graph.outputs = [t for t in graph.outputs if t.name not in self.stat_outputs]
        graph_outputs = {t.name for t in graph.outputs}
        bns: list[str] = []
        drops: list[str] = []
        for node in graph.nodes:
            if node.op == "BatchNormalization":
                changed = False
                if node.attrs.get("training_mode", 0) != 0:
                    node.attrs["training_mode"] = 0
                    changed = True
                if len(node.outputs) > 1 and not any(
                        o.outputs or o.name in graph_outputs for o in node.outputs[1:]):
                    while len(node.outputs) > 1:
                        node.outputs.pop()
                    changed = True
                if changed:
                    bns.append(node.name)
            elif node.op == "Dropout":
                n = len(node.inputs)
                while len(node.inputs) > 2:
                    node.inputs.pop()
                while len(node.inputs) > 1 and node.inputs[-1].name == "":
                    node.inputs.pop()
                if len(node.inputs) != n:
                    drops.append(node.name)
        return PassResult(graph, InferenceFormReport(tuple(bns), tuple(drops), removed))


def fix_eval_model(model: onnx.ModelProto, stat_outputs: Collection[str]) -> onnx.ModelProto:
    """The eval model onnxblock built, in inference form (BatchNorm with one output, Dropout
    without its training input) and without the running-statistics graph outputs."""
    graph = to_graph(model)
    ToInferenceFormPass(stat_outputs)(graph)
    return from_graph(graph, ModelMeta.of(model))


def to_training_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int | None]:
    """The model at an opset the training runtime runs: converted down with
    onnx.version_converter when it is newer (returns the opset it was converted from), or
    refused in one line naming the op that cannot be converted."""
    top = env.runtime_limits()
    source = default_opset(model)
    if source <= top.max_opset:
        return model, None
    converted = convert_opset(model, top.max_opset)
    log.warning("converted the model from opset %d to %d, the newest %s %s trains",
                source, top.max_opset, top.name, top.version)
    return fix_ir(converted), source



def export_template(
    original: onnx.ModelProto, prepared: gs.Graph, meta: ModelMeta, *, dynamic_ok: bool
) -> onnx.ModelProto:
    """The model trained weights are written into: the prepared graph in inference form
    (changed in place), with the original's input and output declarations when its batch is
    free, and no inner shapes; exported with the prepared model's ``meta``."""
    ToInferenceFormPass()(prepared)
    if dynamic_ok:
        decl = {vi.name: vi for vi in (*original.graph.input, *original.graph.output)}
        for t in (*prepared.inputs, *prepared.outputs):
            if t.name in decl and isinstance(t, gs.Variable):
                t.dtype = get_onnx_tensor_dtype(decl[t.name])
                t.shape = get_onnx_tensor_shape(decl[t.name])
    io = {t.name for t in (*prepared.inputs, *prepared.outputs)}
    for name, t in prepared.tensors().items():
        if isinstance(t, gs.Variable) and name not in io:
            t.dtype, t.shape = None, None
    return from_graph(prepared, meta)


def export_inference_model(art: Artifacts, params: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The inference model with ``params`` (name -> array) as its initializers (on the
    protobuf it is loaded as: only initializer values change)."""
    m = onnx.load(str(art.inference_model))
    names = {t.name for t in m.graph.initializer}
    missing = [n for n in params if n not in names]
    if missing:
        raise InputError(
            f"{art.path}: the inference model lacks parameters "
            f"{', '.join(missing[:3])}; rebuild the artifacts"
        )
    for t in m.graph.initializer:
        if t.name in params:
            arr = np.asarray(params[t.name])
            if tuple(arr.shape) != tuple(t.dims):
                raise InputError(
                    f"parameter {t.name}: shape {arr.shape} does not match the "
                    f"model's {tuple(t.dims)}"
                )
            t.CopyFrom(numpy_helper.from_array(arr.astype(np.float32, copy=False), t.name))
    return fix_ir(m)
