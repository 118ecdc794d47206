"""The training and inference forms of a model, and the opset it trains at.

:func:`to_training_form` puts BatchNorm in ``training_mode=1`` with its running-statistics
outputs (frozen parameters the trainer updates from them), gives Dropout its
``training_mode`` input and mask output, and LayerNormalization its Mean and InvStdDev
outputs (its gradient needs them). :func:`to_inference_form` and :func:`fix_eval_model`
undo that for the inference and eval models; :func:`export_inference_model` writes trained
weights into the inference model. :func:`to_training_opset` converts a model newer than the
training runtime runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_ssl import env
from onnx_ssl.errors import InputError, UnsupportedModelError
from onnx_ssl.io import convert_opset, default_opset

from .proto import drop_unused_initializers, fix_ir
from .spec import Artifacts

log = logging.getLogger(__name__)


def to_training_form(
    model: onnx.ModelProto, frozen: Sequence[str]
) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """BatchNorm in training mode with its running-statistics outputs, Dropout with its
    training-mode input and mask, LayerNormalization with Mean and InvStdDev outputs.

    Returns the model and the (running-statistic output, parameter) pairs.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    frozen_set = set(frozen)
    stats: list[tuple[str, str]] = []
    opset = default_opset(m)
    used = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
    used |= {t.name for t in m.graph.initializer}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    train_flag = None
    for node in m.graph.node:
        if node.op_type == "BatchNormalization":
            if opset < 14:
                raise UnsupportedModelError(
                    f"node {node.name or '?'} (BatchNormalization): opset {opset} < 14 has no "
                    f"training mode; convert the model to opset >= 14"
                )
            attr = next((a for a in node.attribute if a.name == "training_mode"), None)
            if attr is None:
                attr = node.attribute.add()
                attr.name = "training_mode"
                attr.type = onnx.AttributeProto.INT
            attr.i = 1
            while len(node.output) < 3:
                node.output.append(
                    fresh(
                        f"{node.name or node.output[0]}.ssl_running_"
                        f"{'mean' if len(node.output) == 1 else 'var'}"
                    )
                )
            for k in (1, 2):
                if node.output[k] == "":
                    node.output[k] = fresh(f"{node.name or node.output[0]}.ssl_running_{k}")
                if node.input[k + 2] in frozen_set:
                    stats.append((node.output[k], node.input[k + 2]))
        elif node.op_type == "Dropout" and opset >= 12:
            if train_flag is None:
                train_flag = fresh("ssl_dropout_training")
                m.graph.initializer.append(numpy_helper.from_array(np.array(True), train_flag))
            while len(node.input) < 2:
                node.input.append("")
            if len(node.input) < 3:
                node.input.append(train_flag)
            else:
                node.input[2] = train_flag
            if len(node.output) < 2:
                node.output.append(fresh(f"{node.output[0]}.ssl_mask"))
        elif node.op_type == "LayerNormalization":
            while len(node.output) < 3:
                node.output.append(fresh(f"{node.output[0]}.ssl_ln_{len(node.output)}"))
    return m, stats


def to_inference_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """BatchNorm with ``training_mode=0`` and one output; Dropout without its training input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consumed = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    for node in m.graph.node:
        if node.op_type == "BatchNormalization":
            for a in node.attribute:
                if a.name == "training_mode":
                    a.i = 0
            if not any(o in consumed for o in node.output[1:]):
                del node.output[1:]
        elif node.op_type == "Dropout" and len(node.input) > 2:
            del node.input[2:]
            while node.input and node.input[-1] == "":
                del node.input[-1]
    drop_unused_initializers(m)
    return m


def fix_eval_model(m: onnx.ModelProto, stat_outputs: set[str]) -> None:
    """Inference-form BatchNorm (one output) and no running-statistics graph outputs."""
    for node in m.graph.node:
        if node.op_type == "BatchNormalization" and any(o in stat_outputs for o in node.output):
            del node.output[1:]
        elif node.op_type == "Dropout":
            while len(node.input) > 1 and node.input[-1] == "":
                del node.input[-1]
    keep = [o for o in m.graph.output if o.name not in stat_outputs]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    drop_unused_initializers(m)


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
    original: onnx.ModelProto, prepared: onnx.ModelProto, *, dynamic_ok: bool
) -> onnx.ModelProto:
    """The model trained weights are written into: the prepared model in inference form,
    with the original's input and output declarations when its batch is free."""
    t = to_inference_form(prepared)
    if dynamic_ok:
        decl = {vi.name: vi for vi in (*original.graph.input, *original.graph.output)}
        for vi in (*t.graph.input, *t.graph.output):
            if vi.name in decl:
                vi.type.CopyFrom(decl[vi.name].type)
    del t.graph.value_info[:]
    return t


def export_inference_model(art: Artifacts, params: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The inference model with ``params`` (name -> array) as its initializers."""
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
