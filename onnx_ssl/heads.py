"""Attention heads as groups: find each attention of a prepared graph and the heads it has.

An attention computes ``softmax(Q K^T) V`` per head and projects the concatenated heads with
an output projection ``O``. Exporters write it with the head split explicit: ``Q = x Wq (+
bq)``, a Reshape to ``[B, T, H, d]`` and a Transpose to ``[B, H, T, d]`` (the same for K
and V, or one fused ``Wqkv`` cut by a Split or a Reshape to ``[B, T, 3, H, d]``), the two
MatMuls of the core, and a Transpose and Reshape back to ``[B, T, H*d]`` before ``O``.

This module follows every projection channel through those ops exactly: each tensor
between a projection and the core carries a *channel map*, an integer array broadcastable
to the tensor's shape (size 1 on the axes the channels do not vary along) that holds, for
each element, the projection's output channel it comes from. Movement ops (Transpose,
Reshape, Squeeze, Unsqueeze, Expand, Split, Slice, Gather, Concat) move the map with the
data. At the core, the batch positions of ``Q K^T`` tie Q, K and V channels together: the
connected sets of channels are the *units* that can go together. For multi-head attention a
unit is one head (its ``d`` rows of Q, K and V and its ``d`` rows of O); for grouped-query
attention (K/V heads repeated for several Q heads by an Expand) a unit is one K/V head with
all the Q heads that read it.

A unit contributes a constant to the attention's output, and is removed exactly, when

* its rows of the output projection are all zero (it contributes nothing); or
* its V weight slice is zero and the V path adds nothing but the projection's bias: then
  its V rows are the V bias, the same at every key position, and since the softmax's
  weights sum to one over the keys its output is that bias; the constant ``bias @ O_rows``
  goes into the output projection's bias.

ONNX Runtime's fused ``com.microsoft`` ``Attention`` (one packed Q/K/V weight inside the op)
and ``MultiHeadAttention`` (Q, K and V from projections, an optional packed bias) have their
heads as units too, ``num_heads`` at a time; ``GroupQueryAttention`` and any attention with a
key/value cache keep theirs (the cache's layout is the caller's).

``find_attentions`` returns what :mod:`onnx_ssl.passes.remove_heads` rewrites and what the
analysis turns into ``head`` groups; an attention this module cannot follow exactly gets a
:class:`~onnx_ssl.reasons.Reason` instead of units.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .channels import const_value, static_shape
from .groups import Group, Member
from .io import tensor_map
from .reasons import Reason, ReasonCode

# Ops that move or cut data without mixing elements.
_MOVE = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Split",
         "Slice", "Gather", "Concat", "Identity", "Cast", "Dropout"}
# Element-wise ops through which a channel map passes unchanged.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Neg"}
# Ops between Q K^T and the softmax, and between the softmax and its MatMul with V.
_SCORE = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Identity", "Dropout", "Softmax"}
# Linear ops the V path may hold after its bias (a zero V slice stays zero through them).
_LINEAR = {"Mul", "Div", "Neg"} | _MOVE


class _Fail(Exception):
    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.text)
        self.reason = reason


def _fail(node: gs.Node | None, text: str, tensor: gs.Tensor | None = None,
          code: ReasonCode = ReasonCode.OP_CONSTRAINT) -> _Fail:
    where = f"{node.name} ({node.op}): " if node is not None else ""
    return _Fail(Reason(code, where + text, node=None if node is None else node.name,
                        tensor=None if tensor is None else tensor.name))


@dataclass(frozen=True)
class Projection:
    """A layer whose output channels feed the attention: ``MatMul(x, W)`` or ``Gemm``."""

    node: str
    weight: str
    axis: int  # the weight's axis of output channels (input channels for the output proj)
    bias: str | None  # a 1-D constant added to the output (the output projection's bias)
    channels: int


@dataclass(frozen=True)
class Unit:
    """Channels of the projections that go together: a head (or a K/V head with its Q
    heads). Channel numbers are the projection's; ``o_rows`` index the output projection's
    input channels."""

    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]
    o_rows: tuple[int, ...]


@dataclass
class Attention:
    """One attention: its core, projections, units, and the tensors the units run through."""

    qk: str  # the MatMul Q K^T
    pv: str  # the MatMul softmax(.) V
    q: Projection | None = None
    k: Projection | None = None
    v: Projection | None = None
    o: Projection | None = None
    units: tuple[Unit, ...] = ()
    reason: Reason | None = None
    # A unit whose V weight slice is zero has V rows equal to its V bias (the V path adds
    # and scales nothing else) ...
    v_linear: bool = False
    # ... and outputs that bias at every position (the softmax's weights sum to one).
    v_bias_only: bool = False
    # Tensor name -> channel map, in one numbering of all the attention's projection
    # channels: projection ``p``'s channel ``c`` is ``bases[p] + c``.
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    bases: dict[str, int] = field(default_factory=dict)
    # The unit of each batch position of Q K^T (size 1 along axes the heads do not vary
    # along): the map of every tensor of the score path, from Q K^T to the softmax's output.
    labels: np.ndarray | None = None
    score: tuple[str, ...] = ()  # the score path's tensors
    # For each input channel of the output projection, the V channel it carries (global).
    o_chan: np.ndarray | None = None
    # Constant operands cut with the units: (node, input slot).
    sliced: tuple[tuple[str, int], ...] = ()
    # A fused op's packed Q/K/V bias input (node, slot) and the channel of each element.
    packed_bias: tuple[str, int, np.ndarray] | None = None
    nodes: tuple[str, ...] = ()  # every node whose shapes or constants the units touch

    @property
    def prunable(self) -> bool:
        return self.reason is None and len(self.units) > 1


# --- graph helpers ---------------------------------------------------------------------


def _is_layer(node: gs.Node) -> bool:
    """A projection: MatMul with a constant 2-D right operand, or Gemm with a constant B."""
    if node.op == "MatMul" and len(node.inputs) == 2:
        w = const_value(node.inputs[1])
        return w is not None and w.ndim == 2 and const_value(node.inputs[0]) is None
    if node.op == "Gemm" and len(node.inputs) >= 2:
        return const_value(node.inputs[1]) is not None and not node.attrs.get("transA", 0)
    return False


def _out_axis(node: gs.Node) -> int:
    return 0 if node.op == "Gemm" and node.attrs.get("transB", 0) else 1


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def _shape(t: gs.Tensor) -> tuple[int, ...]:
    s = static_shape(t)
    if s is None:
        raise _fail(_producer(t), f"tensor {t.name} has no static shape", t,
                    ReasonCode.RUNTIME_SHAPE)
    return s


def _reduce(full: np.ndarray) -> np.ndarray:
    """A map with size 1 on every axis it does not vary along."""
    out = full
    for a in range(full.ndim):
        if out.shape[a] > 1:
            first = np.take(out, [0], axis=a)
            if np.array_equal(np.broadcast_to(first, out.shape), out):
                out = first
    return np.ascontiguousarray(out)


def _ints(v: np.ndarray | None) -> list[int]:
    return [] if v is None else [int(x) for x in np.asarray(v).reshape(-1)]


def _data_inputs(node: gs.Node) -> list[int]:
    """The input slots of ``node`` that carry data (not shapes, indices or conditions)."""
    if node.op in ("Reshape", "Expand", "Slice", "Split", "Gather", "Squeeze", "Unsqueeze"):
        return [0]
    if node.op == "Where":
        return [1, 2]
    return list(range(len(node.inputs)))


# --- tracing the channel maps ------------------------------------------------------------


def _region(start: gs.Tensor, allowed: set[str]) -> tuple[list[gs.Node], set[str]]:
    """The nodes between projections and ``start`` (walking producers through ``allowed``
    ops, into their data inputs) and the projections reached. A data input that comes from
    anything else (a graph input, another op) is simply not data: the caller checks it."""
    nodes: dict[str, gs.Node] = {}
    layers: set[str] = set()
    memo: dict[str, bool] = {}

    def reaches(t: gs.Tensor) -> bool:  # whether t descends from a projection
        if t.name in memo:
            return memo[t.name]
        memo[t.name] = False  # cycles cannot occur in a DAG; guards recursion anyway
        p = _producer(t)
        ok = False
        if p is not None:
            if _is_layer(p):
                layers.add(p.name)
                nodes[p.name] = p
                ok = True
            elif p.op in allowed:
                for i in _data_inputs(p):
                    if i < len(p.inputs) and not isinstance(p.inputs[i], gs.Constant) \
                            and reaches(p.inputs[i]):
                        ok = True
                if ok:
                    nodes[p.name] = p
        memo[t.name] = ok
        return ok

    reaches(start)
    return list(nodes.values()), layers


def _topo(nodes: Iterable[gs.Node], graph: gs.Graph) -> list[gs.Node]:
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    return sorted(nodes, key=lambda n: order[id(n)])


class _Tracer:
    """Channel maps of the tensors of one region, from its projections' outputs on."""

    def __init__(self, attn: Attention) -> None:
        self.attn = attn
        self.maps = attn.maps
        # Pairs of maps whose elements must fall in the same unit (two data operands of one
        # element-wise op, such as rotary embeddings' x*cos + rotate(x)*sin).
        self.same_unit: list[tuple[np.ndarray, np.ndarray, gs.Node]] = []
        # Non-data operands that vary along axes of a map: the units must not vary there.
        self.varying: list[tuple[np.ndarray, tuple[int, ...], gs.Node]] = []
        # Constant operands that vary along a map's axes: sliced with the units.
        self.sliced: list[tuple[str, str, int]] = []  # (node, constant, input slot)

    def start(self, layer: gs.Node, offset: int = 0) -> None:
        y = layer.outputs[0]
        s = _shape(y)
        c = s[-1]
        m = (np.arange(c, dtype=np.int64) + offset).reshape((1,) * (len(s) - 1) + (c,))
        self.maps[y.name] = m

    def run(self, node: gs.Node) -> None:
        op = node.op
        data = [i for i in _data_inputs(node)
                if i < len(node.inputs) and node.inputs[i].name in self.maps]
        if not data:
            return
        x = node.inputs[data[0]]
        m = self.maps[x.name]
        outs = node.outputs
        if op in ("Reshape", "Expand") and const_value(node.inputs[1]) is None:
            # The rewrite sets the shape's head dims: it must be a constant.
            raise _fail(node, f"its target shape {node.inputs[1].name} is computed at run "
                              f"time", node.inputs[1], ReasonCode.RUNTIME_SHAPE)
        if op in ("Identity", "Cast", "Dropout", "Neg"):
            self.maps[outs[0].name] = m
        elif op == "Transpose":
            perm = node.attrs.get("perm", list(range(m.ndim))[::-1])
            self.maps[outs[0].name] = np.ascontiguousarray(np.transpose(m, perm))
        elif op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            s, t = _shape(x), _shape(outs[0])
            self.maps[outs[0].name] = _reduce(np.broadcast_to(m, s).reshape(t))
        elif op == "Expand":
            t = _shape(outs[0])
            self.maps[outs[0].name] = _reduce(np.broadcast_to(
                m.reshape((1,) * (len(t) - m.ndim) + m.shape), t))
        elif op == "Split":
            self._split(node, m)
        elif op == "Slice":
            self._slice(node, m)
        elif op == "Gather":
            self._gather(node, m)
        elif op == "Concat":
            self._concat(node)
        elif op in _ELEMENTWISE:
            self._elementwise(node, data)
        else:
            raise _fail(node, "carries attention channels through an op that mixes them")

    def _split(self, node: gs.Node, m: np.ndarray) -> None:
        s = _shape(node.inputs[0])
        axis = int(node.attrs.get("axis", 0)) % len(s)
        sizes = [_shape(o)[axis] for o in node.outputs]
        start = 0
        for o, n in zip(node.outputs, sizes, strict=True):
            part = m if m.shape[axis] == 1 else np.take(m, range(start, start + n), axis=axis)
            self.maps[o.name] = _reduce(part)
            start += n

    def _slice(self, node: gs.Node, m: np.ndarray) -> None:
        s = _shape(node.inputs[0])
        vals = [const_value(t) if i < len(node.inputs) else None
                for i, t in enumerate(node.inputs[1:5], start=1)]
        if any(v is None for v in vals[:2]) or any(
                i < len(node.inputs) and vals[i - 1] is None for i in (3, 4)
                if i < len(node.inputs) and node.inputs[i].name):
            raise _fail(node, "slice bounds computed at run time", node.inputs[0],
                        ReasonCode.RUNTIME_SHAPE)
        starts, ends = _ints(vals[0]), _ints(vals[1])
        axes = _ints(vals[2]) if len(vals) > 2 and vals[2] is not None else \
            list(range(len(starts)))
        steps = _ints(vals[3]) if len(vals) > 3 and vals[3] is not None else [1] * len(starts)
        full = np.broadcast_to(m, s)
        index: list[slice] = [slice(None)] * len(s)
        for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
            index[ax % len(s)] = slice(st, en, sp)
        self.maps[node.outputs[0].name] = _reduce(full[tuple(index)])

    def _gather(self, node: gs.Node, m: np.ndarray) -> None:
        idx = const_value(node.inputs[1])
        if idx is None:
            raise _fail(node, "gather indices computed at run time", node.inputs[1],
                        ReasonCode.RUNTIME_SHAPE)
        s = _shape(node.inputs[0])
        axis = int(node.attrs.get("axis", 0)) % len(s)
        full = np.broadcast_to(m, s)
        self.maps[node.outputs[0].name] = _reduce(np.take(full, idx.astype(np.int64), axis))

    def _concat(self, node: gs.Node) -> None:
        parts = []
        for t in node.inputs:
            if t.name not in self.maps:
                raise _fail(node, f"joins attention channels with {t.name}, which carries "
                                  f"none", t)
            parts.append(np.broadcast_to(self.maps[t.name], _shape(t)))
        axis = int(node.attrs["axis"]) % parts[0].ndim
        self.maps[node.outputs[0].name] = _reduce(np.concatenate(parts, axis=axis))

    def _elementwise(self, node: gs.Node, data: list[int]) -> None:
        out = node.outputs[0]
        t = _shape(out)
        r = len(t)

        def lift(a: np.ndarray) -> np.ndarray:
            return a.reshape((1,) * (r - a.ndim) + a.shape)

        m = lift(self.maps[node.inputs[data[0]].name])
        for i in data[1:]:
            other = lift(self.maps[node.inputs[i].name])
            self.same_unit.append((np.broadcast_to(m, t), np.broadcast_to(other, t), node))
        varies = tuple(a for a in range(r) if m.shape[a] > 1)
        for i, inp in enumerate(node.inputs):
            if i in data or not inp.name:
                continue
            s = static_shape(inp)
            if s is None:
                raise _fail(node, f"operand {inp.name} has no static shape", inp,
                            ReasonCode.RUNTIME_SHAPE)
            s = (1,) * (r - len(s)) + s
            along = tuple(a for a in varies if s[a] > 1)
            if not along:
                continue
            if isinstance(inp, gs.Constant):
                self.sliced.append((node.name, inp.name, i))  # cut with the units
            else:
                self.varying.append((np.broadcast_to(m, t), along, node))
        self.maps[out.name] = m if m.ndim == r else lift(m)


