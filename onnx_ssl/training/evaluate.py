"""Data loss, error rate and fidelity of any ONNX model on a data set, with ONNX Runtime (the
chain's held-out error and fidelity after each phase, the scripts' test error, and the
teacher's outputs for distillation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from .data import Dataset, fit_inputs, fit_targets
from .fidelity import Fidelity, fidelity
from .probe import runs_with_batch, set_batch
from .proto import graph_inputs
from .spec import TensorSpec


def data_loss_and_error(loss: str, out: np.ndarray, y: np.ndarray) -> tuple[float, float | None]:
    """The mean data loss and the error rate (None for regression) of outputs ``out``."""
    o = np.asarray(out, dtype=np.float64)
    if loss == "cross-entropy":
        m = o.max(axis=1, keepdims=True)
        lse = np.log(np.exp(o - m).sum(axis=1)) + m[:, 0]
        value = float(np.mean(lse - o[np.arange(len(y)), y]))
        return value, float(np.mean(np.argmax(o, axis=1) != y))
    t = np.asarray(y, dtype=np.float64).reshape(o.shape)
    if loss == "mse":
        return float(np.mean((o - t) ** 2)), None
    if loss == "l1":
        return float(np.mean(np.abs(o - t))), None
    value = float(np.mean(np.logaddexp(0.0, o) - o * t))
    return value, float(np.mean((o > 0) != (t > 0.5)))


def run_model(
    model: onnx.ModelProto,
    data: Dataset,
    outputs: Sequence[str] | None = None,
    *,
    optimize: bool = True,
    batch_size: int = 256,
) -> tuple[Dataset, dict[str, np.ndarray]]:
    """Run ``model`` over ``data`` in batches; (the data fitted to the model's inputs, the
    outputs ``outputs`` (all by default) by name, one row per sample).

    A model with a static batch runs with a free one when it can, else at its own batch
    size with the last batch padded. ONNX Runtime's errors while running are raised as they
    come (:func:`onnx_ssl.training.distill.teacher_targets` names the failing node)."""
    from onnx_ssl.runtime import session

    specs = [TensorSpec.of(i) for i in graph_inputs(model)]
    static = [s.shape[0] for s in specs if s.shape and s.shape[0] is not None]
    m = model
    if static and runs_with_batch(set_batch(model, "batch"), 2):
        m = onnx.shape_inference.infer_shapes(set_batch(model, "batch"))
        static = []
    batch = int(static[0]) if static else batch_size
    names = list(outputs) if outputs is not None else [o.name for o in model.graph.output]
    d = fit_inputs(data, [(s.name, s.shape, s.dtype) for s in specs])
    sess = session(m, optimize=optimize)
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for idx in d.batch_indices(batch):
        n = len(idx)
        if n < batch and static:
            idx = np.concatenate([idx, np.full(batch - n, idx[0], dtype=idx.dtype)])
        xb = {k: v[idx] for k, v in d.x.items()}
        for name, value in zip(names, sess.run(names, xb), strict=True):
            outs[name].append(np.asarray(value)[:n])
    return d, {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outs.items()}


def evaluate_model(
    model: onnx.ModelProto,
    data: Dataset,
    loss: str = "cross-entropy",
    output: str | None = None,
    classes: int | None = None,
) -> tuple[float, float | None]:
    """(mean data loss, error rate) of ``model`` on labelled ``data`` with ONNX Runtime;
    (nan, None) on unlabelled data."""
    if data.y is None:
        return float("nan"), None
    out_name = output or model.graph.output[0].name
    out_spec = next(TensorSpec.of(o) for o in model.graph.output if o.name == out_name)
    d, outs = run_model(model, data, [out_name])
    d = fit_targets(
        d,
        loss,
        out_spec.shape,
        classes or (out_spec.shape[-1] if loss == "cross-entropy" else None),
    )
    assert d.y is not None
    return data_loss_and_error(loss, outs[out_name], d.y)


def evaluate_fidelity(
    model: onnx.ModelProto, data: Dataset, kinds: Mapping[str, str]
) -> tuple[Fidelity, ...]:
    """The fidelity of ``model`` to the teacher outputs held in ``data.targets``, one number
    per output of ``kinds`` (output -> kind, :func:`onnx_ssl.training.fidelity.output_kind`)."""
    if not len(data) or not kinds:
        return ()
    _, outs = run_model(model, data, list(kinds))
    return fidelity(outs, data.targets, kinds)
