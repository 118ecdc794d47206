"""A MAC or parameter budget for the SSL phase, and the guard against collapse.

**The controller** (``ssl --target-macs F`` / ``--target-params F``, F a fraction of the
input model's count in (0, 1]). The group-Lasso strengths given (or the defaults) are the
starting point; one multiplier ``s`` scales all of them (the proximal threshold becomes
``lr * s * lambda_g``). After every SSL epoch the *projected* cost is measured: every
regularised group whose RMS is at most the prune threshold is set to zero in a copy of the
weights, and :func:`onnx_ssl.prune` (no numeric check) reports the MACs and params of the
model it would compile, the same accounting as the final report. Then::

    projected > target, and not falling fast  ->  s <- s * GROWTH   (prune harder)
    projected < LOW * target                  ->  s <- s / GROWTH   (relax)
    otherwise                                 ->  s held

``GROWTH`` is 1.3 and ``LOW`` 0.75. "Falling fast" means below ``FALLING`` (0.85) times the
previous epoch's projection: groups reach zero a few epochs after the strength that drives
them, so a projection already on its way down is given time before the lambdas grow again.
``s`` is saved in the checkpoint (``--resume`` continues with it; the previous projection is
not, so a resumed run's first epoch cannot hold) and logged every epoch.

**Stopping.** Until the budget is met, the projection is also checked after every training
step in which the set of groups at RMS <= the threshold changed (a cheap test on the group
norms; the projection itself is only redone then). The first time it meets the budget, the
groups the threshold zeroes then are set to zero and held there (a mask re-applied after
every step) and the lambdas are turned off (``s`` becomes 0) for the rest of the SSL phase,
which trains the remaining weights. Without this, the lambdas kept zeroing groups for the
epochs left after the budget was met, and LeNet on MNIST ended at 27.2% of the MACs for a
50% target (the README's Torch-Pruning comparison). (A resumed run does not keep the mask:
it is taken again at the first check that meets the budget.) After the SSL
phase, if the projection is still above the target, the prune threshold is raised
(bisection over the groups' RMS values) to the smallest value that meets the budget; the
report gives the threshold used and the MACs reached against the target. Fine-tuning
follows as usual. A threshold raised this way zeroes groups that still carry the function
(their RMS is above ``--threshold``): the run is then judged on its held-out metric against
``--max-drop`` (:mod:`onnx_ssl.training.acceptance`) and, over it, is not accepted (exit
status 3, its model written beside ``-o`` as ``OUT.over-max-drop.onnx``).

**Collapse** (:func:`find_collapse`): training stops with a one-line error, after the last
good epoch's weights are written, when a layer loses every group of a structure (its weight
is all zero: the network is cut), or when the held-out error stays at chance
(``>= 0.9 * (1 - 1/classes)``) for ``CHANCE_EPOCHS`` epochs in a row.

**Zeros in the input model** (:func:`input_zeros`). Before any training, the regularised
groups whose RMS is already at most the threshold, and the BatchNormalization scales that
are all zero, are found and named. timm zero-initialises the last BatchNorm of each residual
block; an eval-mode export folds it into the convolution, whose filters are then all zero,
and a training-mode export keeps it, and the convolution before it gets no gradient from
the data loss (the lambdas alone drive it to zero). Such groups still count as prunable
(removing them is exact), but a budget they meet, or a collapse they cause, says so and
names their layers rather than reading as the lambdas' work.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnx_ssl.errors import InputError

from .forms import export_inference_model
from .penalty import STRUCTURE_OF_KIND, STRUCTURES, Penalty, term_tensors
from .probe import with_static_batch
from .spec import Artifacts

log = logging.getLogger(__name__)

GROWTH = 1.3
LOW = 0.75
FALLING = 0.85
CHANCE_EPOCHS = 3
# Structures whose groups all being zero mean the layer is cut (a depth group is a whole
# residual branch, which may go).
_CUTTING = tuple(s for s in STRUCTURES if s != STRUCTURE_OF_KIND["depth"])


class CollapseError(InputError):
    """Training collapsed; the message says what happened and what to change."""


@dataclass(frozen=True)
class Projection:
    """What pruning the current weights would give, as fractions of the input model."""

    macs: int
    params: int
    macs_before: int
    params_before: int

    @property
    def mac_fraction(self) -> float:
        return self.macs / self.macs_before if self.macs_before else 1.0

    @property
    def param_fraction(self) -> float:
        return self.params / self.params_before if self.params_before else 1.0


def project(
    art: Artifacts, params: Mapping[str, np.ndarray], threshold: float
) -> Projection:
    """Prune (without the numeric check) a copy of ``params`` thresholded at ``threshold``
    and count its MACs and params with the compiler's accounting."""
    from onnx_ssl import prune

    p = {k: np.array(v) for k, v in params.items()}
    art.info.penalty.zero_groups(p, threshold)
    model = export_inference_model(art, p)
    rep = prune(with_static_batch(model), verify=0).report
    return Projection(rep.macs_after, rep.params_after, rep.macs_before, rep.params_before)