# --- finding attentions -----------------------------------------------------------------


def _nan_guard(t: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    """``Where(IsNaN(t), c, t)`` (the dynamo exporter's guard after a softmax): its nodes."""
    users = list(t.outputs)
    if len(users) != 2:
        return None
    isnan = next((n for n in users if n.op == "IsNaN"), None)
    where = next((n for n in users if n.op == "Where"), None)
    if isnan is None or where is None or list(isnan.outputs[0].outputs) != [where]:
        return None
    if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not t \
            or not isinstance(where.inputs[1], gs.Constant):
        return None
    return isnan, where


def _score_path(qk: gs.Node) -> tuple[list[gs.Node], gs.Node, gs.Node] | None:
    """From Q K^T through the score ops to a Softmax and on to MatMul(P, V): the nodes in
    between (softmax included), the softmax and the PV MatMul; None if not an attention."""
    path: list[gs.Node] = []
    t = qk.outputs[0]
    softmax = None
    while True:
        users = list(t.outputs)
        guard = _nan_guard(t) if softmax is not None else None
        if guard is not None:
            path += guard
            t = guard[1].outputs[0]
            continue
        if len(users) != 1:
            return None
        n = users[0]
        if n.op == "MatMul" and softmax is not None and n.inputs[0] is t:
            return path, softmax, n
        if n.op not in _SCORE or (n.op == "Softmax" and softmax is not None):
            return None
        data = [i for i, x in enumerate(n.inputs) if x is t]
        if n.op == "Where" and 0 in data:
            return None
        if n.op == "Softmax":
            softmax = n
        path.append(n)
        t = n.outputs[0]


def _candidates(graph: gs.Graph) -> list[tuple[gs.Node, list[gs.Node], gs.Node, gs.Node]]:
    out = []
    for node in graph.nodes:
        if node.op != "MatMul" or len(node.inputs) != 2:
            continue
        if any(isinstance(t, gs.Constant) for t in node.inputs):
            continue
        found = _score_path(node)
        if found is not None:
            out.append((node, *found))
    return out


def _projection(layer: gs.Node, axis: int, bias: str | None) -> Projection:
    w = const_value(layer.inputs[1])
    assert w is not None
    return Projection(layer.name, layer.inputs[1].name, axis, bias, int(w.shape[axis]))


def _bias_of(layer: gs.Node) -> tuple[str | None, gs.Node | None]:
    """The 1-D constant added right after ``layer`` (Gemm's C, or a following Add)."""
    if layer.op == "Gemm" and len(layer.inputs) > 2 and layer.inputs[2].name:
        c = const_value(layer.inputs[2])
        if c is None or c.ndim != 1:
            raise _fail(layer, f"its bias {layer.inputs[2].name} is not a constant vector "
                               f"(the heads would cut it)", layer.inputs[2])
        return layer.inputs[2].name, None
    y = layer.outputs[0]
    if len(y.outputs) == 1 and y.outputs[0].op == "Add":
        add = y.outputs[0]
        other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
        c = const_value(other)
        if c is not None and c.ndim == 1 and c.size == _shape(y)[-1]:
            return other.name, add
    return None, None


def _output_projection(t: gs.Tensor, attn: Attention, tracer: _Tracer,
                       nodes: list[gs.Node]) -> gs.Node:
    """Follow the PV product through movement ops to the output projection."""
    while True:
        users = list(t.outputs)
        if len(users) != 1:
            raise _fail(_producer(t), f"the heads' output {t.name} is read by "
                                      f"{len(users)} nodes", t)
        n = users[0]
        if _is_layer(n) and n.inputs[0] is t:
            return n
        if n.op not in _MOVE or n.op in ("Concat", "Gather", "Slice", "Split"):
            raise _fail(n, "the heads' output passes through an op other than a reshape or "
                           "transpose before the output projection", t)
        tracer.run(n)
        nodes.append(n)
        t = n.outputs[0]


def _to_output(attn: Attention, tracer: _Tracer, out: gs.Tensor) -> list[gs.Node]:
    """From the heads' output ``out`` (its map set) to the output projection: sets
    ``attn.o`` and ``attn.o_chan``; returns the movement ops on the way."""
    o_nodes: list[gs.Node] = []
    out_layer = _output_projection(out, attn, tracer, o_nodes)
    x = out_layer.inputs[0]
    xm = attn.maps[x.name]
    if any(d > 1 for d in xm.shape[:-1]) or xm.shape[-1] != _shape(x)[-1]:
        raise _fail(out_layer, "the heads do not arrive as the output projection's input "
                               "channels", x)
    attn.o_chan = xm.reshape(-1).copy()
    attn.o = _projection(out_layer, 1 - _out_axis(out_layer), _bias_of(out_layer)[0])
    return o_nodes


def _check_units(tracer: _Tracer, unit_of: np.ndarray) -> None:
    """The element-wise ops on the way keep each element within its unit."""
    for ma, mb, n in tracer.same_unit:
        if not np.array_equal(unit_of[ma], unit_of[mb]):
            raise _fail(n, "mixes channels of different heads")
    for m, along, n in tracer.varying:
        u = unit_of[m]
        for ax in along:
            if not np.all(u == np.take(u, [0], axis=ax)):
                raise _fail(n, "an operand that is not a constant differs between heads")


def _trace_roles(graph: gs.Graph, attn: Attention, tracer: _Tracer, at: gs.Node,
                 ends: dict[str, gs.Tensor], core: set[str], outputs: set[str]
                 ) -> tuple[dict[str, gs.Node], dict[str, gs.Node], set[str], int]:
    """Trace Q, K and V (``ends``) back to their projections and their channel maps forward:
    the projection of each role, the nodes in between, those of the V path, and how many
    projection channels there are (one numbering: a fused QKV projection is one)."""
    touched: dict[str, gs.Node] = {}
    layers: dict[str, gs.Node] = {}
    v_names: set[str] = set()
    for role, t in ends.items():
        nodes, found = _region(t, _MOVE | _ELEMENTWISE)
        if len(found) != 1:
            raise _fail(at, f"{role.upper()} does not come from one projection through "
                            f"reshapes and element-wise ops", t)
        name = next(iter(found))
        layers[role] = next(n for n in nodes if n.name == name)
        touched.update((n.name, n) for n in nodes if n.name != name)
        if role == "v":
            v_names = {n.name for n in nodes if n.name != name}
    base = 0
    for layer in {n.name: n for n in layers.values()}.values():
        attn.bases[layer.name] = base
        tracer.start(layer, base)
        base += _shape(layer.outputs[0])[-1]
    for n in _topo(touched.values(), graph):
        tracer.run(n)
    for role, t in ends.items():
        if t.name not in attn.maps:
            raise _fail(at, f"no channel map reaches {role.upper()}", t)
    # Everything the paths compute must stay inside the attention.
    inside = set(touched) | core
    for n in list(touched.values()) + list(layers.values()):
        for o in n.outputs:
            if o.name in outputs:
                raise _fail(n, f"{o.name} is a graph output (a cache of keys or values?)",
                            o, ReasonCode.GRAPH_OUTPUT)
            for c in o.outputs:
                if c.name not in inside:
                    raise _fail(n, f"{o.name} is also read by {c.name}", o,
                                ReasonCode.READ_OUTSIDE_BRANCH)
    return layers, touched, v_names, base


def _attention(graph: gs.Graph, qk: gs.Node, score: list[gs.Node], softmax: gs.Node,
               pv: gs.Node, outputs: set[str]) -> Attention:
    attn = Attention(qk=qk.name, pv=pv.name)
    tracer = _Tracer(attn)
    ends = {"q": qk.inputs[0], "k": qk.inputs[1], "v": pv.inputs[1]}
    layers, touched, v_names, base = _trace_roles(graph, attn, tracer, qk, ends,
                                                  {qk.name, pv.name}, outputs)
    chans, labels = _units(qk, *(attn.maps[ends[r].name] for r in ("q", "k", "v")))
    unit_of = np.full(base, -1, dtype=np.int64)
    for role_units in chans:
        for u, cs in enumerate(role_units):
            unit_of[cs] = u
    if np.any(unit_of < 0):
        raise _fail(qk, "some projection channels reach no head")
    # The score path: its operands other than the scores must not differ between heads,
    # unless they are constants (a per-head position bias: Swin, LeViT), cut with the heads.
    s_shape = _shape(qk.outputs[0])
    score_names = {qk.outputs[0].name} | {n.outputs[0].name for n in score}
    for n in score:
        for slot, inp in enumerate(n.inputs):
            if inp.name in score_names or not inp.name:
                continue
            s = static_shape(inp)
            if s is None:
                raise _fail(n, f"operand {inp.name} has no static shape", inp,
                            ReasonCode.RUNTIME_SHAPE)
            s = (1,) * (len(s_shape) - len(s)) + s
            if any(s[ax] > 1 and labels.shape[ax] > 1 for ax in range(len(s_shape))):
                if not isinstance(inp, gs.Constant) or n.outputs[0].name not in score_names:
                    raise _fail(n, f"operand {inp.name} differs between heads", inp)
                tracer.sliced.append((n.name, inp.name, slot))
    soft_axis = int(softmax.attrs.get("axis", -1)) % len(s_shape)
    # The PV product carries V channels, the same for every query position.
    o = pv.outputs[0]
    v_full = np.broadcast_to(attn.maps[ends["v"].name], _shape(pv.inputs[1]))
    attn.maps[o.name] = _reduce(np.broadcast_to(np.take(v_full, [0], axis=-2), _shape(o)))
    o_nodes = _to_output(attn, tracer, o)
    assert attn.o_chan is not None
    o_rows: list[list[int]] = [[] for _ in chans[0]]
    for r, c in enumerate(attn.o_chan):
        o_rows[int(unit_of[c])].append(r)
    _check_units(tracer, unit_of)
    for role in ("q", "k", "v"):
        layer = layers[role]
        setattr(attn, role, _projection(layer, _out_axis(layer), _bias_of(layer)[0]))

    def local(role: str, cs: list[int]) -> tuple[int, ...]:
        b = attn.bases[layers[role].name]
        return tuple(c - b for c in cs)

    attn.units = tuple(Unit(local("q", q), local("k", k), local("v", v), tuple(r))
                       for q, k, v, r in zip(*chans, o_rows, strict=True))
    attn.labels = labels
    attn.score = tuple(sorted(score_names))
    attn.sliced = tuple((name, i) for name, _, i in tracer.sliced)
    # The softmax's weights sum to one over the keys, unless a NaN guard zeroes the rows a
    # run-time mask hides entirely.
    guarded = any(n.op == "IsNaN" for n in score) and any(
        not isinstance(t, gs.Constant) and t.name not in score_names
        for n in score for t in n.inputs if t.name)
    attn.v_linear = _v_path_linear(v_names, layers["v"], touched)
    attn.v_bias_only = soft_axis == len(s_shape) - 1 and not guarded and attn.v_linear
    attn.nodes = tuple(n.name for n in _topo(
        list(touched.values()) + [qk, *score, pv] + o_nodes, graph))
    return attn


def _v_path_linear(names: set[str], layer: gs.Node, region: dict[str, gs.Node]) -> bool:
    """Whether the V path adds nothing but the projection's own bias, so that a zero V weight
    slice leaves the bias alone in those rows."""
    _, bias_add = _bias_of(layer)
    for name in names:
        n = region.get(name)
        if n is None or n is bias_add:
            continue
        if n.op not in _LINEAR:
            return False
    return True


def _units(qk: gs.Node, q: np.ndarray, k: np.ndarray, v: np.ndarray
           ) -> tuple[tuple[list[list[int]], list[list[int]], list[list[int]]], np.ndarray]:
    """The units: connected sets of Q, K and V channels over the core's batch positions.
    Returns the channel lists per unit (sorted) and the unit of each batch position of
    Q K^T (size 1 along the query and key axes and along axes the heads do not vary along).
    """
    s = _shape(qk.outputs[0])
    batch = tuple(s[:-2])
    r = len(s)
    n = int(np.prod(batch)) if batch else 1

    def rows(a: np.ndarray, name: str, token_axis: int) -> np.ndarray:
        a = a.reshape((1,) * (r - a.ndim) + a.shape)
        if a.shape[token_axis] != 1:
            raise _fail(qk, f"{name}'s channels vary along its token axis")
        tail = (a.shape[-2], 1) if token_axis == -1 else (1, a.shape[-1])
        return np.broadcast_to(a, batch + tail).reshape(n, -1)

    sets = [rows(q, "Q", -2), rows(k, "K", -1), rows(v, "V", -2)]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for role in sets:
        owner: dict[int, int] = {}
        for b in range(n):
            for c in np.unique(role[b]).tolist():
                if c in owner:
                    ra, rb = find(owner[c]), find(b)
                    if ra != rb:
                        parent[ra] = rb
                else:
                    owner[c] = b
    roots = sorted({find(b) for b in range(n)})
    index = {root: i for i, root in enumerate(roots)}
    label = np.array([index[find(b)] for b in range(n)], dtype=np.int64)
    out: list[list[list[int]]] = []
    for role in sets:
        per: list[set[int]] = [set() for _ in roots]
        for b in range(n):
            per[label[b]].update(np.unique(role[b]).tolist())
        out.append([sorted(p) for p in per])
    labels = _reduce(label.reshape(batch + (1, 1)))
    return (out[0], out[1], out[2]), labels


# ONNX Runtime's fused attention ops (domain com.microsoft).
FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
         "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention")


