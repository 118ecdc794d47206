"""Helpers that passes share: evaluating tensors of a graph, running one node, cleaning up."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import runtime
from .io import clamp_ir


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


def unique_name(graph: gs.Graph, base: str) -> str:
    names = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    if base not in names:
        return base
    k = 1
    while f"{base}_{k}" in names:
        k += 1
    return f"{base}_{k}"
