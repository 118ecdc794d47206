"""RemoveZeroChannelsPass: remove channels that no output depends on, exactly.

For a prunable channel space (see :mod:`onnx_ssl.analysis`), channel ``c`` is removed when

* nobody reads it: every ``in`` member (input channel of each consumer layer, FC column
  block) is zero, so ``y = sum_c W[:, c] * x_c`` does not depend on ``x_c``; or
* it carries a constant: every layer producing into the space has a zero filter ``c``
  (biases may be non-zero), so ``x_c`` is a function of constants alone (a bias, a
  BatchNorm shift ``beta - gamma*mu/sqrt(var+eps)``, an activation of it, ...). Consumers
  then receive the constant's contribution ``k = L(x_const)`` (``L`` the consumer layer
  without bias, applied to an input holding only the removed constant channels), which is
  added back: into the consumer's bias when ``k`` is the same at every position (FC
  layers, 1x1 and unpadded convolutions, global pooling), else as a per-position bias map
  ``Add(L'(x), k[1, C_out, H, W])`` after the smaller layer (a padded convolution sees the
  constant only away from the borders). ``k`` is computed with ONNX Runtime on the exact
  constant map that reaches the consumer, so the fold is exact up to float rounding.

Removal slices every member (filters, biases, norm parameters and statistics, broadcast
constants), every activation on the way (Concat ranges follow automatically; Split sizes,
Slice bounds, Reshape targets, Resize sizes, channel Gather indices and depthwise ``group``
are rewritten, and a channel shuffle becomes a Gather: :mod:`onnx_ssl.permutation`), and keeps
grouped convolutions valid by removing the same number of channels from each group. Channels
of a graph input are never removed from the input: when no layer reads some input features,
a Gather after the input keeps the ones still read (the input keeps its shape).

What stays, and why (each listed under "kept:"):

* every tensor keeps at least one channel: a space, and each part of it that a Split or
  Slice cuts out (ONNX Runtime never returns from a Conv with 0 input channels). The
  channel kept is preferably one that nobody reads and that carries a constant;
* grouped convolutions lose the same number of channels from each group;
* a bias map is added only when it costs fewer params than the channels it replaces save
  (``C_out' * H * W`` against the elements of every member removed), so that the model
  never grows; otherwise the constant channels stay.
* with ``rounding`` (``prune --round-to``), zero channels that make a space's count a
  multiple the runtime prefers (:mod:`onnx_ssl.passes.round_channels`, which decides before
  constants are planned; the report's ``rounded`` lists them).

One run removes what the graph it was given shows. Removing a channel can make others
removable (a filter whose every reader left reads upstream channels that nobody else
reads): the prune pipeline runs this pass and :mod:`onnx_ssl.passes.collapse_residual` to
their fixpoint (:class:`onnx_ssl.pipeline.FixpointPass`). A rewritten graph leaves with its
shapes inferred, for the next analysis.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ssl.analysis import SharedAnalysis
from onnx_ssl.graphutil import (
    cleanup,
    dynamic_input_reason,
    evaluate_seeds,
    fresh_names,
    refresh_shapes,
    run_nodes,
    unique_name,
)
from onnx_ssl.groups import Analysis, ChannelRef, Space
from onnx_ssl.io import tensor_map
from onnx_ssl.ops import LayerSlots
from onnx_ssl.passes.round_channels import RoundChannelCounts, RoundedSpace
from onnx_ssl.pipeline import AnalysedPass, PassResult, Report
from onnx_ssl.reasons import ReasonCode
from onnx_ssl.rules import RULES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpaceChange:
    space: str
    before: int
    after: int
    unread: int
    constant: int


@dataclass(frozen=True)
class RemoveZeroChannelsReport(Report):
    channels_removed: int = 0
    spaces: tuple[SpaceChange, ...] = ()
    constants_folded_into_bias: int = 0
    bias_maps_added: int = 0
    input_features_gathered: int = 0
    kept: tuple[str, ...] = field(default=(), metadata={"info": True})
    # Zero channels kept so that counts land on preferred multiples (--round-to).
    rounded: tuple[RoundedSpace, ...] = field(default=(), metadata={"info": True})

    def merge(self, later: Report) -> RemoveZeroChannelsReport:
        """Two rounds of the pass: one :class:`SpaceChange` per space, from its size before
        the first round to its size after the last."""
        merged = super().merge(later)
        assert isinstance(merged, RemoveZeroChannelsReport)
        by_space: dict[str, SpaceChange] = {}
        for c in merged.spaces:
            p = by_space.get(c.space)
            by_space[c.space] = c if p is None else SpaceChange(
                c.space, p.before, c.after, p.unread + c.unread, p.constant + c.constant)
        # The rounding is the last round's (the state after both), of the sizes before both.
        first = {**{c.space: c.before for c in merged.spaces},
                 **{e.space: e.channels for e in self.rounded}}
        rounded = tuple(dataclasses.replace(e, channels=first.get(e.space, e.channels))
                        for e in merged.rounded)
        return dataclasses.replace(merged, spaces=tuple(by_space.values()), rounded=rounded)


def _source_layer_refs(space: Space, nodes: dict[str, gs.Node]) -> list[ChannelRef]:
    """Out refs on the weight of a node that creates the space's channels from other data: a
    layer (its weight), or an embedding (a Gather of rows of a constant table)."""
    out = []
    for r in space.refs:
        if r.role != "out" or not r.is_weight:
            continue
        n = nodes[r.node]
        rule = RULES.get(n.op)
        idx = rule.creates_from if rule is not None else None
        if idx is None or len(n.inputs) <= idx or n.inputs[idx].name != r.tensor:
            continue
        if rule is not None and rule.layer is not None and rule.layer.depthwise(n):
            continue  # depthwise: a per-channel op, its channel stays input-independent
        out.append(r)  # a filter, or an embedding table's column: the channel's only data
    return out


def _position_nonzero(values: np.ndarray, ref: ChannelRef) -> np.ndarray:
    """For each position of ``ref.axis``: does the slice of ``values`` there hold a non-zero?"""
    nz = values != 0
    if ref.conv_groups > 1 and ref.role == "in" and ref.axis == 1:
        # Grouped conv weight [G*og, ig, ...]: input position g*ig + i is W[g*og:(g+1)*og, i].
        g = ref.conv_groups
        per = nz.reshape(g, nz.shape[0] // g, nz.shape[1], -1).any(axis=(1, 3))
        return per.reshape(-1)
    other = tuple(a for a in range(nz.ndim) if a != ref.axis)
    return nz.any(axis=other) if other else nz


def _nonzero_channels(space: Space, refs: list[ChannelRef], tensors: dict[str, gs.Tensor]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per channel of the space: (some member of ``refs`` is non-zero, some ref covers it)."""
    nonzero = np.zeros(space.channels, dtype=bool)
    covered = np.zeros(space.channels, dtype=bool)
    cache: dict[tuple[str, int, int], np.ndarray] = {}
    for r in refs:
        key = (r.tensor, r.axis, r.conv_groups)
        if key not in cache:
            cache[key] = _position_nonzero(np.asarray(tensors[r.tensor].values), r)
        pos = cache[key]
        span = pos[r.tensor_start * r.block:(r.tensor_start + r.length) * r.block]
        nonzero[r.space_start:r.space_start + r.length] |= span.reshape(r.length,
                                                                        r.block).any(axis=1)
        covered[r.space_start:r.space_start + r.length] = True
    return nonzero, covered


