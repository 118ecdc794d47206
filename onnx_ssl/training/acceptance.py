"""Whether an SSL run's result may read as a success: the held-out metric at every stage and
``--max-drop``.

**The metric** (:class:`Metric`) is measured on the held-out data at four stages: before
SSL (the input model), after the SSL phase, after the cut (threshold and prune: the pruned
model computes what the thresholded one does) and at the end (after fine-tuning). It has a
direction: the held-out *error* (when the data has labels) is better lower, a *fidelity* to
a teacher (label-free distillation) is better higher. Its **drop** is how much worse the
final value is than the *reference*, the better of "before SSL" and "after SSL"::

    reference = best(before, after SSL)
    drop      = final - reference    (error: lower is better)
    drop      = reference - final    (fidelity: higher is better)

The reference is the better of the two because SSL may train an untrained export (its error
before SSL is at chance and any final error would look like a gain) or may itself cost
accuracy (then the input model is the bar).

**The check** (:func:`judge`). A run is *not accepted* when the drop is above the allowed
``max_drop`` (in the metric's own units: 0.03 is 3 points of error). It is checked

- always, when ``--max-drop`` is given;
- otherwise, when a budget (``--target-macs`` / ``--target-params``) was met by a cut the
  tool chose itself: the prune threshold raised above ``--threshold``, so that groups whose
  RMS was above it (not near zero: still carrying the function) were zeroed. The default
  allowed drop is :data:`DEFAULT_MAX_DROP` for the metric (3 points of error, 0.1 of
  fidelity).

A run whose lambdas (the user's, or the controller's) met the budget during SSL, or one
without a budget, is reported with its four values and drop but not judged unless
``--max-drop`` is given. A run without held-out data cannot be judged and says so.

A run that is not accepted exits with :data:`EXIT_OVER_MAX_DROP` (3) from the CLI, and its
model is written beside ``-o OUT.onnx`` as ``OUT.over-max-drop.onnx``
(:func:`rejected_path`), never to ``OUT.onnx``, so a pipeline cannot take it for a good one.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnx_ssl.errors import InputError

# The CLI's exit code for a run whose final metric dropped more than --max-drop allows.
EXIT_OVER_MAX_DROP = 3
# The default allowed drop of each metric (in its units), for a budget met by a raised cut.
DEFAULT_MAX_DROP = {"error": 0.03, "fidelity": 0.1}
# The suffix of the model written instead of OUT.onnx by a run that is not accepted.
REJECTED_SUFFIX = ".over-max-drop.onnx"


def check_max_drop(value: float | None) -> None:
    """``--max-drop`` must be a finite fraction in [0, 1] (a one-line error otherwise)."""
    if value is None:
        return
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise InputError(
            f"--max-drop must be a number in [0, 1] in the metric's units (0.03 is 3 points "
            f"of held-out error), got {value:g}"
        )


@dataclass(frozen=True)
class Metric:
    """A held-out metric at the four stages of the chain (None: not measured)."""

    name: str  # "error", or "fidelity" (a fidelity module may add ":kind:output")
    higher_is_better: bool
    before: float | None
    ssl: float | None
    cut: float | None
    final: float | None
    percent: bool = False  # a fraction shown as a percentage (differences in points)

    @staticmethod
    def error(before: float | None, ssl: float | None, cut: float | None,
              final: float | None) -> Metric:
        return Metric("error", False, before, ssl, cut, final, percent=True)

    @staticmethod
    def fidelity(before: float | None, ssl: float | None, cut: float | None,
                 final: float | None) -> Metric:
        return Metric("fidelity", True, before, ssl, cut, final)

    @property
    def measured(self) -> bool:
        return self.final is not None and self.reference is not None

    def worsening(self, frm: float, to: float) -> float:
        """How much worse ``to`` is than ``frm`` (negative: better)."""
        return frm - to if self.higher_is_better else to - frm

    @property
    def reference(self) -> float | None:
        """The better of "before SSL" and "after SSL"."""
        vals = [v for v in (self.before, self.ssl) if v is not None]
        if not vals:
            return None
        return max(vals) if self.higher_is_better else min(vals)

    @property
    def reference_stage(self) -> str:
        if self.reference is None:
            return ""
        return "before SSL" if self.reference == self.before else "after SSL"

    @property
    def drop(self) -> float | None:
        """How much worse the final value is than the reference (negative: better)."""
        if self.final is None or self.reference is None:
            return None
        return self.worsening(self.reference, self.final)

    def value_text(self, v: float | None) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.2f}%" if self.percent else f"{v:.4f}"

    def amount_text(self, d: float) -> str:
        """A difference in the metric's units (points for an error)."""
        return f"{100 * d:.2f} points" if self.percent else f"{d:.4f}"

    def stages_text(self, finetuned: bool = True) -> str:
        v = self.value_text
        last = "fine-tuned" if finetuned else "final (no fine-tuning)"
        return (f"held-out {self.name}: before SSL {v(self.before)}, after SSL {v(self.ssl)}, "
                f"after the cut {v(self.cut)}, {last} {v(self.final)}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "higher_is_better": self.higher_is_better,
                "percent": self.percent,
                "before": self.before, "ssl": self.ssl, "cut": self.cut, "final": self.final,
                "reference": self.reference, "drop": self.drop}


