"""Importance scores of prunable groups, normalised so that groups of different layers compare.

Budgeted pruning (``prune --target-macs``, :mod:`onnx_ssl.passes.zero_to_budget`) ranks every
prunable channel and depth group of the model in one list by these scores, lowest first.

**Magnitude** (data-free, the default). For a channel group ``g`` of space ``S`` (its ``out``
members: the producing filters, biases and norm parameters; its ``in`` members: the
consumers' input slices; BatchNorm statistics are no part of it)::

    n_g = ||g||_2 = sqrt(sum_j ||w_j||_2^2)                    (norms.group_norm, "l2")
    s_g = n_g / mean_{h in S} n_h

the normalisation of Torch-Pruning's ``GroupMagnitudeImportance`` (``normalizer="mean"``):
its "group" is our space (the layers a channel couples), and each channel's importance is
divided by the mean over the channels of that space, so every space has mean score 1 and a
layer of large weights does not outrank a layer of small weights as a whole. For a depth
group ``b`` (every weight of a residual branch) the branch's RMS is normalised over the
model's prunable branches::

    r_b = ||w_b||_2 / sqrt(|w_b|),      s_b = K_b * r_b / mean_{b' prunable} r_b'   ("rms")

where ``K_b`` is the number of filters of the branch's layers. Removing a branch removes
all of them: ``K_b`` counts each as an average channel (score 1), and ``r_b / mean r``
scales that by how weak the branch is among the branches. A branch that SSL drove towards
zero scores near 0 and goes first; an average branch costs as much as ``K_b`` average
channels, so a budget takes channels before it cuts a healthy branch.

**Activation** (``--data CALIB``): Wanda's score (Sun et al. 2023, ``|W_ij| * ||X_j||_2``)
summed over a channel's input slices. For channel ``c`` of space ``S``, read by the layers
``L`` whose weight has an ``in`` member in the group::

    a_g = sum_L ||W_L[:, c]||_1 * ||X_L[c]||_2,      s_g = a_g / mean_{h in S} a_h

where ``X_L[c]`` is channel ``c`` of ``L``'s input over every calibration sample and position
(computed with ONNX Runtime, the tensors exposed as extra outputs). ``||W_L[:, c]||_1 *
||X_L[c]||_2 = sum_o ||W_L[o, c] X_L[c]||_2`` is the size of what removing the channel takes
from ``L``'s outputs (exactly, for a fully connected layer or a 1x1 convolution), which is
what pruning it changes; a channel that carries large activations into small weights (or the
reverse) is scored by the product, unlike magnitude alone. Wanda rather than a first-order
Taylor score because it needs only a forward pass: the core runs inference sessions and
never the training build, and there are no labels to take a gradient of. A space in which
some group has no such layer input (a channel read only by non-layer ops) is scored by
magnitude. A depth group's activation score is the branch's share of the residual sum::

    a_b = ||branch output||_2 / ||shortcut||_2,      s_b = K_b * a_b / mean_{b' prunable} a_b'

Scores are keyed by group id. Groups that cannot be pruned get no score.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .calibration import Calibration
from .groups import Analysis, ChannelRef, Group, Member
from .io import tensor_map
from .norms import group_norm, group_norms

log = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "activation")


@dataclass(frozen=True)
class Scores:
    """Normalised importance per prunable group id, and the method that gave it."""

    method: str
    by_group: Mapping[str, float]


def scoreable(analysis: Analysis) -> list[Group]:
    """The groups a budget may zero: prunable channel, depth and head groups with weights."""
    return [g for g in analysis.groups if g.kind in ("channel", "depth", "head") and g.prunable
            and any(m.role != "stat" for m in g.members)]


def _values(graph: gs.Graph, groups: Iterable[Group]) -> dict[str, np.ndarray]:
    tensors = tensor_map(graph)
    names = {m.tensor for g in groups for m in g.members}
    return {n: np.asarray(tensors[n].values) for n in names
            if isinstance(tensors.get(n), gs.Constant)}


def _normalised(raw: Mapping[str, float], peers: Mapping[str, str]) -> dict[str, float]:
    """``raw[g] / mean of raw over g's peers`` (``peers``: group id -> peer set key)."""
    sums: dict[str, list[float]] = defaultdict(list)
    for g, v in raw.items():
        sums[peers[g]].append(v)
    means = {k: float(np.mean(v)) for k, v in sums.items()}
    return {g: v / means[peers[g]] if means[peers[g]] > 0 else 0.0 for g, v in raw.items()}