@dataclass
class BudgetController:
    """The multiplier of the lambdas (see the module docstring)."""

    target_macs: float | None = None
    target_params: float | None = None
    scale: float = 1.0
    previous: Projection | None = None
    # Set when the budget is first met (see "Stopping"): the elements held at zero, and the
    # 1-based (epoch, step) it happened at.
    mask: dict[str, np.ndarray] | None = None
    met_at: tuple[int, int] | None = None
    # How many of the groups held at zero then were already zero in the input model.
    met_by_input_zeros: int = 0
    _below: bytes | None = None  # the groups at RMS <= threshold at the last projection

    def check(self, art: Artifacts, live: Mapping[str, np.ndarray],
              all_params: Callable[[], Mapping[str, np.ndarray]], threshold: float,
              at: tuple[int, int]) -> bool:
        """Until the budget is met: if the set of groups at RMS <= ``threshold`` in ``live``
        (the regularised tensors) changed since the last projection, project the model's
        weights (``all_params()``) and, if that meets the budget, record as the mask the
        elements that thresholding zeroes now. True when this call set the mask."""
        if self.mask is not None:
            return False
        pen = art.info.penalty
        below = b"".join(
            np.flatnonzero(pen.norms(t, live, "rms") <= threshold).tobytes() + b"|"
            for t in pen.active_terms)
        if below == self._below:
            return False
        self._below = below
        if self.over(project(art, all_params(), threshold)):
            return False
        p = {k: np.array(live[k]) for k in pen.tensors()}
        pen.zero_groups(p, threshold)
        self.mask = {k: v == 0 for k, v in p.items()}
        self.met_at = at
        return True

    def hold(self, live: Mapping[str, np.ndarray]) -> None:
        """Put the frozen zeros back into the live weights (after an optimizer step)."""
        for k, m in (self.mask or {}).items():
            live[k][m] = 0.0

    def over(self, p: Projection) -> bool:
        return (self.target_macs is not None and p.mac_fraction > self.target_macs) or (
            self.target_params is not None and p.param_fraction > self.target_params
        )

    def _under(self, p: Projection) -> bool:
        ok = [
            frac < LOW * t
            for frac, t in ((p.mac_fraction, self.target_macs),
                            (p.param_fraction, self.target_params))
            if t is not None
        ]
        return bool(ok) and all(ok)

    def _falling(self, p: Projection) -> bool:
        q = self.previous
        if q is None:
            return False
        return ((self.target_macs is None or p.macs < FALLING * q.macs)
                and (self.target_params is None or p.params < FALLING * q.params))

    def update(self, p: Projection) -> float:
        if self.over(p):
            if not self._falling(p):
                self.scale *= GROWTH
        elif self._under(p):
            self.scale /= GROWTH
        self.previous = p
        return self.scale


def threshold_for_budget(
    art: Artifacts,
    params: Mapping[str, np.ndarray],
    threshold: float,
    ctl: BudgetController,
) -> tuple[float, Projection]:
    """The smallest prune threshold >= ``threshold`` (over the groups' RMS values) whose
    projection meets the budget, and that projection (the largest RMS if none does)."""
    pen = art.info.penalty
    p0 = project(art, params, threshold)
    if not ctl.over(p0):
        return threshold, p0
    rms = np.unique(np.concatenate([pen.norms(t, params, "rms") for t in pen.active_terms]))
    cand = rms[rms > threshold]
    lo, hi = 0, len(cand) - 1
    best = (float(cand[hi]), project(art, params, float(cand[hi]))) if len(cand) else (
        threshold, p0)
    while lo <= hi:
        mid = (lo + hi) // 2
        p = project(art, params, float(cand[mid]))
        if ctl.over(p):
            lo = mid + 1
        else:
            best = (float(cand[mid]), p)
            hi = mid - 1
    return best


