"""Helpers that passes share: evaluating tensors of a graph, running one node, cleaning up."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import runtime
from .io import clamp_ir, infer_shapes

if TYPE_CHECKING:
    from .groups import Analysis


def export(graph: gs.Graph) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=True)
    return clamp_ir(model)


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
    why = dynamic_input_reason(graph)
    if why is not None:
        raise ValueError(f"cannot evaluate constants: {why}")
    g = graph.copy()
    for t in g.inputs:
        if t.shape is not None and len(t.shape) and not _static(t.shape[0]):
            t.shape = [1, *list(t.shape)[1:]]
    tensors = g.tensors()
    outs = []
    for n in names:
        t = tensors[n]
        if isinstance(t, gs.Constant):
            continue
        v = gs.Variable(t.name, dtype=t.dtype or np.float32, shape=None)
        outs.append(v)
    # Replace tensors by name so that the export picks the live tensor objects.
    g.outputs = [tensors[v.name] for v in outs]
    for t in g.outputs:
        if t.dtype is None:
            t.dtype = np.float32
    model = export(g)
    sess = runtime.session(model)
    feeds = runtime.random_inputs(sess, seed)
    res = runtime.run(sess, feeds, [t.name for t in g.outputs])
    for n in names:
        t = tensors[n]
        if isinstance(t, gs.Constant):
            res[n] = np.asarray(t.values)
    return res


def run_node(node: gs.Node, inputs: dict[int, np.ndarray], opset: int,
             drop_from: int | None = None) -> np.ndarray:
    """Run a copy of ``node`` alone on the given inputs (by input index); constants stay.

    Inputs from index ``drop_from`` on are left out (a layer without its bias).
    """
    feeds: dict[str, np.ndarray] = {}
    new_inputs: list[gs.Tensor] = []
    kept = node.inputs if drop_from is None else node.inputs[:drop_from]
    for i, t in enumerate(kept):
        if i in inputs:
            v = gs.Variable(f"in{i}", dtype=inputs[i].dtype, shape=list(inputs[i].shape))
            feeds[v.name] = inputs[i]
            new_inputs.append(v)
        elif isinstance(t, gs.Constant):
            new_inputs.append(gs.Constant(f"c{i}", np.asarray(t.values)))
        elif not t.name:
            new_inputs.append(gs.Variable.empty())
        else:
            raise ValueError(f"run_node: input {i} of {node.name} has no value")
    out = gs.Variable("out", dtype=np.float32, shape=None)
    n = gs.Node(node.op, name=node.name, attrs=dict(node.attrs), inputs=new_inputs,
                outputs=[out])
    g = gs.Graph(nodes=[n], inputs=[t for t in new_inputs if isinstance(t, gs.Variable)
                                    and t.name], outputs=[out], opset=opset)
    sess = runtime.session(export(g))
    return runtime.run(sess, feeds, ["out"])["out"]


def clear_inner_shapes(graph: gs.Graph) -> None:
    """Forget inferred shapes of inner tensors (a rewrite changed them); keep graph I/O."""
    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in io:
            t.shape = None


def refresh_shapes(graph: gs.Graph) -> None:
    """Infer again the inner shapes a rewrite changed (in place; graph I/O keep theirs).

    The analysis needs every channel count: a pass that rewrote the graph leaves it with
    its shapes inferred, so that the next pass (or the next round of a fixpoint) does not
    block spaces for an "operand of unknown rank". A tensor that shape inference cannot
    type (an op it does not know) stays without a shape.
    """
    clear_inner_shapes(graph)
    graph.toposort()
    inferred = infer_shapes(export(graph), strict=False)
    dims = {vi.name: vi.type.tensor_type.shape.dim for vi in inferred.graph.value_info
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and t.shape is None and name in dims:
            t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                       for d in dims[name]]


class SharedAnalysis:
    """The channel analysis of the graph a pipeline's passes last saw, computed once.

    A pass never changes the graph it is given, so an analysis stays valid for that very
    graph object (and for a copy of it, whose tensors have the same names). A pass that
    changed the graph hands on a new object, which the next pass analyses afresh.
    """

    def __init__(self, analysis: Analysis | None = None, graph: gs.Graph | None = None
                 ) -> None:
        self._analysis = analysis if graph is not None else None
        self._graph = graph

    def of(self, graph: gs.Graph) -> Analysis:
        if self._analysis is None or self._graph is not graph:
            from .analysis import analyze_graph  # the analysis imports this module

            self._analysis = analyze_graph(graph, kinds=())
            self._graph = graph
        return self._analysis


def bias_maps(graph: gs.Graph) -> dict[str, int]:
    """Layer node -> float elements of the constant maps added right after it.

    ``Add(layer(x), k)`` with a constant ``k`` of rank >= 2 is a per-position bias map (the
    channel pass adds one behind a padded convolution that read a removed constant channel):
    params of the layer that its weight and bias do not show.
    """
    out: dict[str, int] = {}
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or not node.outputs:
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


def unique_name(graph: gs.Graph, base: str) -> str:
    names = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    if base not in names:
        return base
    k = 1
    while f"{base}_{k}" in names:
        k += 1
    return f"{base}_{k}"