def _peers(groups: Iterable[Group]) -> dict[str, str]:
    """Peer sets: a channel's space, the heads of one attention, all depth groups."""
    return {g.id: g.space if g.kind == "channel" and g.space
            else f"\0head:{g.node}" if g.kind == "head" else "\0depth" for g in groups}


def _depth_weights(analysis: Analysis, groups: Iterable[Group]) -> dict[str, float]:
    """Depth group id -> the filters of its branch's layers (``K_b``, at least 1)."""
    filters = {la.node: la.weight_shape[la.out_axis] for la in analysis.layers}
    branches = {f"{b.add}/depth": b for b in analysis.branches}
    return {g.id: float(max(1, sum(filters.get(n, 0) for n in branches[g.id].layers)))
            for g in groups if g.kind == "depth" and g.id in branches}


def _scored(analysis: Analysis, groups: list[Group], raw: Mapping[str, float]
            ) -> dict[str, float]:
    """Normalised scores (see the module doc): per peer set, then depth groups times K_b."""
    scores = _normalised(raw, _peers(groups))
    for g, k in _depth_weights(analysis, groups).items():
        scores[g] *= k
    return scores


def magnitude(analysis: Analysis, graph: gs.Graph) -> Scores:
    """The data-free scores (see the module doc) of ``analysis``'s groups in ``graph``."""
    groups = scoreable(analysis)
    values = _values(graph, groups)
    raw = group_norms([g for g in groups if g.kind == "channel"], values)
    raw.update(group_norms([g for g in groups if g.kind != "channel"], values, "rms"))
    return Scores("magnitude", _scored(analysis, groups, raw))


