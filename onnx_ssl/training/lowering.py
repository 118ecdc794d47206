"""Lower ops that onnxruntime-training 1.19.2 cannot differentiate into exact compositions.

The compositions and their math are in :mod:`onnx_ssl.decompositions`; which op has one is
said by its entry in the op table (``OpRule.training_lowering`` in
:data:`onnx_ssl.rules.RULES`). An op without one that has no gradient is refused by the
gradient builder, in one line naming the op and the node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnx_ssl.decompositions import Lowering, decompose
from onnx_ssl.pipeline import PassBase, PassResult, Report
from onnx_ssl.rules import RULES

log = logging.getLogger(__name__)

# The ops lowered for training, from the op table.
LOWERINGS: dict[str, Lowering] = {
    op: rule.training_lowering for op, rule in RULES.items()
    if rule.training_lowering is not None
}


@dataclass(frozen=True)
class LoweringReport(Report):
    """The (node name, op type) pairs replaced by their compositions."""

    lowered: tuple[tuple[str, str], ...] = ()


class LowerForTrainingPass(PassBase[LoweringReport]):
    """Replace, in place, every node in :data:`LOWERINGS` by its composition.

    The graph must carry its shapes (:func:`onnx_ssl.io.shaped_graph`): the InstanceNorm,
    LRN and GlobalMaxPool compositions read their input's rank, channel count or spatial
    size, and a node whose input lacks it is refused naming the node. Afterwards no node of
    those op types is left; running the pass again reports no change.
    """

    name = "lower-for-training"
    in_place = True

    def call(self, graph: gs.Graph) -> PassResult[LoweringReport]:
        lowered = decompose(graph, LOWERINGS)
        for node_name, op_type in lowered:
            log.debug("lowered %s (%s) for training: %s", node_name, op_type,
                      LOWERINGS[op_type].math)
        return PassResult(graph, LoweringReport(tuple(lowered)))

    def ensures(self, graph: gs.Graph) -> None:
        left = [n for n in graph.nodes if n.op in LOWERINGS and n.domain in (None, "", "ai.onnx")]
        if left:
            raise ValueError(f"node {left[0].name} ({left[0].op}) is still in the graph")
