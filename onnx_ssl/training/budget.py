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
follows as usual.

**Collapse** (:func:`collapse_reason`): training stops with a one-line error, after the last
good epoch's weights are written, when a layer loses every group of a structure (its weight
is all zero: the network is cut), or when the held-out error stays at chance
(``>= 0.9 * (1 - 1/classes)``) for ``CHANCE_EPOCHS`` epochs in a row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_ssl.errors import InputError

from .forms import export_inference_model
from .probe import with_static_batch
from .spec import Artifacts

log = logging.getLogger(__name__)

GROWTH = 1.3
LOW = 0.75
FALLING = 0.85
CHANCE_EPOCHS = 3
# Structures whose groups all being zero mean the layer is cut (a depth group is a whole
# residual branch, which may go).
_CUTTING = ("filter", "channel", "shape", "filter2d", "neuron", "coupled")


class CollapseError(InputError):
    """Training collapsed; the message says what happened and what to change."""


def check_fraction(flag: str, value: float | None) -> None:
    """A budget must be a fraction in (0, 1] (a one-line error otherwise)."""
    if value is None:
        return
    if not (math.isfinite(value) and 0 < value <= 1):
        raise InputError(f"{flag} must be a fraction of the original in (0, 1], got {value:g}")


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
            np.flatnonzero(pen.rms(t, live) <= threshold).tobytes() + b"|"
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
    rms = np.unique(np.concatenate([pen.rms(t, params) for t in pen.active_terms]))
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


def collapse_reason(
    zero_groups: Sequence[tuple[str, float]],
    val_errors: Sequence[float | None],
    classes: int | None,
    bypassed: Collection[str] = (),
) -> str | None:
    """Why training collapsed, or None. ``zero_groups`` is an epoch's (structure:layer,
    fraction of zero groups) list; ``val_errors`` the held-out errors so far. A layer in
    ``bypassed`` (inside a residual branch: its shortcut carries the signal around it) may
    lose every group: that empties the branch, which pruning folds or removes, and cuts
    nothing."""
    cut = [k.split(":", 1) for k, v in zero_groups
           if v >= 1.0 and k.split(":", 1)[0] in _CUTTING]
    if cut and len(cut) == len([k for k, _ in zero_groups if k.split(":", 1)[0] in _CUTTING]):
        return "the whole model lost every group (all its weights are zero)"
    cut = [c for c in cut if c[1] not in bypassed]
    if cut:
        s, layer = cut[0]
        return f"layer {layer} lost every {s} group (its weight is all zero)"
    chance = chance_error(classes)
    recent = list(val_errors[-CHANCE_EPOCHS:])
    if (chance is not None and len(recent) == CHANCE_EPOCHS
            and all(e is not None and e >= chance for e in recent)):
        return (f"the held-out error stayed at chance ({100 * (recent[-1] or 0):.1f}%) for "
                f"{CHANCE_EPOCHS} epochs")
    return None
