"""SimplifyContiguousIndexingPass: drop Slices and Gathers that select a whole axis in order,
and turn a Gather of contiguous indices into a Slice.

Exporters leave such nodes (GhostNet's ``cat([x1, x2])[:, :out_chs]`` when ``out_chs`` is
the concatenation's width), and pruning leaves more (a Gather whose indices were a
permutation-free selection that removing channels made contiguous). ONNX Runtime keeps
them: its ``EliminateSlice`` fires only on ``ends = INT64_MAX``, and a Slice or a Gather on
the channel axis is not an NCHWc op, so each one costs a copy and a pair of
``ReorderOutput``/``ReorderInput`` around it.

For ``x`` of static size ``d`` on every axis the node touches (the pass reads the shapes the
graph carries, as the pipeline leaves them after shape inference; a node on an axis of
unknown size is left alone, except a Slice from 0 to ``INT64_MAX``):

- ``Slice(x, starts, ends, axes, steps)`` is the identity when, on every listed axis,
  ``clamp(start, 0, d) = 0``, ``clamp(end, 0, d) = d`` (negative values counted from ``d``)
  and ``step = 1``: every consumer reads ``x`` instead.
- ``Gather(x, i, axis=a)`` with constant 1-D ``i = [s, s+1, ..., s+k-1]`` (negative
  entries counted from ``d``) equals ``Slice(x, [s], [s+k], [a])``, and is the identity
  when ``s = 0`` and ``k = d``. A 0-D index removes the axis and is left alone.

A node whose output is a graph output is left as it is (the graph keeps its output names),
and so is a Gather of part of a graph input (the selection of the input features the
channel pass keeps, which it recognises again on a second prune).
The rewrite is exact; it changes no value. One pass reaches the fixpoint (it creates no node
that it would rewrite again), so running it twice reports no change the second time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ssl.channels import const_value
from onnx_ssl.pipeline import PassBase, PassResult, Report


@dataclass(frozen=True)
class SimplifyContiguousIndexingReport(Report):
    slices_removed: tuple[str, ...] = ()
    gathers_removed: tuple[str, ...] = ()
    gathers_to_slices: tuple[str, ...] = ()


_INT64_MAX = int(np.iinfo(np.int64).max)


def _dims(x: gs.Tensor) -> list[int | None] | None:
    if x.shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else None for d in x.shape]


def _is_identity_slice(node: gs.Node) -> bool:
    dims = _dims(node.inputs[0])
    if len(node.inputs) < 3:
        return False
    starts, ends = const_value(node.inputs[1]), const_value(node.inputs[2])
    axes = const_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    steps = const_value(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
    if starts is None or ends is None:
        return False
    if len(node.inputs) > 3 and node.inputs[3].name and axes is None:
        return False
    if len(node.inputs) > 4 and node.inputs[4].name and steps is None:
        return False
    n = len(starts)
    axes = np.arange(n) if axes is None else axes
    steps = np.ones(n, dtype=np.int64) if steps is None else steps
    if not (len(ends) == len(axes) == len(steps) == n):
        return False
    rank = len(dims) if dims is not None else None
    for s, e, a, st in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist(),
                           strict=True):
        if rank is not None:
            a = a + rank if a < 0 else a
        if not (0 <= a and (rank is None or a < rank)) or st != 1:
            return False
        d = dims[a] if dims is not None else None
        if d is None:  # unknown size: only [0, INT64_MAX) is the whole axis
            if s == 0 and e == _INT64_MAX:
                continue
            return False
        s = min(max(s + d if s < 0 else s, 0), d)
        e = min(max(e + d if e < 0 else e, 0), d)
        if s != 0 or e != d:
            return False
    return True


def _contiguous_gather(node: gs.Node) -> tuple[int, int, int, int] | None:
    """``(axis, start, stop, d)`` when ``node`` gathers ``start..stop-1`` of an axis of
    static size ``d``, else None."""
    x, idx = node.inputs[0], const_value(node.inputs[1])
    dims = _dims(x)
    if dims is None or idx is None or idx.ndim != 1 or idx.size == 0:
        return None
    rank = len(dims)
    axis = int(node.attrs.get("axis", 0))
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank or dims[axis] is None:
        return None
    d = int(dims[axis])  # type: ignore[arg-type]
    i = idx.astype(np.int64)
    i = np.where(i < 0, i + d, i)
    if int(np.min(i)) < 0 or int(np.max(i)) >= d or not np.array_equal(
            i, np.arange(i[0], i[0] + i.size)):
        return None
    return axis, int(i[0]), int(i[0]) + int(i.size), d


def _bypass(graph: gs.Graph, node: gs.Node) -> None:
    """Every consumer of ``node``'s output reads its data input instead."""
    x, y = node.inputs[0], node.outputs[0]
    for consumer in list(y.outputs):
        for k, t in enumerate(consumer.inputs):
            if t is y:
                consumer.inputs[k] = x
    node.outputs.clear()


class SimplifyContiguousIndexingPass(PassBase[SimplifyContiguousIndexingReport]):
    """Removes identity Slices and Gathers, turns contiguous Gathers into Slices."""

    name = "simplify-contiguous-indexing"

    def call(self, graph: gs.Graph) -> PassResult[SimplifyContiguousIndexingReport]:
        outputs = {t.name for t in graph.outputs}
        inputs = {t.name for t in graph.inputs}

        def candidate(n: gs.Node) -> bool:
            if n.op not in ("Slice", "Gather") or len(n.outputs) != 1 or not n.inputs:
                return False
            if n.outputs[0].name in outputs:
                return False
            if n.op == "Slice":
                return _is_identity_slice(n)
            found = _contiguous_gather(n)
            # The Gather of the input features a prune keeps stays a Gather (the channel
            # pass finds its own selection again by it: pruning twice changes nothing).
            return found is not None and (
                n.inputs[0].name not in inputs or (found[1] == 0 and found[2] == found[3]))

        if not any(candidate(n) for n in graph.nodes):
            return PassResult(graph, SimplifyContiguousIndexingReport())
        graph = graph.copy()
        slices: list[str] = []
        gathers: list[str] = []
        to_slices: list[str] = []
        for node in list(graph.nodes):
            if not candidate(node):
                continue
            if node.op == "Slice":
                _bypass(graph, node)
                slices.append(node.name)
                continue
            found = _contiguous_gather(node)
            assert found is not None
            axis, start, stop, d = found
            if start == 0 and stop == d:
                _bypass(graph, node)
                gathers.append(node.name)
                continue
            x, y = node.inputs[0], node.outputs[0]
            prefix = node.name or y.name
            consts = [gs.Constant(f"{prefix}/{k}", np.array([v], dtype=np.int64))
                      for k, v in (("starts", start), ("ends", stop), ("axes", axis))]
            node.op = "Slice"
            node.attrs = {}
            node.inputs.clear()
            node.inputs.extend([x, *consts])
            del y  # the node keeps its output tensor
            to_slices.append(node.name)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, SimplifyContiguousIndexingReport(
            tuple(slices), tuple(gathers), tuple(to_slices)))
