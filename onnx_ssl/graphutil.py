"""Helpers that passes share: evaluating tensors of a graph, running one node, cleaning up."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from . import runtime
from .io import (
    ModelProto,
    clamp_ir,
    dtype_to_onnx,
    export_graph,
    export_skeleton,
    infer_shapes,
    tensor_map,
)
from .names import fresh_name


def export(graph: gs.Graph) -> ModelProto:
    return clamp_ir(export_graph(graph))


def _static(d: object) -> bool:
    return isinstance(d, (int, np.integer)) and int(d) >= 0


def dynamic_input_reason(graph: gs.Graph) -> str | None:
    """Why :func:`evaluate` cannot stand for every input size, or None when it can: every
    graph input dim is static except perhaps a leading (batch) axis."""
    for t in graph.inputs:
        shape = t.shape
        if shape is None:
            return f"graph input '{t.name}' has an unknown shape"
        if any(not _static(d) for d in list(shape)[1:]):
            return (f"graph input '{t.name}' has dynamic dims {list(shape)} beyond the batch "
                    f"axis")
    return None


def evaluate(graph: gs.Graph, names: Sequence[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Values of the named tensors on seeded random inputs (graph optimisations off).

    A dynamic leading (batch) axis of a graph input is evaluated at size 1; callers read the
    first batch entry. Other dynamic dims raise ValueError (see :func:`dynamic_input_reason`).
    """
    return evaluate_seeds(graph, names, (seed,))[0]


def session_of(graph: gs.Graph, outputs: Sequence[str], tensors: dict[str, gs.Tensor],
               batch: int | None = None) -> Any:
    """An ONNX Runtime session (graph optimisations off) of ``graph``, exported as it is
    (neither copied nor changed), whose outputs are the tensors ``outputs`` (``tensors``:
    :func:`~onnx_ssl.io.tensor_map` of the graph); ``batch`` fixes a dynamic leading dim
    of the inputs."""
    model = export(graph)
    if batch is not None:
        for vi in model.graph.input:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) and not (dims[0].HasField("dim_value") and dims[0].dim_value >= 0):
                dims[0].Clear()
                dims[0].dim_value = batch
    del model.graph.output[:]
    for n in outputs:
        o = model.graph.output.add()
        o.name = n
        o.type.tensor_type.elem_type = dtype_to_onnx(tensors[n].dtype or np.float32)
    return runtime.session(model)


def evaluate_seeds(graph: gs.Graph, names: Sequence[str], seeds: Sequence[int]
                   ) -> list[dict[str, np.ndarray]]:
    """:func:`evaluate` for each seed, in one ONNX Runtime session. The graph is exported
    as it is (neither copied nor changed); the exported model gets the named tensors as its
    outputs and a batch of 1."""
    why = dynamic_input_reason(graph)
    if why is not None:
        raise ValueError(f"cannot evaluate constants: {why}")
    tensors = tensor_map(graph)
    wanted = [n for n in dict.fromkeys(names) if not isinstance(tensors[n], gs.Constant)]
    sess = session_of(graph, wanted, tensors, batch=1)
    out = []
    for seed in seeds:
        res = runtime.run(sess, runtime.random_inputs(sess, seed), wanted)
        for n in names:
            t = tensors[n]
            if isinstance(t, gs.Constant):
                res[n] = np.asarray(t.values)
        out.append(res)
    return out


def run_node(node: gs.Node, inputs: dict[int, np.ndarray], opset: int,
             drop_from: int | None = None) -> np.ndarray:
    """Run a copy of ``node`` alone on the given inputs (by input index); constants stay.

    Inputs from index ``drop_from`` on are left out (a layer without its bias).
    """
    return run_nodes([(node, inputs)], opset, drop_from)[0]


