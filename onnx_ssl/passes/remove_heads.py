"""RemoveHeadsPass: remove attention heads that contribute a constant, exactly.

:mod:`onnx_ssl.heads` finds each attention and its units (a head; for grouped-query
attention a K/V head with the Q heads that read it). A unit goes when

* its rows of the output projection are zero: it contributes nothing; or
* its V weight slice is zero (and the softmax's weights sum to one over the keys): its
  output is its V bias at every position, and ``bias @ O_rows`` is added to the output
  projection's bias (an Add is made when the projection has none).

Its Q, K and V rows (weights and biases) and its output projection rows are cut, and every
tensor between the projections and the core shrinks with them: Reshape targets, Expand
shapes, Split sizes, Slice bounds and Gather indices along the head axes are rewritten, and
constant operands that differ between heads are cut too. Every attention keeps at least one
unit (a head-free attention would be a constant: its residual branch collapses instead, see
:mod:`onnx_ssl.passes.collapse_residual`). The graph leaves with its shapes inferred.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ssl.channels import const_value, static_shape
from onnx_ssl.graphutil import fresh_names, refresh_shapes, unique_name
from onnx_ssl.heads import Attention, Projection, find_attentions
from onnx_ssl.io import tensor_map
from onnx_ssl.pipeline import AnalysedPass, PassResult, Report


@dataclass(frozen=True)
class RemoveHeadsReport(Report):
    # "<attention>: <removed> of <units> heads" per attention that lost heads.
    attentions: tuple[str, ...] = ()
    heads_removed: int = 0
    params_removed: int = 0
    biases_folded: int = 0


def _values(graph: gs.Graph) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.values) for t in tensor_map(graph).values()
            if isinstance(t, gs.Constant)}


def _zero(a: np.ndarray) -> bool:
    return not np.any(a)


def removable(a: Attention, values: dict[str, np.ndarray],
              packed_names: dict[tuple[str, int], str] | None = None
              ) -> dict[int, np.ndarray | None]:
    """Unit -> the constant its removal leaves in the output projection's output (None:
    nothing), for every unit that contributes a constant. Keeps at least one unit."""
    assert a.v is not None and a.o is not None
    packed_names = packed_names or {}
    wo = values[a.o.weight]
    wv = values[a.v.weight]
    bv = values.get(a.v.bias) if a.v.bias else None
    out: dict[int, np.ndarray | None] = {}
    for i, u in enumerate(a.units):
        rows = np.take(wo, list(u.o_rows), axis=a.o.axis)
        if _zero(rows):
            out[i] = None
            continue
        if not a.v_linear or not _zero(np.take(wv, list(u.v), axis=a.v.axis)):
            continue
        if a.packed_bias is not None:  # a fused op adds its own V bias inside
            name, slot, chan = a.packed_bias
            packed = values.get(packed_names.get((name, slot), ""))
            vset = {a.bases[a.v.node] + c for c in u.v}
            if packed is None or not _zero(packed[[c in vset for c in chan.tolist()]]):
                continue
        if bv is None or _zero(bv[list(u.v)]):
            out[i] = None
            continue
        if not a.v_bias_only:
            continue
        # Row r of O carries V channel o_chan[r]: its constant is the V bias there.
        assert a.o_chan is not None
        base = a.bases[a.v.node]
        x = np.array([bv[int(a.o_chan[r]) - base] for r in u.o_rows], dtype=np.float64)
        w = rows if a.o.axis == 0 else rows.T
        out[i] = (x @ w.astype(np.float64)).astype(wo.dtype)
    if len(out) == len(a.units):  # keep one: the first whose removal folds the least
        keep = next((i for i, k in out.items() if k is not None), next(iter(out)))
        del out[keep]
    return out


def _axis_keep(m: np.ndarray, keep: np.ndarray, shape: tuple[int, ...]
               ) -> list[np.ndarray | None] | None:
    """Per axis of a tensor of ``shape`` whose channel map is ``m``: the kept positions (None:
    all). None when the kept elements do not form a sub-grid (cannot happen for units)."""
    mask = keep[m]
    out: list[np.ndarray | None] = []
    for ax in range(len(shape)):
        if m.shape[ax] == 1:
            out.append(None)
            continue
        other = tuple(i for i in range(mask.ndim) if i != ax)
        k = np.flatnonzero(np.any(mask, axis=other) if other else mask)
        out.append(None if len(k) == shape[ax] else k)
    grid = np.ones(mask.shape, dtype=bool)
    for ax, kept in enumerate(out):
        if kept is not None:
            sel = np.zeros(mask.shape[ax], dtype=bool)
            sel[kept] = True
            grid &= sel.reshape([-1 if i == ax else 1 for i in range(mask.ndim)])
    return out if np.array_equal(grid, mask) else None


class RemoveHeadsPass(AnalysedPass[RemoveHeadsReport]):
    """See the module docstring; the constructor is :class:`~onnx_ssl.pipeline.AnalysedPass`'s."""

    name = "remove-heads"

    def call(self, graph: gs.Graph) -> PassResult[RemoveHeadsReport]:
        values: dict[str, np.ndarray] | None = None  # read once a prunable attention needs them
        plans = []
        nodes = {n.name: n for n in graph.nodes}
        for a in find_attentions(graph):
            if not a.prunable:
                continue
            if values is None:
                values = _values(graph)
            packed = {}
            if a.packed_bias is not None:
                packed[(a.packed_bias[0], a.packed_bias[1])] = \
                    nodes[a.packed_bias[0]].inputs[a.packed_bias[1]].name
            drop = removable(a, values, packed)
            if drop:
                plans.append((a, drop))
        if not plans:
            return PassResult(graph, RemoveHeadsReport())
        graph = self._writable(graph)
        names: list[str] = []
        removed = params = folded = 0
        with fresh_names(graph):
            for a, drop in plans:
                p, f = _rewrite(graph, a, drop)
                names.append(f"{a.qk}: {len(drop)} of {len(a.units)} heads")
                removed += len(drop)
                params += p
                folded += f
        graph.cleanup(remove_unused_graph_inputs=False)
        refresh_shapes(graph)
        return PassResult(graph, RemoveHeadsReport(tuple(names), removed, params, folded))


