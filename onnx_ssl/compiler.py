"""``onnx-ssl prune``: the compiler pipeline that turns zero groups into a smaller model.

The prune is one :class:`~onnx_ssl.pipeline.PassManager` over one model object
(:class:`PruneModel`: the graph, the model's metadata, and what the passes learn), built by
:func:`prune_pipeline`; every step is a pass with the same contract, so a failure names its
pass and the passes before it, and a toolchain can run any part of it from Python:

    prepare       the working copy (:mod:`onnx_ssl.preparation`: unique node names, a
                  symbolic batch bound, constant shape arithmetic folded, shapes inferred):
                  the one proto -> graph conversion
    analyze       the channel analysis the rewrites reuse while the graph matches it
    [zero-small-groups | zero-to-budget]   with a threshold or a MAC/param budget: changes
                  the function, reported separately (the zeroed model is the reference)
    rewrite       :func:`rewrite_passes`: fixpoint(CollapseResidualPass, RemoveHeadsPass,
                  RemoveZeroChannelsPass) -> SimplifyContiguousIndexingPass ->
                  ShrinkKernelsPass -> [LowerSparseConvPass,
                  with --lower] -> CleanupPass
    count         the result's layers, counted on the rewrite while it has its shapes
    unbind-batch  the batch made symbolic again
    finish        sort, export (the one graph -> proto conversion), strict shape
                  inference, checker (and the ORT load, when no check follows)
    [verify]      numeric check against the model read (or the zeroed one)

and the caller writes the result. Nodes keep the names of the working copy: the input's,
and the generated name of a node that was unnamed or shared its name (see
``preparation.name_nodes``), which the report's layers use too. MACs are per sample when the
batch is symbolic.

**A budget** (``target_macs``/``target_params``, fractions of the input's counts): the groups
are scored (:mod:`onnx_ssl.importance`), :class:`ZeroGroupsToBudgetPass` zeroes the least
important ones until its estimate meets the budget, and the exact passes then run on a copy
to count what the prune really leaves (the report's accounting). Where that count misses the
window ``[F - LANDING, F]``, the pass runs again with its aim moved by the estimate's error
(``aim <- F - (real - estimate) - LANDING / 4``), at most ``TRIALS`` times in all; the last
trial's rewrite is the result (the exact passes do not run a second time). With
``lower``, the budget is met before the lowering, which only lowers the count further.

**Rounding** (``round_to`` N or ``"auto"``): RemoveZeroChannelsPass keeps zero channels so that
the kept counts land on multiples of N (or on counts measured faster), which is exact; with a
budget and a fixed N the selection itself lands on rounded counts
(:mod:`onnx_ssl.passes.round_channels`, :mod:`onnx_ssl.passes.zero_to_budget`).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .analysis import SharedAnalysis, analyze_graph, bias_maps, layers_of, model_layers
from .calibration import Calibration, check_calibration, input_specs, read_calibration
from .channels import static_shape
from .errors import InputError, VerificationError
from .groups import Analysis, Layer
from .importance import IMPORTANCES, activation, magnitude
from .io import ModelMeta, from_graph, weight_bytes
from .ops import LayerSlots
from .passes.cleanup import CleanupPass
from .passes.cleanup_contiguous import SimplifyContiguousIndexingPass
from .passes.collapse_residual import CollapseResidualPass
from .passes.lower_sparse_conv import MARKER as LOWERED
from .passes.lower_sparse_conv import STRATEGIES as LOWER_STRATEGIES
from .passes.lower_sparse_conv import LowerSparseConvPass
from .passes.remove_channels import RemoveZeroChannelsPass
from .passes.remove_heads import RemoveHeadsPass
from .passes.round_channels import RoundChannelCounts, parse_round_to
from .passes.shrink_kernels import ShrinkKernelsPass
from .passes.zero_small_groups import ZeroSmallGroupsPass
from .passes.zero_to_budget import (
    Budget,
    ZeroGroupsToBudgetPass,
    ZeroToBudgetReport,
    check_fraction,
)
from .pipeline import (
    FinishPass,
    FixpointPass,
    GraphPass,
    Model,
    ModelPass,
    PassManager,
    PassResult,
    PipelineReport,
    PreconditionError,
    Report,
    StepReport,
    finish,
    gc_paused,
    release_memory,
    settle,
)
from .preparation import WorkingCopy, name_nodes, working_copy
from .rules import RULES
from .runtime import ATOL, RTOL, Difference, compare
from .runtime import verify as verify_outputs
from .text import format_table

log = logging.getLogger(__name__)

# Above this many bytes of weights, prune hands the working copy's memory back before the
# export and the numeric check (see pipeline.release_memory).
RELEASE_BYTES = 64 << 20
# A budget F is met when the pruned count lies in [F - LANDING, F] (fractions of the input's).
LANDING = 0.02
# Real prunes a budget may take to land there (the first from the estimate alone).
TRIALS = 4


@dataclass(frozen=True)
class LayerStat:
    """One parameterised layer before and after pruning (the paper's Table 1 columns)."""

    node: str
    op: str
    filters_before: int
    filters_after: int
    channels_before: int
    channels_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    # Measured ONNX Runtime speed-up of this layer, where a benchmark filled it in.
    speedup: float | None = None

    @property
    def mac_fraction(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 0.0


def _slots(la: Layer) -> LayerSlots:
    slots = RULES[la.op_type].layer
    assert slots is not None, la.op_type  # a Layer is made only for an op with layer slots
    return slots


def _filters(la: Layer) -> int:
    return _slots(la).filters(la.weight_shape, la.out_axis, la.conv_groups)


def _channels(la: Layer) -> int:
    return _slots(la).channels(la.weight_shape, la.in_axis, la.conv_groups)


def layer_stats(before: Sequence[Layer], after: Sequence[Layer]) -> tuple[LayerStat, ...]:
    post = {la.node: la for la in after}
    out = []
    for la in before:
        lb = post.get(la.node)
        out.append(LayerStat(
            la.node, la.op_type, _filters(la), _filters(lb) if lb else 0, _channels(la),
            _channels(lb) if lb else 0, la.params, lb.params if lb else 0, la.macs,
            lb.macs if lb else 0))
    return tuple(out)


@dataclass(frozen=True)
class PruneReport:
    model: str
    layers: tuple[LayerStat, ...]
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    passes: tuple[tuple[str, Report], ...]
    threshold: float | None = None
    # How the step that changes the function (threshold or budget) changed the outputs,
    # measured on `effect_inputs` (calibration data, or the numeric check's random inputs).
    effect: tuple[Difference, ...] = ()
    verification: tuple[Difference, ...] | None = None
    kept: tuple[str, ...] = field(default=())
    target_macs: float | None = None
    target_params: float | None = None
    effect_inputs: str = ""

    @property
    def threshold_effect(self) -> tuple[Difference, ...]:
        """The function change of the threshold step (the name from before budgets)."""
        return self.effect

    @property
    def mac_fraction(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def param_fraction(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def modified(self) -> bool:
        return any(r.modified for _, r in self.passes)

    @property
    def removed(self) -> bool:
        """Whether the exact passes (all but the threshold step) changed the graph."""
        return any(r.modified for n, r in self.passes if n not in _CHANGING)

    def _zeroing(self) -> Report | None:
        return next((r for n, r in self.passes if n in _CHANGING), None)

    @property
    def groups_zeroed(self) -> int:
        """Groups the step that changes the function (threshold or budget) set to zero."""
        return int(getattr(self._zeroing(), "groups_zeroed", 0))

    def _step_text(self) -> str:
        """What the step that changes the function did (threshold or budget)."""
        zero = self._zeroing()
        n = getattr(zero, "groups_zeroed", 0)
        kinds = ", ".join(f"{k} {v}" for k, v in getattr(zero, "by_kind", ()))
        if isinstance(zero, ZeroToBudgetReport):
            reached = ", ".join(
                f"{what} {getattr(self, 'target_' + what):.1%} -> {frac:.1%}"
                for what, frac in (("macs", self.mac_fraction), ("params", self.param_fraction))
                if getattr(self, "target_" + what) is not None)
            return (f"budget (target -> reached, of the input's count): {reached}; zeroed {n} "
                    f"group(s) by {zero.importance} importance" + (f" ({kinds})" if n else ""))
        return (f"threshold {self.threshold:g} zeroed {n} group(s) with L2 norm <= "
                f"{self.threshold:g} ({kinds})" if n else
                f"threshold {self.threshold:g} zeroed no group (no nonzero prunable group has "
                f"L2 norm <= {self.threshold:g})")

    def _change_line(self) -> str:
        step = self._step_text()
        n = getattr(self._zeroing(), "groups_zeroed", 0)
        if not self.effect:
            return step + ("; may have CHANGED the function" if n else
                           "; the function is unchanged") + (
                " (output difference not measured: the numeric check was skipped)")
        worst = max(d.relative for d in self.effect)
        on = f" on {self.effect_inputs}" if self.effect_inputs else ""
        if not any(d.max_abs for d in self.effect):
            return step + f"; the outputs did not change (max output difference 0){on}"
        per = "; ".join(f"'{d.output}' {d.relative:.3g}" + (
            f", top-1 agreement {d.agreement:.1%}" if d.agreement is not None else "")
            for d in self.effect)
        return (step + f"; this CHANGED the function: max output difference {worst:.3g} "
                       f"relative to max |output|{on} (per output: {per})")

    def to_json(self) -> dict[str, Any]:
        def diff(d: Difference) -> dict[str, Any]:
            return d.to_json()

        zero = self._zeroing()
        return {
            "model": self.model,
            "modified": self.modified,
            "layers_before": self.layers_before,
            "layers_after": self.layers_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "layers": [{**s.__dict__, "mac_fraction": s.mac_fraction} for s in self.layers],
            "passes": [{"name": n, **r.to_json()} for n, r in self.passes],
            "threshold": self.threshold,
            "target_macs": self.target_macs,
            "target_params": self.target_params,
            "mac_fraction": self.mac_fraction,
            "param_fraction": self.param_fraction,
            # The step that changed the function (threshold or budget) and by how much.
            "function_change": None if zero is None else {
                "step": "budget" if isinstance(zero, ZeroToBudgetReport) else "threshold",
                "groups_zeroed": getattr(zero, "groups_zeroed", 0),
                "by_kind": dict(getattr(zero, "by_kind", ())),
                "importance": getattr(zero, "importance", None),
                "inputs": self.effect_inputs,
                "outputs": [diff(d) for d in self.effect]},
            "threshold_effect": [diff(d) for d in self.effect],
            "verification": None if self.verification is None else {
                "rtol": RTOL, "atol": ATOL, "outputs": [diff(d) for d in self.verification]},
            "kept": list(self.kept),
        }

    def to_text(self) -> str:
        rows = [("layer", "op", "filters", "channels", "params", "MACs", "MAC frac")]
        for s in self.layers:
            rows.append((s.node, s.op, f"{s.filters_before} -> {s.filters_after}",
                         f"{s.channels_before} -> {s.channels_after}",
                         f"{s.params_before} -> {s.params_after}",
                         f"{s.macs_before} -> {s.macs_after}" if s.macs_before else "-",
                         f"{s.mac_fraction:.1%}" if s.macs_before else "-"))
        lines = format_table(rows)
        frac = self.macs_after / self.macs_before if self.macs_before else 0.0
        pfrac = self.params_after / self.params_before if self.params_before else 0.0
        macs = (f"MACs {self.macs_before} -> {self.macs_after} ({frac:.1%}, "
                f"{1 / frac if frac else float('inf'):.2f}x fewer)" if self.macs_before else
                "MACs not static (a layer's shapes are not; `analyze` notes why)")
        lines += [
            "",
            f"layers {self.layers_before} -> {self.layers_after}; params {self.params_before}"
            f" -> {self.params_after} ({pfrac:.1%}); {macs}",
        ]
        for name, r in self.passes:
            if r.modified:
                shown = r.to_text(skip=("kept", "spaces", "lowered", "dense", "zeroed",
                                        "rounded", "rounding"))
                if shown:
                    lines.append(f"pass {name}: {shown}")
            for e in (*getattr(r, "lowered", ()), *getattr(r, "dense", ())):
                times = ", ".join(f"{k} {t:.3g} ms" for k, t in e.times_ms)
                lines.append(f"lowering {e.node}: {e.strategy}, MACs {e.macs_before} -> "
                             f"{e.macs_after}" + (f" (measured{' (cached)' if e.cached else ''}"
                                                 f": {times})" if times else ""))
        if self._zeroing() is not None:
            lines.append(self._change_line())
            for r in getattr(self._zeroing(), "rounding", ()):
                lines.append(f"budget rounding: {r}")
        if not self.removed:
            lines.append("no change: nothing could be removed" + (
                " (zero channels were kept for the reasons below)" if self.kept else
                " (the model has no zero groups, or it was already pruned)"))
        for k in self.kept:
            lines.append(f"kept: {k}")
        if not self.verification:
            lines.append("numeric check: skipped, nothing was checked (--no-verify or "
                         "--verify 0)")
        else:
            worst = max((d.relative for d in self.verification), default=0.0)
            lines.append(f"numeric check: passed, max difference {worst:.2g} x max |output| "
                         f"(tolerance {ATOL:g} + {RTOL:g} x max |output|)")
        return "\n".join(lines)


# The passes that change the function (the explicit step before the exact passes).
_CHANGING = (ZeroSmallGroupsPass.name, ZeroGroupsToBudgetPass.name)


@dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    report: PruneReport


@gc_paused()  # linear in the graph's size (see pipeline.gc_paused)
def prune(model: onnx.ModelProto, *, threshold: float | None = None, verify: int = 3,
          seed: int = 0, name: str = "", lower: str = "off", provider: str = "cpu",
          batch: int = 1, threads: int = 0, lower_cache: str | None = None,
          target_macs: float | None = None, target_params: float | None = None,
          importance: str | None = None,
          calib: str | Path | Mapping[str, np.ndarray] | Calibration | None = None,
          round_to: int | str | None = None) -> PruneResult:
    """Remove zero groups from ``model``; the result computes the same outputs.

    ``threshold`` first zeroes every prunable group with L2 norm <= threshold; a budget
    (``target_macs``/``target_params``, fractions in (0, 1] of the input's MACs and params,
    both held when both are given) first zeroes the least important groups until the pruned
    model's count is at most the target and within ``LANDING`` of it (see the module doc).
    Either changes the function; ``report.effect`` says by how much, on ``calib`` (an .npz
    path or arrays, one per model input, checked against the model) or else on the numeric
    check's seeded random inputs. ``importance``: ``magnitude`` or ``activation`` (needs
    ``calib``; the default when it is given). ``verify_n`` seeded random inputs are compared
    against the model read, or the zeroed one (0 skips the check). ``lower`` (auto, off or a
    strategy of ``LowerSparseConvPass``) lowers convs with zero fibers or 2D filters, chosen
    by timing on ``provider`` at ``batch`` and ``threads``; ``lower_cache`` is the folder of
    cached timings (default ~/.cache/onnx-ssl-lowering; "" disables the cache).
    ``round_to`` (a multiple N >= 1 or ``"auto"``, timed like ``lower``) keeps zero channels
    so that the kept counts land on multiples (:mod:`onnx_ssl.passes.round_channels`); with
    a budget, the selection lands on such counts itself.
    """
    verify_n = verify
    if verify_n < 0:
        raise InputError(f"--verify must be >= 0 (0 skips the numeric check), got {verify_n}")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise InputError(f"--threshold must be a finite number >= 0, got {threshold}")
    if lower not in LOWER_STRATEGIES or batch < 1 or threads < 0:
        raise InputError(f"--lower must be one of {', '.join(LOWER_STRATEGIES)}, --batch >= 1 "
                         f"and --threads >= 0; got {lower!r}, {batch}, {threads}")
    budget = _budget(target_macs, target_params, threshold)
    rt = parse_round_to(round_to)
    rounding = RoundChannelCounts(rt, provider=provider, batch=batch, threads=threads,
                                  cache_dir=_cache_dir(lower_cache)) if rt is not None else None
    cal = _calibration(calib, model)
    if cal is not None and threshold is None and budget is None:
        raise InputError("--data scores and measures the groups a budget or a threshold "
                         "zeroes; give --target-macs, --target-params or --threshold")
    if importance is not None and budget is None:
        raise InputError("--importance ranks the groups of a budget; give --target-macs or "
                         "--target-params")
    method = importance or ("activation" if cal is not None else "magnitude")
    if method not in IMPORTANCES:
        raise InputError(f"--importance must be one of {', '.join(IMPORTANCES)}, got {method!r}")
    if method == "activation" and cal is None:
        raise InputError("--importance activation needs calibration inputs (--data CALIB)")
    zeroing = threshold is not None or budget is not None
    lowering = LowerSparseConvPass(
        lower, provider=provider, batch=batch, threads=threads,
        cache_dir=_cache_dir(lower_cache)) if lower != "off" else None
    state = PruneModel(None, ModelMeta.of(model), model, name=name)
    pipeline = prune_pipeline(
        kinds=("channel", "depth", "head") if zeroing else (), threshold=threshold, budget=budget,
        method=method, cal=cal, seed=seed, verify=verify_n, lowering=lowering,
        rounding=rounding)
    out = pipeline(state)
    final = state.proto
    before = state.before
    assert final is not None and before is not None
    passes = [(n, r) for n, r in out.report.results if not isinstance(r, StepReport)]
    lowered = out.report.get(lowering.name) if lowering is not None else None
    shaped, maps_before, maps_after = state.shaped, state.maps_before, state.maps_after
    after_layers = shaped if shaped is not None else model_layers(final)
    if before.layers and not before.macs:
        # The input's MACs are not static (a shape depends on a batch the analysis could not
        # bind); the result's may be (prune folded what blocked it), but a count against an
        # unknown is no comparison: both stay unknown (0), as `analyze` reports them.
        after_layers = tuple(dataclasses.replace(la, macs=0) for la in after_layers)
    stats = tuple(dataclasses.replace(
        s, params_before=s.params_before + maps_before.get(s.node, 0),
        params_after=s.params_after + maps_after.get(s.node, 0))
        for s in layer_stats(before.layers, after_layers))
    if lowering is not None:
        assert lowered is not None
        stats, after_layers = _merge_lowered(stats, after_layers, lowered)
    kept: list[str] = []
    for _, r in passes:
        kept += list(getattr(r, "kept", ()))
    report = PruneReport(
        model=name or model.graph.name, layers=stats,
        layers_before=len(before.layers), layers_after=len(after_layers),
        params_before=before.params + sum(maps_before.values()),
        params_after=sum(la.params for la in after_layers) + sum(maps_after.values()),
        macs_before=before.macs, macs_after=sum(la.macs for la in after_layers),
        passes=tuple(passes), threshold=threshold, effect=state.effect,
        verification=state.verification, kept=tuple(kept),
        target_macs=budget.macs if budget else None,
        target_params=budget.params if budget else None, effect_inputs=state.effect_inputs)
    return PruneResult(final, report)


@dataclass(eq=False)
class PruneModel(Model):
    """The model object a prune hands from pass to pass (see :func:`prune_pipeline`): the
    graph and metadata, and what the prune's passes learn on the way. ``input``: the model
    read, its nodes uniquely named (what ONNX Runtime runs in the checks); ``wc``: the
    working copy's map back to the input (its batch); ``before``: the analysis of the
    prepared graph; ``reference``: the model the result must compute (the input, or the
    zeroed one); ``landed``: the budget's last trial, which ran the rewrites already;
    ``shaped`` and ``maps_after``: the layers and bias maps of the rewrite, counted while
    it has its shapes."""

    name: str = ""
    input: onnx.ModelProto | None = None
    wc: WorkingCopy | None = None
    before: Analysis | None = None
    maps_before: dict[str, int] = field(default_factory=dict)
    reference: onnx.ModelProto | None = None
    effect: tuple[Difference, ...] = ()
    effect_inputs: str = ""
    landed: PassResult[PipelineReport] | None = None
    shaped: tuple[Layer, ...] | None = None
    maps_after: dict[str, int] = field(default_factory=dict)
    verification: tuple[Difference, ...] | None = None
    large: bool = False

    def working_copy(self) -> WorkingCopy:
        if self.wc is None:
            raise PreconditionError("the model was not prepared (no working copy)")
        return self.wc

    def analysis(self) -> Analysis:
        if self.before is None:
            raise PreconditionError("the model was not analysed")
        return self.before


class _Step(ModelPass[StepReport]):
    """A step of the prune pipeline that changes no weight or channel (its report is a
    :class:`StepReport`, left out of the prune report's passes)."""

    def call(self, graph: Any) -> PassResult[StepReport]:
        self.step(graph)
        return PassResult(graph, StepReport())

    @abc.abstractmethod
    def step(self, model: PruneModel) -> None:
        """The step itself, on ``model`` (changed in place)."""


class PreparePass(_Step):
    """Load: the working copy of the model read (see :mod:`onnx_ssl.preparation`: node names
    made unique, constant shape arithmetic folded at a bound batch, shapes inferred), the
    one proto -> graph conversion of the pipeline. The proto read stays the ``input`` (the
    reference of the numeric check)."""

    name = "prepare"

    def requires(self, graph: Any) -> None:
        if graph.proto is None:
            raise PreconditionError("no model was read")

    def step(self, model: PruneModel) -> None:
        proto = model.proto
        assert proto is not None
        # Unique node names and a bound batch; `wc.unbind` makes the result batch-agnostic.
        model.wc = working_copy(proto)
        model.graph = model.wc.graph
        # ONNX Runtime refuses two nodes of one name: the check runs the input uniquely named.
        model.input = model.wc.named if model.wc.named is not None else name_nodes(proto)
        model.reference = model.input
        model.large = weight_bytes(proto) >= RELEASE_BYTES
        model.proto = None
        settle()  # the working copy stays alive: no reason to collect garbage after this pass


class AnalyzePass(_Step):
    """The channel analysis of the prepared graph (groups of ``kinds``: only the step that
    zeroes groups needs them; the rewrites read spaces and branches), which the rewrites
    reuse while the graph matches it."""

    name = "analyze"

    def __init__(self, kinds: Sequence[str], budget: Budget | None = None) -> None:
        self.kinds = tuple(kinds)
        self.budget = budget

    def requires(self, graph: Any) -> None:
        graph.the_graph()

    def step(self, model: PruneModel) -> None:
        graph = model.the_graph()
        before = analyze_graph(graph, kinds=self.kinds, name=model.name)
        if self.budget is not None and self.budget.macs is not None and not before.macs:
            raise InputError("--target-macs needs static MACs, and a layer's shapes are not "
                             "(`analyze` notes why); use --target-params")
        model.before = before
        model.maps_before = bias_maps(graph)  # per-position bias maps: their layer's params
        settle()  # the analysis stays alive too


class ZeroGroupsPass(ModelPass[Report]):
    """The step that changes the function: the groups a threshold or a budget picks are
    zeroed (:class:`ZeroSmallGroupsPass`, :class:`ZeroGroupsToBudgetPass`); the zeroed model
    becomes the reference of the numeric check, and its difference from the input is
    measured (``effect``: on the calibration data, or the check's random inputs)."""

    def __init__(self, *, threshold: float | None, budget: Budget | None, method: str,
                 cal: Calibration | None, seed: int, verify: int, reuse: bool,
                 rounding: RoundChannelCounts | None) -> None:
        self.threshold, self.budget, self.method, self.cal = threshold, budget, method, cal
        self.seed, self.verify, self.reuse, self.rounding = seed, verify, reuse, rounding
        self.name = ZeroSmallGroupsPass.name if budget is None else ZeroGroupsToBudgetPass.name

    def requires(self, graph: Any) -> None:
        graph.the_graph()
        graph.analysis()

    def call(self, graph: Any) -> PassResult[Report]:
        model: PruneModel = graph
        g, before, wc = model.the_graph(), model.analysis(), model.working_copy()
        res: PassResult[Report]
        if self.budget is not None:
            res, model.landed = _zero_to_budget(g, before, self.budget, self.method, self.cal,
                                                model.meta, self.seed, reuse=self.reuse,
                                                rounding=self.rounding)
        else:
            assert self.threshold is not None
            res = ZeroSmallGroupsPass(self.threshold, before)(g)
        model.graph = res.graph
        # finish() leaves the graph as it is; unbind() changes it in place: it gets a copy,
        # so that the graph stays the one that `before` and the rewrites describe. The
        # numeric checks below load it in ONNX Runtime.
        model.reference = reference = finish(
            wc.unbind(res.graph.copy()) if wc.batch else res.graph, model.meta, load=False)
        assert model.input is not None
        if self.cal is not None:
            model.effect = tuple(compare(model.input, reference,
                                         feeds=list(self.cal.batches())))
            model.effect_inputs = f"{self.cal.source} ({self.cal.samples} samples)"
        elif self.verify:
            model.effect = tuple(compare(model.input, reference, n=self.verify,
                                         seed=self.seed))
            model.effect_inputs = (f"{self.verify} seeded random input(s) (seed "
                                   f"{self.seed})")
        settle()  # the zeroed graph is the rewrites' input: no reason to collect it
        return PassResult(model, res.report)


class RewritePass(ModelPass[PipelineReport]):
    """The rewrites that keep the function (:func:`rewrite_passes`), to their fixpoint; a
    budget's last trial ran them already (its result is taken as it is). Their reports are
    the prune report's passes."""

    name = "rewrite"

    def __init__(self, seed: int, lowering: LowerSparseConvPass | None,
                 rounding: RoundChannelCounts | None) -> None:
        self.seed, self.lowering, self.rounding = seed, lowering, rounding

    def requires(self, graph: Any) -> None:
        graph.the_graph()
        graph.analysis()

    def call(self, graph: Any) -> PassResult[PipelineReport]:
        model: PruneModel = graph
        settle()  # the working copy and its analysis stay alive: no reason to collect garbage
        if model.landed is not None:
            out, model.landed = model.landed, None
        else:
            # The passes reuse the analysis while the graph they get matches it (graph_key:
            # zeroing changes float weights only), and analyse it afresh once one changed it.
            shared = SharedAnalysis(model.analysis())
            out = rewrite_passes(shared, self.seed, self.lowering, self.rounding)(
                model.the_graph())
        model.graph = out.graph
        return PassResult(model, out.report)


class CountPass(_Step):
    """The layers and bias maps of the rewrite, counted while it has its shapes (bound batch,
    as ``model_layers`` binds it) rather than on a re-import of the exported model."""

    name = "count"

    def step(self, model: PruneModel) -> None:
        graph = model.the_graph()
        model.maps_after = bias_maps(graph)
        model.shaped = _shaped_layers(graph)


class UnbindBatchPass(_Step):
    """The batch made symbolic again (:meth:`WorkingCopy.unbind`); the working copy goes,
    so that a large model's weights are not held several times at once in the export and
    the check."""

    name = "unbind-batch"

    def step(self, model: PruneModel) -> None:
        model.graph = model.working_copy().unbind(model.the_graph())
        model.wc = None
        # A full collection costs time in proportion to the graph's nodes; it pays for large
        # weights (what it frees), not for a graph of many small layers.
        if model.large:
            release_memory()


class VerifyPass(_Step):
    """The numeric check: ``n`` seeded random inputs, the result against the reference
    (raises VerificationError beyond the tolerance); it loads the result in ONNX Runtime
    (:class:`FinishPass` leaves that load to it)."""

    name = "verify"

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def step(self, model: PruneModel) -> None:
        if model.large:
            release_memory()
        assert model.proto is not None and model.reference is not None
        model.verification = tuple(verify_outputs(model.reference, model.proto, n=self.n,
                                                  seed=self.seed))


def prune_pipeline(*, kinds: Sequence[str] = (), threshold: float | None = None,
                   budget: Budget | None = None, method: str = "magnitude",
                   cal: Calibration | None = None, seed: int = 0, verify: int = 3,
                   lowering: LowerSparseConvPass | None = None,
                   rounding: RoundChannelCounts | None = None) -> PassManager:
    """The whole prune as one pipeline of passes over a :class:`PruneModel`:

    prepare -> analyze -> [zero-small-groups | zero-to-budget] -> rewrite (the passes of
    :func:`rewrite_passes`) -> count -> unbind-batch -> finish -> [verify].

    ``prepare`` is the one proto -> graph conversion, ``finish`` the one graph -> proto
    conversion; ONNX Runtime loads the result once (in the check, or in finish without
    one). A failure names its pass and the passes before it (the input's errors and a
    failed check keep their message, with the pass in a note). A new rewrite that keeps
    the function is registered in :func:`rewrite_passes`.
    """
    zeroing = threshold is not None or budget is not None
    steps: list[GraphPass[Any]] = [PreparePass(), AnalyzePass(kinds, budget)]
    if zeroing:
        steps.append(ZeroGroupsPass(threshold=threshold, budget=budget, method=method,
                                    cal=cal, seed=seed, verify=verify,
                                    reuse=lowering is None, rounding=rounding))
    steps += [RewritePass(seed, lowering, rounding), CountPass(), UnbindBatchPass(),
              FinishPass(load=not verify)]
    if verify:
        steps.append(VerifyPass(verify, seed))
    return PassManager(steps, name="prune", as_they_are=(InputError, VerificationError))


def rewrite_passes(shared: SharedAnalysis, seed: int, lowering: LowerSparseConvPass | None,
                   rounding: RoundChannelCounts | None = None) -> PassManager:
    """The passes that keep the function, on the prepared graph. Removing channels and
    branches enables more of both: they run to their fixpoint, in place (the graph is the
    caller's own, and nothing reads it after the passes: copying a large graph cost as much
    as a third of the channel pass).

    **Registering a rewrite**: a pass that removes structure and can enable (or be enabled
    by) the others goes into the fixpoint's list; a one-off rewrite goes after it, before
    the lowering and the cleanup. It takes the graph and returns ``PassResult(graph,
    report)`` (see :class:`~onnx_ssl.pipeline.PassBase`); an analysed pass takes ``shared``
    to reuse the analysis."""
    return PassManager([
        FixpointPass([CollapseResidualPass(seed=seed, shared=shared, in_place=True),
                      RemoveHeadsPass(seed=seed, shared=shared, in_place=True),
                      RemoveZeroChannelsPass(seed=seed, shared=shared, in_place=True,
                                             rounding=rounding)]),
        SimplifyContiguousIndexingPass(), ShrinkKernelsPass(),
        *([lowering] if lowering else []), CleanupPass()])


def _budget(target_macs: float | None, target_params: float | None,
            threshold: float | None) -> Budget | None:
    check_fraction("--target-macs", target_macs)
    check_fraction("--target-params", target_params)
    if target_macs is None and target_params is None:
        return None
    if threshold is not None:
        raise InputError("--threshold and --target-macs/--target-params both choose the groups "
                         "to zero; pick one")
    return Budget(target_macs, target_params)


def _calibration(calib: str | Path | Mapping[str, np.ndarray] | Calibration | None,
                 model: onnx.ModelProto) -> Calibration | None:
    if calib is None or isinstance(calib, Calibration):
        return calib
    if isinstance(calib, (str, Path)):
        return read_calibration(calib, input_specs(model))
    return check_calibration(calib, input_specs(model))


def _count(out: PassResult[PipelineReport], before: Analysis, meta: ModelMeta,
           maps_before: int) -> dict[str, float]:
    """The MAC and param fractions of a rewrite, counted as the report counts them."""
    layers = _shaped_layers(out.graph)
    if layers is None:
        layers = model_layers(from_graph(out.graph, meta))
    params = sum(la.params for la in layers) + sum(bias_maps(out.graph).values())
    p0 = before.params + maps_before
    return {"macs": sum(la.macs for la in layers) / before.macs if before.macs else 1.0,
            "params": params / p0 if p0 else 1.0}


def _zero_to_budget(graph: gs.Graph, before: Analysis, budget: Budget, method: str,
                    cal: Calibration | None, meta: ModelMeta, seed: int, reuse: bool,
                    rounding: RoundChannelCounts | None = None
                    ) -> tuple[PassResult[ZeroToBudgetReport], PassResult[PipelineReport] | None]:
    """Zero groups of ``graph`` until the real prune lands in ``[F - LANDING, F]`` (see the
    module doc). Returns the zeroing pass's result and, where ``reuse``, the exact passes'
    result on (a copy of) its graph; the input graph is left as it is."""
    scores = (activation(before, graph, cal) if method == "activation" and cal is not None
              else magnitude(before, graph))
    targets = dict(budget.items())
    maps_before = sum(bias_maps(graph).values())
    aim = dict(targets)
    best: tuple[float, PassResult[ZeroToBudgetReport], PassResult[PipelineReport]] | None = None
    tried: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for trial in range(1, TRIALS + 1):
        zero = ZeroGroupsToBudgetPass(budget, scores.by_group, before, method,
                                      aim=Budget(aim.get("macs"), aim.get("params")),
                                      round_to=rounding.multiple if rounding else None
                                      )(graph)
        out = rewrite_passes(SharedAnalysis(before), seed, None, rounding)(zero.graph.copy())
        real = _count(out, before, meta, maps_before)
        est = {k: getattr(zero.report, "estimated_" + k) for k in targets}
        under = min(targets[k] - real[k] for k in targets)
        tried.append(", ".join(f"{k} {real[k]:.1%}" for k in targets))
        log.info("budget trial %d: aim %s, estimate %s, pruned %s", trial, aim, est, real)
        if under >= 0 and (best is None or under < best[0]):
            best = (under, zero, out)
        if 0 <= under <= LANDING:
            break
        if zero.report.zeroed in seen:
            break  # the corrected aim chose the same groups: nothing closer to try
        seen.add(zero.report.zeroed)
        aim = {k: targets[k] - (real[k] - est[k]) - LANDING / 4 for k in targets}
    if best is None:
        wanted = ", ".join(f"{k} {v:.1%}" for k, v in targets.items())
        raise InputError(f"the budget ({wanted} of the input's count) cannot be reached: the "
                         f"prunable groups leave at least {tried[-1]} (`analyze` lists what "
                         f"blocks the rest" + (f"; --round-to {rounding.round_to} allows only "
                                               f"rounded counts" if rounding else "") + ")")
    return best[1], best[2] if reuse else None


def _shaped_layers(graph: gs.Graph) -> tuple[Layer, ...] | None:
    """The layers of a rewrite (see ``analysis.layers_of``), or None when a layer's input or
    output has no static shape there: every pass that changes shapes infers them again
    (``graphutil.refresh_shapes``), and one that does not keeps the function, so a layer
    with both shapes has the MACs that its node has in the exported model."""
    layers = layers_of(graph)
    nodes = {n.name: n for n in graph.nodes}
    for la in layers:
        n = nodes[la.node]
        if static_shape(n.inputs[0]) is None or static_shape(n.outputs[0]) is None:
            return None
    return layers


def _cache_dir(spec: str | None) -> Path | None:
    from .passes.lower_sparse_conv import default_cache_dir

    if spec is None:
        return default_cache_dir()
    return Path(spec) if spec else None


def _merge_lowered(stats: tuple[LayerStat, ...], after: tuple[Layer, ...], rep: Report
                   ) -> tuple[tuple[LayerStat, ...], tuple[Layer, ...]]:
    """Count a lowered conv as one layer with the params and MACs of its lowering (its
    pieces are named ``<conv>.lowered...``; a MatMul on an im2col is no layer of the table)."""
    low = {e.node: e for e in getattr(rep, "lowered", ())}
    if not low:
        return stats, after
    out = []
    for s in stats:
        e = low.get(s.node)
        out.append(s if e is None else dataclasses.replace(
            s, filters_after=e.filters, channels_after=e.channels,
            params_after=e.params_after, macs_after=e.macs_after))
    return tuple(out), tuple(la for la in after if LOWERED not in la.node) + tuple(
        Layer(e.node, "Conv", "", None, 0, 1, 1, (), e.params_after, e.macs_after, None, None)
        for e in low.values())

