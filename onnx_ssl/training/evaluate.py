"""Data loss and error rate of any ONNX model on a data set, with ONNX Runtime (the chain's
held-out error after each phase, and the scripts' test error)."""

from __future__ import annotations

import numpy as np
import onnx

from .data import Dataset, fit_inputs, fit_targets
from .probe import runs_with_batch, set_batch
from .proto import graph_inputs
from .spec import TensorSpec
from .trainer import data_loss_and_error


def evaluate_model(
    model: onnx.ModelProto,
    data: Dataset,
    loss: str = "cross-entropy",
    output: str | None = None,
    classes: int | None = None,
) -> tuple[float, float | None]:
    """(mean data loss, error rate) of ``model`` on ``data`` with ONNX Runtime."""
    from onnx_ssl.runtime import session

    inputs = graph_inputs(model)
    specs = [TensorSpec.of(i) for i in inputs]
    static = [s.shape[0] for s in specs if s.shape and s.shape[0] is not None]
    m = model
    if static and runs_with_batch(set_batch(model, "batch"), 2):
        m = onnx.shape_inference.infer_shapes(set_batch(model, "batch"))
        static = []
    batch = int(static[0]) if static else 256
    out_name = output or model.graph.output[0].name
    out_spec = next(TensorSpec.of(o) for o in model.graph.output if o.name == out_name)
    d = fit_inputs(data, [(s.name, s.shape, s.dtype) for s in specs])
    d = fit_targets(
        d,
        loss,
        out_spec.shape,
        classes or (out_spec.shape[-1] if loss == "cross-entropy" else None),
    )
    sess = session(m, optimize=True)
    outs = []
    for xb, _ in d.batches(batch):
        n = len(next(iter(xb.values())))
        if n < batch and static:
            idx = np.concatenate([np.arange(n), np.zeros(batch - n, dtype=np.int64)])
            xb = {k: v[idx] for k, v in xb.items()}
        outs.append(sess.run([out_name], xb)[0][:n])
    return data_loss_and_error(loss, np.concatenate(outs), d.y)