class VerdictCode(enum.Enum):
    """Why a run was or was not accepted (code branches on this, never on the text)."""

    ACCEPTED = "accepted"            # checked: the drop is within the allowed one
    OVER_MAX_DROP = "over_max_drop"  # checked: the drop is above it
    NOT_CHECKED = "not_checked"      # no --max-drop and no budget met by a raised cut
    NO_METRIC = "no_metric"          # no held-out data: nothing to check against


@dataclass(frozen=True)
class Verdict:
    """The check of :func:`judge`, with the numbers it used."""

    code: VerdictCode
    metric: Metric
    max_drop: float | None  # the allowed drop used (None: not checked)
    # Groups zeroed by a prune threshold raised above --threshold (RMS above it).
    live_groups_zeroed: int = 0
    threshold: float = 0.0        # --threshold
    threshold_used: float = 0.0   # the threshold pruning used
    budget: bool = False
    advice: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.code is not VerdictCode.OVER_MAX_DROP

    @property
    def checked(self) -> bool:
        return self.code in (VerdictCode.ACCEPTED, VerdictCode.OVER_MAX_DROP)

    def drop_text(self) -> str:
        m = self.metric
        d = m.drop
        if d is None:
            return "no held-out data: the result is not checked"
        what = (f"{m.amount_text(d)} worse than {m.reference_stage}" if d > 0 else
                f"{m.amount_text(-d)} better than {m.reference_stage}" if d < 0 else
                f"no change from {m.reference_stage}")
        if self.max_drop is None:
            return f"{what} (not checked: give --max-drop)"
        return f"{what} (allowed {m.amount_text(self.max_drop)}, --max-drop {self.max_drop:g})"

    def to_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "code": self.code.value, "checked": self.checked,
                "max_drop": self.max_drop, "drop": self.metric.drop,
                "live_groups_zeroed": self.live_groups_zeroed, "advice": list(self.advice)}


def judge(metric: Metric, *, max_drop: float | None, budget: bool, live_groups_zeroed: int,
          threshold: float, threshold_used: float) -> Verdict:
    """The verdict on a run (see the module docstring). ``max_drop`` is ``--max-drop`` (None:
    not given); ``live_groups_zeroed`` the groups above ``threshold`` that the raised
    ``threshold_used`` zeroed."""
    common: dict[str, Any] = {"live_groups_zeroed": live_groups_zeroed,
                              "threshold": threshold, "threshold_used": threshold_used,
                              "budget": budget}
    if not metric.measured:
        return Verdict(VerdictCode.NO_METRIC, metric, None, **common)
    allowed = max_drop
    if allowed is None and budget and live_groups_zeroed > 0:
        allowed = DEFAULT_MAX_DROP.get(metric.name.split(":", 1)[0])
    if allowed is None:
        return Verdict(VerdictCode.NOT_CHECKED, metric, None, **common)
    drop = metric.drop
    assert drop is not None
    if drop <= allowed + 1e-12:
        return Verdict(VerdictCode.ACCEPTED, metric, allowed, **common)
    advice = (("more SSL --epochs (so that the lambdas reach the budget)",
               "a larger lambda (--lambda-*)", "a higher --target-macs / --target-params")
              if live_groups_zeroed > 0 else
              ("a higher --target-macs / --target-params", "more --epochs or --finetune-epochs")
              if budget else ("smaller lambdas (--lambda-*)", "more --finetune-epochs"))
    return Verdict(VerdictCode.OVER_MAX_DROP, metric, allowed, advice=advice, **common)


def rejected_path(output: str | Path) -> Path:
    """Where the model of a run that is not accepted goes: beside ``OUT.onnx``, as
    ``OUT.over-max-drop.onnx``."""
    out = Path(output)
    return out.with_name(out.stem + REJECTED_SUFFIX)


def names_text(names: Sequence[str], limit: int = 6) -> str:
    """``a, b, c`` (and ``N more`` past ``limit``)."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
