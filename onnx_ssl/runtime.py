"""The ONNX Runtime boundary: sessions, seeded random inputs and the numeric check.

Every import of ``onnxruntime`` in onnx-ssl goes through :func:`ort`
(:func:`onnx_ssl.env.import_ort`): it works with whichever single runtime distribution is
installed, keeps torch from being imported by the training build, and says in one line which
extra to install when there is none. A model is loaded with the newest IR version the
installed runtime accepts; a model whose opset the runtime cannot run is refused with both
versions and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import env
from .errors import (
    InputError,
    OnnxSslError,
    UnsupportedModelError,
    VerificationError,
    one_line,
)
from .io import clamp_ir, default_opset, weight_bytes, write_external

# The tolerance the numeric check holds: max |pruned - reference| over each output must be
# at most ATOL + RTOL * max |reference| (a norm-wise relative error; element-wise relative
# error is meaningless for outputs near zero).
RTOL = 1e-5
ATOL = 1e-6

# A model of this many bytes or more is handed to ONNX Runtime as a file with external data.
SESSION_FILE_THRESHOLD = 16 << 20


def ort(purpose: str = "this command") -> Any:
    """The ``onnxruntime`` module; EnvironmentProblem (one line, with the fix) if unusable."""
    return env.import_ort(purpose)


class _ReferenceSession:
    """The part of ``onnxruntime.InferenceSession`` that onnx-graphsurgeon's constant folding
    uses, computed by onnx's reference evaluator (exact, slow; shape arithmetic is tiny)."""

    def __init__(self, model: bytes, *args: Any, **kwargs: Any) -> None:
        from onnx.reference import ReferenceEvaluator

        self._ref = ReferenceEvaluator(onnx.load_from_string(model))

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, Any]) -> list[Any]:
        return list(self._ref.run(list(names) if names is not None else None, dict(feeds)))


# ONNX Runtime's default logger severity (it has no getter): 2, warnings and worse.
_ORT_DEFAULT_SEVERITY = 2


@contextlib.contextmanager
def _fold_quietly(rt: Any | None) -> Iterator[None]:
    """Keep onnx-graphsurgeon's fold from printing: its own warnings (a foldable node with a
    large output, the missing ``colored`` module) and those of the sessions it opens (ONNX
    Runtime's optimizers log every Unsqueeze they cannot remove, hundreds of lines on a
    transformer). Ours set their severity themselves; the fold's take the default logger's,
    which is set to errors for the fold and back to ONNX Runtime's default after it."""
    logger = gs.logger.G_LOGGER
    severity = logger.severity
    logger.severity = max(severity, logger.ERROR)
    if rt is not None:
        rt.set_default_logger_severity(3)
    try:
        yield
    finally:
        logger.severity = severity
        if rt is not None:
            rt.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


@contextlib.contextmanager
def folding_runtime() -> Iterator[None]:
    """What onnx-graphsurgeon's ``fold_constants`` imports as ``onnxruntime``, and quiet.

    With a runtime installed, the real one (torch-free through the shim). Without one
    (``analyze`` needs none), a stand-in module whose ``InferenceSession`` is onnx's
    reference evaluator, registered for the duration of the fold only.
    """
    if env.has_ort():
        env.install_shim()
        with _fold_quietly(ort()):
            yield
        return
    stand_in = types.ModuleType("onnxruntime", "onnx-ssl's stand-in: onnx.reference")
    stand_in.InferenceSession = _ReferenceSession  # type: ignore[attr-defined]
    stand_in.__onnx_ssl_stand_in__ = True  # type: ignore[attr-defined]
    sys.modules["onnxruntime"] = stand_in
    try:
        with _fold_quietly(None):
            yield
    finally:
        if sys.modules.get("onnxruntime") is stand_in:
            del sys.modules["onnxruntime"]


def check_runs(model: onnx.ModelProto) -> None:
    """Raise UnsupportedModelError when the installed runtime cannot run ``model``'s opset."""
    opset = default_opset(model)
    lim = env.runtime_limits()
    if opset > lim.max_opset:
        raise UnsupportedModelError(
            f"the model's opset {opset} is newer than {lim.name} {lim.version} runs (opset <= "
            f"{lim.max_opset}); upgrade it (pip install -U {lim.name}) or convert the model "
            f"down: onnx-ssl convert MODEL.onnx --opset {lim.max_opset} -o "
            f"MODEL-opset{lim.max_opset}.onnx")