def _set_const(graph: gs.Graph, node: gs.Node, slot: int, value: np.ndarray) -> None:
    old = node.inputs[slot]
    node.inputs[slot] = gs.Constant(unique_name(graph, f"{old.name}.heads"),
                                    np.ascontiguousarray(value))


def _cut(t: gs.Tensor, axis: int, keep: np.ndarray) -> int:
    """Cut a projection's constant along ``axis`` in place (every reader sees the cut)."""
    v = np.asarray(t.values)
    new = np.take(v, keep, axis=axis)
    t.values = np.ascontiguousarray(new)
    return int(v.size - new.size)


def _rewrite(graph: gs.Graph, a: Attention, drop: dict[int, np.ndarray | None]
             ) -> tuple[int, int]:
    assert a.q is not None and a.k is not None and a.v is not None and a.o is not None
    tensors = tensor_map(graph)
    nodes = {n.name: n for n in graph.nodes}
    projs = list({x.node: x for x in (a.q, a.k, a.v)}.values())
    total = sum(p.channels for p in projs)
    keep = np.ones(total, dtype=bool)
    o_keep = np.ones(a.o.channels, dtype=bool)
    units = np.ones(len(a.units), dtype=bool)
    for i in drop:
        u = a.units[i]
        units[i] = False
        for p, chans in ((a.q, u.q), (a.k, u.k), (a.v, u.v)):
            keep[[a.bases[p.node] + c for c in chans]] = False
        o_keep[list(u.o_rows)] = False
    # Every tensor's kept positions, on the shapes before the rewrite.
    cuts: dict[str, list[np.ndarray | None]] = {}
    for name, m in a.maps.items():
        t = tensors[name]
        s = static_shape(t)
        assert s is not None
        ax = _axis_keep(m, keep, s)
        assert ax is not None, name
        cuts[name] = ax
    assert a.labels is not None
    for name in a.score:
        s = static_shape(tensors[name])
        assert s is not None
        lab = a.labels.reshape((1,) * (len(s) - a.labels.ndim) + a.labels.shape)
        ax = _axis_keep(lab, units, s)
        assert ax is not None, name
        cuts[name] = ax

    def new_shape(name: str) -> list[int]:
        s = list(static_shape(tensors[name]) or ())
        for i, k in enumerate(cuts.get(name, [])):
            if k is not None:
                s[i] = len(k)
        return s

    for name in a.nodes:
        node = nodes[name]
        if not node.outputs or node.outputs[0].name not in cuts:
            continue
        out = node.outputs[0]
        old_out = list(static_shape(out) or ())
        new_out = new_shape(out.name)
        if node.op == "Reshape":
            target = np.asarray(const_value(node.inputs[1])).copy()
            new_in = new_shape(node.inputs[0].name)
            for i, (o, n) in enumerate(zip(old_out, new_out, strict=True)):
                if o == n or target[i] == -1:
                    continue
                if target[i] == 0:
                    assert new_in[i] == n, node.name
                    continue
                target[i] = n
            _set_const(graph, node, 1, target)
        elif node.op == "Expand":
            shape = np.asarray(const_value(node.inputs[1])).copy()
            off = len(old_out) - len(shape)
            for i in range(len(shape)):
                if shape[i] == old_out[i + off] and old_out[i + off] != new_out[i + off]:
                    shape[i] = new_out[i + off]
            _set_const(graph, node, 1, shape)
        elif node.op == "Split":
            axis = int(node.attrs.get("axis", 0)) % len(old_out)
            sizes = np.array([new_shape(o.name)[axis] for o in node.outputs], dtype=np.int64)
            if len(node.inputs) > 1 and node.inputs[1].name:
                _set_const(graph, node, 1, sizes)
            elif "split" in node.attrs:
                node.attrs["split"] = [int(x) for x in sizes]
            elif len(set(sizes.tolist())) > 1:
                node.inputs = [node.inputs[0], gs.Constant(
                    unique_name(graph, f"{node.name}.split"), sizes)]
        elif node.op in ("Slice", "Gather"):
            _rewrite_index(graph, node, cuts.get(node.inputs[0].name), old_out)
        # Constant operands that differ between heads: cut with them.
        for slot, inp in enumerate(node.inputs):
            if (node.name, slot) not in a.sliced:
                continue
            v = np.asarray(const_value(inp))
            lifted = v.reshape((1,) * (len(old_out) - v.ndim) + v.shape)
            for axis, kept in enumerate(cuts[out.name]):
                if kept is not None and lifted.shape[axis] > 1:
                    lifted = np.take(lifted, kept, axis=axis)
            _set_const(graph, node, slot, lifted.reshape(lifted.shape[len(old_out) - v.ndim:]))
    # The projections.
    params = 0
    for p in projs:
        lk = np.flatnonzero(keep[a.bases[p.node]:a.bases[p.node] + p.channels])
        params += _cut(tensors[p.weight], p.axis, lk)
        if p.bias is not None:
            params += _cut(tensors[p.bias], 0, lk)
    if a.packed_bias is not None:
        name, slot, chan = a.packed_bias
        params += _cut(nodes[name].inputs[slot], 0, np.flatnonzero(keep[chan]))
    fused = nodes.get(a.qk)
    if fused is not None and fused.domain == "com.microsoft" and fused.op in (
            "Attention", "MultiHeadAttention"):
        left = [u for i, u in enumerate(a.units) if i not in drop]
        fused.attrs["num_heads"] = len(left)
        if "qkv_hidden_sizes" in fused.attrs:
            fused.attrs["qkv_hidden_sizes"] = [sum(len(getattr(u, r)) for u in left)
                                               for r in ("q", "k", "v")]
    fold = [k for k in drop.values() if k is not None]
    folded = 0
    if fold:
        _fold_bias(graph, a.o, nodes[a.o.node], sum(fold[1:], fold[0]))
        folded = len(fold)
    params += _cut(tensors[a.o.weight], a.o.axis, np.flatnonzero(o_keep))
    return params, folded


