"""ZeroSmallGroupsPass: set to zero every prunable group whose L2 norm is at most T.

For a coupled channel group ``g`` with members ``w_1 .. w_m`` (its ``out`` and ``in``
slices; ``stat`` members such as BatchNorm running statistics are not part of the norm and
are left alone), the pass sets every member to zero when

    ||g||_2 = sqrt(sum_j ||w_j||_2^2) <= T.

Depth groups (every weight of a residual branch) are handled the same way. This CHANGES
the model's function: it is the explicit thresholding step between SSL training (which
drives groups towards zero) and the exact prune passes. The caller reports the output
difference it caused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ssl.analysis import SharedAnalysis
from onnx_ssl.graphutil import require_unique_node_names
from onnx_ssl.groups import Analysis, Group
from onnx_ssl.io import tensor_map
from onnx_ssl.pipeline import PassBase, PassResult, Report


@dataclass(frozen=True)
class ZeroSmallGroupsReport(Report):
    groups_zeroed: int = 0
    by_kind: tuple[tuple[str, int], ...] = ()
    threshold: float = 0.0


def group_norm(group: Group, values: dict[str, np.ndarray]) -> float:
    total = 0.0
    for m in group.members:
        if m.role == "stat":
            continue
        v = values[m.tensor]
        total += float(np.sum(np.square(v[m.index(v.shape)], dtype=np.float64)))
    return float(np.sqrt(total))


def group_norms(groups: Iterable[Group], values: dict[str, np.ndarray]) -> dict[str, float]:
    """:func:`group_norm` of each group, by id, at a fraction of the cost for many groups: a
    member that slices one axis of its tensor is read from that axis' per-position sums of
    squares, computed once per tensor and axis."""
    sums: dict[tuple[str, int], np.ndarray] = {}
    out: dict[str, float] = {}
    for g in groups:
        total = 0.0
        for m in g.members:
            if m.role == "stat":
                continue
            v = values[m.tensor]
            cut = [a for a, s in enumerate(m.slice) if s is not None]
            if len(cut) != 1:
                total += float(np.sum(np.square(v[m.index(v.shape)], dtype=np.float64)))
                continue
            key = (m.tensor, cut[0])
            if key not in sums:
                other = tuple(a for a in range(v.ndim) if a != cut[0])
                sums[key] = np.sum(np.square(v, dtype=np.float64), axis=other)
            total += float(sums[key][list(m.slice[cut[0]] or ())].sum())
        out[g.id] = float(np.sqrt(total))
    return out


class ZeroSmallGroupsPass(PassBase[ZeroSmallGroupsReport]):
    name = "zero-small-groups"

    def __init__(self, threshold: float, analysis: Analysis | None = None,
                 kinds: tuple[str, ...] = ("channel", "depth")) -> None:
        """``analysis`` is used only for a graph it matches, with groups of ``kinds`` (see
        :class:`~onnx_ssl.analysis.SharedAnalysis`); any other graph is analysed afresh."""
        if threshold < 0:
            raise ValueError("threshold must be >= 0")
        self.threshold = threshold
        self.shared = SharedAnalysis(analysis)
        self.kinds = kinds

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
            # Already zero: nothing changes (keeps the pass idempotent).
            if all(not np.any(values[m.tensor][m.index(values[m.tensor].shape)])
                   for m in members):
                continue
            if group_norm(g, values) > self.threshold:
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