def session(model: onnx.ModelProto, optimize: bool = False, threads: int = 0,
            providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An inference session; graph optimisations are off unless asked (for exact checks)."""
    rt = ort()
    check_runs(model)
    so = rt.SessionOptions()
    so.graph_optimization_level = (rt.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else rt.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    model = clamp_ir(model)
    try:
        if weight_bytes(model) < SESSION_FILE_THRESHOLD or any(
                t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            return rt.InferenceSession(model.SerializeToString(), so, providers=list(providers))
        # A large model goes through a file with its weights beside it, which the runtime
        # maps instead of copying: from bytes it would hold them twice more (the bytes, its
        # parsed copy) on top of the model's own.
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.onnx")
            write_external(model, path, "model.data")
            return rt.InferenceSession(path, so, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types
        raise InputError(f"ONNX Runtime cannot load the model: {one_line(e)}") from e


_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
}


# The batch size used for a symbolic leading (batch) dimension in the numeric check.
DYNAMIC_BATCH = 2


def random_inputs(sess: Any, seed: int = 0, batch: int = DYNAMIC_BATCH
                  ) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input.

    A symbolic first dimension is taken as the batch and set to ``batch``; any other
    dynamic dimension is refused (its size cannot be guessed).
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        shape = list(i.shape)
        if shape and not (isinstance(shape[0], int) and shape[0] >= 0):
            shape[0] = batch
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise InputError(f"input '{i.name}' has a dynamic shape {i.shape}; the numeric "
                             f"check needs static sizes except the batch (or pass "
                             f"--no-verify)")
        dtype = _NP_TYPES.get(i.type)
        if dtype is None:
            raise InputError(f"input '{i.name}' has unsupported type {i.type}")
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[i.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[i.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def run(model_or_session: Any, feeds: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    sess = (session(model_or_session) if isinstance(model_or_session, onnx.ModelProto)
            else model_or_session)
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def fails_at_batch(model: onnx.ModelProto, batch: int) -> str | None:
    """Why ``model`` does not run with its symbolic leading input dims set to ``batch`` (ONNX
    Runtime's error, one line), on seeded random inputs. None when it runs, and when that
    cannot be tried: no ONNX Runtime, one that cannot load the model, or an input with
    another dynamic dim."""
    if not env.has_ort():
        return None
    try:
        sess = session(model)
        feeds = random_inputs(sess, batch=batch)
    except OnnxSslError:
        return None
    opts = ort().RunOptions()
    opts.log_severity_level = 4  # the error comes back as the exception, not on stderr
    try:
        sess.run(None, feeds, opts)
    except Exception as e:  # onnxruntime raises its own exception types
        return _runtime_error(one_line(e))
    return None


def _runtime_error(text: str) -> str:
    """ONNX Runtime's kernel error without its source path and C++ signature: ``node (Op):
    message``."""
    m = re.search(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)$", text)
    if m is None:
        return text
    msg = re.sub(r"^\S+:\d+ .*?\) ", "", m.group(3))
    return f"{m.group(2)} ({m.group(1)}): {msg}"


@dataclass(frozen=True)
class Difference:
    """The worst difference on one output over the inputs compared. ``agreement``: for an
    output that looks like logits (see :func:`looks_like_logits`), the fraction of samples
    whose top-1 class is the reference's; None for any other output."""

    output: str
    max_abs: float
    ref_max_abs: float
    agreement: float | None = None

    @property
    def relative(self) -> float:
        return self.max_abs / max(self.ref_max_abs, 1e-30)

    @property
    def within_tolerance(self) -> bool:
        return self.max_abs <= ATOL + RTOL * self.ref_max_abs

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "max_abs": self.max_abs,
                "ref_max_abs": self.ref_max_abs, "relative": self.relative,
                "top1_agreement": self.agreement}


def looks_like_logits(value: np.ndarray) -> bool:
    """A float ``[batch, classes]`` output with more than one class: its argmax over the
    last axis is a prediction."""
    return value.dtype.kind == "f" and value.ndim == 2 and value.shape[1] > 1


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto, n: int = 2,
            seed: int = 0, feeds: Sequence[Mapping[str, np.ndarray]] | None = None
            ) -> list[Difference]:
    """Run both models on ``feeds`` (default: ``n`` seeded random inputs); the worst
    difference per output, and the top-1 agreement of the outputs that look like logits."""
    # One session at a time: a large model's weights are not held by two sessions at once.
    ref_s = session(reference)
    feeds = (list(feeds) if feeds is not None else
             [random_inputs(ref_s, seed + k) for k in range(n)])
    refs = [run(ref_s, f) for f in feeds]
    del ref_s
    cand_s = session(candidate)
    worst: dict[str, Difference] = {}
    # output -> (samples whose top-1 class agrees, samples)
    top1: dict[str, tuple[int, int]] = {}
    for f, a in zip(feeds, refs, strict=True):
        b = run(cand_s, f)
        for name, ref in a.items():
            if name not in b:
                raise VerificationError(f"output '{name}' is missing from the rewritten model")
            got = b[name]
            if got.shape != ref.shape:
                raise VerificationError(f"output '{name}' changed shape from {ref.shape} "
                                        f"to {got.shape}")
            diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
            if not np.all(np.isfinite(got)) and np.all(np.isfinite(ref)):
                diff = float("inf")
            if looks_like_logits(ref):
                same, total = top1.get(name, (0, 0))
                top1[name] = (same + int(np.sum(np.argmax(got, -1) == np.argmax(ref, -1))),
                              total + ref.shape[0])
            d = Difference(name, diff, float(np.max(np.abs(ref))) if ref.size else 0.0)
            if name not in worst or d.max_abs > worst[name].max_abs:
                worst[name] = d
    return [dataclasses.replace(d, agreement=top1[k][0] / top1[k][1])
            if top1.get(k, (0, 0))[1] else d for k, d in worst.items()]


def verify(reference: onnx.ModelProto, candidate: onnx.ModelProto, n: int = 2, seed: int = 0
           ) -> list[Difference]:
    """Raise VerificationError naming the output that differs beyond the tolerance."""
    diffs = compare(reference, candidate, n, seed)
    for d in diffs:
        if not d.within_tolerance:
            raise VerificationError(
                f"output '{d.output}' differs by {d.max_abs:.3g} (max |reference| "
                f"{d.ref_max_abs:.3g}, tolerance {ATOL:g} + {RTOL:g}*max|ref|); nothing written")
    return diffs
