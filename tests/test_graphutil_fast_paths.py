"""The fast paths of the prune's graph plumbing compute what onnx-graphsurgeon computes:
``graphutil.toposort`` and ``graphutil.cleanup`` leave the node list as ``Graph.toposort`` and
``Graph.cleanup`` leave it, and ``io.export_graph`` writes the model ``gs.export_onnx``
writes, byte for byte."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnx_ssl.graphutil import cleanup, toposort
from onnx_ssl.io import export_graph


def _graph(order: str, dead: bool) -> gs.Graph:
    """x -> a=Relu(x) -> b=Add(a, k) -> y, plus c=Relu(x) (a second depth-0 node), and
    ``dead``: d=Neg(a) that no output reads. ``order``: the node list, by node name."""
    x = gs.Variable("x", dtype=np.float32, shape=[1, 4])
    a = gs.Variable("a", dtype=np.float32, shape=[1, 4])
    c = gs.Variable("c", dtype=np.float32, shape=[1, 4])
    y = gs.Variable("y", dtype=np.float32, shape=[1, 4])
    k = gs.Constant("k", np.arange(4, dtype=np.float32))
    nodes = {"a": gs.Node("Relu", "a", inputs=[x], outputs=[a]),
             "c": gs.Node("Relu", "c", inputs=[x], outputs=[c]),
             "b": gs.Node("Add", "b", inputs=[a, k], outputs=[y])}
    outputs = [y, c]
    if dead:
        nodes["d"] = gs.Node("Neg", "d", inputs=[a],
                             outputs=[gs.Variable("d", dtype=np.float32, shape=[1, 4])])
    return gs.Graph(nodes=[nodes[n] for n in order if n in nodes], inputs=[x],
                    outputs=outputs, opset=17)


@pytest.mark.parametrize("order", ["acbd", "cabd", "abcd", "bacd", "dbca"])
def test_toposort_orders_as_onnx_graphsurgeon(order):
    ours, theirs = _graph(order, dead=True), _graph(order, dead=True)
    assert [n.name for n in toposort(ours).nodes] == [n.name for n in theirs.toposort().nodes]


def test_toposort_keeps_a_sorted_list_itself():
    g = _graph("acbd", dead=True)
    nodes = g.nodes
    assert toposort(g).nodes is nodes  # nothing to move: the list is left as it is


@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("order", ["acbd", "bacd"])
def test_cleanup_removes_as_onnx_graphsurgeon(order, dead):
    ours, theirs = _graph(order, dead), _graph(order, dead)
    kept = [n.name for n in cleanup(ours).nodes]
    assert kept == [n.name for n in theirs.cleanup(remove_unused_graph_inputs=False).nodes]
    assert ("d" in kept) is False


@pytest.mark.parametrize("eager", [False, True])
def test_export_graph_writes_what_export_onnx_writes(eager):
    g = gs.import_onnx(gs.export_onnx(_graph("acbd", dead=True)))  # constants read lazily
    if eager:  # a rewritten constant: numpy values, not the proto's
        k = next(t for t in g.tensors().values() if isinstance(t, gs.Constant))
        k.values = np.asarray(k.values) + 1
    assert (export_graph(g).SerializeToString()
            == gs.export_onnx(g, do_type_check=True).SerializeToString())
