"""The coupled-group analysis of an ONNX graph.

``analyze`` propagates channel layouts through the working copy that
:mod:`onnx_ssl.preparation` makes (unique node names, a bound batch, constant shape
arithmetic folded, shapes inferred) with the op rules of :mod:`onnx_ssl.rules` and returns an
immutable :class:`~onnx_ssl.groups.Analysis`: channel spaces (prunable or the reason why
not), the groups of each requested kind with their members, the parameterised layers with
params and MACs, and the residual branches.

What ``analyze`` hands back speaks of the model it was given: every group member names an
initializer or a Constant node output of that model (:func:`to_input`), and the pruned model
keeps the input's node names (:func:`~onnx_ssl.preparation.name_nodes` names only the nodes
without a name of their own) and its symbolic batch
(:meth:`~onnx_ssl.preparation.WorkingCopy.unbind`).

The preparation's names (``prepare``, ``working_copy``, ``name_nodes``, ``bind_batch``, ...)
are importable from here too, as before the split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .channels import Engine, Layout, Seg, const_value, static_shape
from .errors import InputError, OnnxSslError
from .graphutil import graph_key
from .groups import (
    DEFAULT_KINDS,
    KINDS,
    Analysis,
    Branch,
    ChannelRef,
    Group,
    Layer,
    Member,
    Slice,
    Space,
)
from .heads import find_attentions, head_groups, head_notes
from .io import CONTROL_FLOW_OPS, ModelMeta, from_graph, infer_shapes, tensor_map, to_graph
from .names import fresh_name
from .preparation import (  # noqa: F401  (re-exported: importable from here as before)
    _INT_TYPES,
    BOUND_BATCH,
    FLOAT_TYPES,
    LAYER_OPS,
    PROBE_BATCH,
    RANGE_OPSET,
    BatchSlots,
    BatchTile,
    BatchTiles,
    Dim,
    WorkingCopy,
    _name_nodes,
    _prepare,
    bind_batch,
    bind_batch_to,
    fold_model,
    name_nodes,
    prepare,
    symbolic_batch,
    unshare_constants,
    working_copy,
)
from .reasons import Reason, ReasonCode
from .rules import RULES, apply_rule, layer_weight
from .text import format_table as text_table

log = logging.getLogger(__name__)


def to_input(wc: WorkingCopy, a: Analysis) -> Analysis:
    """``a`` (an analysis of the working copy ``wc``) in terms of the input model.

    Every member names an initializer or a Constant node output of the input: a copy made
    by :func:`unshare_constants` is its original (same slice); a folded constant is the
    slice of the input tensor(s) it was computed from (a reshape, transpose, gather, ...
    of them), traced by folding again with the input's elements numbered (a chain of
    transposes, reshapes, slices and casts of one tensor: by numpy, at any size). A
    layer whose weight is such a permutation of one input tensor names that tensor, with
    its shape and axes. One input tensor reached through several copies is listed once
    per distinct slice. A member that no slice of an input tensor stands for blocks its
    group (and its channel space), with the reason; in a depth group, such a member that
    is no layer's weight is left out instead (the branch goes whole either way).
    """
    mapped: list[tuple[Group, tuple[Member, ...], Reason | None]] = []
    blocked: dict[str, Reason] = {}
    traces = _traces(wc, ({wc.copies.get(m.tensor, m.tensor) for g in a.groups
                            for m in g.members}
                           | {wc.copies.get(la.weight, la.weight) for la in a.layers})
                          - wc.allowed)
    permutations = frozenset(n for n, t in traces.items() if _is_permutation(t))
    transposes = {n: p for n in permutations
                  if (p := _transpose_axes(traces[n])) is not None}
    layer_weights = {la.weight for la in a.layers}
    for g in a.groups:
        members: dict[tuple[str, Slice], Member] = {}
        why: Reason | None = None
        for m in g.members:
            got, w = _member_in_input(wc, m, traces, permutations, transposes)
            if w is not None and g.kind == "depth" and m.tensor not in layer_weights:
                # A constant the branch computes from the input's tensors (the rotary
                # tables of a LLaMA export): no parameter of the branch, which goes whole.
                continue
            why = why or w
            for x in got:
                members.setdefault((x.tensor, x.slice), x)
        mapped.append((g, tuple(members.values()), why))
        if why and g.kind == "channel" and g.space is not None:
            blocked.setdefault(g.space, why)
    spaces = tuple(
        s if s.id not in blocked else dataclasses.replace(
            s, prunable=False, reason=s.reason or blocked[s.id],
            all_reasons=(*s.all_reasons, blocked[s.id]))
        for s in a.spaces)
    by_id = {s.id: s for s in spaces}
    groups = []
    for g, kept, why in mapped:
        prunable, reason = g.prunable, g.reason
        if g.kind == "channel" and g.space in blocked:
            prunable, reason = False, by_id[g.space].reason
        elif why:
            prunable, reason = False, reason or why
        groups.append(dataclasses.replace(g, prunable=prunable, reason=reason,
                                          members=kept))
    layers = tuple(_layer_in_input(wc, dataclasses.replace(
        la, weight=wc.copies.get(la.weight, la.weight),
        bias=None if la.bias is None else wc.copies.get(la.bias, la.bias)), traces,
        permutations) for la in a.layers)
    return dataclasses.replace(a, spaces=spaces, groups=tuple(groups), layers=layers,
                               notes=(*a.notes, *wc.notes),
                               macs_per_sample=bool(wc.batch),
                               key=None)  # it describes the input, no graph of ours

def _layer_in_input(wc: WorkingCopy, la: Layer, traces: Mapping[str, Any],
                    permutations: frozenset[str]) -> Layer:
    """``la`` with a weight folded from one input tensor by moving its elements (the
    Transpose of a linear layer's weight, exported unfolded) named as that tensor, with
    its shape and axes; ``la`` itself when its weight is no such tensor."""
    if la.weight in wc.allowed or la.weight not in permutations:
        return la
    codes, ((src, offset, shape),) = traces[la.weight]
    axes = [_source_axis(codes - offset, a, shape) for a in (la.out_axis, la.in_axis)]
    if axes[0] is None or axes[1] is None:
        return la
    return dataclasses.replace(la, weight=src, weight_shape=shape, out_axis=axes[0],
                               in_axis=axes[1])

def _member_in_input(wc: WorkingCopy, m: Member, traces: Mapping[str, Any],
                     permutations: frozenset[str],
                     transposes: Mapping[str, tuple[int, ...]]
                     ) -> tuple[list[Member], Reason | None]:
    name = wc.copies.get(m.tensor, m.tensor)
    if name in wc.allowed:
        return [Member(name, m.role, m.slice)], None
    trace = traces.get(name)
    if trace is None:
        return [], Reason(ReasonCode.NOT_A_MODEL_SLICE,
                          f"weight {m.tensor} is not a tensor of the input model",
                          tensor=m.tensor)
    if isinstance(trace, str):
        return [], Reason(ReasonCode.NOT_A_MODEL_SLICE, f"weight {m.tensor} is {trace}",
                          tensor=m.tensor)
    codes, sources = trace
    if name in transposes:  # axis a of the member is axis axes[a] of the source
        src, _, shape = sources[0]
        moved: list[tuple[int, ...] | None] = [None] * len(shape)
        for a, d in enumerate(transposes[name]):
            x = m.slice[a]
            moved[d] = (None if x is None or len(set(x)) == shape[d]
                        else tuple(sorted(set(x))))
        return [Member(src, m.role, tuple(moved))], None
    index = m.index(codes.shape)
    picked = np.unique(codes[index])
    # Of a permutation of one tensor, no element outside the member is in its slice: the
    # check below, linear in the tensor's size for each member, is skipped.
    mask = None if name in permutations else np.zeros(codes.shape, dtype=bool)
    if mask is not None:
        mask[index] = True
    out = []
    for src, offset, shape in sources:
        local = picked[(picked >= offset) & (picked < offset + math.prod(shape))] - offset
        if not local.size:
            continue
        if shape:
            coords = np.unravel_index(local, shape)
            axes = [np.unique(c) for c in coords]
            block = offset + np.ravel_multi_index(np.ix_(*axes), shape).reshape(-1)
        else:  # a scalar (GPT-2's causal mask is a Where of two): its one element
            axes, block = [], np.array([offset])
        # The slice must hold exactly the picked elements, and zeroing it must touch
        # nothing of the folded constant outside the member.
        if block.size != local.size or (mask is not None
                                        and np.isin(codes[~mask], block).any()):
            return [], Reason(ReasonCode.NOT_A_MODEL_SLICE,
                              f"folded from {src} by an op that mixes its elements, so "
                              f"that no slice of {src} is the member", tensor=m.tensor)
        sl = tuple(None if len(ax) == d else tuple(int(i) for i in ax)
                   for ax, d in zip(axes, shape, strict=True))
        out.append(Member(src, m.role, sl))
    return out, None

def _traces(wc: WorkingCopy, names: set[str]) -> dict[str, Any]:
    """The folded float constants among ``names`` -> (for each element, the number of the
    input element it holds; the numbered sources (name, first number, shape)), or why it
    cannot be traced (see :func:`_trace_folded`)."""
    tensors = tensor_map(wc.graph)
    todo = {n: np.asarray(tensors[n].values) for n in sorted(names)
            if isinstance(tensors.get(n), gs.Constant)}
    todo = {n: v for n, v in todo.items() if v.dtype.type in FLOAT_TYPES}
    return _trace_folded(wc.prefold, wc.meta, todo) if todo else {}


def _is_permutation(trace: Any) -> bool:
    """Whether a trace (see :func:`_trace_folded`) holds every element of one tensor once."""
    if isinstance(trace, str):
        return False
    codes, sources = trace
    if len(sources) != 1 or codes.size != math.prod(sources[0][2]):
        return False
    local = codes.reshape(-1) - sources[0][1]
    if local.min() < 0 or local.max() >= local.size:
        return False
    seen = np.zeros(local.size, dtype=bool)  # n numbers in [0, n): all seen iff each once
    seen[local] = True
    return bool(seen.all())


def _transpose_axes(trace: Any) -> tuple[int, ...] | None:
    """``axes`` when a trace's codes are ``transpose(arange(n).reshape(shape), axes)`` of its
    one source (a reshape-free chain of moves: a linear layer's transposed weight)."""
    codes, ((_, offset, shape),) = trace
    if codes.ndim != len(shape):
        return None
    found = [_source_axis(codes - offset, a, shape) for a in range(codes.ndim)]
    axes = tuple(d for d in found if d is not None)
    if sorted(axes) != list(range(len(shape))):
        return None
    full = np.arange(math.prod(shape), dtype=np.int64).reshape(shape) + offset
    if not np.array_equal(codes, np.transpose(full, axes)):
        return None
    return axes


def _source_axis(codes: np.ndarray, axis: int, shape: tuple[int, ...]) -> int | None:
    """The axis of a tensor of ``shape`` that ``axis`` of ``codes`` (the flat indices into
    it that a permutation of its elements holds) runs along, whole, or None."""
    n = codes.shape[axis]
    steps = np.unravel_index(np.moveaxis(codes, axis, 0).reshape(n, -1)[:, 0], shape)
    moving = [d for d, c in enumerate(steps) if n > 1 and np.any(c != c[0])]
    if len(moving) != 1 or shape[moving[0]] != n:
        return None
    d = moving[0]
    if not np.array_equal(steps[d], np.arange(n)):
        return None
    return d



def _trace_folded(prefold: onnx.ModelProto, meta: ModelMeta, folded: dict[str, np.ndarray]
                  ) -> dict[str, Any]:
    """Which input elements the ``folded`` constants hold: fold ``prefold`` again with every
    float constant they are computed from replaced by the numbers of its elements (exact
    integers in its own float type), and check that the numbers, looked up in the true
    values, give the folded values back (an op that computes rather than moves elements
    fails the check)."""
    producer = {o: n for n in prefold.graph.node for o in n.output}
    inits = {t.name: t for t in prefold.graph.initializer}
    out: dict[str, Any] = {}
    sources: dict[str, list[str]] = {}
    for name in folded:
        found: list[str] = []
        stack, seen = [name], set()
        while stack:
            x = stack.pop()
            if x in seen or not x:
                continue
            seen.add(x)
            n = producer.get(x)
            if n is None:
                if x in inits and inits[x].data_type in _FLOAT_PROTO:
                    found.append(x)
                continue
            if n.op_type not in ("Shape", "Size"):  # they read only a shape
                stack.extend(n.input)
        if not found:
            out[name] = "computed from no float tensor of the input"
            continue
        sources[name] = sorted(found)
    graph = to_graph(prefold)
    tensors = tensor_map(graph)
    # A constant that only moves one tensor's elements (a linear layer's Transpose of its
    # weight where the exporter did not fold): numbered by numpy in int64, at any size.
    for name in list(sources):
        moved = _trace_moves(graph, tensors, name, folded[name])
        if moved is not None:
            idx, src = moved
            out[name] = (idx, ((src, 0, tuple(int(d) for d in tensors[src].shape)),))
            del sources[name]
    if not sources:
        return out
    offsets: dict[str, int] = {}
    values: dict[str, np.ndarray] = {}
    total = 0
    for src in sorted({s for ss in sources.values() for s in ss}):
        v = np.asarray(tensors[src].values)
        offsets[src], total = total, total + v.size
        values[src] = v
        if total > _exact_integers(v.dtype):
            return {**out, **{n: "folded from tensors too large to trace" for n in sources}}
        tensors[src].values = (offsets[src] + np.arange(v.size)).reshape(v.shape).astype(
            v.dtype)
    try:
        coded = fold_model(from_graph(graph, meta))
    except OnnxSslError as e:
        return {**out, **{n: f"folded from the input's constants ({e})" for n in sources}}
    table = np.concatenate([values[s].reshape(-1).astype(np.float64) for s in offsets])
    coded_consts = tensor_map(coded)
    for name, srcs in sources.items():
        t = coded_consts.get(name)
        c = np.asarray(t.values).astype(np.float64) if isinstance(t, gs.Constant) else None
        true = folded[name].astype(np.float64)
        idx = np.zeros(0, dtype=np.int64)
        ok = (c is not None and c.shape == true.shape and bool(np.all(c == np.round(c)))
              and bool(np.all((c >= 0) & (c < total))))
        if ok and c is not None:
            idx = c.astype(np.int64)
            ok = bool(np.array_equal(table[idx], true, equal_nan=True))
        if not ok:
            out[name] = (f"computed from {', '.join(srcs)} by arithmetic, not a slice of "
                         f"{'it' if len(srcs) == 1 else 'them'}")
            continue
        out[name] = (idx, tuple((s, offsets[s], tuple(int(d) for d in values[s].shape))
                                for s in srcs))
    return out


_FLOAT_PROTO = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
# Ops that only move (or re-type) the elements of their first input; the other inputs are
# constant shapes, axes or slice bounds.
_MOVES = frozenset({"Transpose", "Reshape", "Slice", "Cast", "Identity", "Squeeze", "Unsqueeze",
                    "Flatten"})


def _exact_integers(dtype: np.dtype) -> int:
    """How many element numbers (0, 1, ...) a float type holds exactly."""
    return int(2 ** (np.finfo(dtype).nmant + 1))


def _trace_moves(graph: gs.Graph, tensors: Mapping[str, gs.Tensor], name: str,
                 value: np.ndarray) -> tuple[np.ndarray, str] | None:
    """When ``name`` is computed from one float constant of ``graph`` (the input before
    folding) by a chain of :data:`_MOVES` ops with constant parameters: for each of its
    elements, the flat index of the source element it holds, and the source's name. The same
    ops applied by numpy to the indices (int64, so exact at any size), checked against
    ``value``, the folded constant. None otherwise (the numeric trace decides)."""
    chain: list[gs.Node] = []
    t = tensors.get(name)
    while t is not None and not isinstance(t, gs.Constant):
        if len(t.inputs) != 1 or t.inputs[0].op not in _MOVES or not t.inputs[0].inputs:
            return None
        chain.append(t.inputs[0])
        t = t.inputs[0].inputs[0]
    if t is None or not chain:
        return None
    src = np.asarray(t.values)
    if src.dtype.type not in FLOAT_TYPES:
        return None
    codes: np.ndarray | None = np.arange(src.size, dtype=np.int64).reshape(src.shape)
    for node in reversed(chain):
        params: list[np.ndarray | None] = []
        for x in node.inputs[1:]:
            if x.name and not isinstance(x, gs.Constant):
                return None  # a parameter computed at run time
            params.append(np.asarray(x.values).astype(np.int64) if x.name else None)
        assert codes is not None
        codes = _move(node, codes, params)
        if codes is None:
            return None
    assert codes is not None
    if codes.shape != value.shape or not np.array_equal(
            src.reshape(-1)[codes].astype(value.dtype), value, equal_nan=True):
        return None
    return codes, t.name


def _move(node: gs.Node, x: np.ndarray, params: Sequence[np.ndarray | None]
          ) -> np.ndarray | None:
    """``node`` (one of :data:`_MOVES`) applied to ``x`` with its constant ``params``."""
    a = node.attrs

    def param(i: int, attr: str) -> list[int] | None:
        if len(params) > i and params[i] is not None:
            return [int(v) for v in np.asarray(params[i]).reshape(-1)]
        return [int(v) for v in a[attr]] if attr in a else None

    op = node.op
    if op in ("Cast", "Identity"):
        return x
    if op == "Transpose":
        perm = a.get("perm")
        return np.transpose(x, None if perm is None else [int(p) for p in perm])
    if op == "Reshape":
        shape = param(0, "shape")
        if shape is None:
            return None
        if not int(a.get("allowzero", 0)):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        try:
            return x.reshape(shape)
        except ValueError:
            return None
    if op == "Flatten":
        axis = int(a.get("axis", 1))
        axis += x.ndim if axis < 0 else 0
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    if op in ("Squeeze", "Unsqueeze"):
        axes = param(0, "axes")
        if op == "Unsqueeze":
            return None if axes is None else np.expand_dims(x, tuple(axes))
        return np.squeeze(x) if axes is None else np.squeeze(x, tuple(axes))
    if op == "Slice":
        starts, ends = param(0, "starts"), param(1, "ends")
        if starts is None or ends is None:
            return None
        axes = param(2, "axes") or list(range(len(starts)))
        steps = param(3, "steps") or [1] * len(starts)
        index: list[slice] = [slice(None)] * x.ndim
        # Python slicing clamps the bounds the way ONNX Slice does.
        for s0, e0, ax, st in zip(starts, ends, axes, steps, strict=True):
            index[ax % x.ndim] = slice(s0, e0, st)
        return x[tuple(index)]
    return None


def _space_ids(e: Engine) -> dict[int, str]:
    ids: dict[int, str] = {}
    used: set[str] = set()
    for i in range(len(e.spaces)):
        if e.find(i) != i:
            continue
        ids[i] = fresh_name(used, e.spaces[i].label, sep="#")
    return ids


def _seed_inputs(e: Engine, graph: gs.Graph) -> None:
    for t in graph.inputs:
        shape = t.shape
        if t.dtype is None or np.dtype(t.dtype).type not in FLOAT_TYPES:
            continue
        if shape is None or len(shape) < 2 or not isinstance(shape[1], (int, np.integer)):
            continue
        c = int(shape[1])
        s = e.new_space(c, f"input:{t.name}", "input")
        e.spaces[s].reasons.append(Reason(
            ReasonCode.GRAPH_INPUT, f"graph input '{t.name}': its channels are fixed by the "
            f"caller", tensor=t.name))
        e.layouts[t.name] = Layout(1, 1, (Seg(s, 0, c),))
        e.refs.append(ChannelRef(t.name, 1, "act", s, 0, 0, c, 1, "", False))


def _subgraph_names(g: gs.Graph, bound: set[str], out: set[str]) -> None:
    local = bound | {t.name for t in g.inputs}
    for n in g.nodes:
        for t in n.inputs:
            if t.name and t.name not in local and not isinstance(t, gs.Constant):
                out.add(t.name)
        for v in n.attrs.values():
            for sub in v if isinstance(v, list) else [v]:
                if isinstance(sub, gs.Graph):
                    _subgraph_names(sub, local, out)
        local |= {t.name for t in n.outputs}


def _block_control_flow(e: Engine, graph: gs.Graph) -> list[str]:
    notes: list[str] = []
    tensors = tensor_map(graph)
    for node in graph.nodes:
        if node.op not in CONTROL_FLOW_OPS:
            continue
        names: set[str] = set()
        for v in node.attrs.values():
            for sub in v if isinstance(v, list) else [v]:
                if isinstance(sub, gs.Graph):
                    _subgraph_names(sub, set(), names)
        why = Reason(ReasonCode.CONTROL_FLOW,
                     f"{node.name} ({node.op}): control flow; its subgraphs are not analysed",
                     node=node.name)
        for n in names | {t.name for t in node.inputs}:
            if n in tensors:
                e.block(e.layout(tensors[n]), why)
        notes.append(why.text)
    return notes


def _check_weights(e: Engine, graph: gs.Graph,
                   tensors: Mapping[str, gs.Tensor] | None = None) -> None:
    """Block spaces whose weights are shared with layers elsewhere or read by other ops
    (``tensors``: ``tensor_map(graph)``, where the caller has it)."""
    tensors = tensor_map(graph) if tensors is None else tensors
    by_tensor: dict[tuple[str, int], list[ChannelRef[int]]] = defaultdict(list)
    for r in e.refs:
        if r.is_weight:
            by_tensor[(r.tensor, r.axis)].append(r)
    for (name, axis), refs in by_tensor.items():
        roots = {e.find(r.space) for r in refs}
        users = e.weight_users.get(name, set())
        consumers = {n.name for n in tensors[name].outputs} if name in tensors else set()
        why: Reason | None = None
        # The same positions claimed by different channels: a weight shared across spaces.
        # Intervals sorted by start; an overlap with a different (space, offset) is sharing.
        spans = sorted((r.tensor_start, r.tensor_start + r.length,
                        (e.find(r.space), r.space_start - r.tensor_start)) for r in refs)
        reach, reach_key = -1, None  # the furthest end so far, and whose it is
        for start, end, key in spans:
            if start < reach and key != reach_key:
                why = Reason(ReasonCode.SHARED_WEIGHT,
                             f"weight {name} (axis {axis}) is shared by layers in different "
                             f"spaces: " + ", ".join(sorted(u.lstrip("!") for u in users)),
                             tensor=name)
                break
            if end > reach:
                reach, reach_key = end, key
        outside = sorted(c for c in consumers if c not in users)
        if any(u.startswith("!") for u in users):
            outside += sorted(u[1:] for u in users if u.startswith("!"))
        if outside:
            why = Reason(ReasonCode.SHARED_WEIGHT,
                         f"weight {name} is also read by {', '.join(outside)}", tensor=name)
        if name in e.graph_output_names:
            why = Reason(ReasonCode.GRAPH_OUTPUT, f"weight {name} is a graph output",
                         tensor=name)
        if why:
            for s in roots:
                e.block_space(s, why)


def _propagate(graph: gs.Graph, tensors: Mapping[str, gs.Tensor] | None = None
               ) -> tuple[Engine, list[str]]:
    e = Engine(graph)
    _seed_inputs(e, graph)
    for node in graph.nodes:
        if node.op in CONTROL_FLOW_OPS:
            continue
        apply_rule(e, node)
    # After propagation, so that the layouts of what the subgraphs read are known.
    notes = _block_control_flow(e, graph)
    for t in graph.outputs:
        e.block(e.layout(t), Reason(ReasonCode.GRAPH_OUTPUT, f"reaches graph output '{t.name}'",
                                    tensor=t.name))
    _check_weights(e, graph, tensors)
    return e, notes


def _build_spaces(e: Engine, ids: dict[int, str]) -> tuple[Space, ...]:
    refs_by_root: dict[int, list[ChannelRef[str]]] = defaultdict(list)
    for r in e.refs:
        root = e.find(r.space)
        refs_by_root[root].append(ChannelRef(
            tensor=r.tensor, axis=r.axis, role=r.role,
            space=ids[root], space_start=r.space_start, tensor_start=r.tensor_start,
            length=r.length, block=r.block, node=r.node, is_weight=r.is_weight,
            conv_groups=r.conv_groups))
    spaces = []
    for root, sid in ids.items():
        rs = e.spaces[root]
        reasons = tuple(dict.fromkeys(rs.reasons))
        spaces.append(Space(
            id=sid, channels=rs.length, prunable=not reasons,
            reason=reasons[0] if reasons else None,
            nodes=tuple(dict.fromkeys(n for n in rs.nodes if n)),
            origin="input" if rs.origin == "input" else "producer",
            partitions=tuple(sorted(set(rs.partitions))),
            refs=tuple(refs_by_root[root]),
            all_reasons=reasons,
        ))
    return tuple(spaces)


def member_slice(ref: ChannelRef, channel: int, shape: Sequence[int]
                 ) -> tuple[tuple[int, ...] | None, ...]:
    """The slice of ``ref.tensor`` (of ``shape``) that holds ``channel`` of the space."""
    pos = ref.positions(channel)
    sl: list[tuple[int, ...] | None] = [None] * len(shape)
    if ref.conv_groups > 1 and ref.role == "in" and ref.axis == 1:
        ig = shape[1]
        og = shape[0] // ref.conv_groups
        g = pos[0] // ig
        sl[0] = tuple(range(g * og, (g + 1) * og))
        sl[1] = tuple(p % ig for p in pos)
    else:
        sl[ref.axis] = pos
    return tuple(sl)


def _channel_groups(spaces: Sequence[Space], shapes: dict[str, tuple[int, ...]]
                    ) -> list[Group]:
    groups: list[Group] = []
    for sp in spaces:
        per_channel: list[list[Member]] = [[] for _ in range(sp.channels)]
        for r in sp.refs:
            if not r.is_weight:
                continue
            shape = shapes[r.tensor]
            role: Any = r.role
            if r.conv_groups > 1 and r.role == "in" and r.axis == 1:
                for j in range(r.length):
                    c = r.space_start + j
                    per_channel[c].append(Member(r.tensor, role, member_slice(r, c, shape)))
                continue
            pre: tuple[None, ...] = (None,) * r.axis
            post: tuple[None, ...] = (None,) * (len(shape) - r.axis - 1)
            for j in range(r.length):
                first = (r.tensor_start + j) * r.block
                pos = tuple(range(first, first + r.block))
                per_channel[r.space_start + j].append(Member(r.tensor, role, (*pre, pos, *post)))
        for c, members in enumerate(per_channel):
            groups.append(Group(f"{sp.id}/{c}", "channel", sp.id, c, sp.prunable, sp.reason,
                                tuple(members)))
    return groups


def layers_of(graph: gs.Graph) -> tuple[Layer, ...]:
    """The parameterised layers with params and MACs, without the channel analysis."""
    return _layers(graph, None, {})


def _layers(graph: gs.Graph, e: Engine | None, ids: dict[int, str]) -> tuple[Layer, ...]:
    layers = []
    for node in graph.nodes:
        found = layer_weight(node)
        if found is None:
            continue
        slots, wv = found
        w = node.inputs[slots.weight]
        b = slots.bias
        bias = (node.inputs[b] if b is not None and len(node.inputs) > b and node.inputs[b].name
                else None)
        bv = const_value(bias) if bias is not None else None
        group = int(node.attrs.get("group", 1))
        out_axis, in_axis = slots.axes(node)
        macs = slots.macs(node, tuple(int(d) for d in wv.shape), static_shape(node.inputs[0]),
                          static_shape(node.outputs[0]))

        def sid(t: gs.Tensor) -> str | None:
            if e is None:
                return None
            lay = e.layout(t)
            if lay is None or len(lay.segs) != 1:
                return None
            return ids[e.find(lay.segs[0].space)]

        layers.append(Layer(
            node=node.name, op_type=node.op, weight=w.name,
            bias=bias.name if bv is not None and bias is not None else None,
            out_axis=out_axis, in_axis=in_axis, conv_groups=group,
            weight_shape=tuple(int(d) for d in wv.shape),
            params=int(wv.size) + (int(bv.size) if bv is not None else 0),
            macs=macs, in_space=sid(node.inputs[0]), out_space=sid(node.outputs[0])))
    return tuple(layers)


def _side_branch(add: gs.Node, g: nx.DiGraph, producer: Mapping[str, gs.Node]
                 ) -> tuple[gs.Tensor, list[str], str] | None:
    """For ``add = s + t`` where ``t`` depends on the node that makes ``s``: ``t``, the nodes
    between that node (the fork) and ``t`` (those that depend on the fork: side inputs such
    as a mask stay outside), and the fork."""
    a, b = add.inputs
    y = static_shape(add.outputs[0])
    for s, t in ((a, b), (b, a)):
        if y is None or static_shape(s) != y or static_shape(t) != y:
            continue  # a broadcast operand (an attention mask added to scores) is no shortcut
        fork = producer[s.name].name
        end = producer[t.name].name
        above = nx.ancestors(g, end) | {end}
        if fork not in above:
            continue
        below = nx.descendants(g, fork)
        return t, [n for n in above if n in below], fork
    return None


def _immediate_dominators(preds: Mapping[str, Sequence[str]], src: str) -> dict[str, str]:
    """The immediate dominator of every node of a DAG rooted at ``src`` (``preds``: node ->
    its predecessors, ``src`` for a node without any), as networkx's
    ``immediate_dominators`` computes it: in a topological order each node's immediate
    dominator is the common ancestor, in the dominator tree, of its predecessors. Linear
    but for the walks up that tree. A node on a cycle (no DAG) is left out, as a node
    ``src`` does not reach."""
    succ: dict[str, list[str]] = {}
    waiting: dict[str, int] = {}
    for n, ps in preds.items():
        waiting[n] = len(ps)
        for p in ps:
            succ.setdefault(p, []).append(n)
    index = {src: 0}
    idom = {src: src}
    queue = [src]
    i = 0
    while i < len(queue):
        v = queue[i]
        i += 1
        for w in succ.get(v, ()):
            waiting[w] -= 1
            if waiting[w]:
                continue
            index[w] = len(queue)
            queue.append(w)
            ps = preds[w]
            d = ps[0]
            for b in ps[1:]:
                a = d
                while a != b:
                    while index[a] > index[b]:
                        a = idom[a]
                    while index[b] > index[a]:
                        b = idom[b]
                d = a
            idom[w] = d
    return idom


def _branches(graph: gs.Graph, e: Engine, weight_layers: set[str]) -> tuple[Branch, ...]:
    """Residual branches: for each Add of two activations, the nodes between its immediate
    dominator (the fork) and the Add on the side that holds more layers. A branch's
    ``layers`` are its weight layers (``weight_layers``: an attention's activation MatMuls
    are not among them)."""
    src = "\0source"
    producer: dict[str, gs.Node] = {}
    for node in graph.nodes:
        for t in node.outputs:
            producer[t.name] = node
    preds: dict[str, list[str]] = {}
    for node in graph.nodes:
        ps: dict[str, None] = {}  # ordered set
        for t in node.inputs:
            p = producer.get(t.name)
            if p is not None:
                ps[p.name] = None
        preds[node.name] = list(ps) if ps else [src]
    idom = _immediate_dominators(preds, src)
    nx_graph: list[nx.DiGraph] = []  # made only for a branch with side inputs

    def g() -> nx.DiGraph:
        if not nx_graph:
            d = nx.DiGraph()
            d.add_node(src)
            d.add_nodes_from(preds)
            d.add_edges_from((p, n) for n, ps in preds.items() for p in ps)
            nx_graph.append(d)
        return nx_graph[0]
    by_name = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    outputs = {t.name for t in graph.outputs}
    result: list[Branch] = []
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2:
            continue
        if any(t.name not in producer for t in node.inputs):
            continue
        fork = idom.get(node.name)
        if fork == src:
            # The branch also reads tensors made apart from the fork (an attention's mask,
            # computed from another graph input): y = s + F(s, side inputs).
            side = _side_branch(node, g(), producer)
            if side is None:
                continue
            t, nodes, fork = side
            if not any(by_name[n].op in LAYER_OPS for n in nodes):
                continue
        elif fork is None:
            continue
        else:
            sides: list[tuple[gs.Tensor, list[str]]] = []
            for t in node.inputs:
                seen: dict[str, None] = {}  # ordered set
                stack = [producer[t.name].name]
                ok = True
                while stack:
                    n = stack.pop()
                    if n == fork or n in seen:
                        continue
                    if n == src or idom.get(n) is None:
                        ok = False
                        break
                    seen[n] = None
                    stack.extend(preds[n])
                if not ok:
                    sides = []
                    break
                sides.append((t, list(seen)))
            if len(sides) != 2:
                continue
            layer_counts = [sum(1 for n in s if by_name[n].op in LAYER_OPS) for _, s in sides]
            if max(layer_counts) == 0:
                continue
            k = 0 if layer_counts[0] > layer_counts[1] else 1
            if layer_counts[0] == layer_counts[1]:
                # Same number of layers: the branch is the longer path.
                k = 0 if len(sides[0][1]) > len(sides[1][1]) else 1
            t, nodes = sides[k]
        members = set(nodes)
        reason: Reason | None = None
        for n in nodes:
            bn = by_name[n]
            for out in bn.outputs:
                if out.name in outputs:
                    reason = Reason(ReasonCode.GRAPH_OUTPUT,
                                    f"{n} ({bn.op}): output {out.name} is a graph output",
                                    node=n, tensor=out.name)
                for c in out.outputs:
                    if c.name not in members and c.name != node.name:
                        reason = Reason(ReasonCode.READ_OUTSIDE_BRANCH,
                                        f"{n} ({bn.op}): output {out.name} is also read by "
                                        f"{c.name}", node=n, tensor=out.name)
            if n in weight_layers:
                # A layer weight shared with a layer outside the branch (ALBERT's layers
                # share theirs): zeroing the branch would zero the other layer too. Only
                # matrices and kernels: an exporter merges equal constants, and freshly
                # initialised biases and norm scales often are equal.
                for w in bn.inputs:
                    if not isinstance(w, gs.Constant) or len(w.shape) < 2:
                        continue
                    other = next((c.name for c in w.outputs if c.name not in members), None)
                    if other is not None:
                        reason = Reason(ReasonCode.SHARED_WEIGHT,
                                        f"{n} ({bn.op}): weight {w.name} is shared with "
                                        f"{other}, outside the branch", node=n, tensor=w.name)
        ordered = sorted(members, key=order.__getitem__)
        result.append(Branch(
            add=node.name, fork=fork, branch_output=t.name, nodes=tuple(ordered),
            layers=tuple(n for n in ordered if n in weight_layers),
            prunable=reason is None, reason=reason))
    return tuple(result)


def _depth_groups(branches: Sequence[Branch], graph: gs.Graph) -> list[Group]:
    by_name = {n.name: n for n in graph.nodes}
    groups = []
    for b in branches:
        members: list[Member] = []
        seen: set[str] = set()
        for n in b.nodes:
            node = by_name[n]
            for i, t in enumerate(node.inputs):
                v = const_value(t)
                if v is None or t.name in seen or v.dtype.type not in FLOAT_TYPES:
                    continue
                if v.size <= 1:
                    continue
                seen.add(t.name)
                role = "stat" if node.op == "BatchNormalization" and i >= 3 else "out"
                members.append(Member(t.name, role, (None,) * v.ndim))  # type: ignore[arg-type]
        groups.append(Group(f"{b.add}/depth", "depth", None, None, b.prunable, b.reason,
                            tuple(members), node=b.add))
    return groups


def _weight_groups(layers: Sequence[Layer], kinds: Iterable[str],
                   shared: dict[str, Reason]) -> list[Group]:
    groups: list[Group] = []
    kinds = set(kinds)
    for la in layers:
        reason = shared.get(la.weight)
        ok = reason is None
        shape = la.weight_shape
        slots = RULES[la.op_type].layer
        kind = slots.kind if slots is not None else None
        # Shape and 2D-filter groups index a 2-D conv weight [filters, channels, kh, kw].
        if kind == "conv" and (la.out_axis, la.in_axis) == (0, 1) and len(shape) == 4:
            n, c, kh, kw = shape
            if "shape" in kinds:
                for ci in range(c):
                    for m in range(kh):
                        for k in range(kw):
                            groups.append(Group(
                                f"{la.node}/shape/{ci},{m},{k}", "shape", None, None, ok,
                                reason, (Member(la.weight, "out", (None, (ci,), (m,), (k,))),),
                                node=la.node))
            if "filter2d" in kinds:
                for ni in range(n):
                    for ci in range(c):
                        groups.append(Group(
                            f"{la.node}/filter2d/{ni},{ci}", "filter2d", None, None, ok, reason,
                            (Member(la.weight, "out", ((ni,), (ci,), None, None)),),
                            node=la.node))
        if kind == "fc" and "neuron" in kinds:
            for role, axis in (("out", la.out_axis), ("in", la.in_axis)):
                for j in range(shape[axis]):
                    sl: list[tuple[int, ...] | None] = [None, None]
                    sl[axis] = (j,)
                    groups.append(Group(
                        f"{la.node}/neuron/{role}/{j}", "neuron", None, j, ok, reason,
                        (Member(la.weight, role, tuple(sl)),),  # type: ignore[arg-type]
                        node=la.node))
    return groups


def analyze(model: onnx.ModelProto, kinds: Iterable[str] = DEFAULT_KINDS, name: str = "",
            prepared: bool = False) -> Analysis:
    """Analyse ``model`` and list groups of ``kinds``; the result speaks of ``model`` (see
    :func:`to_input`).

    ``prepared`` says that ``model`` comes from :func:`prepare` (its folding is skipped
    unless its batch is symbolic)."""
    kinds_t = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds_t if k not in KINDS]
    if bad:
        raise InputError(f"unknown group kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    if prepared and not symbolic_batch(model) and not _name_nodes(model)[1]:
        return analyze_graph(to_graph(model), kinds_t, name or model.graph.name)
    wc = _prepare(model)
    return to_input(wc, analyze_graph(wc.graph, kinds_t, name or model.graph.name))


def model_layers(model: onnx.ModelProto) -> tuple[Layer, ...]:
    """The parameterised layers of ``model`` with params and MACs (per sample when its batch
    is symbolic: bound to ``BOUND_BATCH`` for shape inference)."""
    if symbolic_batch(model):
        model = infer_shapes(bind_batch(model, BOUND_BATCH), strict=False)
    return layers_of(to_graph(model))


def analyze_graph(graph: gs.Graph, kinds: Sequence[str] = DEFAULT_KINDS, name: str = "", *,
                  key: int | None = None) -> Analysis:
    """Analyse a prepared graph (static shapes inferred, constants folded). ``key``: its
    ``graphutil.graph_key`` where the caller has it (else computed)."""
    tensors = tensor_map(graph)
    e, notes = _propagate(graph, tensors)
    ids = _space_ids(e)
    spaces = _build_spaces(e, ids)
    shapes = {n: tuple(int(d) for d in t.shape) for n, t in tensors.items()
              if isinstance(t, gs.Constant)}
    layers = _layers(graph, e, ids)
    unknown = [la.node for la in layers if la.macs == 0]
    if unknown and len(unknown) < len(layers):
        notes = [*notes, f"the MACs of {len(unknown)} of {len(layers)} layers are not static "
                 f"(their shapes are not), so neither are the model's: "
                 f"{', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}"]
    branches = _branches(graph, e, {la.node for la in layers})
    groups: list[Group] = []
    if "channel" in kinds:
        groups += _channel_groups(spaces, shapes)
    if "depth" in kinds:
        groups += _depth_groups(branches, graph)
    if "head" in kinds:
        attentions = find_attentions(graph)
        groups += head_groups(graph, attentions)
        notes = [*notes, *head_notes(attentions)]
    shared: dict[str, Reason] = {}
    for la in layers:
        users = tensors[la.weight].outputs
        if len(users) > 1:
            names = ", ".join(u.name for u in users)
            shared[la.weight] = Reason(ReasonCode.SHARED_WEIGHT,
                                       f"weight {la.weight} is shared by {names}",
                                       tensor=la.weight)
    groups += _weight_groups(layers, kinds, shared)
    return Analysis(model=name or graph.name, spaces=spaces, groups=tuple(groups), layers=layers,
                    branches=branches, kinds=tuple(kinds), notes=tuple(notes),  # type: ignore
                    key=graph_key(graph) if key is None else key)


# --- text report ---------------------------------------------------------------------------


def _fmt_int(n: int) -> str:
    for unit, div in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


class SharedAnalysis:
    """The channel analysis of the graph a pipeline's passes last saw, reused while it
    matches.

    Every analysis carries the key (:func:`~onnx_ssl.graphutil.graph_key`) of the graph it
    was computed on; :meth:`of` hands out the one it holds only when the graph it is asked
    about has that key (the graph unchanged, or a copy of it, or one whose float weights
    alone changed), and analyses the graph afresh otherwise: an analysis handed in is
    checked, never trusted. ``computed`` counts the analyses it ran.
    """

    def __init__(self, analysis: Analysis | None = None) -> None:
        self._analysis = analysis
        self.computed = 0

    def of(self, graph: gs.Graph, kinds: Sequence[str] = ()) -> Analysis:
        """The analysis of ``graph`` with at least the group ``kinds`` given."""
        a = self._analysis
        key = graph_key(graph)
        if a is None or a.key != key or not set(kinds) <= set(a.kinds):
            a = self._analysis = analyze_graph(graph, kinds=tuple(kinds), key=key)
            self.computed += 1
        return a


def bias_maps(graph: gs.Graph) -> dict[str, int]:
    """Layer node -> float elements of the constant maps added right after it.

    ``Add(layer(x), k)`` with a constant ``k`` of rank >= 2 is a per-position bias map (the
    channel pass adds one behind a padded convolution that read a removed constant channel):
    params of the layer that its weight and bias do not show. Only parameterised layers
    count: a map after a MatMul of two activations (attention's position bias after
    Q x K^T) belongs to no layer.
    """
    out: dict[str, int] = {}
    for node in graph.nodes:
        if layer_weight(node) is None or not node.outputs:
            continue
        y = node.outputs[0]
        while len(y.outputs) == 1 and y.outputs[0].op == "Add" and y.outputs[0].outputs:
            add = y.outputs[0]
            k = next((t for t in add.inputs if isinstance(t, gs.Constant)), None)
            if k is None or len(k.shape) < 2 or np.dtype(k.dtype).kind != "f":
                break
            out[node.name] = out.get(node.name, 0) + int(np.prod(k.shape))
            y = add.outputs[0]
    return out


def format_table(a: Analysis) -> str:
    spaces = {s.id: s for s in a.spaces}

    def desc(sid: str | None) -> str:
        if sid is None:
            return "-"
        s = spaces[sid]
        return f"{sid} ({s.channels}) {'prunable' if s.prunable else 'blocked'}"

    rows = [("layer", "op", "weight", "out space", "in space", "params (W+b)", "MACs")]
    for la in a.layers:
        rows.append((la.node, la.op_type, "x".join(map(str, la.weight_shape)),
                     desc(la.out_space), desc(la.in_space), _fmt_int(la.params),
                     _fmt_int(la.macs)))
    lines = text_table(rows)
    n_prunable = sum(s.prunable for s in a.spaces)
    ch_total = sum(s.channels for s in a.spaces)
    ch_prunable = sum(s.channels for s in a.spaces if s.prunable)
    lines += [
        "",
        f"model {a.model}: {len(a.layers)} layers, layer params (their weights and biases) "
        f"{_fmt_int(a.params)} "
        + (f"({a.params}), MACs {_fmt_int(a.macs)} ({a.macs})"
           + (" per sample" if a.macs_per_sample else "")
           if a.macs or not a.layers
           else f"({a.params}), MACs not static (a layer's shapes are not)"),
        f"channel spaces: {len(a.spaces)} ({n_prunable} prunable), channels {ch_total} "
        f"({ch_prunable} prunable)",
    ]
    blocked = [s for s in a.spaces if not s.prunable]
    if blocked:
        lines.append("blocked spaces:")
        for s in blocked:
            lines.append(f"  {s.id} ({s.channels} ch): {s.reason.text if s.reason else ''}")
    constrained = [s for s in a.spaces if s.prunable and s.constraint]
    if constrained:
        lines.append("prunable with a constraint:")
        for s in constrained:
            lines.append(f"  {s.id} ({s.channels} ch): {s.constraint}")
    if a.branches:
        ok = sum(b.prunable for b in a.branches)
        lines.append(f"residual branches: {len(a.branches)} ({ok} prunable as depth groups)")
        for b in a.branches:
            if not b.prunable:
                lines.append(f"  {b.add}: {b.reason.text if b.reason else ''}")
    counts: dict[str, int] = defaultdict(int)
    for g in a.groups:
        counts[g.kind] += 1
    lines.append("groups: " + ", ".join(f"{k} {counts[k]}" for k in a.kinds))
    for n in a.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)
