"""The coupled-group analysis of an ONNX graph.

``prepare`` makes the *working copy* the analysis and the prune passes work on: every node
gets a unique name, a symbolic leading (batch) input dim is bound to ``BOUND_BATCH`` (a model
that does not run at another batch size is refused: its batch is not really dynamic), the
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

from .channels import Engine, Layout, Seg, const_value, static_shape
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
from .names import fresh_name
from .reasons import Reason, ReasonCode
from .rules import RULES, apply_rule, layer_weight
from .runtime import DYNAMIC_BATCH, fails_at_batch, folding_runtime
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
# vector (or of a 0-D one, position 0) is `factor` x the batch size.
BatchSlots = Mapping[tuple[str, int], tuple[tuple[int, int], ...]]
# Ops that the write-back of an affine per-sample constant uses (Range) exist from opset 11.
RANGE_OPSET = 11


@dataclass(frozen=True, eq=False)
class BatchTile:
    """A folded constant that is one block of its first ``rows`` rows (axis 0) once per
    sample: the same block each time (``step`` None: a class token or an attention mask
    expanded to the batch), or, for an integer tensor, sample i's block is sample 0's plus
    i x ``step`` (an index computed from the batch, like ``Range(batch)[:, None] * T +
    Range(T)`` that gathers each sample's rows of a flattened mask)."""

    rows: int
    step: np.ndarray | None = None


# (node, input index) -> that constant's per-sample block (see BatchTile).
BatchTiles = Mapping[tuple[str, int], BatchTile]


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
    ``outputs``: declared output shapes to restore; ``slots`` and ``tiles``: the folded
    constants that depend on the batch (shape vectors and sizes computed from it; tensors
    repeated once per sample, or growing by a constant step per sample: see BatchTile).
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
    tiles: BatchTiles = dataclasses.field(default_factory=dict)

    # --- back to the input model ---------------------------------------------------------
    def unbind(self, graph: gs.Graph) -> gs.Graph:
        """Make ``graph`` (a rewrite of the working copy; changed in place) batch-agnostic
        again: graph inputs and outputs get the input's declarations back, and every folded
        constant that depends on the batch is written without it (a Reshape target with one
        batch entry gets -1 there; others are computed from the input's batch size at run
        time: a Tile of the per-sample block, or block + Range(batch) x step). Inner shapes
        are forgotten (shape inference recomputes them)."""
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
        todo: list[tuple[str, int, tuple[tuple[int, int], ...] | BatchTile]] = [
            *((name, i, pos) for (name, i), pos in self.slots.items()),
            *((name, i, tile) for (name, i), tile in self.tiles.items())]
        for name, i, how in todo:
            node = nodes.get(name)
            if node is None or i >= len(node.inputs) or not isinstance(node.inputs[i],
                                                                       gs.Constant):
                continue  # removed, or no longer a folded constant
            v = np.asarray(node.inputs[i].values).copy()
            if (node.op == "Reshape" and i == 1 and isinstance(how, tuple) and len(how) == 1
                    and not np.any(v == -1)):
                v[how[0][0]] = -1
                node.inputs[i] = gs.Constant(unique_name(graph, f"{name}.shape"), v)
                continue
            made: list[gs.Node] = []
            if size is None:  # first in the graph: every later write-back reads it
                first: list[gs.Node] = []
                size = self._batch_size(graph, first)
                graph.nodes[0:0] = first
            if isinstance(how, BatchTile) and how.step is not None:
                node.inputs[i] = self._batch_steps(graph, name, v[:how.rows], how.step, size,
                                                   made)
            elif isinstance(how, BatchTile):
                node.inputs[i] = self._batch_tile(graph, name, v[:how.rows], size, made)
            else:
                node.inputs[i] = self._batch_vector(graph, name, v, how, size, made)
            # In graph order: right before the node (they read only the graph input).
            at = next(k for k, n in enumerate(graph.nodes) if n is node)
            graph.nodes[at:at] = made
        clear_inner_shapes(graph)
        return graph

    @staticmethod
    def _batch_tile(graph: gs.Graph, name: str, block: np.ndarray, size: gs.Tensor,
                    made: list[gs.Node]) -> gs.Tensor:
        """``Tile(block, [batch, 1, ...])``: ``block`` once per sample along axis 0; the
        nodes that compute it go to ``made``."""
        ones = gs.Constant(unique_name(graph, f"{name}.tile_ones"),
                           np.ones(block.ndim - 1, dtype=np.int64))
        reps = gs.Variable(unique_name(graph, f"{name}_tile_repeats"), dtype=np.int64)
        made.append(gs.Node("Concat", name=unique_name(graph, f"{name}_tile_repeats"),
                            attrs={"axis": 0}, inputs=[size, ones], outputs=[reps]))
        out = gs.Variable(unique_name(graph, f"{name}_batch_tile"), dtype=block.dtype)
        made.append(gs.Node("Tile", name=unique_name(graph, f"{name}_batch_tile"),
                            inputs=[gs.Constant(unique_name(graph, f"{name}.per_sample"),
                                                block), reps], outputs=[out]))
        return out

    @staticmethod
    def _batch_steps(graph: gs.Graph, name: str, block: np.ndarray, step: np.ndarray,
                     size: gs.Tensor, made: list[gs.Node]) -> gs.Tensor:
        """``block + i x step`` for sample i = 0 .. batch-1, stacked along axis 0 (``Range``
        over the batch, reshaped to broadcast, times ``step``, plus ``block``); the nodes
        that compute it go to ``made``."""
        if step.shape != block.shape:
            raise OnnxSslError(f"{name}: the per-sample block of a constant computed from the "
                               f"batch size was reshaped by the rewrite ({block.shape}, its "
                               f"step {step.shape}); it cannot be written back")
        used = ({n.name for n in made} | {t.name for n in made for t in n.outputs}
                | set(tensor_map(graph)) | {n.name for n in graph.nodes})

        def fresh(base: str) -> str:  # unique also among what is not in the graph yet
            return fresh_name(used, base, start=1)

        def node(op: str, base: str, inputs: list[gs.Tensor], dtype: Any = np.int64,
                 **attrs: Any) -> gs.Tensor:
            out = gs.Variable(fresh(f"{name}_{base}"), dtype=dtype)
            made.append(gs.Node(op, name=fresh(f"{name}_{base}"), attrs=attrs, inputs=inputs,
                                outputs=[out]))
            return out

        def const(base: str, v: np.ndarray) -> gs.Constant:
            return gs.Constant(fresh(f"{name}.{base}"), v)

        one_row = block.shape[0] == 1  # one row per sample: the samples are that axis
        ndim = block.ndim if one_row else block.ndim + 1
        n = node("Reshape", "batch_scalar",
                 [size, const("scalar_shape", np.zeros(0, np.int64))])
        i = node("Range", "sample_index", [const("zero", np.array(0, np.int64)), n,
                                           const("one", np.array(1, np.int64))])
        i = node("Reshape", "sample_column", [i, const("column_shape", np.array(
            [-1, *(1,) * (ndim - 1)], np.int64))])
        per = block if one_row else block[None]
        grown = node("Mul", "batch_step", [i, const("step", (step if one_row else step[None])
                                                    .astype(np.int64))])
        out = node("Add", "batch_steps", [grown, const("per_sample", per.astype(np.int64))])
        if not one_row:
            out = node("Reshape", "batch_rows", [out, const("rows_shape", np.array(
                [-1, *block.shape[1:]], np.int64))])
        if block.dtype == np.int64:
            return out
        return node("Cast", "batch_steps_cast", [out], dtype=block.dtype,
                    to=_INT_TYPES[block.dtype.type])

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
        """``v`` with entry ``p`` replaced by ``factor`` x the batch size, for each pair (a
        0-D ``v``: its one entry); the nodes that compute it go to ``made``."""
        used = ({n.name for n in made} | {t.name for n in made for t in n.outputs}
                | set(tensor_map(graph)) | {n.name for n in graph.nodes})
        scalar = v.ndim == 0
        v = v.reshape(-1)

        def fresh(base: str) -> str:  # unique also among what is not in the graph yet
            return fresh_name(used, base, start=1)

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
        if scalar:
            vec, out = out, gs.Variable(fresh(f"{name}_batch_scalar"), dtype=np.int64)
            made.append(gs.Node("Reshape", name=fresh(f"{name}_batch_scalar"),
                                inputs=[vec, gs.Constant(fresh(f"{name}.scalar_shape"),
                                                         np.zeros(0, np.int64))],
                                outputs=[out]))
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
        of them), traced by folding again with the input's elements numbered (a chain of
        transposes, reshapes, slices and casts of one tensor: by numpy, at any size). A
        layer whose weight is such a permutation of one input tensor names that tensor, with
        its shape and axes. One input tensor reached through several copies is listed once
        per distinct slice. A member that no slice of an input tensor stands for blocks its
        group (and its channel space), with the reason.
        """
        mapped: list[tuple[Group, tuple[Member, ...], Reason | None]] = []
        blocked: dict[str, Reason] = {}
        traces = self._traces(({self.copies.get(m.tensor, m.tensor) for g in a.groups
                                for m in g.members}
                               | {self.copies.get(la.weight, la.weight) for la in a.layers})
                              - self.allowed)
        permutations = frozenset(n for n, t in traces.items() if _is_permutation(t))
        transposes = {n: p for n in permutations
                      if (p := _transpose_axes(traces[n])) is not None}
        for g in a.groups:
            members: dict[tuple[str, Slice], Member] = {}
            why: Reason | None = None
            for m in g.members:
                got, w = self._member_in_input(m, traces, permutations, transposes)
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
        layers = tuple(self._layer_in_input(dataclasses.replace(
            la, weight=self.copies.get(la.weight, la.weight),
            bias=None if la.bias is None else self.copies.get(la.bias, la.bias)), traces,
            permutations) for la in a.layers)
        return dataclasses.replace(a, spaces=spaces, groups=tuple(groups), layers=layers,
                                   notes=(*a.notes, *self.notes),
                                   macs_per_sample=bool(self.batch),
                                   key=None)  # it describes the input, no graph of ours

    def _layer_in_input(self, la: Layer, traces: Mapping[str, Any],
                        permutations: frozenset[str]) -> Layer:
        """``la`` with a weight folded from one input tensor by moving its elements (the
        Transpose of a linear layer's weight, exported unfolded) named as that tensor, with
        its shape and axes; ``la`` itself when its weight is no such tensor."""
        if la.weight in self.allowed or la.weight not in permutations:
            return la
        codes, ((src, offset, shape),) = traces[la.weight]
        axes = [_source_axis(codes - offset, a, shape) for a in (la.out_axis, la.in_axis)]
        if axes[0] is None or axes[1] is None:
            return la
        return dataclasses.replace(la, weight=src, weight_shape=shape, out_axis=axes[0],
                                   in_axis=axes[1])

    def _member_in_input(self, m: Member, traces: Mapping[str, Any],
                         permutations: frozenset[str],
                         transposes: Mapping[str, tuple[int, ...]]
                         ) -> tuple[list[Member], Reason | None]:
        name = self.copies.get(m.tensor, m.tensor)
        if name in self.allowed:
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

    def _traces(self, names: set[str]) -> dict[str, Any]:
        """The folded float constants among ``names`` -> (for each element, the number of the
        input element it holds; the numbered sources (name, first number, shape)), or why it
        cannot be traced (see :func:`_trace_folded`)."""
        tensors = tensor_map(self.graph)
        todo = {n: np.asarray(tensors[n].values) for n in sorted(names)
                if isinstance(tensors.get(n), gs.Constant)}
        todo = {n: v for n, v in todo.items() if v.dtype.type in FLOAT_TYPES}
        return _trace_folded(self.prefold, self.meta, todo) if todo else {}


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
        new = fresh_name(taken, f"{node.name or node.op_type}_{i}")
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


def bind_batch_to(model: onnx.ModelProto, size: int | None) -> onnx.ModelProto:
    """``model`` with its symbolic batch dim bound to ``size`` (the ``--bind-batch`` option):
    for an export whose batch is declared dynamic but baked into its shapes, analysed and
    pruned as the static model it is. ``model`` itself when ``size`` is None or its batch is
    static."""
    if size is None:
        return model
    if size < 1:
        raise InputError(f"--bind-batch must be >= 1, got {size}")
    return bind_batch(model, size) if symbolic_batch(model) else model


def _batch_slots(a: gs.Graph, b: gs.Graph, affine: bool = True
                 ) -> tuple[BatchSlots, BatchTiles, str | None]:
    """The folded constants of ``a`` (prepared at BOUND_BATCH) that differ in ``b`` (at
    PROBE_BATCH): shape vectors (and sizes) with entries that are multiples of the batch,
    tensors that repeat one block of rows per sample, and (with ``affine``) integer tensors
    whose block grows by a constant step per sample; or why they cannot be written back
    batch-agnostic."""
    nb = {n.name: n for n in b.nodes}
    if set(nb) != {n.name for n in a.nodes}:
        return {}, {}, "constant folding leaves different nodes at different batch sizes"
    slots: dict[tuple[str, int], tuple[tuple[int, int], ...]] = {}
    tiles: dict[tuple[str, int], BatchTile] = {}
    for n in a.nodes:
        o = nb[n.name]
        if len(o.inputs) != len(n.inputs):
            return {}, {}, f"{n.name} ({n.op}): its inputs differ at different batch sizes"
        for i, (x, y) in enumerate(zip(n.inputs, o.inputs, strict=True)):
            cx, cy = isinstance(x, gs.Constant), isinstance(y, gs.Constant)
            if cx != cy:
                return {}, {}, (f"{n.name} ({n.op}): input {i} is constant at some batch "
                                f"sizes only")
            if not cx:
                continue
            vx, vy = np.asarray(x.values), np.asarray(y.values)
            if vx.shape == vy.shape and np.array_equal(vx, vy):
                continue
            where = f"{n.name} ({n.op}): input {i} is computed from the batch size"
            tile = _per_sample_rows(vx, vy, affine)
            if tile is not None:
                tiles[(n.name, i)] = tile
                continue
            if vx.ndim > 1 or vx.shape != vy.shape or vx.dtype.type not in _INT_TYPES:
                grows = ("nor an integer tensor growing by a constant step per sample"
                         if affine else f"(an index growing per sample needs opset >= "
                                        f"{RANGE_OPSET})")
                return {}, {}, (f"{where}, and it is neither a shape vector nor repeated per "
                                f"sample {grows}")
            pos = []
            fx, fy = vx.reshape(-1), vy.reshape(-1)
            for d in np.flatnonzero(fx != fy):
                k = int(fx[d]) // BOUND_BATCH
                if k < 1 or k * BOUND_BATCH != int(fx[d]) or k * PROBE_BATCH != int(fy[d]):
                    return {}, {}, f"{where}, not as a multiple of it"
                pos.append((int(d), k))
            slots[(n.name, i)] = tuple(pos)
    return slots, tiles, None


def _per_sample_rows(vx: np.ndarray, vy: np.ndarray, affine: bool = True
                     ) -> BatchTile | None:
    """How ``vx`` (at BOUND_BATCH) and ``vy`` (at PROBE_BATCH) are one block of ``r`` rows
    per sample along axis 0: repeated (a class token or a mask expanded to the batch), or,
    with ``affine`` and integers, sample i's block = sample 0's + i x a constant step (an
    index into a flattened per-sample tensor); None when neither."""
    if vx.ndim < 1 or vy.ndim != vx.ndim or vx.shape[1:] != vy.shape[1:]:
        return None
    rows = vx.shape[0] // BOUND_BATCH
    if rows < 1 or rows * BOUND_BATCH != vx.shape[0] or rows * PROBE_BATCH != vy.shape[0]:
        return None
    block = vx[:rows]
    nan = vx.dtype.kind in "fc"
    reps = (1,) * (vx.ndim - 1)
    if (np.array_equal(vx, np.tile(block, (BOUND_BATCH, *reps)), equal_nan=nan)
            and np.array_equal(vy, np.tile(block, (PROBE_BATCH, *reps)), equal_nan=nan)):
        return BatchTile(rows)
    if not affine or vx.dtype.kind not in "iu" or PROBE_BATCH < 2:
        return None
    # Exact in int64 (the values are indices or sizes); the progression is checked over all
    # PROBE_BATCH samples, so the step is constant at least up to there.
    x, y = vx.astype(np.int64), vy.astype(np.int64)
    step = y[rows:2 * rows] - y[:rows]

    def grows(v: np.ndarray, n: int) -> bool:
        i = np.arange(n, dtype=np.int64).reshape(n, *(1,) * v.ndim)
        return np.array_equal(v.reshape(n, *block.shape), x[:rows][None] + i * step[None])

    if not (grows(x, BOUND_BATCH) and grows(y, PROBE_BATCH)):
        return None
    return BatchTile(rows, step)


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
    _check_batch_is_dynamic(named, shown)
    slots: BatchSlots = {}
    tiles: BatchTiles = {}
    try:
        st = _prepare_at(named, meta, BOUND_BATCH, keep)
        probe = _prepare_at(named, meta, PROBE_BATCH, keep=False)
        slots, tiles, why = _batch_slots(st.graph, probe.graph,
                                         meta.opset() >= RANGE_OPSET)
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
                       batch, outputs, slots, (note,), tiles)


def _check_batch_is_dynamic(model: onnx.ModelProto, shown: str) -> None:
    """InputError (one line) when ``model``, whose inputs ``shown`` have a symbolic batch dim,
    does not run at batch ``DYNAMIC_BATCH``: an export whose batch is declared dynamic but is
    baked into its shapes, which no analysis at another batch size, and no pruned model that
    keeps the batch symbolic, can be faithful to."""
    why = fails_at_batch(model, DYNAMIC_BATCH)
    if why is None:
        return
    runs = [b for b in (BOUND_BATCH, PROBE_BATCH) if fails_at_batch(model, b) is None]
    fix = (f"it runs at batch {runs[0]}: rerun with --bind-batch {runs[0]}" if runs else
           "rerun with --bind-batch N, N the batch it was exported at,")
    raise InputError(
        f"the input model does not run at batch {DYNAMIC_BATCH} ({why}), so the batch dim of "
        f"input(s) {shown} is declared dynamic but is not; {fix} to bind it, or re-export the "
        f"model with a dynamic batch axis")


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
            copy = gs.Constant(fresh_name(names, t.name, sep=".", start=1, numbered=True),
                               values.copy())
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


def _check_weights(e: Engine, graph: gs.Graph) -> None:
    """Block spaces whose weights are shared with layers elsewhere or read by other ops."""
    tensors = tensor_map(graph)
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
        e.block(e.layout(t), Reason(ReasonCode.GRAPH_OUTPUT, f"reaches graph output '{t.name}'",
                                    tensor=t.name))
    _check_weights(e, graph)
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
