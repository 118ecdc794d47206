"""The SSL procedure of Wen et al. 2016 (section 4.3) on an ONNX model.

:func:`run_ssl`:

1. split the data into a training and a held-out part (the same split for every phase) and
   measure the input model's error on the held-out part;
2. train with the group-Lasso penalty (artifacts with the chosen lambdas; by default SGD
   with the proximal step, which makes groups exactly zero);
3. threshold: set to zero every regularised group whose RMS (``||w_G|| / sqrt(|G|)``) is at
   most ``threshold``;
4. prune: :func:`onnx_ssl.prune` removes the zero groups and checks that the smaller model
   computes the same outputs as the thresholded one;
5. fine-tune the pruned model without the penalty;
6. write the final model and a report: error before and after each phase, filters and
   channels per layer, MACs per layer (the paper's FLOP column), params, layers.

With ``target_macs`` / ``target_params`` (fractions of the input model), the lambdas are
the starting point of a controller that scales them every SSL epoch until the projected
cost of pruning meets the budget, and the prune threshold is raised if it still does not
(:mod:`onnx_ssl.training.budget`). Every SSL epoch logs the projected MACs, and a collapse
(a layer that loses every group, or chance-level held-out error for several epochs) stops
the run with a one-line error after the last good weights are written.

**Is the result a success?** The held-out metric (the error, when the data has labels) is
measured before SSL, after SSL, after the cut (threshold and prune) and after fine-tuning;
the report's last line gives all four and the drop from the better of the first two to the
end (:mod:`onnx_ssl.training.acceptance`). A run whose drop is over ``max_drop``
(``--max-drop``; by default checked only for a budget met by raising the prune threshold,
at 3 points of error) is *not accepted*: its model is written as ``OUT.over-max-drop.onnx``
beside ``output``, never to ``output``, the report says ``accepted: false`` and the CLI
exits with status 3 (:data:`~onnx_ssl.training.acceptance.EXIT_OVER_MAX_DROP`). Groups and
BatchNorm scales already zero in the input model are named in the report, and a budget met
or a collapse caused by them says so (:func:`~onnx_ssl.training.budget.input_zeros`).

With ``work_dir``, each training phase checkpoints every epoch there and the run is recorded
in ``ssl_run.json``; ``resume`` continues an interrupted run from the last finished epoch of
the phase it was in (pruning is recomputed: it is deterministic).

Held-out errors come from :mod:`.evaluate`, measured speedups from :mod:`.speedup`; the demo
on built-in data is :mod:`.demo`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnx_ssl.compiler import LayerStat
from onnx_ssl.errors import InputError
from onnx_ssl.io import ModelProto, save_model, write_text_atomic
from onnx_ssl.text import format_table as _table

from .acceptance import Metric, Verdict, check_max_drop, judge, names_text, rejected_path
from .artifacts import build_artifacts
from .budget import (
    INPUT_ZEROS_HINT,
    BudgetController,
    CollapseError,
    InputZero,
    ZeroKind,
    below_threshold,
    collapse_cause,
    find_collapse,
    input_zeros,
    input_zeros_text,
    project,
    threshold_for_budget,
)
from .data import Dataset
from .distill import DEFAULT_DISTILL_LOSS, DEFAULT_TEMPERATURE, teacher_targets
from .evaluate import (
    evaluate_fidelity,
    evaluate_model,  # re-exported
)
from .fidelity import Fidelity
from .fidelity import describe as describe_fidelity
from .forms import export_inference_model
from .penalty import Lambdas
from .probe import BatchCheck, static_batch, with_static_batch
from .spec import ARTIFACT_FILES, ArtifactOptions, Artifacts
from .speedup import add_speedups  # re-exported
from .trainer import (
    LOG,
    STATE,
    TRAINED,
    EpochStats,
    ProgressEvent,
    TrainConfig,
    Trainer,
)

__all__ = [
    "DEFAULT_FINETUNE_EPOCHS",
    "DEFAULT_FINETUNE_LR",
    "DEFAULT_LAMBDA",
    "DEFAULT_SSL_EPOCHS",
    "DEFAULT_SSL_LR",
    "DEFAULT_THRESHOLD",
    "LAST_GOOD",
    "PHASES",
    "RUN_INFO",
    "SslOptions",
    "SslReport",
    "SslResult",
    "add_speedups",
    "evaluate_model",
    "run_ssl",
    "work_files",
]

if TYPE_CHECKING:
    from .distributed import Distributed

log = logging.getLogger(__name__)

# Defaults of `onnx-ssl ssl`, chosen on LeNet with an 8,000-image MNIST split (125 steps
# per epoch, baseline error 1.85%): lambda 0.01 prunes nothing; 0.02 keeps the baseline
# error with 15-40 filters; 0.03 gives 4-30 filters (21.6% of the MACs) at 2.20%; 0.04
# gives 3-26 filters at 2.20%; 0.1 leaves 1-15 filters at 3.15%.
DEFAULT_LAMBDA = 0.03
DEFAULT_SSL_EPOCHS = 20
DEFAULT_SSL_LR = 0.05
DEFAULT_FINETUNE_EPOCHS = 10
DEFAULT_FINETUNE_LR = 5e-4
DEFAULT_THRESHOLD = 1e-3

# `--start oneshot`: the most training samples the one-shot selection's activation
# importance is computed on.
ONESHOT_CALIB = 256
# How the chain reaches its budget: "ssl" (group Lasso from the input model, then the
# threshold) or "oneshot" (`prune --target-macs`'s selection, then fine-tuning); "auto":
# oneshot when distilling without labels to a budget, where it kept more fidelity at equal
# MACs and epochs on LeNet and MiniLM (docs/results.md), else ssl.
STARTS = ("auto", "ssl", "oneshot")

# The subfolders of --work-dir: the SSL phase and the fine-tuning phase.
PHASES = ("ssl", "finetune")
# In --work-dir: what the run is (model, data, options), checked by --resume.
RUN_INFO = "ssl_run.json"
# In --work-dir/ssl after a collapse: the last good epoch's weights as a model.
LAST_GOOD = "last_good_model.onnx"

Notify = Callable[[str], None]


@dataclass(frozen=True)
class SslOptions:
    """Options of the SSL chain (the CLI's defaults)."""

    lambdas: Lambdas = field(
        default_factory=lambda: Lambdas(filter=DEFAULT_LAMBDA, channel=DEFAULT_LAMBDA)
    )
    loss: str = "cross-entropy"
    epochs: int = DEFAULT_SSL_EPOCHS
    lr: float = DEFAULT_SSL_LR
    optimizer: str = "sgd"
    prox: bool = True
    schedule: str = "cosine"
    batch_size: int = 64
    weight_decay: float = 0.0
    scale_by_size: bool = False
    threshold: float = DEFAULT_THRESHOLD
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS
    finetune_lr: float = DEFAULT_FINETUNE_LR
    finetune_optimizer: str = "adamw"
    val_fraction: float = 0.2
    seed: int = 0
    verify: int = 2
    work_dir: Path | None = None
    # Continue the interrupted run in work_dir (same model, data and options).
    resume: bool = False
    # A budget: fractions of the input model's MACs / params (see onnx_ssl.training.budget).
    target_macs: float | None = None
    target_params: float | None = None
    # Stop with CollapseError when a layer is cut or the error stays at chance.
    stop_on_collapse: bool = True
    # The most the held-out metric may worsen (see onnx_ssl.training.acceptance); None: the
    # metric's default, checked only for a budget met by raising the prune threshold.
    max_drop: float | None = None
    # Self-distillation (onnx_ssl.training.distill): fit the input model's outputs instead
    # of the labels (always done when the data has none).
    distill: bool = False
    distill_loss: str = DEFAULT_DISTILL_LOSS
    distill_temperature: float = DEFAULT_TEMPERATURE
    distill_weights: str | None = None
    # "oneshot": no SSL phase; the budget is met by prune's one-shot selection and the
    # pruned model is fine-tuned (distilled without labels) for finetune_epochs; "auto":
    # see STARTS.
    start: str = "auto"

    def __post_init__(self) -> None:
        from onnx_ssl.passes.zero_to_budget import check_fraction

        ArtifactOptions(distill=self.distill_loss, temperature=self.distill_temperature)

        check_fraction("--target-macs", self.target_macs)
        check_fraction("--target-params", self.target_params)
        check_max_drop(self.max_drop)
        if self.start not in STARTS:
            raise InputError(f"--start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.start == "oneshot" and self.target_macs is None and self.target_params is None:
            raise InputError("--start oneshot needs a budget: give --target-macs F or "
                             "--target-params F")
        if self.resume and self.work_dir is None:
            raise InputError("--resume needs the work folder of the interrupted run")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise InputError(f"--threshold must be a finite number >= 0, got {self.threshold}")
        if self.epochs < 0 or self.finetune_epochs < 0:
            raise InputError("epochs must be >= 0")
        for flag, v in (("--lr", self.lr), ("--finetune-lr", self.finetune_lr)):
            if not (math.isfinite(v) and v > 0):
                raise InputError(f"{flag} must be a finite number > 0, got {v}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(
                f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"
            )
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0 <= self.val_fraction < 1:  # also refuses nan
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.verify < 0:
            raise InputError(
                f"--verify must be >= 0 (0 skips the numeric check), got {self.verify}"
            )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["lambdas"] = self.lambdas.to_json()
        d["work_dir"] = None if self.work_dir is None else str(self.work_dir)
        return d


@dataclass(frozen=True)
class SslReport:
    """What the chain did, with errors on the held-out data after every phase."""

    model: str
    data: str
    train_samples: int
    val_samples: int
    error_before: float | None
    error_ssl: float | None
    error_thresholded: float | None
    error_pruned: float | None
    error_final: float | None
    groups_zeroed: int
    layers: tuple[LayerStat, ...]
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    options: SslOptions
    ssl_history: tuple[EpochStats, ...] = ()
    finetune_history: tuple[EpochStats, ...] = ()
    speedup: float | None = None
    seconds: float = 0.0
    prune_text: str = ""
    # The threshold pruning used (raised above options.threshold to meet a budget).
    threshold_used: float | None = None
    lambda_scale: float = 1.0
    # The held-out metric at the four stages and the verdict on it (acceptance module).
    metric: Metric | None = None
    verdict: Verdict | None = None
    # Groups above options.threshold that a raised threshold_used zeroed.
    live_groups_zeroed: int = 0
    # What was already zero in the input model, before any training.
    input_zeros: tuple[InputZero, ...] = ()
    # Whether the input model, thresholded, already met the budget (None: no budget).
    input_meets_budget: bool | None = None
    # (SSL epoch, step), 1-based, where the budget was met, and how many of the groups then
    # held at zero were already zero in the input model.
    budget_met_at: tuple[int, int] | None = None
    met_by_input_zeros: int = 0
    # The -o path asked for, and the path the final model was written to (another one when
    # the run is not accepted).
    output: str | None = None
    written_to: str | None = None
    # Distillation: held-out fidelity to the input model per stage (before, ssl,
    # thresholded, pruned, final), one Fidelity per output (onnx_ssl.training.fidelity).
    fidelity: tuple[tuple[str, tuple[Fidelity, ...]], ...] = ()

    @property
    def accepted(self) -> bool:
        """False when the final metric dropped more than --max-drop allows."""
        return self.verdict is None or self.verdict.accepted

    @property
    def budget_met(self) -> bool | None:
        o = self.options
        if o.target_macs is None and o.target_params is None:
            return None
        mf = self.macs_after / self.macs_before if self.macs_before else 1.0
        pf = self.params_after / self.params_before if self.params_before else 1.0
        return (o.target_macs is None or mf <= o.target_macs + 1e-12) and (
            o.target_params is None or pf <= o.target_params + 1e-12)

    def _cost_text(self) -> str:
        """``MACs 48.2% of the original (target 50.0%), params ...``."""
        o = self.options
        mf = self.macs_after / self.macs_before if self.macs_before else 1.0
        pf = self.params_after / self.params_before if self.params_before else 1.0
        if self.budget_met is None:
            return f"MACs {mf:.1%} of the original, params {pf:.1%}"
        parts = []
        if o.target_macs is not None:
            parts.append(f"MACs {mf:.1%} of the original (target {o.target_macs:.1%})")
        if o.target_params is not None:
            parts.append(f"params {pf:.1%} (target {o.target_params:.1%})")
        return ", ".join(parts)

    def _met_at_text(self) -> str:
        if self.budget_met_at is None:
            return ""
        e, st = self.budget_met_at
        text = f"; met at SSL epoch {e}, step {st}"
        if self.input_meets_budget and self.met_by_input_zeros:
            return (f"{text} by {self.met_by_input_zeros} groups already zero in the input "
                    f"model")
        if self.met_by_input_zeros:
            return (f"{text} ({self.met_by_input_zeros} of its groups already zero in the "
                    f"input model)")
        return text

    def budget_text(self) -> str:
        if self.budget_met is None:
            return ""
        how = (f"one-shot selection of {self.live_groups_zeroed} groups (--start oneshot)"
               if self.options.start == "oneshot" else
               f"lambdas x{self.lambda_scale:.3g} at the end of SSL, threshold "
               f"{self.threshold_used if self.threshold_used is not None else 0:.3g}"
               f"{self._met_at_text()}")
        return f"budget {'met' if self.budget_met else 'NOT met'}: {self._cost_text()}; {how}"

    def last_line(self) -> str:
        """The line a pipeline reads: cost, the held-out metric at the four stages, its drop
        and whether the run is accepted (and, when not, where the model went and what to
        change)."""
        m, v = self.metric, self.verdict
        head = self.budget_text() or self._cost_text()
        if m is None or v is None:
            return head
        o = self.options
        stages = m.stages_text(finetuned=o.finetune_epochs > 0
                               or (o.start == "oneshot" and o.epochs > 0))
        if v.accepted:
            return f"{head}; {stages}: {v.drop_text()}"
        o = self.options
        cut = ""
        if v.live_groups_zeroed:
            cut = (f" by the one-shot selection, which zeroed {v.live_groups_zeroed} groups "
                   f"that were not near zero" if o.start == "oneshot" else
                   f" only by raising the prune threshold from {o.threshold:g} to "
                   f"{v.threshold_used:.3g}, which zeroed {v.live_groups_zeroed} groups that "
                   f"were not near zero")
        where = ""
        if self.written_to is not None:
            where = f"; the model is in {self.written_to}, not {self.output}"
        advice = list(v.advice)
        use = ", ".join(advice[:-1]) + (" or " if len(advice) > 1 else "") + advice[-1]
        return (f"NOT ACCEPTED (over --max-drop, exit status 3): {self._cost_text()}{cut}; "
                f"{stages}: {v.drop_text()}{where}; use {use}")

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "train_samples": self.train_samples,
            "val_samples": self.val_samples,
            "error": {
                "before": self.error_before,
                "ssl": self.error_ssl,
                "thresholded": self.error_thresholded,
                "pruned": self.error_pruned,
                "final": self.error_final,
            },
            "groups_zeroed": self.groups_zeroed,
            "layers_before": self.layers_before,
            "layers_after": self.layers_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "speedup": self.speedup,
            "layers": [{**asdict(r), "mac_fraction": r.mac_fraction} for r in self.layers],
            "options": self.options.to_json(),
            "ssl_history": [h.row() for h in self.ssl_history],
            "finetune_history": [h.row() for h in self.finetune_history],
            "seconds": round(self.seconds, 2),
            "metric": None if self.metric is None else self.metric.to_json(),
            "accepted": self.accepted,
            "max_drop": None if self.verdict is None else self.verdict.max_drop,
            "drop": None if self.metric is None else self.metric.drop,
            "verdict": None if self.verdict is None else self.verdict.to_json(),
            "input_zeros": [z.to_json() for z in self.input_zeros],
            "output": self.output,
            "written_to": self.written_to,
            "last_line": self.last_line(),
            "fidelity": {stage: [{"output": f.output, "kind": f.kind, "value": f.value}
                                 for f in fids] for stage, fids in self.fidelity},
            "budget": {
                "target_macs": self.options.target_macs,
                "target_params": self.options.target_params,
                "mac_fraction": self.macs_after / self.macs_before if self.macs_before else None,
                "param_fraction": (self.params_after / self.params_before
                                   if self.params_before else None),
                "met": self.budget_met,
                "threshold_used": self.threshold_used,
                "lambda_scale": self.lambda_scale,
                "live_groups_zeroed": self.live_groups_zeroed,
                "met_at": None if self.budget_met_at is None else list(self.budget_met_at),
                "met_by_input_zeros": self.met_by_input_zeros,
                "input_meets_budget": self.input_meets_budget,
            },
        }

    def to_text(self) -> str:
        def pct(e: float | None) -> str:
            return "-" if e is None else f"{100 * e:.2f}%"

        lines = [
            f"SSL on {self.model} with {self.data} ({self.train_samples} training, "
            f"{self.val_samples} held-out samples); lambdas: "
            f"{self.options.lambdas.describe()}",
            f"held-out error: before {pct(self.error_before)}, after SSL "
            f"{pct(self.error_ssl)}, thresholded ({self.groups_zeroed} groups zeroed) "
            f"{pct(self.error_thresholded)}, pruned {pct(self.error_pruned)}, fine-tuned "
            f"{pct(self.error_final)}",
            *(["held-out fidelity to the input model: "
               + "; ".join(f"{stage} {describe_fidelity(f)}" for stage, f in self.fidelity)]
              if self.fidelity else []),
            *([f"already zero in the input model, before training: "
               f"{input_zeros_text(self.input_zeros)} ({INPUT_ZEROS_HINT})"]
              if self.input_zeros else []),
            "",
        ]
        rows = [("layer", "op", "filters", "channels", "params", "MACs (FLOP/2)", "MACs kept")]
        for r in self.layers:
            rows.append(
                (
                    r.node,
                    r.op,
                    f"{r.filters_before} -> {r.filters_after}",
                    f"{r.channels_before} -> {r.channels_after}",
                    f"{r.params_before} -> {r.params_after}",
                    f"{r.macs_before} -> {r.macs_after}",
                    f"{r.mac_fraction:.1%}",
                )
            )
        lines += _table(rows)
        pfrac = self.params_after / self.params_before if self.params_before else 0.0
        mfrac = self.macs_after / self.macs_before if self.macs_before else 0.0
        lines += [
            "",
            f"layers {self.layers_before} -> {self.layers_after}; params "
            f"{self.params_before} -> {self.params_after} ({pfrac:.1%}); MACs "
            f"{self.macs_before} -> {self.macs_after} ({mfrac:.1%})",
            f"time {self.seconds:.1f}s",
            self.last_line(),
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class SslResult:
    model: ModelProto
    report: SslReport
    output: Path | None = None
    # The SSL phase's model with its small groups zeroed, before pruning (for the figures).
    thresholded: ModelProto | None = None




# --- the chain ------------------------------------------------------------------------------


def _prune_keeping_batch(model: ModelProto, **kw: Any) -> Any:
    """``onnx_ssl.prune`` on ``model`` as it is, so that a symbolic batch stays symbolic and
    what the analysis bound to it is written back computed from it (a batch index folded at
    batch 1 would give every sample sample 0's attention mask); where the batch cannot be
    bound (the MACs are then not static), on the model at batch 1."""
    from onnx_ssl import prune

    if with_static_batch(model) is not model:  # a symbolic batch
        try:
            pr = prune(model, **kw)
        except InputError:  # e.g. a budget on MACs that are not static at a symbolic batch
            pr = None
        if pr is not None and (pr.report.macs_before or not pr.report.layers):
            return pr
    return prune(with_static_batch(model), **kw)


def _restore_io(original: ModelProto, model: ModelProto) -> ModelProto:
    """Give ``model`` the input/output declarations of ``original`` if it runs with them."""
    decl = {vi.name: vi for vi in (*original.graph.input, *original.graph.output)}
    m = ModelProto()
    m.CopyFrom(model)
    changed = False
    for vi in (*m.graph.input, *m.graph.output):
        if vi.name in decl and vi.type != decl[vi.name].type:
            dims = decl[vi.name].type.tensor_type.shape.dim
            if len(dims) == len(vi.type.tensor_type.shape.dim):
                vi.type.CopyFrom(decl[vi.name].type)
                changed = True
    if not changed:
        return model
    del m.graph.value_info[:]
    # Values, not only shapes: a batch index folded at batch 1 runs at any batch and gives
    # every sample sample 0's attention mask (see probe.BatchCheck).
    own = static_batch(model)
    return m if BatchCheck(model, own).mismatch(m, own + 2) is None else model


def work_files(work_dir: str | Path | None) -> list[Path]:
    """The files :func:`run_ssl` writes into ``work_dir`` (its artifacts, checkpoints, logs
    and trained models of both phases): outputs and inputs are checked against them."""
    if work_dir is None:
        return []
    per_phase = (*ARTIFACT_FILES, STATE, LOG, TRAINED)
    return [Path(work_dir) / RUN_INFO, Path(work_dir) / PHASES[0] / LAST_GOOD,
            *(Path(work_dir) / phase / f for phase in PHASES for f in per_phase)]


def _run_identity(model: ModelProto, data: Dataset, opts: SslOptions) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one."""
    import hashlib

    d = opts.to_json()
    # (--max-drop only judges the result: a resumed run may change it.)
    del d["work_dir"], d["resume"], d["max_drop"]
    h = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]
    digest = hashlib.sha256(b"" if data.y is None else np.ascontiguousarray(data.y).tobytes())
    for k in sorted(data.x):
        digest.update(np.ascontiguousarray(data.x[k]).tobytes())
    return {"model": h, "data": digest.hexdigest()[:16], "samples": len(data), "options": d}


def _start_or_resume(work: Path, ident: dict[str, Any], resume: bool) -> None:
    """Record the run in ``work`` or, with ``resume``, check that it is the recorded one.

    Each phase checkpoints itself: the trainer writes ``train_state.ckpt`` after every epoch
    (to a temporary file renamed over the old one, so a kill leaves the previous epoch's);
    pruning is recomputed from the SSL phase's final checkpoint (it is deterministic)."""
    import json

    path = work / RUN_INFO
    if not resume:
        write_text_atomic(path, json.dumps(ident, indent=1, sort_keys=True) + "\n")
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{work}: no interrupted run to resume (no {RUN_INFO})") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e})") from e
    for key in ("model", "data", "samples"):
        if saved.get(key) != ident[key]:
            raise InputError(f"--resume {work}: the {key} differs from the interrupted run's")
    diff = sorted(k for k in ident["options"]
                  if saved.get("options", {}).get(k) != ident["options"][k])
    if diff:
        raise InputError(f"--resume {work}: options differ from the interrupted run's: "
                         f"{', '.join(diff)}")


def run_ssl(
    model: ModelProto,
    data: Dataset,
    options: SslOptions | None = None,
    *,
    output: str | Path | None = None,
    report_path: str | Path | None = None,
    name: str = "",
    progress: Callable[[ProgressEvent], None] | None = None,
    notify: Notify | None = None,
    workers: Distributed | None = None,
) -> SslResult:
    """Run the SSL chain (see the module docstring) and write ``output`` if given.

    With ``workers`` (:mod:`.distributed`), every worker runs the chain, the training phases
    data-parallel, and only rank 0 writes files (the others' artifacts go to a temporary
    folder)."""
    opts = options or SslOptions()
    writer = workers is None or workers.is_writer
    say = notify or (lambda msg: log.info("%s", msg))
    t0 = time.perf_counter()
    name = name or model.graph.name or "model"
    distill = opts.distill or data.y is None
    if distill:  # the teacher's outputs, computed once per sample
        data = teacher_targets(model, data)
        say(f"{'--distill' if data.y is not None else 'no labels in the data'}: distilling "
            f"the input model's outputs ({opts.distill_loss}; teacher outputs cached for "
            f"{len(data)} samples)")
    if opts.start == "auto":
        budget = opts.target_macs is not None or opts.target_params is not None
        opts = replace(opts, start="oneshot" if distill and budget else "ssl")
    dist = ({"distill": opts.distill_loss, "temperature": opts.distill_temperature,
             "distill_weights": opts.distill_weights} if distill else {})
    with tempfile.TemporaryDirectory(prefix="onnx-ssl-") as tmp:
        work = Path(opts.work_dir) if opts.work_dir is not None and writer else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if opts.work_dir is not None and writer:
            _start_or_resume(work, _run_identity(model, data, opts), opts.resume)

        say(f"building the SSL training artifacts ({opts.lambdas.describe()})")
        art = build_artifacts(
            model,
            work / PHASES[0],
            ArtifactOptions(
                loss=opts.loss,
                lambdas=opts.lambdas,
                weight_decay=opts.weight_decay,
                optimizer=opts.optimizer,
                scale_by_size=opts.scale_by_size,
                fallback_batch=opts.batch_size,
                **dist,  # type: ignore[arg-type]
            ),
            name=name,
        )
        cfg = TrainConfig(
            epochs=opts.epochs,
            batch_size=opts.batch_size,
            lr=opts.lr,
            schedule=opts.schedule,
            prox=opts.prox,
            val_fraction=0.0,
            seed=opts.seed,
            save_state=opts.work_dir is not None,
            resume=opts.resume,
        )
        trainer = Trainer(art, cfg, dist=workers)
        train, val = trainer.prepare_data(data).split(opts.val_fraction, opts.seed)
        fitted_val = val if len(val) else None
        # (A resumed trainer holds the trained weights: measure the input's error apart.)
        before = (Trainer(art, replace(cfg, resume=False, save_state=False, export=False))
                  if trainer.start_epoch else trainer)
        _, err_before, fid_before = (before.evaluate_all(fitted_val) if fitted_val is not None
                                     else (0, None, ()))
        say(
            f"held-out error before SSL: {_pct(err_before)}"
            f"{f' (fidelity {describe_fidelity(fid_before)})' if distill else ''}"
            + ("" if opts.start == "oneshot" else f"; training with SSL for {opts.epochs} epochs")
        )
        # What is zero before any training (see onnx_ssl.training.budget): named, and told
        # apart from what the lambdas zero.
        params0 = before.params()
        zeros = input_zeros(art.info.penalty, params0, opts.threshold, model)
        if zeros:
            say(f"already zero in the input model: {input_zeros_text(zeros)}")
        ctl = (BudgetController(opts.target_macs, opts.target_params, trainer.lambda_scale)
               if opts.target_macs is not None or opts.target_params is not None else None)
        input_meets = (None if ctl is None
                       else not ctl.over(project(art, params0, opts.threshold)))
        start = _StartZeros(zeros, below_threshold(art.info.penalty, params0, opts.threshold),
                            bool(input_meets))
        if input_meets and zeros:
            say(f"the input model already meets the budget with the groups already zero in "
                f"it: they count as pruned ({INPUT_ZEROS_HINT})")
        del params0
        fid_ssl: tuple[Fidelity, ...] = ()
        label_loss = "cross-entropy" if distill else opts.loss
        if opts.start == "oneshot":
            # No SSL phase: the budget is met by the one-shot selection of `prune`
            # (activation importance on training inputs), and fine-tuning recovers.
            ssl_history: tuple[EpochStats, ...] = ()
            err_ssl = None  # no SSL phase: "after SSL" is not measured
            calib = {k: v[:ONESHOT_CALIB] for k, v in train.x.items()}
            say(f"one-shot selection to the budget (activation importance on "
                f"{min(len(train), ONESHOT_CALIB)} training samples); pruning")
            pr = _prune_keeping_batch(model, verify=opts.verify, seed=opts.seed, name=name,
                                      target_macs=opts.target_macs,
                                      target_params=opts.target_params, calib=calib)
            threshold = opts.threshold
            zeroed = live_zeroed = pr.report.groups_zeroed
            thresholded: ModelProto | None = None
            pruned = _restore_io(model, pr.model)
        else:
            hook = _epoch_hook(art, opts, ctl, zeros)
            try:
                ssl = trainer.fit(train, val if len(val) else None, _in_phase(progress, "ssl"),
                                  on_epoch=hook, on_step=_step_hook(art, opts, ctl, say, start))
            except CollapseError as e:
                where = (_write_last_good(trainer, art, opts, output) if writer
                         else "rank 0 wrote the last good weights")
                raise CollapseError(f"{e}; {where}") from None
            ssl_history = ssl.history
            err_ssl = ssl.val_error
            if fitted_val is not None and (distill or not ssl.history):
                _, err_ssl, fid_ssl = trainer.evaluate_all(fitted_val)

            params = trainer.params()
            threshold = opts.threshold
            live_zeroed = 0
            if ctl is not None:
                threshold, proj = threshold_for_budget(art, params, opts.threshold, ctl)
                if threshold > opts.threshold:
                    live_zeroed = _zeroed_between(art, params, opts.threshold, threshold)
                    say(f"budget not met by the SSL phase alone: prune threshold raised from "
                        f"{opts.threshold:g} to {threshold:.3g}, zeroing {live_zeroed} groups "
                        f"above {opts.threshold:g} (projected MACs {proj.mac_fraction:.1%}, "
                        f"params {proj.param_fraction:.1%})")
            zeroed = art.info.penalty.zero_groups(params, threshold)
            trainer.set_params(params)
            _, err_thr, fid_thr = (trainer.evaluate_all(fitted_val) if fitted_val is not None
                                   else (0, None, ()))
            thresholded = export_inference_model(art, params)
            say(
                f"SSL done: held-out error {_pct(err_ssl)}; {zeroed} groups at RMS <= "
                f"{threshold:.3g} set to zero (error {_pct(err_thr)}); pruning"
            )
            pr = _prune_keeping_batch(thresholded, verify=opts.verify, seed=opts.seed,
                                      name=name)
            pruned = _restore_io(thresholded, pr.model)
        err_pruned = evaluate_model(pruned, val, label_loss)[1] if len(val) else None
        kinds = trainer.fidelity_kinds
        fid_pruned = evaluate_fidelity(pruned, val, kinds) if distill else ()
        if opts.start == "oneshot":  # the cut is the prune: the pruned model computes it
            err_thr, fid_thr = err_pruned, fid_pruned
        rep = pr.report
        say(
            f"pruned: params {rep.params_before} -> {rep.params_after}, MACs "
            f"{rep.macs_before} -> {rep.macs_after}; held-out error {_pct(err_pruned)}"
        )

        final = pruned
        ft_hist: tuple[EpochStats, ...] = ()
        err_final = err_pruned
        # --start oneshot has no SSL phase: its epochs fine-tune too.
        ft_epochs = opts.finetune_epochs + (opts.epochs if opts.start == "oneshot" else 0)
        if ft_epochs > 0:
            say(f"fine-tuning the pruned model for {ft_epochs} epochs")
            ft_art = build_artifacts(
                pruned,
                work / PHASES[1],
                ArtifactOptions(
                    loss=opts.loss,
                    optimizer=opts.finetune_optimizer,
                    weight_decay=opts.weight_decay,
                    fallback_batch=opts.batch_size,
                    **dist,  # type: ignore[arg-type]
                ),
                name=name,
            )
            ft_cfg = replace(
                cfg, epochs=ft_epochs, lr=opts.finetune_lr, prox=False, penalty=False
            )
            ft = Trainer(ft_art, ft_cfg, dist=workers).fit(
                train, val if len(val) else None, _in_phase(progress, "finetune"))
            assert ft.model is not None
            final = _restore_io(pruned, ft.model)
            ft_hist = ft.history
            err_final = ft.val_error
        fid_final = evaluate_fidelity(final, val, kinds) if distill else ()

    layers = rep.layers
    metric = Metric.error(err_before, err_ssl, err_pruned, err_final)
    stages = (("before", fid_before), ("ssl", fid_ssl), ("thresholded", fid_thr),
              ("pruned", fid_pruned), ("final", fid_final)) if distill else ()
    if distill and err_before is None and fid_final:  # no labels: judge the fidelity
        metric = _fidelity_metric(fid_before, fid_ssl, fid_pruned, fid_final)
    verdict = judge(metric, max_drop=opts.max_drop, budget=ctl is not None,
                    live_groups_zeroed=live_zeroed, threshold=opts.threshold,
                    threshold_used=threshold)
    if opts.start == "oneshot" and verdict.advice:
        verdict = replace(verdict, advice=(
            "more --finetune-epochs", "--start ssl (group Lasso reaches the budget first)",
            "a higher --target-macs / --target-params"))
    # A result over --max-drop is kept, but never under the name a pipeline takes as good.
    target = (None if output is None
              else Path(output) if verdict.accepted else rejected_path(output))
    report = SslReport(
        model=name,
        data=data.name,
        train_samples=len(train),
        val_samples=len(val),
        error_before=err_before,
        error_ssl=err_ssl,
        error_thresholded=err_thr,
        error_pruned=err_pruned,
        error_final=err_final,
        groups_zeroed=zeroed,
        layers=layers,
        layers_before=rep.layers_before,
        layers_after=rep.layers_after,
        params_before=rep.params_before,
        params_after=rep.params_after,
        macs_before=rep.macs_before,
        macs_after=rep.macs_after,
        options=opts,
        ssl_history=ssl_history,
        finetune_history=ft_hist,
        seconds=time.perf_counter() - t0,
        prune_text=rep.to_text(),
        threshold_used=threshold,
        lambda_scale=trainer.lambda_scale,
        metric=metric,
        verdict=verdict,
        live_groups_zeroed=live_zeroed,
        input_zeros=zeros,
        input_meets_budget=input_meets,
        budget_met_at=None if ctl is None else ctl.met_at,
        met_by_input_zeros=0 if ctl is None else ctl.met_by_input_zeros,
        output=None if output is None else str(output),
        written_to=None if target is None else str(target),
        fidelity=stages,
    )
    out_path = None
    if target is not None and writer:
        out_path = save_model(final, target)
    if not verdict.accepted:  # (the CLI prints the report, whose last line this is)
        (say if notify is not None else lambda m: log.warning("%s", m))(report.last_line())
    if report_path is not None and writer:
        import json

        write_text_atomic(report_path, json.dumps(report.to_json(), indent=1) + "\n")
    return SslResult(final, report, out_path, thresholded)


def _fidelity_metric(*stages: tuple[Fidelity, ...]) -> Metric:
    """The acceptance metric of a label-free run: the first output's fidelity (higher is
    better, so a relative error counts as 1 - error)."""
    first = next(f for f in stages[-1])

    def value(fids: tuple[Fidelity, ...]) -> float | None:
        f = next((f for f in fids if f.output == first.output), None)
        if f is None:
            return None
        return 1 - f.value if f.kind == "relerr" else f.value

    b, s, c, f = (value(x) for x in stages)
    return Metric(f"fidelity:{first.kind}:{first.output}", True, b, s, c, f,
                  percent=first.kind == "top1")


def _in_phase(
    progress: Callable[[ProgressEvent], None] | None, phase: str
) -> Callable[[ProgressEvent], None] | None:
    """``progress`` with the phase's name on every event."""
    if progress is None:
        return None
    cb = progress
    return lambda ev: cb(replace(ev, phase=phase))


def _epoch_hook(
    art: Artifacts, opts: SslOptions, ctl: BudgetController | None,
    zeros: tuple[InputZero, ...] = (),
) -> Callable[[Trainer, EpochStats], dict[str, float]]:
    """After each SSL epoch: the projected cost of pruning now, the collapse check (which
    names the input model's zeros when they caused it), and the budget controller's next
    lambda multiplier."""
    errors: list[float | None] = []
    bypassed = {la["node"] for la in art.info.layers if la.get("bypassed")}

    def hook(tr: Trainer, stats: EpochStats) -> dict[str, float]:
        errors.append(stats.val_error)
        c = find_collapse(stats.zero_groups, errors, art.info.classes, bypassed)
        if c is not None and opts.stop_on_collapse:
            cause = collapse_cause(c, zeros)
            reason = f"{c.text}: {cause}" if cause else c.text
            raise CollapseError(
                f"training collapsed in SSL epoch {stats.epoch}: {reason}; use a smaller "
                f"{'budget cut (a larger --target-macs)' if ctl else 'lambda'}, or start from "
                f"a trained model"
            )
        p = project(art, tr.params(), opts.threshold)
        extra = {"projected_macs": round(p.mac_fraction, 5),
                 "projected_params": round(p.param_fraction, 5),
                 "lambda_scale": round(tr.lambda_scale, 6)}
        if ctl is not None and ctl.mask is None:
            tr.lambda_scale = ctl.update(p)
        return extra

    return hook


@dataclass(frozen=True)
class _StartZeros:
    """What was zero in the input model: the named layers, and for every active penalty
    term which of its groups were at RMS <= the threshold; ``meets_budget``: those alone
    met the budget."""

    zeros: tuple[InputZero, ...]
    below: tuple[np.ndarray, ...]
    meets_budget: bool

    def overlap(self, art: Artifacts, live: dict[str, np.ndarray], threshold: float) -> int:
        """How many groups at RMS <= ``threshold`` in ``live`` were there in the input."""
        now = below_threshold(art.info.penalty, live, threshold)
        return sum(int(np.sum(a & b)) for a, b in zip(self.below, now, strict=True))

    def met_text(self, n: int, total: int) -> str:
        """What the budget-met message says about the input model's zeros."""
        groups = [z.layer for z in self.zeros if z.kind is not ZeroKind.BN_SCALE]
        bns = [z for z in self.zeros if z.kind is ZeroKind.BN_SCALE]
        text = ""
        if n and self.meets_budget:
            text = (f" by {n} groups that were already zero in the input model (layers "
                    f"{names_text(list(dict.fromkeys(groups)))}; {INPUT_ZEROS_HINT})")
        elif n:
            text = (f" ({n} of the {total} groups at zero were already zero in the input "
                    f"model: layers {names_text(list(dict.fromkeys(groups)))})")
        if bns:
            text += (f"; the input model has BatchNorm scales at zero "
                     f"({input_zeros_text(bns)}), which leave the layers before them "
                     f"without a gradient from the data")
        return text


def _step_hook(
    art: Artifacts, opts: SslOptions, ctl: BudgetController | None, say: Callable[[str], None],
    start: _StartZeros | None = None,
) -> Callable[[Trainer, int, int], None] | None:
    """With a budget: after every step until the budget is met, project the weights (when
    the groups under the threshold changed); once it is met, turn the lambdas off and hold
    the groups zero then at zero for the rest of the SSL phase (see
    :mod:`onnx_ssl.training.budget`)."""
    if ctl is None:
        return None
    c = ctl
    tensors = art.info.penalty.tensors()

    def hook(tr: Trainer, epoch: int, step: int) -> None:
        if c.mask is not None:
            c.hold(tr.live(tensors))
            return
        live = tr.live(tensors)
        if not c.check(art, live, tr.params, opts.threshold, (epoch + 1, step + 1)):
            return
        c.hold(live)
        why = ""
        if start is not None and start.zeros:
            total = sum(int(np.sum(m)) for m in below_threshold(art.info.penalty, live,
                                                                 opts.threshold))
            c.met_by_input_zeros = start.overlap(art, live, opts.threshold)
            why = start.met_text(c.met_by_input_zeros, total)
        say(f"budget met at SSL epoch {epoch + 1}, step {step + 1}{why}: the lambdas (x"
            f"{tr.lambda_scale:.3g}) are turned off and the groups at RMS <= "
            f"{opts.threshold:g} held at zero from now on")
        tr.lambda_scale = 0.0

    return hook


def _zeroed_between(art: Artifacts, params: dict[str, np.ndarray], low: float,
                    high: float) -> int:
    """How many more groups thresholding at ``high`` zeroes than at ``low`` (counted as
    ``zero_groups`` counts: terms that share a tensor, filter and channel groups, are
    thresholded one after the other)."""
    pen = art.info.penalty
    at = [pen.zero_groups({k: np.array(params[k]) for k in pen.tensors()}, t)
          for t in (low, high)]
    return at[1] - at[0]


def _write_last_good(
    trainer: Trainer, art: Artifacts, opts: SslOptions, output: str | Path | None
) -> str:
    """Write the last good weights (the trainer put them back) as a model; say where."""
    if opts.work_dir is not None:
        path = Path(opts.work_dir) / PHASES[0] / LAST_GOOD
    elif output is not None:
        out = Path(output)
        path = out.with_name(out.stem + ".last_good.onnx")
    else:
        return "nothing written (no --work-dir or output)"
    save_model(export_inference_model(art, trainer.params()), path)
    ckpt = f" and checkpoint {trainer.state_path}" if opts.work_dir is not None else ""
    return f"the last good weights are in {path}{ckpt}"


def _pct(e: float | None) -> str:
    return "-" if e is None else f"{100 * e:.2f}%"
