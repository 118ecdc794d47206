"""The loss graph: an onnxblock ``TrainingBlock`` computing (equation (1) of Wen et al. 2016)::

    ssl_loss = E_D(W) + weight_decay/2 * sum_l ||W_l||^2 + s * sum_g lambda_g R_g(W)

where ``E_D`` is the data loss of the model output, ``R_g`` the group-Lasso sums of
:mod:`onnx_ssl.training.penalty` and ``s`` the scalar input ``ssl_penalty_scale``.
``ssl_data_loss``, ``ssl_group_lasso`` (the unscaled sum) and ``ssl_weight_decay`` are extra
outputs, followed by the model outputs and the BatchNorm batch statistics. ``Sum`` and
``ReduceSumSquare`` have no gradient in onnxruntime-training 1.19.2: the terms are Add chains
and Mul + ReduceSum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from onnx_ssl.errors import UnsupportedModelError

from .penalty import GraphWriter, Penalty, add_penalty_nodes
from .spec import OUT_DATA, OUT_LOSS, OUT_PENALTY, OUT_WD, PENALTY_SCALE, TensorSpec


@dataclass
class LossSpec:
    """What the loss block reads and writes."""

    loss: str
    output: str
    target: str
    model_outputs: list[str]
    stat_outputs: list[str]
    penalty: Penalty
    weight_decay: float
    decay_tensors: list[str]
    opset: int


def make_training_block(ob: Any, spec: LossSpec) -> Any:
    """The onnxblock TrainingBlock: data loss + weight decay + scale * group Lasso."""

    class SslLoss(ob.Block):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            if spec.loss == "cross-entropy":
                self._data = ob.loss.CrossEntropyLoss()
            elif spec.loss == "mse":
                self._data = ob.loss.MSELoss()
            elif spec.loss == "bce":
                self._data = ob.loss.BCEWithLogitsLoss()
            else:
                self._data = ob.loss.L1Loss()

        def build(self, *outputs: str) -> tuple[str, ...]:
            graph = self.base.graph
            w = GraphWriter(graph, spec.opset, prefix="ssl")
            data = w.to_vector(self._data(spec.output, spec.target))
            penalty = add_penalty_nodes(spec.penalty, w)
            scale = onnx.ValueInfoProto(name=PENALTY_SCALE)
            scale.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            scale.type.tensor_type.shape.dim.add().dim_value = 1
            graph.input.append(scale)
            if spec.weight_decay > 0 and spec.decay_tensors:
                sums = [
                    w.reduce_sum(w.node("Mul", [t, t], "wd_sq"), None, hint="wd_sum")
                    for t in spec.decay_tensors
                ]
                wd = w.node(
                    "Mul",
                    [w.add_all(sums, "wd"), w.const(spec.weight_decay / 2, hint="wd_half")],
                    "wd",
                )
            else:
                wd = w.const(0.0, hint="zero")
            w.node("Identity", [data], output=OUT_DATA)
            w.node("Identity", [penalty], output=OUT_PENALTY)
            w.node("Identity", [wd], output=OUT_WD)
            scaled = w.node("Mul", [penalty, PENALTY_SCALE], "scaled_penalty")
            total = w.node("Add", [w.node("Add", [data, wd], "data_wd"), scaled], "total")
            w.node("Identity", [total], output=OUT_LOSS)
            return (
                OUT_LOSS,
                OUT_DATA,
                OUT_PENALTY,
                OUT_WD,
                *spec.model_outputs,
                *spec.stat_outputs,
            )

    class SslTraining(ob.TrainingBlock):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self._loss = SslLoss()

        def build(self, *outputs: str) -> tuple[str, ...]:
            return self._loss(*outputs)  # type: ignore[no-any-return]

    return SslTraining()


def target_spec(loss: str, out: TensorSpec, taken: set[str]) -> TensorSpec:
    """The target input of the loss for model output ``out``: class indices for
    cross-entropy, a tensor like the output otherwise; named apart from ``taken``."""
    base = "labels" if loss == "cross-entropy" else "target"
    name = base if base not in taken else f"ssl_{base}"
    if loss == "cross-entropy":
        if len(out.shape) != 2:
            raise UnsupportedModelError(
                f"cross-entropy needs a model output of shape [batch, classes]; output "
                f"'{out.name}' has shape {list(out.shape)} (use --loss mse/bce/l1?)"
            )
        return TensorSpec(name, out.shape[:-1], "int64")
    return TensorSpec(name, out.shape, out.dtype)

