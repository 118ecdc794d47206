"""The coupled-group analysis of an ONNX graph.

``prepare`` makes the *working copy* the analysis and the prune passes work on: every node
gets a unique name, a symbolic leading (batch) input dim is bound to ``BOUND_BATCH``, the
shape arithmetic that static shapes make constant is folded (and Constant nodes become
initializers), each reader of a merged constant gets its own copy, and shapes are inferred.
``analyze`` propagates channel layouts through the graph with the op rules of
:mod:`onnx_ssl.rules` and returns an immutable :class:`~onnx_ssl.groups.Analysis`: channel
spaces (prunable or the reason why not), the groups of each requested kind with their
members, the parameterised layers with params and MACs, and the residual branches.

What ``analyze`` hands back speaks of the model it was given: every group member names an
initializer or a Constant node output of that model (:meth:`WorkingCopy.to_input`), and the
pruned model keeps the input's node names (:func:`name_nodes` names only the nodes without
a name of their own) and its symbolic batch (:meth:`WorkingCopy.unbind`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .channels import Engine, Layout, RawRef, Seg, const_value, static_shape
from .errors import InputError, OnnxSslError, UnsupportedModelError, one_line
from .graphutil import clear_inner_shapes, graph_key, unique_name
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
from .io import (
    CONTROL_FLOW_OPS,
    ModelMeta,
    fold_trivial_constants,
    from_graph,
    infer_shapes,
    shaped_graph,
    tensor_map,
    to_graph,
)
from .rules import RULES, apply_rule, layer_weight
from .runtime import folding_runtime
from .text import format_table as text_table

log = logging.getLogger(__name__)

# The parameterised layers: the ops whose entry in the op table has weight and bias slots.
LAYER_OPS = tuple(op for op, rule in RULES.items() if rule.layer is not None)
FLOAT_TYPES = (np.float32, np.float64, np.float16)


# Working copy: a symbolic leading (batch) input dim is bound to BOUND_BATCH for shape
# reasoning and folding (so MACs are per sample); a second preparation at PROBE_BATCH tells
# which folded constants depend on the batch, so that the rewrite can write them back
# batch-agnostic. The numeric check runs at runtime.DYNAMIC_BATCH, a third size.
BOUND_BATCH = 1
PROBE_BATCH = 3

Dim = int | str | None
# (node, input index) -> ((position, factor), ...): entry `position` of that constant 1-D
# vector is `factor` x the batch size.
BatchSlots = Mapping[tuple[str, int], tuple[tuple[int, int], ...]]


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """The working copy of ``model`` (see :class:`WorkingCopy`), with the input's symbolic
    batch dim restored: unique node names, constant shape arithmetic and Constant-node
    weights folded, each reader of a merged constant with its own copy
    (:func:`unshare_constants`), shapes inferred.

    The result computes the same function as ``model`` for the model's input shapes; its
    initializers are the tensors that ``analyze(result, prepared=True)`` names.
    """
    wc = _prepare(model)
    if not wc.batch:
        assert wc.model is not None  # kept by _prepare
        return wc.model
    return infer_shapes(from_graph(wc.unbind(wc.graph.copy()), wc.meta), strict=False)


def working_copy(model: onnx.ModelProto) -> WorkingCopy:
    """The working copy of ``model`` that the prune passes rewrite (see :class:`WorkingCopy`);
    its ``unbind`` makes a rewrite batch-agnostic like the input. Its ``model`` is None: the
    passes need only the graph, and the proto would hold every weight once more."""
    return _prepare(model, keep=False)


@dataclass(frozen=True, eq=False)
class WorkingCopy:
    """The model the analysis and the prune passes work on, and how it maps back to the input.

    ``model``/``graph``: the prepared model (see :func:`prepare`) with a symbolic batch bound
    to ``BOUND_BATCH`` (``model`` is None in the copy :func:`working_copy` makes).
    ``renamed``: generated node name -> the input's name ("" for an unnamed node; see
    :func:`name_nodes`). A rewrite keeps the generated names: every node
    the input named uniquely keeps its name, an unnamed one keeps ``<OpType>_<index>`` (so
    that the prune report's layer names find their nodes), and of nodes sharing a name the
    first keeps it and the others keep ``<name>_<index>`` (ONNX Runtime refuses a model with
    two nodes of one name). ``copies``: a constant copied by :func:`unshare_constants` -> its
    original. ``allowed``: the input's initializers and Constant node outputs. ``prefold``:
    the model before constant folding (to trace folded constants back to the input's
    tensors). ``batch``: bound input -> its symbolic dim (a name, or None when unnamed);
    ``outputs``: declared output shapes to restore; ``slots``: the folded constants that
    depend on the batch.
    """

    model: onnx.ModelProto | None
    graph: gs.Graph
    meta: ModelMeta
    renamed: Mapping[str, str]
    copies: Mapping[str, str]
    allowed: frozenset[str]
    prefold: onnx.ModelProto
    batch: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    outputs: Mapping[str, tuple[Dim, ...]] = dataclasses.field(default_factory=dict)
    slots: BatchSlots = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    # --- back to the input model ---------------------------------------------------------
    def unbind(self, graph: gs.Graph) -> gs.Graph:
        """Make ``graph`` (a rewrite of the working copy; changed in place) batch-agnostic
        again: graph inputs and outputs get the input's declarations back, and every folded
        constant that depends on the batch is written without it (a Reshape target with one
        batch entry gets -1 there; others are computed from the input's batch size at run
        time). Inner shapes are forgotten (shape inference recomputes them)."""
        if not self.batch:
            return graph
        for t in graph.inputs:
            if t.name in self.batch and t.shape is not None and len(t.shape):
                t.shape = [self.batch[t.name], *list(t.shape)[1:]]
        for t in graph.outputs:
            if t.name in self.outputs:
                t.shape = list(self.outputs[t.name])
        nodes = {n.name: n for n in graph.nodes}
        size: gs.Tensor | None = None  # the batch size as a 1-D int64 tensor, made once
        for (name, i), pos in self.slots.items():
            node = nodes.get(name)
            if node is None or i >= len(node.inputs) or not isinstance(node.inputs[i],
                                                                       gs.Constant):
                continue  # removed, or no longer a folded constant
            v = np.asarray(node.inputs[i].values).copy()
            if node.op == "Reshape" and i == 1 and len(pos) == 1 and not np.any(v == -1):
                v[pos[0][0]] = -1
                node.inputs[i] = gs.Constant(unique_name(graph, f"{name}.shape"), v)
                continue
            made: list[gs.Node] = []
            if size is None:
                size = self._batch_size(graph, made)
            node.inputs[i] = self._batch_vector(graph, name, v, pos, size, made)
            # In graph order: right before the node (they read only the graph input).
            at = next(k for k, n in enumerate(graph.nodes) if n is node)
            graph.nodes[at:at] = made
        clear_inner_shapes(graph)
        return graph

    def _batch_size(self, graph: gs.Graph, made: list[gs.Node]) -> gs.Tensor:
        x = next(t for t in graph.inputs if t.name in self.batch)
        shape = gs.Variable(unique_name(graph, f"{x.name}_shape"), dtype=np.int64)
        made.append(gs.Node("Shape", name=unique_name(graph, f"{x.name}_shape"), inputs=[x],
                            outputs=[shape]))
        size = gs.Variable(unique_name(graph, f"{x.name}_batch_size"), dtype=np.int64)
        first = gs.Constant(unique_name(graph, f"{x.name}_batch_axis"),
                            np.array([0], dtype=np.int64))
        made.append(gs.Node("Gather", name=unique_name(graph, f"{x.name}_batch_size"),
                            attrs={"axis": 0}, inputs=[shape, first], outputs=[size]))
        return size

    @staticmethod
    def _batch_vector(graph: gs.Graph, name: str, v: np.ndarray,
                      pos: tuple[tuple[int, int], ...], size: gs.Tensor, made: list[gs.Node]
                      ) -> gs.Tensor:
        """``v`` with entry ``p`` replaced by ``factor`` x the batch size, for each pair; the
        nodes that compute it go to ``made``."""
        used = {n.name for n in made} | {t.name for n in made for t in n.outputs}

        def fresh(base: str) -> str:  # unique also among what is not in the graph yet
            k, out = 1, unique_name(graph, base)
            while out in used:
                k, out = k + 1, unique_name(graph, f"{base}_{k}")
            used.add(out)
            return out

        parts: list[gs.Tensor] = []
        start = 0
        for p, factor in sorted(pos):
            if p > start:
                parts.append(gs.Constant(fresh(f"{name}.fixed"), v[start:p].astype(np.int64)))
            entry = size
            if factor != 1:
                entry = gs.Variable(fresh(f"{name}_batch_entry"), dtype=np.int64)
                k = gs.Constant(fresh(f"{name}.batch_factor"), np.array([factor], np.int64))
                made.append(gs.Node("Mul", name=fresh(f"{name}_batch_mul"), inputs=[size, k],
                                    outputs=[entry]))
            parts.append(entry)
            start = p + 1
        if start < len(v):
            parts.append(gs.Constant(fresh(f"{name}.fixed"), v[start:].astype(np.int64)))
        out = gs.Variable(fresh(f"{name}_batch_shape"), dtype=np.int64)
        made.append(gs.Node("Concat", name=fresh(f"{name}_batch_shape"), attrs={"axis": 0},
                            inputs=parts, outputs=[out]))
        if v.dtype == np.int64:
            return out
        cast = gs.Variable(fresh(f"{name}_batch_shape_cast"), dtype=v.dtype)
        made.append(gs.Node("Cast", name=fresh(f"{name}_batch_cast"),
                            attrs={"to": _INT_TYPES[v.dtype.type]}, inputs=[out],
                            outputs=[cast]))
        return cast

    # --- the analysis handed to the user ---------------------------------------------------
    def to_input(self, a: Analysis) -> Analysis:
        """``a`` (an analysis of the working copy) in terms of the input model.

        Every member names an initializer or a Constant node output of the input: a copy made
        by :func:`unshare_constants` is its original (same slice); a folded constant is the
        slice of the input tensor(s) it was computed from (a reshape, transpose, gather, ...
        of them), traced by folding again with the input's elements numbered. One input
        tensor reached through several copies is listed once per distinct slice. A member
        that no slice of an input tensor stands for blocks its group (and its channel
        space), with the reason.
        """
        mapped: list[tuple[Group, tuple[Member, ...], str | None]] = []
        blocked: dict[str, str] = {}
        traces = self._traces({self.copies.get(m.tensor, m.tensor) for g in a.groups
                               for m in g.members} - self.allowed)
        for g in a.groups:
            members: dict[tuple[str, Slice], Member] = {}
            why = None
            for m in g.members:
                got, w = self._member_in_input(m, traces)
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
        layers = tuple(dataclasses.replace(
            la, weight=self.copies.get(la.weight, la.weight),
            bias=None if la.bias is None else self.copies.get(la.bias, la.bias))
            for la in a.layers)
        return dataclasses.replace(a, spaces=spaces, groups=tuple(groups), layers=layers,
                                   notes=(*a.notes, *self.notes),
                                   macs_per_sample=bool(self.batch),
                                   key=None)  # it describes the input, no graph of ours

    def _member_in_input(self, m: Member, traces: Mapping[str, Any]
                         ) -> tuple[list[Member], str | None]:
        name = self.copies.get(m.tensor, m.tensor)
        if name in self.allowed:
            return [Member(name, m.role, m.slice)], None
        trace = traces.get(name)
        if trace is None:
            return [], f"weight {m.tensor} is not a tensor of the input model"
        if isinstance(trace, str):
            return [], f"weight {m.tensor} is {trace}"
        codes, sources = trace
        mask = np.zeros(codes.shape, dtype=bool)
        mask[m.index(codes.shape)] = True
        picked = np.unique(codes[mask])
        out = []
        for src, offset, shape in sources:
            local = picked[(picked >= offset) & (picked < offset + math.prod(shape))] - offset
            if not local.size:
                continue
            coords = np.unravel_index(local, shape)
            axes = [np.unique(c) for c in coords]
            block = offset + np.ravel_multi_index(np.ix_(*axes), shape).reshape(-1)
            # The slice must hold exactly the picked elements, and zeroing it must touch
            # nothing of the folded constant outside the member.
            if block.size != local.size or np.isin(codes[~mask], block).any():
                return [], (f"folded from {src} by an op that mixes its elements, so that no "
                            f"slice of {src} is the member")
            sl = tuple(None if len(ax) == d else tuple(int(i) for i in ax)
                       for ax, d in zip(axes, shape, strict=True))
            out.append(Member(src, m.role, sl))
        return out, None

    def _traces(self, names: set[str]) -> dict[str, Any]:
        """The folded float constants among ``names`` -> (for each element, the number of the
        input element it holds; the numbered sources (name, first number, shape)), or why it
        cannot be traced (see :func:`_trace_folded`)."""
        tensors = tensor_map(self.graph)
        todo = {n: np.asarray(tensors[n].values) for n in sorted(names)
                if isinstance(tensors.get(n), gs.Constant)}
        todo = {n: v for n, v in todo.items() if v.dtype.type in FLOAT_TYPES}
        return _trace_folded(self.prefold, self.meta, todo) if todo else {}


_INT_TYPES = {np.int64: onnx.TensorProto.INT64, np.int32: onnx.TensorProto.INT32,
              np.int16: onnx.TensorProto.INT16, np.int8: onnx.TensorProto.INT8,
              np.uint64: onnx.TensorProto.UINT64, np.uint32: onnx.TensorProto.UINT32,
              np.uint16: onnx.TensorProto.UINT16, np.uint8: onnx.TensorProto.UINT8}


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
    offsets: dict[str, int] = {}
    values: dict[str, np.ndarray] = {}
    total = 0
    for src in sorted({s for ss in sources.values() for s in ss}):
        v = np.asarray(tensors[src].values)
        offsets[src], total = total, total + v.size
        values[src] = v
        limit = 2 ** (np.finfo(v.dtype).nmant + 1)  # integers exact in the float type
        if total > limit:
            return {**out, **{n: "folded from tensors too large to trace" for n in sources}}
        tensors[src].values = (offsets[src] + np.arange(v.size)).reshape(v.shape).astype(
            v.dtype)
    try:
        _, coded = _fold(from_graph(graph, meta), meta)
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


def _foldable(model: onnx.ModelProto) -> bool:
    """Whether any node computes from constants alone (or reads only a shape)."""
    consts = {t.name for t in model.graph.initializer}
    consts.add("")
    for n in model.graph.node:
        if n.op_type in ("Constant", "Shape", "Size") or all(i in consts for i in n.input):
            return True
    return False


def _fold(m: onnx.ModelProto, meta: ModelMeta, keep: bool = True
          ) -> tuple[onnx.ModelProto | None, gs.Graph]:
    """Fold constant shape arithmetic (to a fixpoint, inferring shapes anew); infer shapes.

    Without ``keep``, only the graph is made (the model is None): when there is nothing to
    fold, the graph reads ``m``'s weights instead of a copy of ``m`` with shapes.
    """
    if not keep and not _foldable(m):
        return None, shaped_graph(m)
    m = infer_shapes(m, strict=False)
    graph = to_graph(m)
    if not _foldable(m):
        return m, graph
    _shape_ranges_as_slices(graph)
    has_control_flow = any(n.op_type in CONTROL_FLOW_OPS for n in m.graph.node)
    for _ in range(4):
        before = len(graph.nodes)
        try:
            with folding_runtime():
                graph.fold_constants(fold_shapes=True, recurse_subgraphs=not has_control_flow,
                                     error_ok=False, flatten_subgraphs=False)
        except Exception as e:  # onnx-graphsurgeon raises plain exceptions
            raise UnsupportedModelError(f"constant folding failed: {one_line(e)}"
                                        ) from e
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        m = infer_shapes(from_graph(graph, meta), strict=False)
        graph = to_graph(m)
        # Shapes inferred anew may make more arithmetic constant; stop when nothing is left.
        if len(graph.nodes) == before or not _foldable(m):
            break
    return (m if keep else None), graph


def _shape_ranges_as_slices(graph: gs.Graph) -> None:
    """``Shape(x, start, end)`` -> ``Slice(Shape(x), start, end)``, which computes the same:
    onnx-graphsurgeon's shape folding ignores ``start`` and ``end`` (it folds the whole
    shape), the Slice it folds right."""
    for node in list(graph.nodes):
        if node.op != "Shape" or not ({"start", "end"} & set(node.attrs)):
            continue
        start = int(node.attrs.pop("start", 0))
        end = int(node.attrs.pop("end", np.iinfo(np.int64).max))
        full = gs.Variable(unique_name(graph, f"{node.outputs[0].name}_full"), dtype=np.int64)
        out = node.outputs[0]
        node.outputs = [full]
        graph.nodes.append(gs.Node("Slice", name=unique_name(graph, f"{node.name}_range"),
                                   inputs=[full, *(gs.Constant(unique_name(graph, f"{node.name}."
                                                                            f"{k}"),
                                                               np.array([v], dtype=np.int64))
                                                   for k, v in (("start", start), ("end", end),
                                                                ("axis", 0)))],
                                   outputs=[out]))
    graph.toposort()


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a unique name on every node: a node the input names uniquely keeps its
    name, an unnamed node at position ``i`` of the node list is ``<OpType>_<i>``, and of
    nodes sharing a name the first keeps it and the one at position ``i`` is ``<name>_<i>``
    (``_2``, ``_3``, ... appended where that is taken). The model itself when every name is
    already unique."""
    return _name_nodes(model)[0]


