"""ZeroSmallGroupsPass: set to zero every prunable group whose L2 norm (or RMS) is at most T.

For a coupled channel group ``g`` with members ``w_1 .. w_m`` (its ``out`` and ``in``
slices; ``stat`` members such as BatchNorm running statistics are not part of the norm and
are left alone), the pass sets every member to zero when

    ||g||_2 = sqrt(sum_j ||w_j||_2^2) <= T,

or, with ``norm="rms"``, when ``||g||_2 / sqrt(|g|) <= T`` (:mod:`onnx_ssl.norms`, the one
measure every threshold compares). Depth groups (every weight of a residual branch) are
handled the same way. This CHANGES the model's function: it is the explicit thresholding
step between SSL training (which drives groups towards zero) and the exact prune passes.
The caller reports the output difference it caused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ssl.analysis import SharedAnalysis
from onnx_ssl.graphutil import require_unique_node_names
from onnx_ssl.groups import Analysis
from onnx_ssl.io import tensor_map
from onnx_ssl.norms import Norm, group_is_zero, group_norm
from onnx_ssl.pipeline import PassBase, PassResult, Report


@dataclass(frozen=True)
class ZeroSmallGroupsReport(Report):
    groups_zeroed: int = 0
    by_kind: tuple[tuple[str, int], ...] = ()
    threshold: float = 0.0


class ZeroSmallGroupsPass(PassBase[ZeroSmallGroupsReport]):
    name = "zero-small-groups"

    def __init__(self, threshold: float, analysis: Analysis | None = None,
                 kinds: tuple[str, ...] = ("channel", "depth"), norm: Norm = "l2") -> None:
        """``analysis`` is used only for a graph it matches, with groups of ``kinds`` (see
        :class:`~onnx_ssl.analysis.SharedAnalysis`); any other graph is analysed afresh.
        ``norm`` is what ``threshold`` is compared with (:func:`onnx_ssl.norms.group_norm`)."""
        if threshold < 0:
            raise ValueError("threshold must be >= 0")
        self.threshold = threshold
        self.shared = SharedAnalysis(analysis)
        self.kinds = kinds
        self.norm = norm

    def requires(self, graph: gs.Graph) -> None:
        require_unique_node_names(graph)

    def call(self, graph: gs.Graph) -> PassResult[ZeroSmallGroupsReport]:
        analysis = self.shared.of(graph, self.kinds)  # checked against this graph
        graph = graph.copy()
        tensors = tensor_map(graph)
        values = {n: np.array(t.values) for n, t in tensors.items() if isinstance(t, gs.Constant)}
        zeroed: Counter[str] = Counter()
        dirty: set[str] = set()
        for g in analysis.groups:
            if g.kind not in self.kinds or not g.prunable or not g.members:
                continue
            members = [m for m in g.members if m.role != "stat"]
            if not members:
                continue
            if group_is_zero(g, values):
                continue  # already zero: nothing changes (keeps the pass idempotent)
            if group_norm(g, values, self.norm) > self.threshold:
                continue
            for m in members:
                v = values[m.tensor]
                v[m.index(v.shape)] = 0
                dirty.add(m.tensor)
            zeroed[g.kind] += 1
        for name in dirty:
            tensors[name].values = values[name]
        report = ZeroSmallGroupsReport(sum(zeroed.values()), tuple(sorted(zeroed.items())),
                                       self.threshold)
        return PassResult(graph, report)
