"""The loss graph: an onnxblock ``TrainingBlock`` computing (equation (1) of Wen et al. 2016)::

    ssl_loss = E_D(W) + weight_decay/2 * sum_l ||W_l||^2 + s * sum_g lambda_g R_g(W)

where ``E_D`` is the data loss of the model output (or, when distilling, the weighted sum of
one loss per model output against the teacher's, :mod:`onnx_ssl.training.distill`), ``R_g``
the group-Lasso sums of :mod:`onnx_ssl.training.penalty` and ``s`` the scalar input
``ssl_penalty_scale``.
``ssl_data_loss``, ``ssl_group_lasso`` (the unscaled sum) and ``ssl_weight_decay`` are extra
outputs, followed by the model outputs and the BatchNorm batch statistics. ``Sum`` and
``ReduceSumSquare`` have no gradient in onnxruntime-training 1.19.2: the terms are Add chains
and Mul + ReduceSum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from onnx_ssl.errors import UnsupportedModelError

from .distill import DISTILL_SCALE
from .penalty import GraphWriter, Penalty, add_penalty_nodes
from .spec import OUT_DATA, OUT_LOSS, OUT_PENALTY, OUT_WD, PENALTY_SCALE, TensorSpec

# Keeps sqrt's gradient finite at a zero vector (cosine distillation).
_COS_EPS = 1e-12


@dataclass
class LossSpec:
    """What the loss block reads and writes.

    With labels: ``loss`` on model output ``output`` against the target input ``target``.
    Distilling (``distill`` not empty): one term per model output, ``(output, target input,
    loss)`` with loss mse, kl or cosine, summed with the weights fed in ``ssl_distill_scale``;
    ``targets`` gives the target inputs' specs, ``temperature`` the KL temperature.
    """

    loss: str
    output: str
    target: str
    model_outputs: list[str]
    stat_outputs: list[str]
    penalty: Penalty
    weight_decay: float
    decay_tensors: list[str]
    opset: int
    distill: tuple[tuple[str, str, str], ...] = ()
    targets: tuple[TensorSpec, ...] = ()
    output_types: dict[str, str] = field(default_factory=dict)
    output_ranks: dict[str, int] = field(default_factory=dict)
    temperature: float = 2.0


def _add_input(graph: onnx.GraphProto, spec: TensorSpec) -> None:
    vi = onnx.ValueInfoProto(name=spec.name)
    vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    shape = vi.type.tensor_type.shape
    for k, d in enumerate(spec.shape):
        dim = shape.dim.add()
        if d is None:
            dim.dim_param = "batch" if k == 0 else f"{spec.name}_dim{k}"
        else:
            dim.dim_value = d
    graph.input.append(vi)


def distill_loss_nodes(w: GraphWriter, spec: LossSpec) -> str:
    """``sum_k c_k L_k`` (see :mod:`onnx_ssl.training.distill`) as a [1] tensor."""
    for t in spec.targets:
        _add_input(w.graph, t)
    _add_input(w.graph, TensorSpec(DISTILL_SCALE, (len(spec.distill),), "float32"))
    terms = []
    for out, tgt, loss in spec.distill:
        s = out
        if spec.output_types.get(out, "float32") != "float32":
            s = w.node("Cast", [out], "student_f32", to=onnx.TensorProto.FLOAT)
        if loss == "mse":
            d = w.node("Sub", [s, tgt], "diff")
            sq = w.node("Mul", [d, d], "sq")
            if spec.output_ranks.get(out, 1) >= 2:  # squared distance of the vectors
                sq = w.reduce_sum(sq, [-1], hint="sq_dist")
            term = w.to_vector(w.node("ReduceMean", [sq], "mse", keepdims=0))
        elif loss == "kl":
            inv_t = w.const(1.0 / spec.temperature, hint="inv_temperature")
            ls = w.node("LogSoftmax", [w.node("Mul", [s, inv_t], "zs")], "log_ps", axis=-1)
            lt = w.node("LogSoftmax", [w.node("Mul", [tgt, inv_t], "zt")], "log_pt", axis=-1)
            kl = w.reduce_sum(
                w.node("Mul", [w.node("Exp", [lt], "pt"), w.node("Sub", [lt, ls], "log_ratio")],
                       "kl_terms"), [-1], hint="kl")
            mean = w.to_vector(w.node("ReduceMean", [kl], "kl_mean", keepdims=0))
            term = w.node("Mul", [mean, w.const(spec.temperature ** 2, hint="t_squared")],
                          "kl_t2")
        else:  # cosine
            dot = w.reduce_sum(w.node("Mul", [s, tgt], "st"), [-1], hint="dot")
            ss = w.reduce_sum(w.node("Mul", [s, s], "ss"), [-1], hint="ss")
            tt = w.reduce_sum(w.node("Mul", [tgt, tgt], "tt"), [-1], hint="tt")
            norm = w.node("Sqrt", [w.node("Add", [w.node("Mul", [ss, tt], "sstt"),
                                                  w.const(_COS_EPS, hint="cos_eps")],
                                          "sstt_eps")], "norms")
            cos = w.node("Div", [dot, norm], "cos")
            mean = w.to_vector(w.node("ReduceMean", [cos], "cos_mean", keepdims=0))
            term = w.node("Sub", [w.const(1.0, hint="one"), mean], "one_minus_cos")
        terms.append(term)
    vec = terms[0] if len(terms) == 1 else w.node("Concat", terms, "distill_terms", axis=0)
    return w.reduce_sum(w.node("Mul", [vec, DISTILL_SCALE], "weighted"), None,
                        hint="distill_loss")


def make_training_block(ob: Any, spec: LossSpec) -> Any:
    """The onnxblock TrainingBlock: data loss + weight decay + scale * group Lasso."""

    class SslLoss(ob.Block):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self._data: Any = None
            if spec.distill:
                pass
            elif spec.loss == "cross-entropy":
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
            if spec.distill:
                data = distill_loss_nodes(w, spec)
            else:
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

