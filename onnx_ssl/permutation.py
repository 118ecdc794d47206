"""Fixed permutations of the channel axis: ShuffleNet's channel shuffle.

A channel shuffle with ``g`` groups is written by every exporter as three nodes::

    y1 = Reshape(x, [N, g, C/g, H, W])     # channel c = i*(C/g) + j lands on (i, j)
    y2 = Transpose(y1, perm=[0, 2, 1, 3, 4])
    y  = Reshape(y2, [N, C, H, W])         # (j, i) lands on channel j*g + i

so output channel ``p = j*g + i`` is input channel ``perm[p] = i*(C/g) + j``: a fixed
permutation, ``perm = arange(C).reshape(g, C/g).T.reshape(-1)``. Nothing mixes channels, so
the channel spaces continue through it, each channel at its new position. The op rules
(:mod:`onnx_ssl.rules`) follow the permutation; the channel-removal pass replaces the three
nodes by one ``Gather(x, kept, axis)`` when channels go, because the kept channels are no
longer a shuffle of equal groups in general, and a Gather of constant indices on the channel
axis is itself a channel permutation that a later analysis follows.

The module also holds the other rewrites that renumber channel positions when channels go:
a Gather's indices, a ScatterND's index tuples (an in-place slice add,
``out[:, :C] += x``), and the target of an Expand to its input's own shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from . import ops
from .channels import dims
from .graphutil import unique_name


@dataclass(frozen=True)
class Shuffle:
    """A matched channel shuffle: ``first`` (Reshape) -> ``transpose`` -> ``last`` (Reshape).
    Output position ``p`` of ``last`` holds input position ``perm[p]`` of ``first``."""

    first: gs.Node
    transpose: gs.Node
    last: gs.Node
    axis: int
    perm: tuple[int, ...]


def _static(t: gs.Tensor) -> tuple[int | str, ...] | None:
    """The tensor's dims when every one is known (an int, or a named symbolic dim)."""
    d = dims(t)
    return None if d is None or None in d else d  # type: ignore[return-value]


def _only_reader(t: gs.Tensor, op: str, graph_outputs: set[str]) -> gs.Node | None:
    if t.name in graph_outputs or len(t.outputs) != 1 or t.outputs[0].op != op:
        return None
    node: gs.Node = t.outputs[0]
    return node


def match_shuffle(first: gs.Node, axis: int, graph_outputs: set[str]) -> Shuffle | None:
    """The channel shuffle that starts at Reshape ``first`` on channel axis ``axis`` of its
    input, or None. Every shape on the way must be known (a named batch dim is fine)."""
    if first.op != "Reshape" or not first.outputs:
        return None
    s, t1 = _static(first.inputs[0]), _static(first.outputs[0])
    if s is None or t1 is None or len(t1) != len(s) + 1 or not 0 <= axis < len(s):
        return None
    c = s[axis]
    g, k = t1[axis], t1[axis + 1]
    if not (isinstance(c, int) and isinstance(g, int) and isinstance(k, int)) or g * k != c:
        return None
    if t1[:axis] != s[:axis] or t1[axis + 2:] != s[axis + 1:] or g == 1 or k == 1:
        return None
    tr = _only_reader(first.outputs[0], "Transpose", graph_outputs)
    if tr is None or not tr.outputs:
        return None
    want = list(range(len(t1)))
    want[axis], want[axis + 1] = axis + 1, axis
    if [int(p) for p in tr.attrs.get("perm", [])] != want:
        return None
    last = _only_reader(tr.outputs[0], "Reshape", graph_outputs)
    if last is None or not last.outputs or _static(last.outputs[0]) != s:
        return None
    perm = np.arange(c).reshape(g, k).T.reshape(-1)
    return Shuffle(first, tr, last, axis, tuple(int(p) for p in perm))


# --- rewrites when channels go (entries of the op table, onnx_ssl.rules.RULES) ------------

# The positions deleted from each activation: tensor name -> (axis, positions).
Deletions = dict[str, tuple[int, set[int]]]