def _rewrite_index(graph: gs.Graph, node: gs.Node, cut: list[np.ndarray | None] | None,
                   old_in: list[int]) -> None:
    """A Slice or Gather along an axis the units shrank: its positions among the kept."""
    if cut is None or all(k is None for k in cut):
        return
    shape_in = static_shape(node.inputs[0])
    assert shape_in is not None
    if node.op == "Gather":
        axis = int(node.attrs.get("axis", 0)) % len(shape_in)
        k = cut[axis]
        if k is None:
            return
        rank = {int(p): i for i, p in enumerate(k)}
        idx = np.asarray(const_value(node.inputs[1]))
        flat = [rank[int(i) % shape_in[axis]] for i in idx.reshape(-1)
                if int(i) % shape_in[axis] in rank]
        new = np.array(flat, dtype=idx.dtype).reshape(idx.shape if idx.ndim == 0 else (-1,))
        _set_const(graph, node, 1, new)
        return
    starts = np.asarray(const_value(node.inputs[1])).copy()
    ends = np.asarray(const_value(node.inputs[2])).copy()
    axes = (np.asarray(const_value(node.inputs[3])) if len(node.inputs) > 3
            and node.inputs[3].name else np.arange(len(starts)))
    steps = (np.asarray(const_value(node.inputs[4])) if len(node.inputs) > 4
             and node.inputs[4].name else np.ones(len(starts), dtype=np.int64))
    for j, ax in enumerate(axes):
        ax = int(ax) % len(shape_in)
        k = cut[ax]
        if k is None:
            continue
        chosen = range(*slice(int(starts[j]), int(ends[j]), int(steps[j])).indices(shape_in[ax]))
        rank = {int(p): i for i, p in enumerate(k)}
        kept = [rank[p] for p in chosen if p in rank]
        step = int(steps[j])
        assert kept and all(b - a == step for a, b in zip(kept, kept[1:], strict=False)), node.name
        starts[j] = kept[0]
        ends[j] = kept[-1] + (1 if step > 0 else -1)
        if step < 0 and ends[j] < 0:
            ends[j] = -(2**62)  # past the start, as the exporters write it
    _set_const(graph, node, 1, starts)
    _set_const(graph, node, 2, ends)


def _fold_bias(graph: gs.Graph, o: Projection, layer: gs.Node, k: np.ndarray) -> None:
    """Add ``k`` to the output projection's bias (made when it has none)."""
    if o.bias is not None:
        t = tensor_map(graph)[o.bias]
        t.values = (np.asarray(t.values) + k).astype(np.asarray(t.values).dtype)
        return
    y = layer.outputs[0]
    z = gs.Variable(unique_name(graph, f"{y.name}.heads"), dtype=y.dtype, shape=y.shape)
    for c in list(y.outputs):
        c.inputs = [z if t is y else t for t in c.inputs]
    if y in graph.outputs:
        graph.outputs = [z if t is y else t for t in graph.outputs]
    const = gs.Constant(unique_name(graph, f"{layer.name}.heads_bias"), k)
    graph.nodes.append(gs.Node("Add", unique_name(graph, f"{layer.name}.heads_bias_add"),
                               inputs=[y, const], outputs=[z]))
