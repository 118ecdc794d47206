"""CleanupPass: remove dead nodes and unused initializers, then sort topologically.

A node is dead when none of its outputs reaches a graph output; an initializer is unused
when no remaining node reads it. Graph inputs are kept even when unused (the model keeps
its signature).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnx_ssl.io import tensor_map
from onnx_ssl.pipeline import PassBase, PassResult, Report, unfinished_reason


@dataclass(frozen=True)
class CleanupReport(Report):
    nodes_removed: int = 0
    initializers_removed: int = 0


def _count(graph: gs.Graph) -> tuple[int, int]:
    consts = {n for n, t in tensor_map(graph).items() if isinstance(t, gs.Constant)}
    return len(graph.nodes), len(consts)


class CleanupPass(PassBase[CleanupReport]):
    """Ensures what :func:`onnx_ssl.pipeline.finish` needs: nodes sorted, none dead."""

    name = "cleanup"

    def ensures(self, graph: gs.Graph) -> None:
        why = unfinished_reason(graph)
        if why is not None:
            raise ValueError(f"the graph is not clean and sorted: {why}")

    def call(self, graph: gs.Graph) -> PassResult[CleanupReport]:
        if unfinished_reason(graph) is None:  # already clean and sorted: nothing to copy
            return PassResult(graph, CleanupReport())
        nodes, consts = _count(graph)
        graph = graph.copy()
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        nodes2, consts2 = _count(graph)
        return PassResult(graph, CleanupReport(nodes - nodes2, consts - consts2))