def _kept(indices: list[int] | tuple[int, ...], size: int, gone: set[int]) -> np.ndarray:
    """``indices`` (positions of an axis of ``size``) without the ``gone`` ones, renumbered
    to the axis once ``gone`` is deleted from it."""
    new, k = {}, 0
    for p in range(size):
        if p not in gone:
            new[p] = k
            k += 1
    norm = [i + size if i < 0 else i for i in indices]
    return np.array([new[i] for i in norm if i not in gone], dtype=np.int64)


def rewrite_gather(graph: gs.Graph, node: gs.Node, deletions: Deletions) -> None:
    """Gather of constant indices on the channel axis: the indices of deleted channels go,
    the others are renumbered."""
    d = deletions.get(node.inputs[0].name)
    if d is None or node.inputs[0].shape is None or not isinstance(node.inputs[1], gs.Constant):
        return
    axis, gone = d
    if int(node.attrs.get("axis", 0)) % len(node.inputs[0].shape) != axis:
        return
    idx = np.asarray(node.inputs[1].values)
    if idx.ndim != 1:
        return
    kept = _kept([int(i) for i in idx], int(node.inputs[0].shape[axis]), gone)
    node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}.indices"), kept)


def rewrite_reshape(graph: gs.Graph, node: gs.Node, deletions: Deletions) -> None:
    """The first Reshape of a channel shuffle whose input loses channels: the shuffle becomes
    ``Gather(x, kept, axis)`` (the permutation restricted to the kept channels), written to
    the shuffle's output; the Transpose and the last Reshape are left unused. Any other
    Reshape: its static target on the channel axis loses the deleted count."""
    d = deletions.get(node.inputs[0].name)
    sh = None if d is None else match_shuffle(node, d[0], {t.name for t in graph.outputs})
    if sh is None or d is None:
        ops.rewrite_reshape(graph, node, deletions)
        return
    axis, gone = d
    y = sh.last.outputs[0]
    sh.last.outputs = [gs.Variable(unique_name(graph, f"{y.name}_unused"), dtype=y.dtype)]
    idx = gs.Constant(unique_name(graph, f"{sh.last.name}.kept_channels"),
                      _kept(sh.perm, len(sh.perm), gone))
    graph.nodes.append(gs.Node("Gather", name=unique_name(graph, f"{sh.last.name}_gather"),
                               attrs={"axis": axis}, inputs=[node.inputs[0], idx],
                               outputs=[y]))


def rewrite_scatter_nd(graph: gs.Graph, node: gs.Node, deletions: Deletions) -> None:
    """ScatterND that writes whole channels: the index tuples of deleted channels go (their
    update channels go with them: the analysis united the two), the others are renumbered."""
    d = deletions.get(node.inputs[0].name)
    if d is None or node.inputs[0].shape is None or not isinstance(node.inputs[1], gs.Constant):
        return
    axis, gone = d
    idx = np.asarray(node.inputs[1].values)
    q = int(idx.shape[-1])
    if axis >= q:
        return  # whole rows of the leading axes: the indices do not name channels
    lead = list(idx.shape[:-1])
    tuples = idx.reshape(-1, q)
    size = int(node.inputs[0].shape[axis])
    norm = [int(p) + size if p < 0 else int(p) for p in tuples[:, axis]]
    keep = [j for j, p in enumerate(norm) if p not in gone]
    new = tuples[keep].copy()
    new[:, axis] = _kept([norm[j] for j in keep], size, gone)
    wide = [k for k, n in enumerate(lead) if n != 1]
    if wide:
        lead[wide[0]] = len(keep)
    node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}.indices"),
                                 new.reshape(*lead, q).astype(idx.dtype))


def rewrite_expand(graph: gs.Graph, node: gs.Node, deletions: Deletions) -> None:
    """An Expand to its input's own shape (the only one whose channels flow) that loses
    channels: its target becomes all ones, which expands nothing whatever the channels."""
    if deletions.get(node.inputs[0].name) is None or len(node.inputs) < 2:
        return
    n = int(np.asarray(node.inputs[1].values).size) if isinstance(
        node.inputs[1], gs.Constant) else len(node.inputs[0].shape or ())
    node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}.shape"),
                                 np.ones(n, dtype=np.int64))
