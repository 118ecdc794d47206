"""Preparation: the working copy that the analysis and the prune passes work on.

``prepare`` makes it from a model: every node gets a unique name (:func:`name_nodes`), a
symbolic leading (batch) input dim is bound to ``BOUND_BATCH`` (a model that does not run at
another batch size is refused: its batch is not really dynamic), the shape arithmetic that
static shapes make constant is folded (and Constant nodes become initializers), each reader
of a merged constant gets its own copy (:func:`unshare_constants`), and shapes are inferred.
The model is imported once (proto -> graph); a second batch size (the probe that tells which
folded constants depend on the batch) is a copy of that graph with other shapes, and each
round of folding infers shapes on the graph's skeleton instead of a round trip through
protobuf. :meth:`WorkingCopy.unbind` makes a rewrite batch-agnostic again.

The analysis of the working copy (:mod:`onnx_ssl.analysis`) maps its result back onto the
input model (:func:`onnx_ssl.analysis.to_input`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import InputError, OnnxSslError, UnsupportedModelError, one_line
from .graphutil import clear_inner_shapes, unique_name
from .io import (
    CONTROL_FLOW_OPS,
    ModelMeta,
    export_skeleton,
    fold_trivial_constants,
    from_graph,
    infer_shapes,
    shaped_graph,
    tensor_map,
    to_graph,
    write_shapes,
)
from .names import fresh_name
from .rules import RULES
from .runtime import DYNAMIC_BATCH, fails_at_batch, folding_runtime

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



_INT_TYPES = {np.int64: onnx.TensorProto.INT64, np.int32: onnx.TensorProto.INT32,
              np.int16: onnx.TensorProto.INT16, np.int8: onnx.TensorProto.INT8,
              np.uint64: onnx.TensorProto.UINT64, np.uint32: onnx.TensorProto.UINT32,
              np.uint16: onnx.TensorProto.UINT16, np.uint8: onnx.TensorProto.UINT8}


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """The working copy of ``model`` (see :class:`WorkingCopy`), with the input's symbolic
    batch dim restored: unique node names, constant shape arithmetic and Constant-node
    weights folded, each reader of a merged constant with its own copy
    (:func:`unshare_constants`), shapes inferred.

    The result computes the same function as ``model`` for the model's input shapes; its
    initializers are the tensors that ``analyze(result, prepared=True)`` names.
    """
    wc = _prepare(model)
    if wc.batch:
        return infer_shapes(from_graph(wc.unbind(wc.graph.copy()), wc.meta), strict=False)
    if not wc.folded and not wc.copies:  # the graph is the input's: so is the model
        return infer_shapes(wc.prefold, strict=False)
    return infer_shapes(from_graph(wc.graph, wc.meta), strict=False, copy=False)


def working_copy(model: onnx.ModelProto) -> WorkingCopy:
    """The working copy of ``model`` that the prune passes rewrite (see :class:`WorkingCopy`);
    its ``unbind`` makes a rewrite batch-agnostic like the input. Its ``model`` is None: the
    passes need only the graph, and the proto would hold every weight once more."""
    return _prepare(model)



@dataclass(frozen=True, eq=False)
class WorkingCopy:
    """The model the analysis and the prune passes work on, and how it maps back to the input.

    ``graph``: the prepared graph (see :func:`prepare`) with a symbolic batch bound to
    ``BOUND_BATCH``; ``model`` is None (kept for callers that read it: :func:`prepare`
    exports the graph).
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
    # Whether preparation changed the graph beyond the input's (folded or unshared).
    folded: bool = True
    # The input with its nodes uniquely named (see name_nodes): what ONNX Runtime runs.
    named: onnx.ModelProto | None = None

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


def _foldable(graph: gs.Graph) -> bool:
    """Whether any node computes from constants alone (or reads only a shape)."""
    for n in graph.nodes:
        if n.op in ("Constant", "Shape", "Size") or all(
                isinstance(t, gs.Constant) or not t.name for t in n.inputs):
            return True
    return False


def _reinfer(graph: gs.Graph) -> None:
    """Infer the shapes of ``graph`` again, in place (after a round of folding): its
    skeleton goes through shape inference (no weight is exported), and the types and shapes
    inferred go back to its tensors."""
    write_shapes(graph, infer_shapes(export_skeleton(graph), strict=False, copy=False))


def _fold(graph: gs.Graph) -> gs.Graph:
    """Fold constant shape arithmetic in ``graph`` (in place, to a fixpoint, inferring shapes
    anew after each round); ``graph`` has its shapes inferred already."""
    if not _foldable(graph):
        return graph
    _shape_ranges_as_slices(graph)
    has_control_flow = any(n.op in CONTROL_FLOW_OPS for n in graph.nodes)
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
        _canonical_dtypes(graph)
        _reinfer(graph)
        # Shapes inferred anew may make more arithmetic constant; stop when nothing is left.
        if len(graph.nodes) == before or not _foldable(graph):
            break
    return graph


