"""CollapseResidualPass: delete residual branches whose output became a constant.

A residual block computes ``y = shortcut + F(x)`` where the branch ``F`` runs from the fork
``x`` to the Add. When every path from ``x`` through ``F`` meets a layer with an all-zero
weight (the paper's depth-wise sparsity zeroes *every* layer of the branch, which implies
this), ``F(x) = k`` is the same for every input: biases, BatchNorm shifts and
activations of them. Then ``y = shortcut + k``: the branch is deleted and the Add keeps the
constant ``k`` (reduced to ``[1, C, 1, 1]`` when it is the same at every position), or
disappears entirely when ``k == 0``. ``k`` is evaluated with ONNX Runtime on two different
inputs, which must agree exactly. A ``k`` that varies over positions (a padded convolution
behind the zero layer) is stored only when it costs fewer params than the branch holds;
otherwise the branch stays, listed under "kept:", so that the model never grows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ssl.analysis import LAYER_OPS
from onnx_ssl.graphutil import (
    dynamic_input_reason,
    evaluate_seeds,
    fresh_names,
    refresh_shapes,
    unique_name,
)
from onnx_ssl.groups import Branch
from onnx_ssl.pipeline import AnalysedPass, PassResult, Report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollapseResidualReport(Report):
    branches_removed: tuple[str, ...] = ()
    layers_removed: int = 0
    constant_adds: int = 0
    kept: tuple[str, ...] = field(default=(), metadata={"info": True})


def _entry_layers_zero(by_name: dict[str, gs.Node], b: Branch) -> bool:
    """Whether every path from data outside the branch to its output passes through a layer
    whose weight is all zero (``y = 0 x + bias``), so the branch output is a constant.

    Data spreads from the tensors the branch reads from outside through every node, except
    a Conv/Gemm/MatMul with an all-zero constant weight that receives it only as its data
    input: such a layer stops it. Ops on the way to that layer (a no-op Pad an exporter left
    before a 1x1 convolution, a Cast, a Transpose) are then of no consequence.
    """
    produced = {t.name for n in b.nodes for t in by_name[n].outputs}
    data: set[str] = set()  # branch tensors that depend on the branch's input
    stops: set[str] = set()
    changed = True
    while changed:  # b.nodes is in graph order; iterate in case it is not topological
        changed = False
        for n in b.nodes:
            node = by_name[n]
            if n in stops or all(t.name in data for t in node.outputs if t.name):
                continue
            fed = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)
                   and (t.name not in produced or t.name in data)]
            if not fed:
                continue
            if (node.op in LAYER_OPS and len(node.inputs) > 1
                    and isinstance(node.inputs[1], gs.Constant)
                    and all(t is node.inputs[0] for t in fed)
                    and not np.any(np.asarray(node.inputs[1].values))):
                stops.add(n)
                continue
            data.update(t.name for t in node.outputs if t.name)
            changed = True
    return bool(stops) and b.branch_output not in data


def _branch_params(by_name: dict[str, gs.Node], b: Branch) -> int:
    """Float constant elements that only the branch's nodes read (deleted with it)."""
    inside = set(b.nodes)
    seen: set[str] = set()
    total = 0
    for n in b.nodes:
        for t in by_name[n].inputs:
            if (isinstance(t, gs.Constant) and t.name not in seen
                    and np.dtype(t.dtype).kind == "f"
                    and all(c.name in inside for c in t.outputs)):
                seen.add(t.name)
                total += int(np.prod(t.shape))
    return total


class CollapseResidualPass(AnalysedPass[CollapseResidualReport]):
    """See the module docstring; the constructor is :class:`~onnx_ssl.pipeline.AnalysedPass`'s."""

    name = "collapse-residual"

    def call(self, graph: gs.Graph) -> PassResult[CollapseResidualReport]:
        analysis = self.shared.of(graph)
        nodes = {n.name: n for n in graph.nodes}
        todo = [b for b in analysis.branches if b.prunable and _entry_layers_zero(nodes, b)]
        if not todo:
            return PassResult(graph, CollapseResidualReport())  # unchanged: no copy needed
        graph = self._writable(graph)
        no_fold = dynamic_input_reason(graph)
        if no_fold:
            why = tuple(f"{b.add}: keeps its zeroed residual branch: evaluating the branch's "
                        f"constant needs static input shapes, but {no_fold}" for b in todo)
            return PassResult(graph, CollapseResidualReport(kept=why))
        names = [b.branch_output for b in todo]
        a, b2 = evaluate_seeds(graph, names, (self.seed, self.seed + 1))  # one session
        by_name = {n.name: n for n in graph.nodes}
        outputs = {t.name for t in graph.outputs}
        removed: list[str] = []
        kept: list[str] = []
        layers = consts = 0
        with fresh_names(graph):  # one name set for the pass, not one per constant
            for br in todo:
                k, k2 = a[br.branch_output][:1], b2[br.branch_output][:1]
                if not np.array_equal(k, k2):
                    log.info("branch of %s is not constant; kept", br.add)
                    continue
                add = by_name[br.add]
                branch_t = next(t for t in add.inputs if t.name == br.branch_output)
                short_t = next(t for t in add.inputs if t.name != br.branch_output)
                # Reduce the constant to [1, C, 1, 1] when it is the same everywhere in space.
                red = k
                if k.ndim == 4 and np.all(k == k[:, :, :1, :1]):
                    red = k[:, :, :1, :1]
                held = _branch_params(by_name, br)
                if np.any(red) and red.size > held:
                    kept.append(f"{br.add}: keeps its constant residual branch: the constant "
                                f"varies over positions, and storing it ({red.size} params) "
                                f"costs more than the branch's {held}")
                    continue
                if not np.any(red):
                    y = add.outputs[0]
                    if y.name in outputs:
                        add.op, add.inputs = "Identity", [short_t]
                    else:
                        for c in list(y.outputs):
                            c.inputs = [short_t if t is y else t for t in c.inputs]
                        add.outputs = []
                else:
                    const = gs.Constant(unique_name(graph, f"{br.add}.branch_constant"),
                                        red.astype(np.float32))
                    add.inputs = [short_t if t is short_t else const for t in add.inputs]
                    consts += 1
                del branch_t
                removed.append(br.add)
                layers += len(br.layers)
        if not removed:
            return PassResult(graph, CollapseResidualReport(kept=tuple(kept)))
        graph.cleanup(remove_unused_graph_inputs=False)
        refresh_shapes(graph)  # the next pass analyses this graph: it needs its shapes
        return PassResult(graph, CollapseResidualReport(tuple(removed), layers, consts,
                                                        tuple(kept)))