def run_nodes(jobs: Sequence[tuple[gs.Node, dict[int, np.ndarray]]], opset: int,
              drop_from: int | None = None) -> list[np.ndarray]:
    """:func:`run_node` for each ``(node, inputs)``, all in one ONNX Runtime session (one
    session per node costs about 50 ms each; a pass that folds thousands of constants
    opens one). Each copy reads only its own inputs; constants are shared, not copied."""
    feeds: dict[str, np.ndarray] = {}
    nodes: list[gs.Node] = []
    graph_inputs: list[gs.Tensor] = []
    outs: list[gs.Variable] = []
    consts: dict[int, gs.Constant] = {}  # one initializer per constant, however many read it
    for j, (node, inputs) in enumerate(jobs):
        new_inputs: list[gs.Tensor] = []
        kept = node.inputs if drop_from is None else node.inputs[:drop_from]
        for i, t in enumerate(kept):
            if i in inputs:
                v = gs.Variable(f"n{j}.in{i}", dtype=inputs[i].dtype,
                                shape=list(inputs[i].shape))
                feeds[v.name] = inputs[i]
                new_inputs.append(v)
                graph_inputs.append(v)
            elif isinstance(t, gs.Constant):
                if id(t) not in consts:
                    consts[id(t)] = gs.Constant(f"c{len(consts)}", np.asarray(t.values))
                new_inputs.append(consts[id(t)])
            elif not t.name:
                new_inputs.append(gs.Variable.empty())
            else:
                raise ValueError(f"run_node: input {i} of {node.name} has no value")
        out = gs.Variable(f"n{j}.out", dtype=np.float32, shape=None)
        outs.append(out)
        nodes.append(gs.Node(node.op, name=f"n{j}", attrs=dict(node.attrs), inputs=new_inputs,
                             outputs=[out]))
    if not nodes:
        return []
    g = gs.Graph(nodes=nodes, inputs=graph_inputs, outputs=list(outs), opset=opset)
    sess = runtime.session(export(g))
    res = runtime.run(sess, feeds, [o.name for o in outs])
    return [res[o.name] for o in outs]


def clear_inner_shapes(graph: gs.Graph) -> None:
    """Forget inferred shapes of inner tensors (a rewrite changed them); keep graph I/O."""
    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in tensor_map(graph).values():
        if isinstance(t, gs.Variable) and t.name not in io:
            t.shape = None


def has_subgraphs(graph: gs.Graph) -> bool:
    """Does a node of ``graph`` hold a subgraph (control flow)? ``Node.subgraphs()`` without
    its generator per node."""
    graph_type = gs.Graph
    for n in graph.nodes:
        attrs = n.attrs
        if attrs:
            for v in attrs.values():
                if isinstance(v, graph_type):
                    return True
    return False


def _flat(graph: gs.Graph) -> bool:
    """No local functions and no subgraphs: what the fast paths below need (onnx-graphsurgeon
    recurses into those)."""
    return not graph.functions and not has_subgraphs(graph)


def toposort(graph: gs.Graph) -> gs.Graph:
    """``graph.toposort()`` (in place), skipped when it would not move a node: every node's
    producers come before it and the depth onnx-graphsurgeon sorts by (1 + the deepest
    producer's, 0 without one) never decreases along the list. onnx-graphsurgeon's stable
    sort keeps such a list as it is, at several times the cost of this check."""
    if not _flat(graph):
        return graph.toposort()
    level: dict[int, int] = {}
    last = 0
    for n in graph.nodes:
        d = 0
        for t in n.inputs:
            for p in t.inputs:
                lp = level.get(id(p))
                if lp is None:  # made by a later node (or by none in the list)
                    return graph.toposort()
                if lp >= d:
                    d = lp + 1
        if d < last:
            return graph.toposort()
        last = level[id(n)] = d
    return graph


def cleanup(graph: gs.Graph) -> gs.Graph:
    """``graph.cleanup(remove_unused_graph_inputs=False)`` (in place), skipped when it would
    remove nothing: every node reaches a graph output, no graph input has a producer, and
    no two tensors share a name (onnx-graphsurgeon walks tensors by name)."""
    if not _flat(graph) or any(t.inputs for t in graph.inputs):
        return graph.cleanup(remove_unused_graph_inputs=False)
    seen: dict[str, gs.Tensor] = {}
    live: set[int] = set()
    todo = list(graph.outputs)
    while todo:
        t = todo.pop()
        if not t.is_empty():
            other = seen.setdefault(t.name, t)
            if other is not t:
                return graph.cleanup(remove_unused_graph_inputs=False)
        for p in t.inputs:
            if id(p) not in live:
                live.add(id(p))
                todo.extend(p.inputs)
    if any(id(n) not in live for n in graph.nodes):
        return graph.cleanup(remove_unused_graph_inputs=False)
    return graph