def chance_error(classes: int | None) -> float | None:
    """The held-out error counted as chance: 0.9 x (1 - 1/classes)."""
    if not classes or classes < 2:
        return None
    return 0.9 * (1 - 1 / classes)


class CollapseCode(enum.Enum):
    LAYER_CUT = "layer_cut"    # a layer outside residual branches lost every group
    MODEL_CUT = "model_cut"    # every layer lost every group
    CHANCE = "chance"          # the held-out error stayed at chance


@dataclass(frozen=True)
class Collapse:
    """Why training collapsed: the code, the structure and layer it names, the sentence."""

    code: CollapseCode
    text: str
    structure: str = ""
    layer: str = ""


def find_collapse(
    zero_groups: Sequence[tuple[str, float]],
    val_errors: Sequence[float | None],
    classes: int | None,
    bypassed: Collection[str] = (),
) -> Collapse | None:
    """Why training collapsed, or None. ``zero_groups`` is an epoch's (structure:layer,
    fraction of zero groups) list; ``val_errors`` the held-out errors so far. A layer in
    ``bypassed`` (inside a residual branch: its shortcut carries the signal around it) may
    lose every group: that empties the branch, which pruning folds or removes, and cuts
    nothing."""
    cut = [k.split(":", 1) for k, v in zero_groups
           if v >= 1.0 and k.split(":", 1)[0] in _CUTTING]
    if cut and len(cut) == len([k for k, _ in zero_groups if k.split(":", 1)[0] in _CUTTING]):
        return Collapse(CollapseCode.MODEL_CUT,
                        "the whole model lost every group (all its weights are zero)")
    cut = [c for c in cut if c[1] not in bypassed]
    if cut:
        s, layer = cut[0]
        return Collapse(CollapseCode.LAYER_CUT,
                        f"layer {layer} lost every {s} group (its weight is all zero)", s, layer)
    chance = chance_error(classes)
    recent = list(val_errors[-CHANCE_EPOCHS:])
    if (chance is not None and len(recent) == CHANCE_EPOCHS
            and all(e is not None and e >= chance for e in recent)):
        return Collapse(CollapseCode.CHANCE,
                        f"the held-out error stayed at chance ({100 * (recent[-1] or 0):.1f}%) "
                        f"for {CHANCE_EPOCHS} epochs")
    return None


def collapse_reason(
    zero_groups: Sequence[tuple[str, float]],
    val_errors: Sequence[float | None],
    classes: int | None,
    bypassed: Collection[str] = (),
) -> str | None:
    """The sentence of :func:`find_collapse`, or None."""
    c = find_collapse(zero_groups, val_errors, classes, bypassed)
    return None if c is None else c.text


# --- zeros in the input model ----------------------------------------------------------


class ZeroKind(enum.Enum):
    GROUPS = "groups"      # regularised groups at RMS <= the threshold
    BN_SCALE = "bn_scale"  # entries of a BatchNormalization's scale that are exactly zero
    WEIGHT = "weight"      # a layer's whole weight, not regularised (shared, for example)


@dataclass(frozen=True)
class InputZero:
    """One layer whose weights are already zero in the input model, before any training."""

    kind: ZeroKind
    structure: str  # the term's structure ("filter", ...), or "scale" for a BatchNorm
    layer: str      # the term's layer (node name), or the BatchNormalization node
    tensor: str
    zero: int
    total: int
    after: str = ""  # for a BatchNorm: the node that feeds it (the convolution)

    @property
    def whole(self) -> bool:
        return self.zero == self.total

    def part(self) -> str:
        """What is zero, without the layer's name."""
        if self.kind is ZeroKind.BN_SCALE:
            feed = f", after {self.after}" if self.after else ""
            return f"BatchNorm scale {self.zero}/{self.total} zero{feed}"
        if self.kind is ZeroKind.WEIGHT:
            return f"weight {self.tensor} all zero"
        return f"{self.zero}/{self.total} {self.structure} groups zero"

    def text(self) -> str:
        return f"{self.layer} ({self.part()})"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "structure": self.structure, "layer": self.layer,
                "tensor": self.tensor, "zero": self.zero, "total": self.total,
                "after": self.after or None}


# What an input model's zeros usually are, and what to do about them.
INPUT_ZEROS_HINT = ("for example a BatchNorm scale initialised to zero, as timm does for the "
                    "last BatchNorm of each residual block, which an eval-mode export folds "
                    "into the convolution's filters; randomise or train them first")


