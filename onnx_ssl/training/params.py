"""Which initializers are trained: :func:`classify_parameters` reads the op table's
parameter slots (:data:`onnx_ssl.rules.RULES`) to split a graph's float32 initializers into
trainable weights and frozen BatchNorm running statistics."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ssl.rules import RULES

log = logging.getLogger(__name__)


def _ancestors(graph: gs.Graph, output: str) -> set[str]:
    """Names of the tensors ``output`` depends on."""
    tensors = graph.tensors()
    seen: set[str] = set()
    stack = [tensors[output]] if output in tensors else []
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        for n in t.inputs:
            stack.extend(i for i in n.inputs if i.name)
    return seen


def classify_parameters(
    graph: gs.Graph, output: str | None = None
) -> tuple[list[str], list[str]]:
    """Split the float32 constants (initializers) into trainable weights and frozen
    BatchNorm statistics (only those ``output`` depends on, when given).

    A weight is an initializer read in a parameter slot (the weight and bias of Conv, Gemm,
    MatMul, the scale and shift of normalisations, element-wise Add/Sub/Mul/Div operands with
    more than one element, ...). BatchNorm running statistics are frozen parameters (updated
    from the batch statistics, not by gradients). Other initializers stay constants.
    """
    trainable: dict[str, None] = {}
    frozen: dict[str, None] = {}
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant) or np.dtype(t.dtype) != np.float32:
                continue
            numel = int(np.prod(t.shape, dtype=np.int64))
            # The op table says which inputs are parameters (``trained``), which operands
            # are when not scalars (``trained_operands``), and which are running statistics.
            rule = RULES.get(node.op)
            if rule is None:
                continue
            if i in rule.stat_params:
                frozen[t.name] = None
            elif i in rule.trained or (rule.trained_operands and numel > 1):
                trainable[t.name] = None
    frozen_list = [n for n in frozen if n not in trainable]
    train_list = list(trainable)
    if output is not None:
        # Gradients exist only for what the loss reads (other outputs' heads stay constant).
        reach = _ancestors(graph, output)
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
