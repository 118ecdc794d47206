"""Which initializers are trained: :func:`classify_parameters` reads the op table's
parameter slots (:data:`onnx_ssl.rules.RULES`) to split a model's float32 initializers into
trainable weights and frozen BatchNorm running statistics."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_ssl.rules import RULES

log = logging.getLogger(__name__)


def _is_float32(t: onnx.TensorProto) -> bool:
    return t.data_type == onnx.TensorProto.FLOAT


def _ancestors(model: onnx.ModelProto, output: str) -> set[str]:
    """Names of the tensors ``output`` depends on."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: set[str] = set()
    stack = [output]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        n = producer.get(t)
        if n is not None:
            stack.extend(i for i in n.input if i)
    return seen


def classify_parameters(
    model: onnx.ModelProto, output: str | None = None
) -> tuple[list[str], list[str]]:
    """Split the float32 initializers into trainable weights and frozen BatchNorm statistics
    (only those ``output`` depends on, when given).

    A weight is an initializer read in a parameter slot (the weight and bias of Conv, Gemm,
    MatMul, the scale and shift of normalisations, element-wise Add/Sub/Mul/Div operands with
    more than one element, ...). BatchNorm running statistics are frozen parameters (updated
    from the batch statistics, not by gradients). Other initializers stay constants.
    """
    inits = {t.name: t for t in model.graph.initializer}
    trainable: dict[str, None] = {}
    frozen: dict[str, None] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            t = inits.get(name)
            if t is None or not _is_float32(t):
                continue
            numel = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
            # The op table says which inputs are parameters (``trained``), which operands
            # are when not scalars (``trained_operands``), and which are running statistics.
            rule = RULES.get(node.op_type)
            if rule is None:
                continue
            if i in rule.stat_params:
                frozen[name] = None
            elif i in rule.trained or (rule.trained_operands and numel > 1):
                trainable[name] = None
    frozen_list = [n for n in frozen if n not in trainable]
    train_list = list(trainable)
    if output is not None:
        # Gradients exist only for what the loss reads (other outputs' heads stay constant).
        reach = _ancestors(model, output)
        unused = [n for n in train_list if n not in reach]
        if unused:
            log.info(
                "%d parameters do not affect output %s and are not trained: %s",
                len(unused),
                output,
                ", ".join(unused[:5]),
            )
        train_list = [n for n in train_list if n in reach]
        frozen_list = [n for n in frozen_list if n in reach]
    return train_list, frozen_list
