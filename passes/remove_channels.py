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
Slice bounds, Reshape targets, Resize sizes and depthwise ``group`` are rewritten), and keeps
grouped convolutions valid by removing the same number of channels from each group. Channels
of a graph input are never removed from the input: when no layer reads some input features,
a Gather after the input keeps the ones still read (the input keeps its shape).
A space keeps at least one channel; whole residual branches go through
:mod:`onnx_ssl.passes.collapse_residual`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ssl.analysis import LAYER_OPS, analyze_graph
from onnx_ssl.graphutil import (
    clear_inner_shapes,
    dynamic_input_reason,
    evaluate,
    run_node,
    unique_name,
)
from onnx_ssl.groups import Analysis, ChannelRef, Space
from onnx_ssl.pipeline import PassResult, Report

log = logging.getLogger(__name__)

INPUT_REASON_PREFIX = "graph input '"


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


def _source_layer_refs(space: Space, nodes: dict[str, gs.Node]) -> list[ChannelRef]:
    """Out refs on the weight of a node that creates the space's channels from other data: a
    layer (its weight), or an embedding (a Gather of rows of a constant table)."""
    out = []
    for r in space.refs:
        if r.role != "out" or not r.is_weight:
            continue
        n = nodes[r.node]
        if n.op == "Gather" and n.inputs[0].name == r.tensor:
            out.append(r)  # the table's column is the channel's only data
            continue
        if n.op not in LAYER_OPS or n.inputs[1].name != r.tensor:
            continue
        if n.op == "Conv" and int(n.attrs.get("group", 1)) > 1 and (
                np.asarray(n.inputs[1].values).shape[1] == 1):
            continue  # depthwise: a per-channel op, its channel stays input-independent
        out.append(r)
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
    """Keep grouped convolutions valid: the same count removed from every group."""
    kept: list[str] = []
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
                    changed = True
            if changed:
                kept.append(f"{space.id}: keeps zero channels so that each of its {g} "
                            f"convolution groups loses the same number")
    return removable, kept


