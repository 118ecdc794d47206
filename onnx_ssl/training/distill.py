"""Self-distillation: train the sparse model to reproduce the input model's outputs.

Without labels (or with ``--distill``), the input model is the *teacher*: ONNX Runtime runs
it once over every sample (:func:`teacher_targets`) and its outputs, one array per model
output, are the targets, cached in the :class:`~onnx_ssl.training.data.Dataset` (computed
once, not per batch). The loss graph (:mod:`onnx_ssl.training.loss_block`) then takes, over
every float output ``k`` of the model, with weights ``w_k`` (``--distill-weights``, default
equal, normalised to sum 1)::

    E_D = sum_k c_k L_k(student_k, teacher_k)

    mse     L = mean_pos ||s - t||^2 over the last axis, c_k = w_k / rms(teacher_k)^2
                (an output of rank < 2: mean((s - t)^2))
    kl      L = T^2 mean_pos sum_c p_t (log p_t - log p_s),  p = softmax(z / T, last axis),
                                                       c_k = w_k
    cosine  L = mean_pos (1 - <s, t> / (||s|| ||t||)) over the last axis,  c_k = w_k

so MSE compares outputs normalised by the teacher's RMS over the data set (outputs of
different scales weigh alike), KL at temperature ``T`` (with Hinton's ``T^2`` factor) fits
logits, and cosine fits embeddings. KL and cosine need vectors along the last axis: an
output of rank < 2, or whose last axis is 1, is fitted with MSE. The ``c_k`` are fed to the
graph as the input ``ssl_distill_scale`` (the RMS comes from the data, the artifacts do
not depend on it).

The MSE's squared distance is summed over the vector, not averaged, so that its gradient is
of the order of a cross-entropy's and the labelled runs' lambdas still apply. Averaged, on
the tiny CNN of the tests (logits of RMS 8.6), the group Lasso at lambda 0.5 cut the network
to chance agreement in 8 epochs, where the summed form keeps 92% top-1 agreement at 45% of
the MACs. The learning rate may need to be lower than with labels: MSE and KL at T > 1 are
more curved than the cross-entropy. On LeNet (8,000 MNIST images, teacher logits of RMS 9.1)
one epoch of ssl's proximal SGD at lr 0.05 diverged with MSE (step 9) and with KL at T = 2
(step ~120), and trained at lr 0.01 and 0.02; KL at T = 1, whose gradient is the
cross-entropy's with the teacher's probabilities as labels, trained at 0.05.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from onnx_ssl.errors import InputError
from onnx_ssl.io import ModelProto

from .data import Dataset
from .spec import DISTILL_LOSSES, TensorSpec, check_temperature  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# The default loss picks per output what fits it (see term_loss); at T = 1 the KL's gradient
# is the cross-entropy's with the teacher's probabilities as labels, so the labelled runs'
# lr and lambdas apply.
DEFAULT_DISTILL_LOSS = "auto"
DEFAULT_TEMPERATURE = 1.0
DISTILL_SCALE = "ssl_distill_scale"
# Above this many bytes of cached teacher outputs, say so (they are held in memory).
CACHE_WARN_BYTES = 2 << 30
_FLOAT = ("float32", "float64", "float16")
_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)'")
_STATUS = re.compile(r"Status Message: (.*)", re.S)


def term_loss(loss: str, shape: Sequence[int | None], name: str = "") -> str:
    """The loss one output is fitted with: ``loss``, or mse where kl and cosine do not
    apply (no vector along the last axis). ``auto`` fits each output as its fidelity is
    measured (:func:`onnx_ssl.training.fidelity.output_kind`): kl for logits, cosine for
    vectors (embeddings, hidden states), mse for the rest."""
    if loss == "auto":
        from .fidelity import output_kind

        return {"top1": "kl", "cosine": "cosine"}.get(output_kind(name, shape), "mse")
    if loss in ("kl", "cosine") and (len(shape) < 2 or shape[-1] == 1):
        return "mse"
    return loss


def distilled_outputs(outputs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The model outputs distillation fits: all of them, and all must be float."""
    bad = [o for o in outputs if o.dtype not in _FLOAT]
    if bad:
        o = bad[0]
        raise InputError(
            f"cannot distil: model output '{o.name}' is {o.dtype}, not a float tensor "
            f"(distillation fits every output of the teacher; remove the integer output "
            f"from the model or train with labels)"
        )
    return list(outputs)