def refresh_shapes(graph: gs.Graph) -> None:
    """Infer again the inner shapes a rewrite changed (in place; graph I/O keep theirs).

    The analysis needs every channel count: a pass that rewrote the graph leaves it with
    its shapes inferred, so that the next pass (or the next round of a fixpoint) does not
    block spaces for an "operand of unknown rank". A tensor that shape inference cannot
    type (an op it does not know) stays without a shape.
    """
    clear_inner_shapes(graph)
    toposort(graph)
    inferred = infer_shapes(export_skeleton(graph), strict=False)
    dims = {vi.name: vi.type.tensor_type.shape.dim for vi in inferred.graph.value_info
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    for name, t in tensor_map(graph).items():
        if isinstance(t, gs.Variable) and t.shape is None and name in dims:
            t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                       for d in dims[name]]


def _attr_key(v: object) -> object:
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_attr_key(x) for x in v)
    if isinstance(v, gs.Constant):
        return ("tensor", tuple(v.shape), str(v.dtype))
    if isinstance(v, np.ndarray):
        return ("array", v.shape, str(v.dtype), v.tobytes())
    if isinstance(v, np.generic):
        return v.item()
    return type(v).__name__  # a subgraph: the analysis blocks control flow anyway


def graph_key(graph: gs.Graph) -> int:
    """A fingerprint of what the channel analysis reads in ``graph``: its nodes (names, ops,
    attributes, input and output names, in order), its inputs and outputs, every tensor's
    shape and dtype, and the values of integer constants (shape vectors, Slice bounds,
    Gather indices). Float values are left out: the analysis never reads them (zeroing a
    group keeps its analysis). Equal keys: the analysis of one graph describes the other.
    Linear in the graph's size, and much cheaper than an analysis."""
    parts: list[object] = [graph.opset, tuple([t.name for t in graph.inputs]),
                           tuple([t.name for t in graph.outputs])]
    # One flat list, and the tensors collected on the way: a tuple per node and
    # graph.tensors() made this about 1.5x slower on a 10k-node chain.
    add = parts.append
    tensors: dict[str, gs.Tensor] = {}
    for n in graph.nodes:
        ins, outs = n.inputs, n.outputs
        parts.extend((n.name, n.op, len(ins), len(outs)))
        for t in (*ins, *outs):
            add(t.name)
            tensors.setdefault(t.name, t)
        if n.attrs:
            add(tuple([(k, _attr_key(v)) for k, v in n.attrs.items()]))
    for t in (*graph.inputs, *graph.outputs):
        tensors.setdefault(t.name, t)
    exact: dict[object, bool] = {}  # dtype -> integer or bool (np.dtype() is slow)
    for name, t in tensors.items():
        dt = t.dtype
        if isinstance(t, gs.Constant):
            if dt not in exact:
                exact[dt] = np.dtype(dt).kind in "iub"
            add((name, tuple(t.shape), dt,
                 np.asarray(t.values).tobytes() if exact[dt] else None))
        else:
            add((name, None if t.shape is None else tuple(t.shape), dt))
    return hash(tuple(parts))


def require_unique_node_names(graph: gs.Graph) -> None:
    """Raise ValueError unless every node of ``graph`` has a name of its own (an analysis
    and the passes find nodes by name; ``analysis.name_nodes`` names them)."""
    seen: set[str] = set()
    for n in graph.nodes:
        if not n.name or n.name in seen:
            raise ValueError(f"node names must be unique and non-empty: {n.op} node "
                             f"{n.name!r} is not (name the nodes first)")
        seen.add(n.name)


class _Names:
    """The names taken in one graph, and those handed out since (see :func:`fresh_names`)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.taken = set(tensor_map(graph)) | {n.name for n in graph.nodes}


_ACTIVE: list[_Names] = []


@contextlib.contextmanager
def fresh_names(graph: gs.Graph) -> Iterator[None]:
    """Within the block, :func:`unique_name` on ``graph`` looks names up in a set made once
    (and kept up to date with the names it hands out) instead of collecting every tensor of
    the graph on each call, which made a rewrite quadratic in the graph's size. Only for
    code that names everything it adds to ``graph`` through :func:`unique_name`."""
    _ACTIVE.append(_Names(graph))
    try:
        yield
    finally:
        _ACTIVE.pop()


def unique_name(graph: gs.Graph, base: str) -> str:
    active = next((a for a in reversed(_ACTIVE) if a.graph is graph), None)
    names = active.taken if active is not None else (
        set(tensor_map(graph)) | {n.name for n in graph.nodes})
    return fresh_name(names, base, start=1)  # adds it to the active set