class RemoveZeroChannelsPass:
    name = "remove-zero-channels"

    def __init__(self, analysis: Analysis | None = None, seed: int = 0,
                 analysed: gs.Graph | None = None) -> None:
        """``analysis`` is used only for the graph it describes: ``analysed``, when given, must
        be the very graph object the pass receives (an unchanged graph from earlier passes);
        otherwise the pass analyses its input itself."""
        self.analysed = analysed
        self.analysis = analysis
        self.seed = seed
        # Constants added by folding that must be sliced like an existing tensor axis:
        # (new tensor, tensor it follows, axis there, axis here).
        self._followers: list[tuple[str, str, int, int]] = []

    def __call__(self, graph: gs.Graph) -> PassResult[RemoveZeroChannelsReport]:
        graph = graph.copy()
        self._followers = []
        usable = self.analysis is not None and (self.analysed is None or self.analysed is graph)
        analysis = self.analysis if usable and self.analysis else analyze_graph(graph, kinds=())
        tensors = graph.tensors()
        nodes = {n.name: n for n in graph.nodes}
        kept: list[str] = []
        plan: dict[str, tuple[set[int], set[int]]] = {}  # space -> (unread, constant)
        # Folding a constant channel evaluates it; that needs static inputs (but the batch).
        no_fold = dynamic_input_reason(graph)
        for sp in analysis.spaces:
            input_only = (not sp.prunable and sp.origin == "input" and all(
                r.startswith(INPUT_REASON_PREFIX) for r in sp.all_reasons))
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
            removable = unread | const
            if not removable:
                continue
            if len(removable) >= sp.channels:
                keep = min(removable)
                removable.discard(keep)
                kept.append(f"{sp.id}: every channel is zero; a layer keeps at least one "
                            f"channel (channel {keep} kept)")
            removable, why = _balance(sp, removable)
            kept += why
            if removable:
                plan[sp.id] = (unread & removable, const & removable)
        if not plan:
            return PassResult(graph, RemoveZeroChannelsReport(kept=tuple(kept)))

        folded, maps = self._fold_constants(graph, analysis, plan, kept)
        gathered = self._apply(graph, analysis, plan)
        clear_inner_shapes(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        changes = tuple(SpaceChange(s, analysis.space(s).channels,
                                    analysis.space(s).channels - len(u | c), len(u), len(c - u))
                        for s, (u, c) in plan.items())
        report = RemoveZeroChannelsReport(
            channels_removed=sum(len(u | c) for u, c in plan.values()), spaces=changes,
            constants_folded_into_bias=folded, bias_maps_added=maps,
            input_features_gathered=gathered, kept=tuple(kept))
        return PassResult(graph, report)

    # --- constants ------------------------------------------------------------------------
    def _fold_constants(self, graph: gs.Graph, analysis: Analysis,
                        plan: dict[str, tuple[set[int], set[int]]], kept: list[str]
                        ) -> tuple[int, int]:
        """Add the contribution of removed constant channels to each consumer.

        A channel whose producing filters are all zero is constant unless something else
        feeds it data (a data-dependent factor broadcast over the channels, say): such
        channels are taken out of ``plan`` and kept, with the reason in ``kept``.
        """
        nodes = {n.name: n for n in graph.nodes}
        per_consumer = _constant_consumers(analysis, plan)
        if not per_consumer:
            return 0, 0
        inputs = sorted({nodes[n].inputs[0].name for n in per_consumer})
        a = evaluate(graph, inputs, self.seed)
        b = evaluate(graph, inputs, self.seed + 1)

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
        if varying:
            for sid, chans in varying.items():
                _drop_from_plan(analysis.space(sid), plan, chans, kept)
            per_consumer = _constant_consumers(analysis, plan)
        folded = maps = 0
        for name, items in per_consumer.items():
            node = nodes[name]
            x = node.inputs[0].name
            xa = a[x][:1]
            z = np.zeros_like(xa)
            for r, c in items:
                z[at(name, r, c)] = xa[at(name, r, c)]
            # The consumer without its bias is linear: L(x) = L(x_kept) + L(z).
            contrib = run_node(node, {0: z}, int(graph.opset or 17), drop_from=2)
            out_axis = 1 if node.op in ("Conv", "ConvTranspose", "Gemm") else contrib.ndim - 1
            per_channel = np.moveaxis(contrib, out_axis, 0).reshape(contrib.shape[out_axis], -1)
            if np.all(per_channel == per_channel[:, :1]):
                self._followers += _add_to_bias(graph, node, per_channel[:, 0].copy())
                folded += 1
            else:
                self._followers += _add_bias_map(graph, node, contrib.astype(np.float32))
                maps += 1
        return folded, maps

    # --- slicing --------------------------------------------------------------------------
    def _apply(self, graph: gs.Graph, analysis: Analysis,
               plan: dict[str, tuple[set[int], set[int]]]) -> int:
        tensors = graph.tensors()
        graph_inputs = {t.name for t in graph.inputs}
        # (tensor, axis) -> positions to delete; grouped-conv inputs handled separately.
        deletions: dict[tuple[str, int], set[int]] = defaultdict(set)
        grouped: dict[str, set[int]] = defaultdict(set)  # weight -> deleted input positions
        gathered = 0
        for sid, (unread, const) in plan.items():
            sp = analysis.space(sid)
            gone = unread | const
            for r in sp.refs:
                pos = {p for c in gone for p in r.positions(c)}
                if not pos:
                    continue
                if r.tensor in graph_inputs:
                    gathered += self._gather_input(graph, tensors[r.tensor], r.axis, pos)
                    continue
                if r.conv_groups > 1 and r.role == "in" and r.axis == 1:
                    grouped[r.tensor] |= pos
                    continue
                deletions[(r.tensor, r.axis)] |= pos
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

    def _gather_input(self, graph: gs.Graph, x: gs.Tensor, axis: int, pos: set[int]) -> int:
        size = x.shape[axis]
        keep = np.array([p for p in range(size) if p not in pos], dtype=np.int64)
        out = gs.Variable(unique_name(graph, f"{x.name}_gathered"), dtype=x.dtype)
        idx = gs.Constant(unique_name(graph, f"{x.name}_kept_features"), keep)
        consumers = list(x.outputs)
        node = gs.Node("Gather", name=unique_name(graph, f"{x.name}_gather"),
                       attrs={"axis": axis}, inputs=[x, idx], outputs=[out])
        for c in consumers:
            c.inputs = [out if t is x else t for t in c.inputs]
        graph.nodes.append(node)
        return len(pos)


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
                    varying: set[int], kept: list[str]) -> None:
    """Keep the ``varying`` channels of ``space`` (not constant after all), and rebalance."""
    unread, const = plan[space.id]
    kept.append(f"{space.id}: keeps channel(s) {sorted(varying)}: their filters are zero, but "
                f"their values still depend on the input (something other than the space's "
                f"layers feeds them, such as a data-dependent factor broadcast over the "
                f"channels), so they are not constants that can be folded")
    const = const - varying
    removable, why = _balance(space, unread | const)
    kept += why
    if removable:
        plan[space.id] = (unread & removable, const & removable)
    else:
        del plan[space.id]