def _canonical_dtypes(graph: gs.Graph) -> None:
    """Folded constants in numpy's canonical types (ONNX Runtime hands int64 back as
    ``longlong``, which compares unequal to ``int64`` by type; an export and import made
    them canonical before folding stopped going through protobuf)."""
    for t in tensor_map(graph).values():
        if isinstance(t, gs.Constant):
            dt = np.dtype(t.dtype)
            if dt.type is not np.dtype(dt.str).type:
                t.values = np.asarray(t.values).astype(np.dtype(dt.str))


def fold_model(m: onnx.ModelProto) -> gs.Graph:
    """The graph of ``m`` with its constant shape arithmetic folded and its shapes inferred
    (see :func:`_fold`)."""
    return _fold(shaped_graph(m))


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
    graph: gs.Graph
    copies: dict[str, str]
    prefold: onnx.ModelProto
    folded: bool


def _prepare_at(pre: onnx.ModelProto, batch: int | None, graph: gs.Graph | None = None
                ) -> _Stage:
    """The working copy of ``pre`` (named, trivial constants folded) with its batch bound to
    ``batch`` (None: as it is). ``graph``: the graph of ``pre`` with its shapes, imported
    already (it is bound and folded in place); None imports ``pre`` here."""
    bound = bind_batch(pre, batch) if batch is not None else pre
    if graph is None:
        graph = shaped_graph(bound)
    elif batch is not None:
        _bind(graph, bound)
    folded = _foldable(graph)  # _fold changes nothing in a graph that is not foldable
    graph = _fold(graph)
    copies = unshare_constants(graph)
    return _Stage(graph, copies, bound, folded)


def _bind(graph: gs.Graph, bound: onnx.ModelProto) -> None:
    """Give ``graph`` (the graph of the input, imported once) the shapes of ``bound`` (the
    input's proto with its batch bound, see :func:`bind_batch`), inferred on the proto
    rather than by a second import."""
    io_names = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for name, t in tensor_map(graph).items():  # bind_batch forgot the value_info too
        if isinstance(t, gs.Variable) and name not in io_names:
            t.dtype, t.shape, t.type = None, None, "tensor"
    write_shapes(graph, infer_shapes(bound, strict=False, copy=False), inputs=True)


def _prepare(model: onnx.ModelProto) -> WorkingCopy:
    meta = ModelMeta.of(model)
    allowed = frozenset({t.name for t in model.graph.initializer}
                        | {o for n in model.graph.node if n.op_type == "Constant"
                           for o in n.output})
    named, renamed = _name_nodes(model)
    batch = symbolic_batch(named)
    pre = fold_trivial_constants(named)
    if not batch:
        st = _prepare_at(pre, None)
        return WorkingCopy(None, st.graph, meta, renamed, st.copies, allowed, st.prefold,
                           folded=st.folded, named=named)
    shown = ", ".join(f"'{n}'" for n in batch)
    _check_batch_is_dynamic(named, shown)
    slots: BatchSlots = {}
    tiles: BatchTiles = {}
    try:
        # One import: the graph at the probe batch is a copy with other shapes (each gets
        # its shapes from inference on the proto at its batch, see _bind).
        base = to_graph(pre)
        st = _prepare_at(pre, BOUND_BATCH, base.copy())
        probe = _prepare_at(pre, PROBE_BATCH, base)
        slots, tiles, why = _batch_slots(st.graph, probe.graph,
                                         meta.opset() >= RANGE_OPSET)
    except OnnxSslError as e:
        why = str(e)
    if why is not None:
        st = _prepare_at(pre, None)
        note = (f"the batch dim of input(s) {shown} stays symbolic ({why}); shapes that "
                f"depend on it are not static, and neither are the MACs")
        return WorkingCopy(None, st.graph, meta, renamed, st.copies, allowed, st.prefold,
                           notes=(note,), folded=st.folded, named=named)
    outputs = {o.name: _dims(o) for o in named.graph.output
               if len(o.type.tensor_type.shape.dim)
               and not o.type.tensor_type.shape.dim[0].HasField("dim_value")}
    note = (f"the batch dim of input(s) {shown} is symbolic: the analysis binds it to "
            f"{BOUND_BATCH} (MACs are per sample); pruned models keep it symbolic")
    return WorkingCopy(None, st.graph, meta, renamed, st.copies, allowed, st.prefold,
                       batch, outputs, slots, (note,), tiles, folded=st.folded, named=named)


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
