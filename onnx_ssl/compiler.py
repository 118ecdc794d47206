"""``onnx-ssl prune``: the compiler pipeline that turns zero groups into a smaller model.

Pipeline: prepare the working copy (unique node names, a symbolic batch bound, constant
shape arithmetic folded) -> [ZeroSmallGroupsPass, only with a threshold: changes the
function, reported separately] -> CollapseResidualPass -> RemoveZeroChannelsPass ->
ShrinkKernelsPass -> [LowerSparseConvPass, with --lower] -> CleanupPass -> the batch made
symbolic again -> finish (sort, shape inference, checker, ORT load) -> numeric check
against the model it read (or the thresholded one) -> write. Nodes keep the names of the
working copy: the input's, and the generated name of a node that was unnamed or shared its
name (see ``analysis.name_nodes``), which the report's layers use too. MACs are per sample
when the batch is symbolic.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from .analysis import analyze_graph, layers_of, model_layers, name_nodes, working_copy
from .channels import static_shape
from .errors import InputError
from .graphutil import SharedAnalysis, bias_maps
from .groups import Layer
from .io import ModelMeta, weight_bytes
from .ops import LayerSlots
from .passes.cleanup import CleanupPass
from .passes.collapse_residual import CollapseResidualPass
from .passes.lower_sparse_conv import MARKER as LOWERED
from .passes.lower_sparse_conv import STRATEGIES as LOWER_STRATEGIES
from .passes.lower_sparse_conv import LowerSparseConvPass
from .passes.remove_channels import RemoveZeroChannelsPass
from .passes.shrink_kernels import ShrinkKernelsPass
from .passes.zero_small_groups import ZeroSmallGroupsPass
from .pipeline import (
    FixpointPass,
    PassManager,
    Report,
    finish,
    gc_paused,
    release_memory,
    settle,
)
from .rules import RULES
from .runtime import ATOL, RTOL, Difference, compare
from .runtime import verify as verify_outputs
from .text import format_table

log = logging.getLogger(__name__)

# Above this many bytes of weights, prune hands the working copy's memory back before the
# export and the numeric check (see pipeline.release_memory).
RELEASE_BYTES = 64 << 20


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
    threshold_effect: tuple[Difference, ...] = ()
    verification: tuple[Difference, ...] | None = None
    kept: tuple[str, ...] = field(default=())

    @property
    def modified(self) -> bool:
        return any(r.modified for _, r in self.passes)

    @property
    def removed(self) -> bool:
        """Whether the exact passes (all but the threshold step) changed the graph."""
        return any(r.modified for n, r in self.passes if n != ZeroSmallGroupsPass.name)

    def _threshold_line(self) -> str:
        zero = next((r for n, r in self.passes if n == ZeroSmallGroupsPass.name), None)
        n = getattr(zero, "groups_zeroed", 0)
        kinds = ", ".join(f"{k} {v}" for k, v in getattr(zero, "by_kind", ()))
        step = (f"threshold {self.threshold:g} zeroed {n} group(s) with L2 norm <= "
                f"{self.threshold:g} ({kinds})" if n else
                f"threshold {self.threshold:g} zeroed no group (no nonzero prunable group has "
                f"L2 norm <= {self.threshold:g})")
        if not self.threshold_effect:
            return step + ("; may have CHANGED the function" if n else
                           "; the function is unchanged") + (
                " (output difference not measured: the numeric check was skipped)")
        worst = max(d.relative for d in self.threshold_effect)
        if not any(d.max_abs for d in self.threshold_effect):
            return step + "; the outputs did not change (max output difference 0)"
        return (step + f"; this CHANGED the function: max output difference {worst:.3g} "
                       f"relative to max |output|")

    def to_json(self) -> dict[str, Any]:
        def diff(d: Difference) -> dict[str, Any]:
            return {"output": d.output, "max_abs": d.max_abs, "ref_max_abs": d.ref_max_abs,
                    "relative": d.relative}

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
            "threshold_effect": [diff(d) for d in self.threshold_effect],
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
                shown = {k: v for k, v in r.to_json().items()
                         if k not in ("modified", "kept", "spaces", "lowered", "dense")
                         and v not in ((), [], 0)}
                if shown:
                    lines.append(f"pass {name}: {shown}")
            for e in (*getattr(r, "lowered", ()), *getattr(r, "dense", ())):
                times = ", ".join(f"{k} {t:.3g} ms" for k, t in e.times_ms)
                lines.append(f"lowering {e.node}: {e.strategy}, MACs {e.macs_before} -> "
                             f"{e.macs_after}" + (f" (measured{' (cached)' if e.cached else ''}"
                                                 f": {times})" if times else ""))
        if self.threshold is not None:
            lines.append(self._threshold_line())
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


@dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    report: PruneReport


@gc_paused()  # linear in the graph's size (see pipeline.gc_paused)
def prune(model: onnx.ModelProto, *, threshold: float | None = None, verify: int = 3,
          seed: int = 0, name: str = "", lower: str = "off", provider: str = "cpu",
          batch: int = 1, threads: int = 0, lower_cache: str | None = None) -> PruneResult:
    """Remove zero groups from ``model``; the result computes the same outputs.

    ``threshold`` first zeroes every prunable group with L2 norm <= threshold (this changes
    the function; ``report.threshold_effect`` says by how much). ``verify_n`` seeded random
    inputs are compared against the model read (0 skips the check). ``lower`` (auto, off or a
    strategy of ``LowerSparseConvPass``) lowers convs with zero fibers or 2D filters, chosen
    by timing on ``provider`` at ``batch`` and ``threads``; ``lower_cache`` is the folder of
    cached timings (default ~/.cache/onnx-ssl-lowering; "" disables the cache).
    """
    verify_n = verify
    if verify_n < 0:
        raise InputError(f"--verify must be >= 0 (0 skips the numeric check), got {verify_n}")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise InputError(f"--threshold must be a finite number >= 0, got {threshold}")
    if lower not in LOWER_STRATEGIES or batch < 1 or threads < 0:
        raise InputError(f"--lower must be one of {', '.join(LOWER_STRATEGIES)}, --batch >= 1 "
                         f"and --threads >= 0; got {lower!r}, {batch}, {threads}")
    meta = ModelMeta.of(model)
    # Unique node names and a bound batch; `wc.unbind` makes the result batch-agnostic.
    wc = working_copy(model)
    graph = wc.graph
    # Groups are only needed to threshold them; the passes read spaces and branches.
    before = analyze_graph(graph, kinds=("channel", "depth") if threshold is not None else (),
                           name=name)
    # ONNX Runtime refuses two nodes of one name: the check runs the input uniquely named.
    model = name_nodes(model)
    reference = model
    passes: list[tuple[str, Report]] = []
    effect: tuple[Difference, ...] = ()
    if threshold is not None:
        res = ZeroSmallGroupsPass(threshold, before)(graph)
        graph = res.graph
        passes.append((ZeroSmallGroupsPass.name, res.report))
        # finish() leaves `graph` as it is; unbind() changes it in place: it gets a copy, so
        # that `graph` stays the one that `before` and the passes below describe.
        reference = finish(wc.unbind(graph.copy()) if wc.batch else graph, meta)
        if verify_n:
            effect = tuple(compare(model, reference, n=verify_n, seed=seed))
        del res
    # The passes reuse `before` while the graph they get matches it (graph_key: thresholding
    # zeroes float weights only), and analyse it afresh once a pass changed it.
    lowering = LowerSparseConvPass(
        lower, provider=provider, batch=batch, threads=threads,
        cache_dir=_cache_dir(lower_cache)) if lower != "off" else None
    # Removing channels and branches enables more of both: they run to their fixpoint, in
    # place (`graph` is this call's own, and nothing reads it after the passes: copying a
    # large graph cost as much as a third of the channel pass).
    shared = SharedAnalysis(before)
    pm = PassManager([FixpointPass([CollapseResidualPass(seed=seed, shared=shared, in_place=True),
                                    RemoveZeroChannelsPass(seed=seed, shared=shared,
                                                           in_place=True)]),
                      ShrinkKernelsPass(), *([lowering] if lowering else []), CleanupPass()])
    maps_before = bias_maps(graph)  # per-position bias maps count as their layer's params
    settle()  # the working copy and its analysis stay alive: no reason to collect garbage
    out = pm(graph)
    passes += list(out.report.results)
    maps_after = bias_maps(out.graph)
    lowered = out.report.get(lowering.name) if lowering is not None else None
    # The layers of the result, counted on the rewrite while it has its shapes (bound batch,
    # as model_layers binds it) rather than on a re-import of the exported model.
    shaped = _shaped_layers(out.graph)
    rewritten = wc.unbind(out.graph)
    # Only the rewrite is needed from here on: the working copy (its protos, and the weights
    # of the graph before the passes) goes before the export and the numeric check's
    # sessions, so that a large model's weights are not held several times at once.
    del wc, graph, shared, pm, out
    # A full collection costs time in proportion to the graph's nodes; it pays for large
    # weights (what it frees), not for a graph of many small layers.
    large = weight_bytes(model) >= RELEASE_BYTES
    if large:
        release_memory()
    final = finish(rewritten, meta)
    del rewritten
    if large:
        release_memory()
    diffs = tuple(verify_outputs(reference, final, n=verify_n, seed=seed)) if verify_n else None
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
        passes=tuple(passes), threshold=threshold,
        threshold_effect=effect, verification=diffs, kept=tuple(kept))
    return PruneResult(final, report)


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