def _activation_axis(node: gs.Node) -> int:
    x = node.inputs[0]
    r = len(x.shape) if x.shape is not None else 2
    return r - 1 if node.op == "MatMul" else 1


def _bias_index(node: gs.Node) -> int | None:
    return 2 if node.op in ("Conv", "ConvTranspose", "Gemm") else None


Follower = tuple[str, str, int, int]


def _out_weight_axis(node: gs.Node) -> int:
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1  # ConvTranspose (group 1), MatMul


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
    """y -> y + k after ``node`` (k broadcasts over the batch)."""
    y = node.outputs[0]
    pre = gs.Variable(unique_name(graph, f"{y.name}_before_const"), dtype=y.dtype)
    node.outputs[0] = pre
    const = gs.Constant(unique_name(graph, f"{node.name}.const_contribution"), k)
    add = gs.Node("Add", name=unique_name(graph, f"{node.name}_add_const"),
                  inputs=[pre, const], outputs=[y])
    graph.nodes.append(add)
    out_axis = k.ndim - 1 if node.op == "MatMul" or k.ndim == 1 else 1
    return [(const.name, node.inputs[1].name, _out_weight_axis(node), out_axis)]


def _rewrite_structure(graph: gs.Graph, node: gs.Node,
                       deletions: dict[str, tuple[int, set[int]]]) -> None:
    """Update attributes and shape inputs that encode channel counts."""

    def deleted(t: gs.Tensor) -> tuple[int, set[int]] | None:
        return deletions.get(t.name)

    if node.op == "Split":
        d = deleted(node.inputs[0])
        if d is None:
            return
        axis, pos = d
        if int(node.attrs.get("axis", 0)) % len(node.inputs[0].shape) != axis:
            return
        sizes = []
        lo = 0
        for out in node.outputs:
            n = out.shape[axis]
            sizes.append(n - sum(1 for p in pos if lo <= p < lo + n))
            lo += n
        arr = np.array(sizes, dtype=np.int64)
        if len(node.inputs) > 1 and node.inputs[1].name:
            node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}.split"), arr)
        else:
            node.attrs.pop("num_outputs", None)
            if graph.opset and graph.opset >= 13:
                node.inputs.append(gs.Constant(unique_name(graph, f"{node.name}.split"), arr))
            else:
                node.attrs["split"] = sizes
    elif node.op == "Slice":
        d = deleted(node.inputs[0])
        if d is None:
            return
        axis, pos = d
        r = len(node.inputs[0].shape)
        size = node.inputs[0].shape[axis]
        starts = [int(v) for v in np.asarray(node.inputs[1].values)]
        ends = [int(v) for v in np.asarray(node.inputs[2].values)]
        axes = ([int(v) for v in np.asarray(node.inputs[3].values)]
                if len(node.inputs) > 3 and node.inputs[3].name else list(range(len(starts))))
        axes = [a + r if a < 0 else a for a in axes]
        if axis not in axes:
            return
        k = axes.index(axis)
        lo = min(size, max(0, starts[k] + size if starts[k] < 0 else starts[k]))
        hi = min(size, max(0, ends[k] + size if ends[k] < 0 else ends[k]))
        starts[k] = lo - sum(1 for p in pos if p < lo)
        ends[k] = hi - sum(1 for p in pos if p < hi)
        node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}.starts"),
                                     np.array(starts, dtype=np.int64))
        node.inputs[2] = gs.Constant(unique_name(graph, f"{node.name}.ends"),
                                     np.array(ends, dtype=np.int64))
    elif node.op == "Reshape":
        d = deleted(node.outputs[0])
        if d is None:
            return
        axis, pos = d
        target = np.asarray(node.inputs[1].values).astype(np.int64).copy()
        if target[axis] > 0:
            target[axis] -= len(pos)
            node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}.shape"), target)
    elif node.op in ("Resize", "Upsample"):
        d = deleted(node.outputs[0])
        if d is None or len(node.inputs) < 4 or not node.inputs[3].name:
            return
        axis, pos = d
        new_sizes = np.asarray(node.inputs[3].values).astype(np.int64).copy()
        new_sizes[axis] -= len(pos)
        node.inputs[3] = gs.Constant(unique_name(graph, f"{node.name}.sizes"), new_sizes)
    elif node.op == "Conv" and int(node.attrs.get("group", 1)) > 1:
        w = node.inputs[1]
        if np.asarray(w.values).shape[1] != 1:
            return
        d = deleted(node.inputs[0])
        if d is not None:
            node.attrs["group"] = int(node.attrs["group"]) - len(d[1])
