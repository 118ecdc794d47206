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
from onnx_ssl.graphutil import clear_inner_shapes, evaluate, run_node, unique_name
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


def _is_zero(a: np.ndarray) -> bool:
    return not np.any(a)


def _source_layer_refs(space: Space, nodes: dict[str, gs.Node]) -> list[ChannelRef]:
    """Out refs on the weight of a layer that creates the space's channels from other data."""
    out = []
    for r in space.refs:
        if r.role != "out" or not r.is_weight:
            continue
        n = nodes[r.node]
        if n.op not in LAYER_OPS or n.inputs[1].name != r.tensor:
            continue
        if n.op == "Conv" and int(n.attrs.get("group", 1)) > 1 and (
                np.asarray(n.inputs[1].values).shape[1] == 1):
            continue  # depthwise: a per-channel op, its channel stays input-independent
        out.append(r)
    return out


def _slice_zero(values: np.ndarray, ref: ChannelRef, channel: int) -> bool:
    from onnx_ssl.analysis import member_slice
    from onnx_ssl.groups import Member

    m = Member(ref.tensor, "in", member_slice(ref, channel, values.shape))
    return _is_zero(values[m.index(values.shape)])


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

    def __init__(self, analysis: Analysis | None = None, seed: int = 0) -> None:
        self.analysis = analysis
        self.seed = seed
        # Constants added by folding that must be sliced like an existing tensor axis:
        # (new tensor, tensor it follows, axis there, axis here).
        self._followers: list[tuple[str, str, int, int]] = []

    def __call__(self, graph: gs.Graph) -> PassResult[RemoveZeroChannelsReport]:
        graph = graph.copy()
        self._followers = []
        analysis = self.analysis or analyze_graph(graph, kinds=("channel",))
        tensors = graph.tensors()
        nodes = {n.name: n for n in graph.nodes}
        kept: list[str] = []
        plan: dict[str, tuple[set[int], set[int]]] = {}  # space -> (unread, constant)
        for sp in analysis.spaces:
            input_only = (not sp.prunable and sp.origin == "input" and all(
                r.startswith(INPUT_REASON_PREFIX) for r in sp.all_reasons))
            if not sp.prunable and not input_only:
                continue
            in_refs = [r for r in sp.refs if r.role == "in" and r.is_weight]
            src = _source_layer_refs(sp, nodes)
            unread: set[int] = set()
            const: set[int] = set()
            for c in range(sp.channels):
                rs = [r for r in in_refs if r.space_start <= c < r.space_start + r.length]
                if all(_slice_zero(np.asarray(tensors[r.tensor].values), r, c) for r in rs):
                    unread.add(c)
                    continue
                if input_only or not src:
                    continue
                ss = [r for r in src if r.space_start <= c < r.space_start + r.length]
                if ss and all(_slice_zero(np.asarray(tensors[r.tensor].values), r, c)
                              for r in ss):
                    const.add(c)
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

        folded, maps = self._fold_constants(graph, analysis, plan)
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
                        plan: dict[str, tuple[set[int], set[int]]]) -> tuple[int, int]:
        """Add the contribution of removed constant channels to each consumer."""
        nodes = {n.name: n for n in graph.nodes}
        # consumer node -> list of (ref, channel) for constant channels that it reads
        per_consumer: dict[str, list[tuple[ChannelRef, int]]] = defaultdict(list)
        for sid, (unread, const) in plan.items():
            sp = analysis.space(sid)
            for r in sp.refs:
                if r.role != "in" or not r.is_weight:
                    continue
                for c in const - unread:
                    if r.space_start <= c < r.space_start + r.length:
                        per_consumer[r.node].append((r, c))
        if not per_consumer:
            return 0, 0
        inputs = sorted({nodes[n].inputs[0].name for n in per_consumer})
        a = evaluate(graph, inputs, self.seed)
        b = evaluate(graph, inputs, self.seed + 1)
        folded = maps = 0
        for name, items in per_consumer.items():
            node = nodes[name]
            x = node.inputs[0].name
            xa, xb = a[x][:1], b[x][:1]
            act_axis = _activation_axis(node)
            z = np.zeros_like(xa)
            for r, c in items:
                sel: list[Any] = [slice(None)] * xa.ndim
                sel[act_axis] = list(r.positions(c))
                if not np.array_equal(xa[tuple(sel)], xb[tuple(sel)]):
                    raise RuntimeError(f"channel {c} of {r.space} is not constant at {name}; "
                                       f"refusing to fold it")
                z[tuple(sel)] = xa[tuple(sel)]
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
        for node in list(graph.nodes):
            _rewrite_structure(graph, node, deletions)
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
                       deletions: dict[tuple[str, int], set[int]]) -> None:
    """Update attributes and shape inputs that encode channel counts."""

    def deleted(t: gs.Tensor) -> tuple[int, set[int]] | None:
        for (name, axis), pos in deletions.items():
            if name == t.name:
                return axis, pos
        return None

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
        sizes = np.asarray(node.inputs[3].values).astype(np.int64).copy()
        sizes[axis] -= len(pos)
        node.inputs[3] = gs.Constant(unique_name(graph, f"{node.name}.sizes"), sizes)
    elif node.op == "Conv" and int(node.attrs.get("group", 1)) > 1:
        w = node.inputs[1]
        if np.asarray(w.values).shape[1] != 1:
            return
        d = deleted(node.inputs[0])
        if d is not None:
            node.attrs["group"] = int(node.attrs["group"]) - len(d[1])