def activation(analysis: Analysis, graph: gs.Graph, calibration: Calibration) -> Scores:
    """The activation-aware scores (see the module doc), from ``calibration`` run through
    ``graph`` (the working copy ``analysis`` describes; it is exported, not changed)."""
    groups = scoreable(analysis)
    values = _values(graph, groups)
    nodes = {n.name: n for n in graph.nodes}
    by_weight = {la.weight: la for la in analysis.layers}
    # Where each layer's input channels sit: (tensor, axis) of the space's activation refs.
    acts: dict[tuple[str, str], ChannelRef] = {}
    for sp in analysis.spaces:
        for r in sp.refs:
            if r.role == "act":
                acts.setdefault((sp.id, r.tensor), r)

    def data_input(weight: str) -> str | None:
        la = by_weight.get(weight)
        node = nodes.get(la.node) if la is not None else None
        if node is None:
            return None
        return next((t.name for t in node.inputs
                     if t.name and t.name != weight and not isinstance(t, gs.Constant)), None)

    # Per channel group: (weight member, the activation ref of its layer's input) pairs.
    reads: dict[str, list[tuple[Member, ChannelRef]]] = {}
    fallback: set[str] = set()  # spaces scored by magnitude
    for g in groups:
        if g.kind != "channel" or g.space is None:
            continue
        pairs = []
        for m in g.members:
            x = data_input(m.tensor) if m.role == "in" else None
            ref = acts.get((g.space, x)) if x is not None else None
            if ref is not None:
                pairs.append((m, ref))
        if pairs:
            reads[g.id] = pairs
        else:
            fallback.add(g.space)
    branches = {f"{b.add}/depth": b for b in analysis.branches}
    residual: dict[str, tuple[str, str]] = {}  # depth group -> (branch output, shortcut)
    for g in groups:
        b = branches.get(g.id) if g.kind == "depth" else None
        add = nodes.get(b.add) if b is not None else None
        if b is None or add is None:
            continue
        other = next((t.name for t in add.inputs if t.name != b.branch_output), None)
        if other is not None:
            residual[g.id] = (b.branch_output, other)
    # A head: its output projection rows times the norms of the heads' output there.
    tensors = tensor_map(graph)
    head_reads: dict[str, tuple[Member, str, int, tuple[int, ...]]] = {}
    for g in groups:
        wo = next((x for x in g.members if x.role == "in"), None) if g.kind == "head" else None
        if wo is None:
            continue
        x = data_input(wo.tensor)
        shape = tensors[x].shape if x is not None and x in tensors else None
        rows = next((sl for sl in wo.slice if sl is not None), None)
        if x is not None and shape and rows is not None:
            head_reads[g.id] = (wo, x, len(shape) - 1, rows)
    axes = {(r.tensor, r.axis) for ps in reads.values() for _, r in ps}
    axes |= {(x, axis) for _, x, axis, _ in head_reads.values()}
    wanted = sorted({t for t, _ in axes} | {t for pair in residual.values() for t in pair})
    squares = _channel_squares(graph, wanted, calibration, axes)
    raw: dict[str, float] = {}
    norms = group_norms([g for g in groups if g.space in fallback], values)
    for g in groups:
        if g.kind == "head":
            hr = head_reads.get(g.id)
            if hr is None:
                raw[g.id] = group_norm(g, values, "rms")
                continue
            wo, x, axis, rows = hr
            w = values[wo.tensor]
            raw[g.id] = (float(np.sum(np.abs(w[wo.index(w.shape)]), dtype=np.float64))
                         * math.sqrt(float(squares[(x, axis)][list(rows)].sum())))
            continue
        if g.kind == "depth":
            pair = residual.get(g.id)
            if pair is None:
                raw[g.id] = group_norm(g, values, "rms")
                continue
            out, short = (math.sqrt(squares[(t, None)].sum()) for t in pair)
            raw[g.id] = out / max(short, 1e-30)
            continue
        if g.space in fallback:
            raw[g.id] = norms[g.id]
            continue
        total = 0.0
        assert g.index is not None  # a channel group
        for m, r in reads[g.id]:
            w = values[m.tensor]
            sq = squares[(r.tensor, r.axis)]
            total += (float(np.sum(np.abs(w[m.index(w.shape)]), dtype=np.float64))
                      * math.sqrt(float(sq[list(r.positions(g.index))].sum())))
        raw[g.id] = total
    if fallback:
        log.info("activation importance: %d space(s) scored by magnitude (a channel read by "
                 "no layer input)", len(fallback))
    return Scores("activation", _scored(analysis, groups, raw))


def _channel_squares(graph: gs.Graph, names: list[str], calibration: Calibration,
                     axes: set[tuple[str, int]]) -> dict[tuple[str, int | None], np.ndarray]:
    """Sum of squares of each named tensor over the calibration inputs: per position along
    ``axis`` for each ``(tensor, axis)`` in ``axes``, and in total (key ``(tensor, None)``)."""
    from . import runtime
    from .graphutil import session_of

    tensors = tensor_map(graph)
    sess = session_of(graph, names, tensors)
    # The working copy's batch is static (bound when the input's was symbolic).
    shape = graph.inputs[0].shape if graph.inputs else None
    size = int(shape[0]) if shape is not None and len(shape) and isinstance(shape[0], int) \
        else None
    out: dict[tuple[str, int | None], np.ndarray] = {}
    for feeds in calibration.batches(size):
        res = runtime.run(sess, feeds, names)
        for n, v in res.items():
            v64 = np.square(np.asarray(v, dtype=np.float64))
            total = out.get((n, None))
            out[(n, None)] = v64.sum(keepdims=True) + (0 if total is None else total)
            for t, axis in axes:
                if t != n:
                    continue
                other = tuple(a for a in range(v64.ndim) if a != axis)
                s = v64.sum(axis=other)
                out[(n, axis)] = out[(n, axis)] + s if (n, axis) in out else s
    return out