def below_threshold(penalty: Penalty, params: Mapping[str, np.ndarray],
                    threshold: float) -> tuple[np.ndarray, ...]:
    """For every active term, which of its groups have an RMS at most ``threshold``."""
    return tuple(penalty.norms(t, params, "rms") <= threshold for t in penalty.active_terms)


def input_zeros(penalty: Penalty, params: Mapping[str, np.ndarray], threshold: float,
                model: onnx.ModelProto | None = None) -> tuple[InputZero, ...]:
    """The layers of the input model (``params``: its weights before training) with groups
    already at RMS <= ``threshold``, and (given ``model``) its BatchNormalization nodes with
    zero entries in their constant scale, and its Conv, Gemm and MatMul layers whose whole
    constant weight is zero without a regularised group saying so (a weight that an exporter
    shared between layers because it is the same zero tensor, for example)."""
    found: list[InputZero] = []
    for t, below in zip(penalty.active_terms, below_threshold(penalty, params, threshold),
                        strict=True):
        n = int(np.sum(below))
        if n:
            found.append(InputZero(ZeroKind.GROUPS, t.structure, t.label,
                                   ",".join(term_tensors(t)), n, int(below.size)))
    if model is not None:
        whole = {z.layer for z in found if z.whole}
        found += [z for z in _zero_constants(model) if z.layer not in whole]
    return tuple(found)


def _zero_constants(model: onnx.ModelProto) -> list[InputZero]:
    """Zero BatchNorm scale entries and all-zero layer weights (through Identity nodes)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = {o: n for n in model.graph.node for o in n.output}

    def const(name: str) -> tuple[str, np.ndarray] | None:
        for _ in range(8):  # Identity chains an exporter's de-duplication leaves
            if name in inits:
                return name, numpy_helper.to_array(inits[name])
            n = nodes.get(name)
            if n is None or n.op_type != "Identity":
                return None
            name = n.input[0]
        return None

    found = []
    for n in model.graph.node:
        if len(n.input) < 2:
            continue
        c = const(n.input[1])
        if c is None or c[1].size == 0:
            continue
        tensor, value = c
        layer = n.name or n.output[0]
        if n.op_type == "BatchNormalization":
            zero = int(np.sum(value == 0))
            if zero:
                feed = nodes.get(n.input[0])
                found.append(InputZero(ZeroKind.BN_SCALE, "scale", layer, tensor, zero,
                                       int(value.size), "" if feed is None
                                       else feed.name or feed.output[0]))
        elif n.op_type in ("Conv", "Gemm", "MatMul") and not np.any(value):
            found.append(InputZero(ZeroKind.WEIGHT, "weight", layer, tensor, int(value.size),
                                   int(value.size)))
    return found


def input_zeros_text(zeros: Sequence[InputZero], limit: int = 6) -> str:
    """``a (6/6 filter groups zero, 6/6 channel groups zero), b (...)`` for a message, one
    entry per layer, at most ``limit`` layers named."""
    by: dict[str, list[InputZero]] = {}
    for z in zeros:
        by.setdefault(z.layer, []).append(z)
    parts = [f"{layer} ({', '.join(z.part() for z in zs)})"
             for layer, zs in list(by.items())[:limit]]
    more = f" and {len(by) - limit} more layers" if len(by) > limit else ""
    return ", ".join(parts) + more


def collapse_cause(c: Collapse, zeros: Sequence[InputZero]) -> str:
    """What the input model's zeros have to do with collapse ``c`` ("" when nothing)."""
    if not zeros:
        return ""
    if c.code is CollapseCode.LAYER_CUT:
        own = [z for z in zeros if z.kind is not ZeroKind.BN_SCALE and z.layer == c.layer
               and z.whole]
        if own:
            what = "weight was" if own[0].kind is ZeroKind.WEIGHT else (
                f"{own[0].structure} groups were")
            return (f"layer {c.layer}'s {what} already all zero in the input model "
                    f"({INPUT_ZEROS_HINT})")
        bn = [z for z in zeros if z.kind is ZeroKind.BN_SCALE and z.after == c.layer]
        if bn:
            return (f"the BatchNorm after it ({bn[0].layer}) has an all-zero scale in the "
                    f"input model, so its filters got no gradient from the data and the "
                    f"lambdas drove them to zero ({INPUT_ZEROS_HINT})")
        return ""
    if c.code is CollapseCode.MODEL_CUT:
        return (f"the input model already had zero weights in {input_zeros_text(zeros)} "
                f"({INPUT_ZEROS_HINT})")
    return ""