def parse_weights(spec: str | Sequence[float] | None, outputs: Sequence[str]) -> tuple[float, ...]:
    """``--distill-weights``: ``W1,W2,...`` (one per output, in the model's order) or
    ``NAME=W,...`` (outputs left out weigh 0); default equal. Normalised to sum 1."""
    n = len(outputs)
    if spec is None or spec == "":
        return tuple(1.0 / n for _ in outputs)
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
        try:
            if items and all("=" in s for s in items):
                named = {k.strip(): float(v) for k, v in (s.split("=", 1) for s in items)}
                unknown = [k for k in named if k not in outputs]
                if unknown:
                    raise InputError(
                        f"--distill-weights: {unknown[0]!r} is not a model output (outputs: "
                        f"{', '.join(outputs)})"
                    )
                values = [named.get(o, 0.0) for o in outputs]
            else:
                values = [float(s) for s in items]
        except ValueError as e:
            raise InputError(f"--distill-weights {spec!r}: not a list of numbers ({e})") from e
    else:
        values = [float(v) for v in spec]
    if len(values) != n:
        raise InputError(
            f"--distill-weights: {len(values)} weight(s) for {n} model output(s) "
            f"({', '.join(outputs)}); give one per output or NAME=W pairs"
        )
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise InputError(f"--distill-weights: weights must be finite, >= 0 and not all 0, "
                         f"got {values}")
    total = sum(values)
    return tuple(v / total for v in values)


def teacher_targets(model: ModelProto, data: Dataset, batch_size: int = 256) -> Dataset:
    """``data`` fitted to ``model``'s inputs, with the model's outputs on every sample as
    ``targets`` and each output's RMS over the data set as ``target_rms``.

    One-line :class:`InputError`: an integer output (naming it), inputs that do not fit,
    a teacher that fails on the inputs (naming the node, its op and the graph inputs it
    reads), or non-finite teacher outputs."""
    from .evaluate import run_model

    outs = distilled_outputs([TensorSpec.of(o) for o in model.graph.output])
    names = [o.name for o in outs]
    from .native import native_stderr_captured

    try:
        # (ONNX Runtime logs a failing node to stderr itself: the error says it in one line.)
        with native_stderr_captured():
            fitted, values = run_model(model, data, names, optimize=False,
                                       batch_size=batch_size)
    except InputError:
        raise
    except Exception as e:  # onnxruntime's own exception types
        raise InputError(teacher_failure(model, e, data.name)) from e
    size = sum(v.nbytes for v in values.values())
    if size > CACHE_WARN_BYTES:
        log.warning("the teacher's outputs take %.1f GiB in memory", size / 2**30)
    rms: dict[str, float] = {}
    for name, v in values.items():
        if not np.all(np.isfinite(v)):
            raise InputError(f"{data.name}: the teacher's output '{name}' holds NaN or "
                             f"infinite values on these inputs")
        values[name] = np.ascontiguousarray(v, dtype=np.float32)
        r = float(np.sqrt(np.mean(np.square(v, dtype=np.float64)))) if v.size else 0.0
        rms[name] = r if r > 0 else 1.0
    log.info("teacher outputs cached for %d samples (%s)", len(fitted),
             ", ".join(f"{k} {tuple(v.shape[1:])}, rms {rms[k]:.3g}" for k, v in values.items()))
    return replace(fitted, targets=values, target_rms=rms)


def teacher_failure(model: ModelProto, e: BaseException, source: str) -> str:
    """One line for ONNX Runtime failing to run the teacher: the node (from the runtime's
    message), its op, and the graph inputs it depends on."""
    from .native import ort_error_line

    text = str(e)
    m = _NODE.search(text)
    if not m:
        return f"{source}: the teacher model fails on these inputs: {ort_error_line(e)}"
    op, node = m.group(1), m.group(2)
    st = _STATUS.search(text)
    why = st.group(1).strip().splitlines()[0][:300] if st else ort_error_line(e)
    feeds = _inputs_of(model, node)
    via = f", fed by input {', '.join(repr(f) for f in feeds)}" if feeds else ""
    return (f"{source}: the teacher model fails on these inputs at node '{node}' "
            f"({op}{via}): {why}")


def _inputs_of(model: ModelProto, node_name: str) -> list[str]:
    """The graph inputs that node ``node_name`` reads, directly or through other nodes."""
    graph_inputs = {i.name for i in model.graph.input} - {t.name for t in
                                                          model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    start = next((n for n in model.graph.node if n.name == node_name), None)
    if start is None:
        return []
    found: list[str] = []
    seen: set[str] = set()
    stack = list(start.input)
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in graph_inputs:
            found.append(t)
        elif t in producer:
            stack.extend(producer[t].input)
    order = [i.name for i in model.graph.input]
    return sorted(found, key=order.index)


def feed_scales(
    terms: Sequence[tuple[str, str, str]], weights: Sequence[float], data: Dataset
) -> np.ndarray:
    """The ``ssl_distill_scale`` input: ``c_k`` of the module docstring for the loss terms
    ``(output, target input, loss)``."""
    c = []
    for (out, _, loss), w in zip(terms, weights, strict=True):
        if loss == "mse":
            r = data.target_rms.get(out)
            if r is None:
                raise InputError(f"{data.name}: no teacher outputs for '{out}' (distillation "
                                 f"needs teacher_targets)")
            c.append(w / (r * r))
        else:
            c.append(w)
    return np.asarray(c, dtype=np.float32)