def _name_nodes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """:func:`name_nodes`, and the generated names -> the input's names."""
    names = [n.name for n in model.graph.node]
    counts = Counter(names)
    if all(n and counts[n] == 1 for n in names):
        return model, {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    taken = {n for n in names if n}
    seen: set[str] = set()
    renamed: dict[str, str] = {}
    for i, node in enumerate(m.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.name or node.op_type}_{i}"
        new, k = base, 2
        while new in taken:
            new, k = f"{base}_{k}", k + 1
        taken.add(new)
        renamed[new] = node.name
        node.name = new
    return m, renamed


def symbolic_batch(model: onnx.ModelProto) -> dict[str, str | None]:
    """Graph inputs whose leading (batch) dim is symbolic -> its name (None if unnamed)."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, str | None] = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        if vi.name in inits or not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = tt.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            out[vi.name] = dims[0].dim_param or None
    return out


def _dims(vi: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in vi.type.tensor_type.shape.dim)


def bind_batch(model: onnx.ModelProto, size: int) -> onnx.ModelProto:
    """A copy of ``model`` whose symbolic leading input dims are ``size``; the symbolic
    leading dims of its outputs and inner shapes are left to shape inference."""
    batch = symbolic_batch(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in batch:
            d = vi.type.tensor_type.shape.dim[0]
            d.Clear()
            d.dim_value = size
    for vi in m.graph.output:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
    del m.graph.value_info[:]
    return m


def _batch_slots(a: gs.Graph, b: gs.Graph) -> tuple[dict[tuple[str, int], tuple[tuple[int, int],
                                                                               ...]], str | None]:
    """The folded constants of ``a`` (prepared at BOUND_BATCH) that differ in ``b`` (at
    PROBE_BATCH), or why they cannot be written back batch-agnostic."""
    nb = {n.name: n for n in b.nodes}
    if set(nb) != {n.name for n in a.nodes}:
        return {}, "constant folding leaves different nodes at different batch sizes"
    slots: dict[tuple[str, int], tuple[tuple[int, int], ...]] = {}
    for n in a.nodes:
        o = nb[n.name]
        if len(o.inputs) != len(n.inputs):
            return {}, f"{n.name} ({n.op}): its inputs differ at different batch sizes"
        for i, (x, y) in enumerate(zip(n.inputs, o.inputs, strict=True)):
            cx, cy = isinstance(x, gs.Constant), isinstance(y, gs.Constant)
            if cx != cy:
                return {}, (f"{n.name} ({n.op}): input {i} is constant at some batch sizes "
                            f"only")
            if not cx:
                continue
            vx, vy = np.asarray(x.values), np.asarray(y.values)
            if vx.shape == vy.shape and np.array_equal(vx, vy):
                continue
            where = f"{n.name} ({n.op}): input {i} is computed from the batch size"
            if vx.ndim != 1 or vx.shape != vy.shape or vx.dtype.type not in _INT_TYPES:
                return {}, f"{where}, and it is not a shape vector"
            pos = []
            for d in np.flatnonzero(vx != vy):
                k = int(vx[d]) // BOUND_BATCH
                if k < 1 or k * BOUND_BATCH != int(vx[d]) or k * PROBE_BATCH != int(vy[d]):
                    return {}, f"{where}, not as a multiple of it"
                pos.append((int(d), k))
            slots[(n.name, i)] = tuple(pos)
    return slots, None


@dataclass(frozen=True)
class _Stage:
    model: onnx.ModelProto | None
    graph: gs.Graph
    copies: dict[str, str]
    prefold: onnx.ModelProto


def _prepare_at(m: onnx.ModelProto, meta: ModelMeta, batch: int | None, keep: bool = True
                ) -> _Stage:
    pre = fold_trivial_constants(bind_batch(m, batch) if batch is not None else m)
    folded, graph = _fold(pre, meta, keep)
    copies = unshare_constants(graph)
    if copies:
        folded = infer_shapes(from_graph(graph, meta), strict=False)
        graph = to_graph(folded)
        if not keep:
            folded = None
    return _Stage(folded, graph, copies, pre)


def _prepare(model: onnx.ModelProto, keep: bool = True) -> WorkingCopy:
    meta = ModelMeta.of(model)
    allowed = frozenset({t.name for t in model.graph.initializer}
                        | {o for n in model.graph.node if n.op_type == "Constant"
                           for o in n.output})
    named, renamed = _name_nodes(model)
    batch = symbolic_batch(named)
    if not batch:
        st = _prepare_at(named, meta, None, keep)
        return WorkingCopy(st.model, st.graph, meta, renamed, st.copies, allowed, st.prefold)
    shown = ", ".join(f"'{n}'" for n in batch)
    slots: dict[tuple[str, int], tuple[tuple[int, int], ...]] = {}
    try:
        st = _prepare_at(named, meta, BOUND_BATCH, keep)
        probe = _prepare_at(named, meta, PROBE_BATCH, keep=False)
        slots, why = _batch_slots(st.graph, probe.graph)
    except OnnxSslError as e:
        why = str(e)
    if why is not None:
        st = _prepare_at(named, meta, None, keep)
        note = (f"the batch dim of input(s) {shown} stays symbolic ({why}); shapes that "
                f"depend on it are not static, and neither are the MACs")
        return WorkingCopy(st.model, st.graph, meta, renamed, st.copies, allowed, st.prefold,
                           notes=(note,))
    outputs = {o.name: _dims(o) for o in named.graph.output
               if len(o.type.tensor_type.shape.dim)
               and not o.type.tensor_type.shape.dim[0].HasField("dim_value")}
    note = (f"the batch dim of input(s) {shown} is symbolic: the analysis binds it to "
            f"{BOUND_BATCH} (MACs are per sample); pruned models keep it symbolic")
    return WorkingCopy(st.model, st.graph, meta, renamed, st.copies, allowed, st.prefold,
                       batch, outputs, slots, (note,))


def unshare_constants(graph: gs.Graph) -> dict[str, str]:
    """Give every reader of a shared float constant its own copy; returns each copy's name ->
    the name of the constant it copies.

    Exporters merge equal initializers (the dynamo exporter's optimiser makes the all-zero
    biases and all-one norm scales of unrelated layers one tensor). Left shared, the channels
    of either reader could not be pruned (slicing the tensor for one would change the
    others), although the readers have nothing in common. A copy per reader computes the same
    function. A constant that some reader uses as a layer weight (input 1 of Conv, Gemm,
    MatMul, ConvTranspose) is a tied weight and stays shared: the analysis blocks it.
    """
    tensors = tensor_map(graph)
    names = set(tensors)
    outputs = {t.name for t in graph.outputs}
    copies: dict[str, str] = {}
    for t in list(tensors.values()):
        if not isinstance(t, gs.Constant) or t.name in outputs:
            continue
        readers: list[gs.Node] = []
        for n in t.outputs:
            if not any(n is r for r in readers):
                readers.append(n)
        if len(readers) < 2:
            continue
        if any(n.op in LAYER_OPS and len(n.inputs) > 1 and n.inputs[1] is t for n in readers):
            continue
        values = np.asarray(t.values)
        if values.dtype.type not in FLOAT_TYPES or values.size <= 1:
            continue
        for n in readers[1:]:
            k = 1
            while f"{t.name}.{k}" in names:
                k += 1
            copy = gs.Constant(f"{t.name}.{k}", values.copy())
            names.add(copy.name)
            for i, x in enumerate(n.inputs):
                if x is t:
                    n.inputs[i] = copy
            copies[copy.name] = t.name
    return copies


def _space_ids(e: Engine) -> dict[int, str]:
    ids: dict[int, str] = {}
    used: set[str] = set()
    for i in range(len(e.spaces)):
        if e.find(i) != i:
            continue
        base = e.spaces[i].label
        sid, k = base, 1
        while sid in used:
            k += 1
            sid = f"{base}#{k}"
        used.add(sid)
        ids[i] = sid
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
        e.spaces[s].reasons.append(f"graph input '{t.name}': its channels are fixed by the "
                                   f"caller")
        e.layouts[t.name] = Layout(1, 1, (Seg(s, 0, c),))
        e.refs.append(RawRef(t.name, 1, "act", s, 0, 0, c, 1, "", False))


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
        why = f"{node.name} ({node.op}): control flow; its subgraphs are not analysed"
        for n in names | {t.name for t in node.inputs}:
            if n in tensors:
                e.block(e.layout(tensors[n]), why)
        notes.append(why)
    return notes


def _check_weights(e: Engine, graph: gs.Graph) -> None:
    """Block spaces whose weights are shared with layers elsewhere or read by other ops."""
    tensors = tensor_map(graph)
    by_tensor: dict[tuple[str, int], list[RawRef]] = defaultdict(list)
    for r in e.refs:
        if r.is_weight:
            by_tensor[(r.tensor, r.axis)].append(r)
    for (name, axis), refs in by_tensor.items():
        roots = {e.find(r.space) for r in refs}
        users = e.weight_users.get(name, set())
        consumers = {n.name for n in tensors[name].outputs} if name in tensors else set()
        why = None
        # The same positions claimed by different channels: a weight shared across spaces.
        # Intervals sorted by start; an overlap with a different (space, offset) is sharing.
        spans = sorted((r.tensor_start, r.tensor_start + r.length,
                        (e.find(r.space), r.space_start - r.tensor_start)) for r in refs)
        reach, reach_key = -1, None  # the furthest end so far, and whose it is
        for start, end, key in spans:
            if start < reach and key != reach_key:
                why = (f"weight {name} (axis {axis}) is shared by layers in different "
                       f"spaces: " + ", ".join(sorted(u.lstrip("!") for u in users)))
                break
            if end > reach:
                reach, reach_key = end, key
        outside = sorted(c for c in consumers if c not in users)
        if any(u.startswith("!") for u in users):
            outside += sorted(u[1:] for u in users if u.startswith("!"))
        if outside:
            why = f"weight {name} is also read by {', '.join(outside)}"
        if name in e.graph_output_names:
            why = f"weight {name} is a graph output"
        if why:
            for s in roots:
                e.block_space(s, why)


def _propagate(graph: gs.Graph) -> tuple[Engine, list[str]]:
    e = Engine(graph)
    _seed_inputs(e, graph)
    for node in graph.nodes:
        if node.op in CONTROL_FLOW_OPS:
            continue
        apply_rule(e, node)
    # After propagation, so that the layouts of what the subgraphs read are known.
    notes = _block_control_flow(e, graph)
    for t in graph.outputs:
        e.block(e.layout(t), f"reaches graph output '{t.name}'")
    _check_weights(e, graph)
    return e, notes


def _build_spaces(e: Engine, ids: dict[int, str]) -> tuple[Space, ...]:
    refs_by_root: dict[int, list[ChannelRef]] = defaultdict(list)
    for r in e.refs:
        root = e.find(r.space)
        refs_by_root[root].append(ChannelRef(
            tensor=r.tensor, axis=r.axis, role=r.role,  # type: ignore[arg-type]
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


def _branches(graph: gs.Graph, e: Engine, weight_layers: set[str]) -> tuple[Branch, ...]:
    """Residual branches: for each Add of two activations, the nodes between its immediate
    dominator (the fork) and the Add on the side that holds more layers. A branch's
    ``layers`` are its weight layers (``weight_layers``: an attention's activation MatMuls
    are not among them)."""
    g = nx.DiGraph()
    src = "\0source"
    g.add_node(src)
    producer: dict[str, gs.Node] = {}
    for node in graph.nodes:
        g.add_node(node.name)
        for t in node.outputs:
            producer[t.name] = node
    for node in graph.nodes:
        has_var = False
        for t in node.inputs:
            p = producer.get(t.name)
            if p is not None:
                g.add_edge(p.name, node.name)
                has_var = True
        if not has_var:
            g.add_edge(src, node.name)
    idom = nx.immediate_dominators(g, src)
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
        if fork is None or fork == src:
            continue
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
                stack.extend(p for p in g.predecessors(n))
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
        reason = None
        for n in nodes:
            bn = by_name[n]
            for out in bn.outputs:
                if out.name in outputs:
                    reason = f"{n} ({bn.op}): output {out.name} is a graph output"
                for c in out.outputs:
                    if c.name not in members and c.name != node.name:
                        reason = f"{n} ({bn.op}): output {out.name} is also read by {c.name}"
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
                            tuple(members)))
    return groups


def _weight_groups(layers: Sequence[Layer], kinds: Iterable[str],
                   shared: dict[str, str]) -> list[Group]:
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
                                reason, (Member(la.weight, "out", (None, (ci,), (m,), (k,))),)))
            if "filter2d" in kinds:
                for ni in range(n):
                    for ci in range(c):
                        groups.append(Group(
                            f"{la.node}/filter2d/{ni},{ci}", "filter2d", None, None, ok, reason,
                            (Member(la.weight, "out", ((ni,), (ci,), None, None)),)))
        if kind == "fc" and "neuron" in kinds:
            for role, axis in (("out", la.out_axis), ("in", la.in_axis)):
                for j in range(shape[axis]):
                    sl: list[tuple[int, ...] | None] = [None, None]
                    sl[axis] = (j,)
                    groups.append(Group(
                        f"{la.node}/neuron/{role}/{j}", "neuron", None, j, ok, reason,
                        (Member(la.weight, role, tuple(sl)),)))  # type: ignore[arg-type]
    return groups


def analyze(model: onnx.ModelProto, kinds: Iterable[str] = DEFAULT_KINDS, name: str = "",
            prepared: bool = False) -> Analysis:
    """Analyse ``model`` and list groups of ``kinds``; the result speaks of ``model`` (see
    :meth:`WorkingCopy.to_input`).

    ``prepared`` says that ``model`` comes from :func:`prepare` (its folding is skipped
    unless its batch is symbolic)."""
    kinds_t = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds_t if k not in KINDS]
    if bad:
        raise InputError(f"unknown group kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    if prepared and not symbolic_batch(model) and not _name_nodes(model)[1]:
        return analyze_graph(to_graph(model), kinds_t, name or model.graph.name)
    wc = _prepare(model)
    return wc.to_input(analyze_graph(wc.graph, kinds_t, name or model.graph.name))


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
    e, notes = _propagate(graph)
    ids = _space_ids(e)
    spaces = _build_spaces(e, ids)
    tensors = tensor_map(graph)
    shapes = {n: tuple(int(d) for d in t.shape) for n, t in tensors.items()
              if isinstance(t, gs.Constant)}
    layers = _layers(graph, e, ids)
    branches = _branches(graph, e, {la.node for la in layers})
    groups: list[Group] = []
    if "channel" in kinds:
        groups += _channel_groups(spaces, shapes)
    if "depth" in kinds:
        groups += _depth_groups(branches, graph)
    shared: dict[str, str] = {}
    for la in layers:
        users = tensors[la.weight].outputs
        if len(users) > 1:
            names = ", ".join(u.name for u in users)
            shared[la.weight] = f"weight {la.weight} is shared by {names}"
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


def format_table(a: Analysis) -> str:
    spaces = {s.id: s for s in a.spaces}

    def desc(sid: str | None) -> str:
        if sid is None:
            return "-"
        s = spaces[sid]
        return f"{sid} ({s.channels}) {'prunable' if s.prunable else 'blocked'}"

    rows = [("layer", "op", "weight", "out space", "in space", "params", "MACs")]
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
        f"model {a.model}: {len(a.layers)} layers, params {_fmt_int(a.params)} "
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
            lines.append(f"  {s.id} ({s.channels} ch): {s.reason}")
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
                lines.append(f"  {b.add}: {b.reason}")
    counts: dict[str, int] = defaultdict(int)
    for g in a.groups:
        counts[g.kind] += 1
    lines.append("groups: " + ", ".join(f"{k} {counts[k]}" for k in a.kinds))
    for n in a.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)