def _fused_attention(graph: gs.Graph, node: gs.Node, outputs: set[str]) -> Attention:
    """com.microsoft ``Attention``: one packed projection ``W [hidden, q + k + v]`` (and
    bias) inside the op, ``num_heads`` heads of ``q/H``, ``k/H`` and ``v/H`` columns; its
    output ``[B, S, v]`` (head ``h`` at ``h*v/H ..``) feeds the output projection."""
    attn = Attention(qk=node.name, pv=node.name)
    if node.op == "MultiHeadAttention":
        return _fused_mha(graph, node, outputs)
    if node.op != "Attention":
        raise _fail(node, f"the heads inside a fused {node.op} are not groups yet (only "
                          f"com.microsoft Attention, MultiHeadAttention and unfused "
                          f"attention are)")
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2:
        raise _fail(node, "its packed Q/K/V weight is not a constant matrix")
    past = [t for i, t in enumerate(node.inputs) if i in (4, 6) and t.name]
    present = [t for t in node.outputs[1:] if t.name]
    if past or present:
        raise _fail(node, "it reads or writes a key/value cache, whose layout the caller "
                          "fixes", (past + present)[0], ReasonCode.GRAPH_OUTPUT)
    if len(node.inputs) > 5 and node.inputs[5].name:
        raise _fail(node, "an attention bias input may differ between heads", node.inputs[5])
    heads = int(node.attrs.get("num_heads", 0))
    sizes = [int(x) for x in node.attrs.get("qkv_hidden_sizes", [])] or [w.shape[1] // 3] * 3
    if heads < 1 or sum(sizes) != w.shape[1] or any(x % heads for x in sizes):
        raise _fail(node, f"num_heads {heads} does not divide its Q/K/V sizes {sizes}")
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if b is not None and const_value(b) is None:
        raise _fail(node, "its bias is not a constant", b)
    proj = Projection(node.name, node.inputs[1].name, 1, None if b is None else b.name,
                      int(w.shape[1]))
    attn.q = attn.k = attn.v = proj
    attn.bases = {node.name: 0}
    dq, dk, dv = (x // heads for x in sizes)
    out = node.outputs[0]
    r = len(_shape(out))
    attn.maps[out.name] = (sizes[0] + sizes[1] + np.arange(sizes[2], dtype=np.int64)).reshape(
        (1,) * (r - 1) + (sizes[2],))
    if out.name in outputs:
        raise _fail(node, f"its output {out.name} is a graph output", out,
                    ReasonCode.GRAPH_OUTPUT)
    o_nodes = _to_output(attn, _Tracer(attn), out)
    assert attn.o_chan is not None
    o_rows: list[list[int]] = [[] for _ in range(heads)]
    for row, c in enumerate(attn.o_chan):
        o_rows[(int(c) - sizes[0] - sizes[1]) // dv].append(row)
    attn.units = tuple(
        Unit(tuple(range(h * dq, (h + 1) * dq)),
             tuple(range(sizes[0] + h * dk, sizes[0] + (h + 1) * dk)),
             tuple(range(sizes[0] + sizes[1] + h * dv, sizes[0] + sizes[1] + (h + 1) * dv)),
             tuple(o_rows[h]))
        for h in range(heads))
    attn.labels = np.zeros((1,), dtype=np.int64)
    # ONNX Runtime masks with a large finite negative: every row of weights sums to one.
    attn.v_linear = attn.v_bias_only = True
    attn.nodes = tuple(n.name for n in [node, *o_nodes])
    return attn


def _fused_mha(graph: gs.Graph, node: gs.Node, outputs: set[str]) -> Attention:
    """com.microsoft ``MultiHeadAttention`` with separate ``query``, ``key`` and ``value``
    ``[B, S, hidden]`` from projections (and an optional packed bias input): head ``h`` is
    the ``h``-th run of ``hidden / num_heads`` channels of each."""
    attn = Attention(qk=node.name, pv=node.name)
    ins = list(node.inputs) + [gs.Variable("")] * (10 - len(node.inputs))
    if not (ins[1].name and ins[2].name):
        raise _fail(node, "packed Q/K/V input: the heads inside are not groups yet")
    cache = [t for t in (ins[6], ins[7], *node.outputs[1:]) if t.name]
    if cache:
        raise _fail(node, "it reads or writes a key/value cache, whose layout the caller "
                          "fixes", cache[0], ReasonCode.GRAPH_OUTPUT)
    if ins[5].name:
        raise _fail(node, "an attention bias input may differ between heads", ins[5])
    heads = int(node.attrs.get("num_heads", 0))
    tracer = _Tracer(attn)
    for role, t in (("q", ins[0]), ("k", ins[1]), ("v", ins[2])):
        if len(_shape(t)) != 3:
            raise _fail(node, f"its {role.upper()} input is not [batch, sequence, hidden]", t)
    layers, touched, v_names, base = _trace_roles(
        graph, attn, tracer, node, {"q": ins[0], "k": ins[1], "v": ins[2]}, {node.name},
        outputs)
    chans = []
    for t in (ins[0], ins[1], ins[2]):
        m = attn.maps.get(t.name)
        if m is None or any(d > 1 for d in m.shape[:-1]) or m.shape[-1] % max(heads, 1):
            raise _fail(node, f"num_heads {heads} does not split {t.name} into heads", t)
        chans.append(m.reshape(-1))
    if heads < 1:
        raise _fail(node, "no num_heads attribute")
    unit_of = np.full(base, -1, dtype=np.int64)
    for c in chans:
        unit_of[c] = np.arange(len(c)) // (len(c) // heads)
    _check_units(tracer, unit_of)
    if ins[3].name:
        b = const_value(ins[3])
        if b is None or b.shape != (sum(len(c) for c in chans),):
            raise _fail(node, "its bias input is not a constant of the Q/K/V sizes", ins[3])
        attn.packed_bias = (node.name, 3, np.concatenate(chans))
    out = node.outputs[0]
    r = len(_shape(out))
    attn.maps[out.name] = chans[2].reshape((1,) * (r - 1) + (-1,))
    o_nodes = _to_output(attn, tracer, out)
    assert attn.o_chan is not None
    for role in ("q", "k", "v"):
        layer = layers[role]
        setattr(attn, role, _projection(layer, _out_axis(layer), _bias_of(layer)[0]))

    def local(role: str, cs: np.ndarray) -> tuple[int, ...]:
        b0 = attn.bases[layers[role].name]
        return tuple(int(c) - b0 for c in cs)

    units = []
    for h in range(heads):
        q, k, v = (c[unit_of[c] == h] for c in chans)
        rows = tuple(int(i) for i in np.flatnonzero(unit_of[attn.o_chan] == h))
        units.append(Unit(local("q", q), local("k", k), local("v", v), rows))
    attn.units = tuple(units)
    attn.labels = np.zeros((1,), dtype=np.int64)
    # The V bias of the packed input is added inside, after the projection: no V-bias fold.
    attn.v_linear = _v_path_linear(v_names, layers["v"], touched)
    attn.v_bias_only = not ins[3].name and attn.v_linear
    attn.nodes = tuple(n.name for n in [*_topo(touched.values(), graph), node, *o_nodes])
    return attn


def find_attentions(graph: gs.Graph) -> list[Attention]:
    """Every attention of a prepared graph (static shapes, constants folded), with its units
    or the reason it has none."""
    outputs = {t.name for t in graph.outputs}
    found: list[Attention] = []
    for qk, score, softmax, pv in _candidates(graph):
        try:
            found.append(_attention(graph, qk, score, softmax, pv, outputs))
        except _Fail as e:
            found.append(Attention(qk=qk.name, pv=pv.name, reason=e.reason))
    for node in graph.nodes:
        if node.domain != "com.microsoft" or node.op not in FUSED:
            continue
        try:
            found.append(_fused_attention(graph, node, outputs))
        except _Fail as e:
            found.append(Attention(qk=node.name, pv=node.name, reason=e.reason))
    _block_shared(graph, found)
    return found


def _block_shared(graph: gs.Graph, found: Sequence[Attention]) -> None:
    """Give a reason to every attention whose projections, or their weights or biases, are
    another attention's too or are read elsewhere: cutting one attention's units would cut
    the other reader's channels (ALBERT's layers share one set of weights, for example)."""
    tensors = tensor_map(graph)
    by_name = {n.name: n for n in graph.nodes}
    owners: dict[str, set[str]] = {}  # projection node or weight/bias tensor -> attentions
    for a in found:
        if a.reason is not None:
            continue
        for p in {x for x in (a.q, a.k, a.v, a.o) if x is not None}:
            for key in (p.node, p.weight, p.bias):
                if key is not None:
                    owners.setdefault(key, set()).add(a.qk)
    for a in found:
        if a.reason is not None:
            continue
        projections = {x for x in (a.q, a.k, a.v, a.o) if x is not None}
        mine = {p.node for p in projections}
        # A bias is read by its projection (Gemm's C) or by the Add right after it.
        bias_readers = mine | {c.name for p in projections
                               for c in by_name[p.node].outputs[0].outputs}
        for p in sorted(projections, key=lambda x: x.node):
            for key, allowed in ((p.node, None), (p.weight, mine), (p.bias, bias_readers)):
                if key is None:
                    continue
                others = sorted(owners.get(key, set()) - {a.qk})
                outside: list[str] = []
                t = tensors.get(key)
                if allowed is not None and t is not None:
                    outside = sorted(n.name for n in t.outputs if n.name not in allowed)
                if others or outside:
                    by = ", ".join(others) if others else ", ".join(outside)
                    what = "projection" if key == p.node else "weight"
                    a.reason = Reason(ReasonCode.SHARED_WEIGHT,
                                      f"{p.node}: its {what} {key} is shared with "
                                      f"{'attention(s) ' if others else ''}{by}",
                                      node=p.node, tensor=None if key == p.node else key)
                    break
            if a.reason is not None:
                break


# --- groups ------------------------------------------------------------------------------


def _rows(p: Projection, chans: Sequence[int]) -> tuple[tuple[int, ...] | None, ...]:
    sl: list[tuple[int, ...] | None] = [None, None]
    sl[p.axis] = tuple(chans)
    return tuple(sl)


def unit_members(a: Attention, u: Unit) -> tuple[Member, ...]:
    """The weight slices of one unit: its rows of Q, K and V (weights and biases, role
    ``out``; one member per tensor when a projection is fused) and its rows of the output
    projection (role ``in``)."""
    assert a.q is not None and a.k is not None and a.v is not None and a.o is not None
    per: dict[str, tuple[Projection, set[int]]] = {}
    for p, chans in ((a.q, u.q), (a.k, u.k), (a.v, u.v)):
        per.setdefault(p.node, (p, set()))[1].update(chans)
    out: list[Member] = []
    for p, chan_set in per.values():
        cs = tuple(sorted(chan_set))
        out.append(Member(p.weight, "out", _rows(p, cs)))
        if p.bias is not None:
            out.append(Member(p.bias, "out", (cs,)))
    out.append(Member(a.o.weight, "in", _rows(a.o, u.o_rows)))
    return tuple(out)


def head_groups(graph: gs.Graph, attentions: Sequence[Attention] | None = None) -> list[Group]:
    """One ``head`` group per unit of every attention found (prunable or with its reason);
    an attention whose units are unknown has none (see :func:`head_notes`)."""
    groups: list[Group] = []
    for a in attentions if attentions is not None else find_attentions(graph):
        if not a.units:
            continue
        reason = a.reason
        if reason is None and len(a.units) < 2:
            reason = Reason(ReasonCode.OP_CONSTRAINT, f"{a.qk}: a single head (the attention "
                            f"needs at least one)", node=a.qk)
        for i, u in enumerate(a.units):
            groups.append(Group(f"{a.qk}/head/{i}", "head", None, i, reason is None, reason,
                                unit_members(a, u), node=a.qk))
    return groups


def head_notes(attentions: Sequence[Attention]) -> list[str]:
    return [f"attention at {a.qk}: its heads are not groups: {a.reason.text}"
            for a in attentions if a.reason is not None and not a.units]
