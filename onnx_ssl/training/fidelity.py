"""Fidelity of a student model to its teacher on held-out inputs, one number per output.

The kind of number depends on what the output is (:func:`output_kind`):

``top1``    logits (rank >= 2, a class axis, the last, longer than 1, read as scores):
            the fraction of positions where the student's arg-max class is the teacher's;
``cosine``  embeddings (vectors along the last axis): the mean cosine similarity
            ``<s, t> / (||s|| ||t||)`` over the positions (1 = same directions);
``relerr``  anything else (a scalar or one value per sample): the relative error
            ``||s - t|| / ||t||`` over the whole data set (0 = identical).

The chain's report, the per-epoch log and the scripts all call :func:`fidelity`, so they
measure the same thing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

KINDS = ("top1", "cosine", "relerr")
_LABEL = {"top1": "top-1 agreement", "cosine": "cosine similarity", "relerr": "relative error"}
# Output names that say "vectors, not class scores" for a [batch, features] output.
_EMBEDDING = re.compile(r"embed|hidden|pool|feature|repr|encod|vector|state", re.I)
_EPS = 1e-12


@dataclass(frozen=True)
class Fidelity:
    """One output's fidelity: ``value`` is a fraction (top1), a cosine or a relative error."""

    output: str
    kind: str
    value: float

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "relerr"

    @property
    def key(self) -> str:
        """The log column: ``fidelity:<kind>:<output>``."""
        return f"fidelity:{self.kind}:{self.output}"

    def text(self) -> str:
        v = f"{100 * self.value:.2f}%" if self.kind == "top1" else f"{self.value:.4f}"
        return f"{self.output} {_LABEL[self.kind]} {v}"


def output_kind(name: str, shape: Sequence[int | None], loss: str = "mse") -> str:
    """How to measure fidelity on output ``name`` of ``shape`` (batch axis first) when the
    student was distilled with ``loss`` (mse, kl or cosine; see the module docstring).

    KL distils logits and cosine embeddings, so they decide; under MSE a ``[batch, C]``
    output is read as logits unless its name says it is a vector (embedding, hidden,
    pooled, feature...), and a higher-rank one as vectors along its last axis."""
    last = shape[-1] if len(shape) >= 2 else None
    if len(shape) < 2 or last == 1:
        return "relerr"
    if loss == "kl":
        return "top1"
    if loss == "cosine":
        return "cosine"
    if len(shape) == 2 and not _EMBEDDING.search(name):
        return "top1"
    return "cosine"


def measure(kind: str, student: np.ndarray, teacher: np.ndarray) -> float:
    """The fidelity of one output (see the module docstring)."""
    s = np.asarray(student, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64).reshape(s.shape)
    if s.size == 0:
        return float("nan")
    if kind == "top1":
        return float(np.mean(np.argmax(s, axis=-1) == np.argmax(t, axis=-1)))
    if kind == "cosine":
        dot = np.sum(s * t, axis=-1)
        norm = np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1)
        return float(np.mean(dot / np.maximum(norm, _EPS)))
    if kind == "relerr":
        return float(np.linalg.norm(s - t) / max(float(np.linalg.norm(t)), _EPS))
    raise ValueError(f"unknown fidelity kind {kind!r}")


def fidelity(
    student: Mapping[str, np.ndarray],
    teacher: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
) -> tuple[Fidelity, ...]:
    """One :class:`Fidelity` per output named in ``kinds`` (output -> kind), in its order."""
    return tuple(Fidelity(o, k, measure(k, student[o], teacher[o])) for o, k in kinds.items())


def describe(fids: Sequence[Fidelity]) -> str:
    """``logits top-1 agreement 98.10%, hidden cosine similarity 0.9932``."""
    return ", ".join(f.text() for f in fids) if fids else "-"