def _balance(space: Space, removable: set[int]) -> tuple[set[int], list[str]]:
    """Keep grouped convolutions valid: the same count removed from every group, and at
    least one channel left in each (the space's ``constraint`` in the analysis JSON)."""
    held: set[int] = set()
    changed = True
    while changed:
        changed = False
        for g in space.partitions:
            size = space.channels // g
            per = [sorted(c for c in removable if c // size == k) for k in range(g)]
            m = min(len(p) for p in per)
            if m == size:
                m = size - 1
            for p in per:
                for c in p[m:]:
                    removable.discard(c)
                    held.add(c)
                    changed = True
    if not held:
        return removable, []
    blocks = math.lcm(*space.partitions)
    size = space.channels // blocks
    return removable, [
        f"{space.id}: keeps {len(held)} zero channel(s) {sorted(held)}: grouped convolutions "
        f"split its channels into {blocks} blocks of {size}, so that each of its convolution "
        f"groups loses the same number and keeps at least one (zero channels in equal numbers "
        f"per block; see the space's constraint in the analysis JSON)"]


class RemoveZeroChannelsPass(AnalysedPass[RemoveZeroChannelsReport]):
    """See the module docstring; the constructor is :class:`~onnx_ssl.pipeline.AnalysedPass`'s."""

    name = "remove-zero-channels"
    # Constants added by folding that must be sliced like an existing tensor axis:
    # (new tensor, tensor it follows, axis there, axis here). Set by each call.
    _followers: list[tuple[str, str, int, int]]

    def __init__(self, analysis: Analysis | None = None, seed: int = 0, *,
                 shared: SharedAnalysis | None = None, in_place: bool = False,
                 rounding: RoundChannelCounts | None = None) -> None:
        super().__init__(analysis, seed, shared=shared, in_place=in_place)
        # Keeps zero channels so that counts land on preferred multiples (--round-to).
        self.rounding = rounding

    def call(self, graph: gs.Graph) -> PassResult[RemoveZeroChannelsReport]:
        analysis = self.shared.of(graph)  # checked against this graph before the copy
        self._followers = []
        kept: list[str] = []
        # The plan only reads the graph: it is copied (unless in place) only when something
        # goes (a round of the fixpoint that finds nothing hands its graph on untouched).
        plan = self._find(graph, analysis, kept)
        rounded: list[RoundedSpace] = []
        if plan and self.rounding is not None:  # before constants are planned on the plan
            plan, why, rounded = self.rounding.apply(graph, analysis, plan)
            kept += why
        contributions = self._plan_constants(graph, analysis, plan, kept) if plan else []
        if not plan:
            return PassResult(graph, RemoveZeroChannelsReport(kept=tuple(kept),
                                                              rounded=tuple(rounded)))
        graph = self._writable(graph)
        with fresh_names(graph):  # every name this pass adds comes from unique_name
            res = self._remove(graph, analysis, plan, contributions, kept)
        return PassResult(res.graph, dataclasses.replace(res.report, rounded=tuple(rounded)))

    def _find(self, graph: gs.Graph, analysis: Analysis, kept: list[str]
              ) -> dict[str, tuple[set[int], set[int]]]:
        """The channels to remove per space, ``(unread, constant)``; the others that are
        zero go to ``kept`` with the reason."""
        tensors = tensor_map(graph)
        nodes = {n.name: n for n in graph.nodes}
        # Folding a constant channel evaluates it; that needs static inputs (but the batch).
        no_fold = dynamic_input_reason(graph)
        found: dict[str, tuple[set[int], set[int]]] = {}  # space -> (unread, constant)
        for sp in analysis.spaces:
            input_only = (not sp.prunable and sp.origin == "input" and all(
                r.code is ReasonCode.GRAPH_INPUT for r in sp.all_reasons))
            if not sp.prunable and not input_only:
                continue
            in_refs = [r for r in sp.refs if r.role == "in" and r.is_weight]
            src = _source_layer_refs(sp, nodes)
            read, _ = _nonzero_channels(sp, in_refs, tensors)
            made, covered = _nonzero_channels(sp, src, tensors)
            unread = {int(c) for c in np.flatnonzero(~read)}
            const: set[int] = set()
            if not input_only and src:
                const = {int(c) for c in np.flatnonzero(covered & ~made & read)}
            if const and no_fold:
                kept.append(f"{sp.id}: keeps {len(const)} constant channel(s) (zero filters, "
                            f"read by other layers): folding them needs static input shapes, "
                            f"but {no_fold}")
                const = set()
            if unread | const:
                found[sp.id] = (unread, const)
        removable = {sid: u | c for sid, (u, c) in found.items()}
        _keep_nonempty(analysis, removable, found, kept)
        plan: dict[str, tuple[set[int], set[int]]] = {}
        for sid, rem in removable.items():
            rem, why = _balance(analysis.space(sid), rem)
            kept += why
            if rem:
                unread, const = found[sid]
                plan[sid] = (unread & rem, const & rem)
        return plan

    def _remove(self, graph: gs.Graph, analysis: Analysis,
                plan: dict[str, tuple[set[int], set[int]]],
                contributions: list[tuple[str, np.ndarray, bool]], kept: list[str]
                ) -> PassResult[RemoveZeroChannelsReport]:
        folded, maps = self._fold(graph, contributions)
        gathered = self._apply(graph, analysis, plan)
        cleanup(graph)
        refresh_shapes(graph)
        changes = tuple(SpaceChange(s, analysis.space(s).channels,
                                    analysis.space(s).channels - len(u | c), len(u), len(c - u))
                        for s, (u, c) in plan.items())
        report = RemoveZeroChannelsReport(
            channels_removed=sum(len(u | c) for u, c in plan.values()), spaces=changes,
            constants_folded_into_bias=folded, bias_maps_added=maps,
            input_features_gathered=gathered, kept=tuple(kept))
        return PassResult(graph, report)

    # --- constants ------------------------------------------------------------------------
    def _plan_constants(self, graph: gs.Graph, analysis: Analysis,
                        plan: dict[str, tuple[set[int], set[int]]], kept: list[str]
                        ) -> list[tuple[str, np.ndarray, bool]]:
        """What each consumer of removed constant channels gets added back:
        ``(consumer, k, uniform)``, ``k`` per output channel when ``uniform``, else the map.

        A channel whose producing filters are all zero is constant unless something else
        feeds it data (a data-dependent factor broadcast over the channels, say). A channel
        whose contribution only a per-position bias map can carry is removed only when that
        pays: the maps must cost fewer params than the removal saves, so that the model
        never grows. Other channels are taken out of ``plan`` and kept, with the reason in
        ``kept``; nothing in the graph changes here.
        """
        nodes = {n.name: n for n in graph.nodes}
        tensors = tensor_map(graph)
        per_consumer = _constant_consumers(analysis, plan)
        if not per_consumer:
            return []
        inputs = sorted({nodes[n].inputs[0].name for n in per_consumer})
        a, b = evaluate_seeds(graph, inputs, (self.seed, self.seed + 1))

        def at(name: str, r: ChannelRef, c: int) -> tuple[Any, ...]:
            node = nodes[name]
            sel: list[Any] = [slice(None)] * a[node.inputs[0].name].ndim
            sel[_activation_axis(node)] = list(r.positions(c))
            return tuple(sel)

        varying: dict[str, set[int]] = defaultdict(set)
        for name, items in per_consumer.items():
            x = nodes[name].inputs[0].name
            for r, c in items:
                if not np.array_equal(a[x][:1][at(name, r, c)], b[x][:1][at(name, r, c)]):
                    varying[r.space].add(c)
        for sid, chans in varying.items():
            _drop_from_plan(analysis.space(sid), plan, chans, kept, (
                "their filters are zero, but their values still depend on the input "
                "(something other than the space's layers feeds them, such as a "
                "data-dependent factor broadcast over the channels), so they are not "
                "constants that can be folded"))
        opset = int(graph.opset or 17)
        cache: dict[tuple[str, tuple[tuple[ChannelRef, int], ...]], np.ndarray] = {}
        while True:
            out: list[tuple[str, np.ndarray, bool, list[tuple[ChannelRef, int]]]] = []
            consumers = _constant_consumers(analysis, plan)
            todo: list[tuple[str, tuple[tuple[ChannelRef, int], ...]]] = []
            jobs: list[tuple[gs.Node, dict[int, np.ndarray]]] = []
            for name, items in consumers.items():
                key = (name, tuple(items))
                if key in cache:
                    continue
                node = nodes[name]
                xa = a[node.inputs[0].name][:1]
                z = np.zeros_like(xa)
                for r, c in items:
                    z[at(name, r, c)] = xa[at(name, r, c)]
                # The consumer without its bias is linear: L(x) = L(x_kept) + L(z).
                todo.append(key)
                jobs.append((node, {0: z}))
            # One session for every consumer, not one each.
            cache.update(zip(todo, run_nodes(jobs, opset, drop_from=2), strict=True))
            for name, items in consumers.items():
                contrib = cache[(name, tuple(items))]
                node = nodes[name]
                out_axis = _slots(node).activation_axis(contrib.ndim)
                per_channel = np.moveaxis(contrib, out_axis, 0).reshape(
                    contrib.shape[out_axis], -1)
                if np.all(per_channel == per_channel[:, :1]):
                    out.append((name, per_channel[:, 0].copy(), True, items))
                else:
                    out.append((name, contrib.astype(np.float32), False, items))
            drop = _costly_maps(analysis, plan, out, tensors, nodes)
            if drop is None:
                return [(name, k, uniform) for name, k, uniform, _ in out]
            for sid, chans, why in drop:
                _drop_from_plan(analysis.space(sid), plan, chans, kept, why)
            if not plan:
                return []

    def _fold(self, graph: gs.Graph, contributions: list[tuple[str, np.ndarray, bool]]
              ) -> tuple[int, int]:
        """Add each contribution: into the consumer's bias, or as a bias map after it."""
        nodes = {n.name: n for n in graph.nodes}
        folded = maps = 0
        for name, k, uniform in contributions:
            if uniform:
                self._followers += _add_to_bias(graph, nodes[name], k)
                folded += 1
            else:
                self._followers += _add_bias_map(graph, nodes[name], k)
                maps += 1
        return folded, maps

    # --- slicing --------------------------------------------------------------------------
    def _apply(self, graph: gs.Graph, analysis: Analysis,
               plan: dict[str, tuple[set[int], set[int]]]) -> int:
        tensors = tensor_map(graph)
        graph_inputs = {t.name for t in graph.inputs}
        deletions, grouped_by, inputs = _deletions(analysis, plan, graph_inputs)
        gathered = 0
        for (name, axis), pos in inputs.items():
            # What reads the input now reads its kept features: a Split, Slice, Gather or
            # shuffle right after the input is rewritten like one after any other tensor.
            deletions[(self._gather_input(graph, tensors[name], axis, pos), axis)] |= pos
            gathered += len(pos)
        grouped: dict[str, set[int]] = defaultdict(set)  # weight -> deleted input positions
        for (name, _), pos in grouped_by.items():
            grouped[name] |= pos
        for new, old, axis_old, axis_new in self._followers:
            if (old, axis_old) in deletions:
                deletions[(new, axis_new)] |= deletions[(old, axis_old)]
        # Structural attributes of activations, before the shapes are forgotten.
        by_tensor = {name: (axis, pos) for (name, axis), pos in deletions.items()}
        for node in list(graph.nodes):
            _rewrite_structure(graph, node, by_tensor)
        for (name, axis), pos in deletions.items():
            t = tensors.get(name)  # a bias replaced by a folded copy is gone (its copy follows)
            if isinstance(t, gs.Constant):
                t.values = np.delete(np.asarray(t.values), sorted(pos), axis=axis)
        for name, pos in grouped.items():
            t = tensors[name]
            w = np.asarray(t.values)
            consumer = next(n for n in t.outputs if n.op == "Conv")
            g = int(consumer.attrs["group"])
            og, ig = w.shape[0] // g, w.shape[1]
            parts = []
            for k in range(g):
                keep = [p % ig for p in range(k * ig, (k + 1) * ig) if p not in pos]
                parts.append(w[k * og:(k + 1) * og][:, keep])
            t.values = np.concatenate(parts, axis=0)
        return gathered

    def _gather_input(self, graph: gs.Graph, x: gs.Tensor, axis: int, pos: set[int]) -> str:
        """Gather the features of graph input ``x`` that stay; the name of the gathered
        tensor, which keeps ``x``'s shape until the shapes are inferred again."""
        size = x.shape[axis]
        keep = np.array([p for p in range(size) if p not in pos], dtype=np.int64)
        out = gs.Variable(unique_name(graph, f"{x.name}_gathered"), dtype=x.dtype,
                          shape=list(x.shape))
        idx = gs.Constant(unique_name(graph, f"{x.name}_kept_features"), keep)
        consumers = list(x.outputs)
        node = gs.Node("Gather", name=unique_name(graph, f"{x.name}_gather"),
                       attrs={"axis": axis}, inputs=[x, idx], outputs=[out])
        for c in consumers:
            c.inputs = [out if t is x else t for t in c.inputs]
        graph.nodes.append(node)
        return str(out.name)


def _constant_consumers(analysis: Analysis, plan: dict[str, tuple[set[int], set[int]]]
                        ) -> dict[str, list[tuple[ChannelRef, int]]]:
    """Consumer layer -> the (in ref, channel) pairs of the constant channels it reads."""
    per_consumer: dict[str, list[tuple[ChannelRef, int]]] = defaultdict(list)
    for sid, (unread, const) in plan.items():
        sp = analysis.space(sid)
        for r in sp.refs:
            if r.role != "in" or not r.is_weight:
                continue
            for c in sorted(const - unread):
                if r.space_start <= c < r.space_start + r.length:
                    per_consumer[r.node].append((r, c))
    return per_consumer


def _drop_from_plan(space: Space, plan: dict[str, tuple[set[int], set[int]]],
                    chans: set[int], kept: list[str], why: str) -> None:
    """Keep the ``chans`` of ``space`` (for reason ``why``), and rebalance."""
    if space.id not in plan:
        return
    unread, const = plan[space.id]
    kept.append(f"{space.id}: keeps channel(s) {sorted(chans)}: {why}")
    const = const - chans
    unread = unread - chans
    removable, balanced = _balance(space, unread | const)
    kept += balanced
    if removable:
        plan[space.id] = (unread & removable, const & removable)
    else:
        del plan[space.id]


Deletions = dict[tuple[str, int], set[int]]


def _deletions(analysis: Analysis, plan: dict[str, tuple[set[int], set[int]]],
               graph_inputs: set[str], refs: Sequence[ChannelRef] | None = None
               ) -> tuple[Deletions, Deletions, Deletions]:
    """The positions ``plan`` deletes: ``(tensor, axis) -> positions`` of plain slices,
    ``(grouped conv weight, groups) -> input positions`` (a grouped conv weight read on its
    input side), and ``(graph input, axis) -> positions`` (gathered, never sliced). Only
    those of ``refs`` when given (refs of spaces that ``plan`` leaves alone count nothing).
    """
    plain: Deletions = defaultdict(set)
    grouped: Deletions = defaultdict(set)
    inputs: Deletions = defaultdict(set)
    if refs is None:
        refs = [r for sid in plan for r in analysis.space(sid).refs]
    for r in refs:
        if r.space not in plan:
            continue
        unread, const = plan[r.space]
        lo, hi = r.space_start, r.space_start + r.length
        pos = {p for c in unread | const if lo <= c < hi for p in r.positions(c)}
        if not pos:
            continue
        if r.tensor in graph_inputs:
            inputs[(r.tensor, r.axis)] |= pos
        elif r.conv_groups > 1 and r.role == "in" and r.axis == 1:
            grouped[(r.tensor, r.conv_groups)] |= pos
        else:
            plain[(r.tensor, r.axis)] |= pos
    return plain, grouped, inputs


def _removed_elements(analysis: Analysis, plan: dict[str, tuple[set[int], set[int]]],
                      tensors: dict[str, gs.Tensor], refs: Sequence[ChannelRef] | None = None
                      ) -> int:
    """Float constant elements (weights, biases, norm parameters) that ``plan`` removes (from
    the tensors of ``refs`` only, when given: pass every ref of those tensors)."""
    plain, grouped, _ = _deletions(analysis, plan, set(), refs)
    cut: dict[str, dict[int, int]] = defaultdict(dict)
    for (name, axis), pos in plain.items():
        cut[name][axis] = len(pos)
    for (name, groups), pos in grouped.items():
        cut[name][1] = cut[name].get(1, 0) + len(pos) // groups  # as many from every group
    total = 0
    for name, axes in cut.items():
        t = tensors.get(name)
        if not isinstance(t, gs.Constant) or np.dtype(t.dtype).kind != "f":
            continue
        shape = [int(d) for d in t.shape]
        total += math.prod(shape) - math.prod(max(0, d - axes.get(i, 0))
                                              for i, d in enumerate(shape))
    return total


Contribution = tuple[str, np.ndarray, bool, list[tuple[ChannelRef, int]]]


def _costly_maps(analysis: Analysis, plan: dict[str, tuple[set[int], set[int]]],
                 contributions: list[Contribution], tensors: dict[str, gs.Tensor],
                 nodes: dict[str, gs.Node]) -> list[tuple[str, set[int], str]] | None:
    """Constant channels to keep because the bias maps they need cost more params than
    removing them saves, as ``(space, channels, reason)``; None when the plan pays.

    A map ``k[1, C_out, H, W]`` costs ``C_out' * H * W`` (``C_out'`` the consumer's output
    channels after the plan); a new bias (a consumer without one) ``C_out'``. First the
    space whose channels cost the most more than they save is kept (one at a time: keeping
    it changes what the others cost); then, if the plan as a whole still grows the model,
    every channel that needs a map is kept.
    """
    plain, _, _ = _deletions(analysis, plan, set())

    def after(node: gs.Node) -> int:  # the consumer's output channels after the plan
        w = node.inputs[1]
        return int(w.shape[_out_weight_axis(node)]) - len(
            plain.get((w.name, _out_weight_axis(node)), ()))

    maps: list[tuple[str, int, set[tuple[str, int]]]] = []
    new_bias = 0
    for name, k, uniform, items in contributions:
        node = nodes[name]
        if not uniform:
            axis = k.ndim - 1 if k.ndim == 1 else _slots(node).activation_axis(k.ndim)
            maps.append((name, k.size // k.shape[axis] * after(node),
                         {(r.space, c) for r, c in items}))
        elif _bias_index(node) is None or len(node.inputs) <= 2 or not node.inputs[2].name:
            new_bias += after(node)
    if not maps:
        return None
    removed = _removed_elements(analysis, plan, tensors)

    # Keeping channels of one space changes only the tensors its refs touch: what removing
    # them saves is counted on those tensors alone (else this is quadratic in the spaces).
    refs_of: dict[str, list[ChannelRef]] = defaultdict(list)
    for sid in plan:
        for r in analysis.space(sid).refs:
            refs_of[r.tensor].append(r)
    needed = set().union(*(chans for _, _, chans in maps))
    by_space: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for s_c in needed:
        by_space[s_c[0]].add(s_c)
    map_cost: dict[str, int] = defaultdict(int)  # space -> cost of the maps only it needs
    for _, cost, pairs in maps:
        spaces = {s for s, _ in pairs}
        if len(spaces) == 1:
            map_cost[next(iter(spaces))] += cost
    worst: tuple[int, str, set[int], int, int] | None = None
    for sid in sorted(by_space):
        mine = by_space[sid]
        avoided = map_cost[sid]
        touched = [r for t in dict.fromkeys(r.tensor for r in analysis.space(sid).refs)
                   for r in refs_of[t]]
        unread, const = plan[sid]
        gone = {ch for _, ch in mine}
        saved = (_removed_elements(analysis, plan, tensors, touched)
                 - _removed_elements(analysis, {**plan, sid: (unread - gone, const - gone)},
                                     tensors, touched))
        if avoided > saved and (worst is None or avoided - saved > worst[0]):
            worst = (avoided - saved, sid, {c for _, c in mine}, avoided, saved)
    if worst is not None:
        _, sid, chans, avoided, saved = worst
        readers = sorted(n for n, _, c in maps if any(s == sid for s, _ in c))
        return [(sid, chans, f"what their constant adds to {', '.join(readers)} varies over "
                             f"positions (a padded convolution's borders), and the "
                             f"per-position bias map that would carry it costs {avoided} "
                             f"params, more than the {saved} that removing them saves")]
    cost = sum(c for _, c, _ in maps) + new_bias
    if cost <= removed:
        return None
    return [(sid, {c for s, c in needed if s == sid},
             f"the per-position bias maps their constants need cost {cost} params, more than "
             f"the {removed} that this removal saves") for sid in sorted({s for s, _ in needed})]


def _keep_nonempty(analysis: Analysis, removable: dict[str, set[int]],
                   found: dict[str, tuple[set[int], set[int]]], kept: list[str]) -> None:
    """Keep one channel of every activation that would lose all of its channels (in place).

    ONNX Runtime cannot run a tensor with 0 channels: a Conv with 0 input channels never
    returns, and a GlobalAveragePool on one fails. So a space keeps at least one channel,
    and so does each part of it that a Split or Slice cuts out. The channel kept is, in
    this order of preference, one that nobody reads and that carries a constant (it ties
    nothing up or down stream), one with zero filters (its upstream channels can still go),
    the first.
    """
    by_tensor: dict[tuple[str, int], list[ChannelRef]] = defaultdict(list)
    sizes: dict[tuple[str, int], int] = defaultdict(int)  # channels of each activation axis
    for sp in analysis.spaces:
        for r in sp.refs:
            if r.role != "act":
                continue
            sizes[(r.tensor, r.axis)] += r.length
            if r.space in removable:
                by_tensor[(r.tensor, r.axis)].append(r)
    for key in sorted(by_tensor, key=lambda k: (sizes[k], k)):
        refs = by_tensor[key]
        if sum(r.length for r in refs) < sizes[key]:
            continue  # a space that is not removed at all holds some of its channels
        cands = [(r.space, c) for r in refs
                 for c in range(r.space_start, r.space_start + r.length)]
        if not all(c in removable[s] for s, c in cands):
            continue

        def rank(sc: tuple[str, int]) -> tuple[bool, bool, int]:
            unread, const = found[sc[0]]
            return (not (sc[1] in unread and sc[1] in const), sc[1] not in const, sc[1])

        sid, keep = min(cands, key=rank)
        removable[sid].discard(keep)
        space = analysis.space(sid)
        if len(cands) >= space.channels and all(s == sid for s, _ in cands):
            kept.append(f"{sid}: every channel is zero; a layer keeps at least one channel "
                        f"(channel {keep} kept)")
        else:
            kept.append(f"{sid}: every channel of tensor '{key[0]}' is zero; a tensor keeps "
                        f"at least one channel (ONNX Runtime cannot run an empty one), so "
                        f"channel {keep} is kept")
    for sid, rem in removable.items():  # a space without activations (never, in practice)
        space = analysis.space(sid)
        if len(rem) >= space.channels:
            keep = min(rem)
            rem.discard(keep)
            kept.append(f"{sid}: every channel is zero; a layer keeps at least one channel "
                        f"(channel {keep} kept)")


def _slots(node: gs.Node) -> LayerSlots:
    """The op table's slots of a layer (the only nodes that read removed channels)."""
    slots = RULES[node.op].layer
    assert slots is not None, f"{node.name} ({node.op}) is not a layer"
    return slots


def _activation_axis(node: gs.Node) -> int:
    x = node.inputs[0]
    r = len(x.shape) if x.shape is not None else 2
    return _slots(node).activation_axis(r)


def _bias_index(node: gs.Node) -> int | None:
    return _slots(node).bias


Follower = tuple[str, str, int, int]


def _out_weight_axis(node: gs.Node) -> int:
    return _slots(node).out_axis(node)


def _add_to_bias(graph: gs.Graph, node: gs.Node, vec: np.ndarray) -> list[Follower]:
    """bias += vec; a new bias constant follows the deletions of the layer's filters."""
    idx = _bias_index(node)
    w = node.inputs[1].name
    w_axis = _out_weight_axis(node)
    if idx is not None and len(node.inputs) > idx and node.inputs[idx].name:
        b = node.inputs[idx]
        old = np.asarray(b.values)
        if old.size == vec.size:
            new = gs.Constant(unique_name(graph, f"{b.name}.folded"),
                              (old + vec.reshape(old.shape)).astype(old.dtype))
            node.inputs[idx] = new
            return [(new.name, w, w_axis, old.ndim - 1)]
    elif idx is not None:
        while len(node.inputs) < idx:
            node.inputs.append(gs.Variable.empty())
        new = gs.Constant(unique_name(graph, f"{node.name}.folded_bias"),
                          vec.astype(np.float32))
        node.inputs.append(new)
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        return [(new.name, w, w_axis, 0)]
    return _add_bias_map(graph, node, vec.astype(np.float32))


def _add_bias_map(graph: gs.Graph, node: gs.Node, k: np.ndarray) -> list[Follower]:
    """y -> y + k after ``node`` (k broadcasts over the batch).

    When ``y`` already goes only into an Add of a constant of ``k``'s shape (a bias map of
    an earlier round, a MatMul's bias), ``k`` is added into that constant instead.
    """
    y = node.outputs[0]
    if len(y.outputs) == 1 and y.outputs[0].op == "Add":
        prev = next((t for t in y.outputs[0].inputs if isinstance(t, gs.Constant)), None)
        if (prev is not None and len(prev.outputs) == 1
                and tuple(prev.shape) == tuple(k.shape)
                and np.dtype(prev.dtype) == k.dtype):
            prev.values = (np.asarray(prev.values) + k).astype(k.dtype)
            return []  # sliced like any broadcast constant of the space: already a member
    pre = gs.Variable(unique_name(graph, f"{y.name}_before_const"), dtype=y.dtype)
    node.outputs[0] = pre
    const = gs.Constant(unique_name(graph, f"{node.name}.const_contribution"), k)
    add = gs.Node("Add", name=unique_name(graph, f"{node.name}_add_const"),
                  inputs=[pre, const], outputs=[y])
    graph.nodes.append(add)
    out_axis = k.ndim - 1 if k.ndim == 1 else _slots(node).activation_axis(k.ndim)
    return [(const.name, node.inputs[1].name, _out_weight_axis(node), out_axis)]


def _rewrite_structure(graph: gs.Graph, node: gs.Node,
                       deletions: dict[str, tuple[int, set[int]]]) -> None:
    """Update attributes and shape inputs that encode channel counts: the ``rewrite`` of the
    node's entry in the op table (Split sizes, Slice bounds, Reshape targets, Resize sizes,
    depthwise ``group``)."""
    rule = RULES.get(node.op)
    if rule is not None and rule.rewrite is not None:
        rule.rewrite(graph, node, deletions)
