"""ZeroGroupsToBudgetPass: zero the least important groups until an estimate of the pruned
model's MACs (and/or params) meets a budget.

The candidates are the prunable channel groups, head groups (attention heads) and depth
groups (whole residual branches), ranked in one list by their normalised importance
(:mod:`onnx_ssl.importance`), lowest first. The pass walks the list and zeroes each
candidate whose removal the analysis allows, until the estimate meets every budget
``F * count_before``:

- a space keeps at least one channel, and so does every part of it that a Split or Slice
  cuts out (the channel pass keeps one there anyway; zeroing it would change the function
  for nothing), unless a depth group removes the whole branch the space lies in;
- a space split into blocks by grouped convolutions (its ``constraint``) loses channels in
  equal numbers per block and keeps one per block: its candidates are *bundles*, the r-th
  least important channel of every block, scored by their mean;
- an attention keeps at least one head (the head pass keeps one anyway), unless a depth group
  removes the branch it lies in; a head takes its rows of the Q, K, V projections (out) and
  of the output projection (in);
- a candidate that would save nothing towards an unmet budget is skipped.

**The estimate** is the prune's own accounting applied to the analysis' layers. A layer of
``C_out`` filters reading ``C_in`` channels (all groups), of which ``k_out`` and ``k_in``
stay, keeps::

    MACs'   = MACs * (k_out / C_out) * (k_in / C_in)
    params' = W * (k_out / C_out) * (k_in / C_in) + b * (k_out / C_out)

(``W`` and ``b`` the weight's and the bias' elements; a depthwise convolution, whose group
count follows its channels, keeps ``MACs * k_out / C_out``). Removing channel ``c`` of a
space takes its positions from the out axis of every weight that produces the space and
from the in axis of every weight that reads it; a removed branch takes all its layers. The
prune itself may keep a channel the estimate removed, or remove one it kept; the caller
(``compiler.prune``) measures the real prune and calls the pass again with a corrected
``aim``.

**Landing.** A candidate that would meet the budget but leave the binding count more than
``band`` (a fraction of the count before) under the aim is passed over for a later,
cheaper one; only when nothing later fits is it taken. Then, while the estimate is still
more than ``band`` under, the candidates taken are given back, most important first,
wherever the budget stays met without them (a small network's last candidate can be a
residual stream's channel, worth several points); a branch may be given back for the
channels of its spaces where that lands closer. So the estimate lands in ``[aim - band,
aim]`` whenever candidates small enough exist; where none are (a network whose every
candidate is several points), it lands as close under as this finds.

**Rounding** (``round_to`` N, ``prune --round-to N``): the channel pass keeps zero channels
so that each space's count lands on a multiple of N or its original size (see
:mod:`onnx_ssl.passes.round_channels`); keeping zero channels would cost the budget, so the
selection lands on such counts itself. A space's candidates (channels, or bundles) are then
taken in *chunks*, in their order: the first chunk brings the space from ``C`` to
``round_down(C)`` (a whole step ``lcm(N, B)`` when ``C`` is a multiple), each next one by a
step, and a chunk is scored by its mean. Every count the selection can reach is then a
rounded one, and the walk, landing and give-back above run unchanged on chunks. A space whose
candidates do not cover it (a channel that cannot be pruned) is not chunked. Each space's
count is reported.

This CHANGES the model's function; the caller reports by how much. A group already zero is
not counted as zeroed (running the pass again on its output zeroes nothing more).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ssl.analysis import SharedAnalysis
from onnx_ssl.errors import InputError
from onnx_ssl.graphutil import require_unique_node_names
from onnx_ssl.groups import Analysis, Group, Layer, Space
from onnx_ssl.io import tensor_map
from onnx_ssl.norms import group_is_zero
from onnx_ssl.passes.round_channels import round_down, step
from onnx_ssl.pipeline import PassBase, PassResult, Report

# Where the estimate aims: at most this fraction of the count before under the aim.
BAND = 0.01


def check_fraction(flag: str, value: float | None) -> None:
    """A budget (``flag`` names it) must be a fraction of the input's count in (0, 1]; a
    one-line error otherwise."""
    if value is not None and not (math.isfinite(value) and 0 < value <= 1):
        raise InputError(f"{flag} must be a fraction of the input's count in (0, 1], "
                         f"got {value:g}")


@dataclass(frozen=True)
class Budget:
    """Target fractions of the input model's MACs and params (None: no budget on it)."""

    macs: float | None = None
    params: float | None = None

    def items(self) -> tuple[tuple[str, float], ...]:
        return tuple((k, v) for k, v in (("macs", self.macs), ("params", self.params))
                     if v is not None)


@dataclass(frozen=True)
class ZeroToBudgetReport(Report):
    groups_zeroed: int = 0
    by_kind: tuple[tuple[str, int], ...] = ()
    # The ids of the groups zeroed, in the order taken.
    zeroed: tuple[str, ...] = field(default=(), metadata={"info": True})
    importance: str = field(default="", metadata={"info": True})
    # The estimate the selection was made for (fractions of the count before).
    aim_macs: float | None = field(default=None, metadata={"info": True})
    aim_params: float | None = field(default=None, metadata={"info": True})
    estimated_macs: float | None = field(default=None, metadata={"info": True})
    estimated_params: float | None = field(default=None, metadata={"info": True})
    # Per space the selection rounded (round_to): its count before and after, and how.
    rounding: tuple[str, ...] = field(default=(), metadata={"info": True})


@dataclass(frozen=True)
class _Candidate:
    groups: tuple[Group, ...]
    score: float
    # Spaces whose channel groups a depth candidate makes moot (they go with the branch).
    covers: frozenset[str] = frozenset()


class _Estimate:
    """The layers' MACs and params as channels and branches go (see the module doc)."""

    def __init__(self, analysis: Analysis) -> None:
        self.layers = analysis.layers
        self.index = {la.weight: i for i, la in enumerate(self.layers)}
        self.by_node = {la.node: i for i, la in enumerate(self.layers)}
        n = len(self.layers)
        self.out_total = [la.weight_shape[la.out_axis] for la in self.layers]
        self.in_total = [la.weight_shape[la.in_axis] * (la.conv_groups if la.in_axis == 1
                                                         else 1) for la in self.layers]
        self.depthwise = [la.conv_groups > 1 and la.weight_shape[la.in_axis] == 1
                          for la in self.layers]
        self.bias = [la.weight_shape[la.out_axis] if la.bias else 0 for la in self.layers]
        self.out_gone: list[set[int]] = [set() for _ in range(n)]
        self.in_gone: list[set[int]] = [set() for _ in range(n)]
        self.dead = [False] * n
        self.cost = {"macs": [float(la.macs) for la in self.layers],
                     "params": [float(la.params) for la in self.layers]}
        self.total = {k: sum(v) for k, v in self.cost.items()}
        self.before = dict(self.total)
        # Per space: channel -> (layer, "out"/"in", positions) it removes.
        self.effects: dict[str, list[list[tuple[int, str, tuple[int, ...]]]]] = {}
        for sp in analysis.spaces:
            per: list[list[tuple[int, str, tuple[int, ...]]]] = [[] for _ in range(sp.channels)]
            for r in sp.refs:
                i = self.index.get(r.tensor) if r.is_weight else None
                if i is None:
                    continue
                la = self.layers[i]
                side = "out" if r.axis == la.out_axis else "in" if r.axis == la.in_axis else ""
                if not side:
                    continue
                for j in range(r.length):
                    c = r.space_start + j
                    per[c].append((i, side, r.positions(c)))
            self.effects[sp.id] = per
        # Per head group: (layer, "out"/"in", positions) of its Q/K/V and output rows.
        self.head_effects: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {}
        for g in analysis.groups:
            if g.kind != "head":
                continue
            eff = []
            for m in g.members:
                i = self.index.get(m.tensor)
                axes = [a for a, sl in enumerate(m.slice) if sl is not None]
                if i is None or len(axes) != 1:
                    continue
                la = self.layers[i]
                side = "out" if axes[0] == la.out_axis else "in"
                eff.append((i, side, tuple(m.slice[axes[0]] or ())))
            self.head_effects[g.id] = eff

    def _layer_cost(self, i: int, gone_out: int, gone_in: int, dead: bool
                    ) -> tuple[float, float]:
        la: Layer = self.layers[i]
        if dead:
            return 0.0, 0.0
        fo = 1 - gone_out / self.out_total[i] if self.out_total[i] else 1.0
        fi = 1 - gone_in / self.in_total[i] if self.in_total[i] else 1.0
        f = fo if self.depthwise[i] else fo * fi
        return la.macs * f, (la.params - self.bias[i]) * f + self.bias[i] * fo

    def after(self, groups: Sequence[Group], branch_layers: Sequence[str],
              apply: bool = False, undo: bool = False) -> dict[str, float]:
        """The totals once ``groups`` (and the layers of removed branches) are gone, or,
        with ``undo``, once they are back; ``apply`` makes that the current state. Costs
        time in proportion to the positions the groups name (no set is copied)."""
        # Per touched layer: [positions gone on the out axis, on the in axis, dead].
        new: dict[int, list[Any]] = {}

        def entry(i: int) -> list[Any]:
            if i not in new:
                new[i] = [len(self.out_gone[i]), len(self.in_gone[i]), self.dead[i]]
            return new[i]

        for g in groups:
            if g.kind == "head":
                effects = self.head_effects.get(g.id, [])
            elif g.kind != "channel" or g.space is None or g.index is None:
                continue
            else:
                effects = self.effects[g.space][g.index]
            for i, side, pos in effects:
                gone = self.out_gone[i] if side == "out" else self.in_gone[i]
                e = entry(i)
                k = 0 if side == "out" else 1
                if undo:
                    e[k] -= sum(1 for p in pos if p in gone)
                else:
                    e[k] += sum(1 for p in pos if p not in gone)
                if apply:
                    (gone.difference_update if undo else gone.update)(pos)
        for node in branch_layers:
            j = self.by_node.get(node)
            if j is not None:
                entry(j)[2] = not undo
        total = dict(self.total)
        for i, (o, n, dead) in new.items():
            m1, p1 = self._layer_cost(i, o, n, dead)
            total["macs"] += m1 - self.cost["macs"][i]
            total["params"] += p1 - self.cost["params"][i]
            if apply:
                self.cost["macs"][i], self.cost["params"][i] = m1, p1
                self.dead[i] = dead
        if apply:
            self.total = total
        return total

    def fraction(self, totals: Mapping[str, float]) -> dict[str, float]:
        return {k: totals[k] / self.before[k] if self.before[k] else 1.0 for k in totals}


def _attention_key(g: Group) -> str:
    """The key under which :class:`_Selection` counts an attention's heads."""
    return f"\0head:{g.node}"


def _parts(sp: Space) -> list[tuple[int, int]]:
    """Channel ranges of ``sp`` that must each keep a channel: the space, and every part a
    tensor holds of it alone (a Split or Slice output)."""
    out = {(0, sp.channels)}
    for r in sp.refs:
        if r.length < sp.channels:
            out.add((r.space_start, r.space_start + r.length))
    return sorted(out)


def candidates(analysis: Analysis, scores: Mapping[str, float], round_to: int | None = None
               ) -> list[_Candidate]:
    """Every candidate (see the module doc), lowest score first; with ``round_to``, a space's
    candidates in chunks that land on rounded counts."""
    by_space: dict[str, list[Group]] = {}
    out: list[_Candidate] = []
    branches = {f"{b.add}/depth": b for b in analysis.branches}
    for g in analysis.groups:
        if g.id not in scores:
            continue
        if g.kind == "channel" and g.space is not None:
            by_space.setdefault(g.space, []).append(g)
        elif g.kind == "depth" and g.id in branches:
            nodes = set(branches[g.id].nodes)
            covers = frozenset([*(sp.id for sp in analysis.spaces
                                  if sp.nodes and set(sp.nodes) <= nodes),
                                *(_attention_key(h) for h in analysis.groups
                                  if h.kind == "head" and h.node in nodes)])
            out.append(_Candidate((g,), scores[g.id], covers))
        elif g.kind == "head":
            out.append(_Candidate((g,), scores[g.id]))
    for sid, groups in by_space.items():
        sp = analysis.space(sid)
        blocks = math.lcm(*sp.partitions) if sp.partitions else 1
        if blocks > 1 and sp.channels % blocks == 0:
            size = sp.channels // blocks
            ranked = [sorted((g for g in groups if g.index is not None
                              and g.index // size == k), key=lambda g: scores[g.id])
                      for k in range(blocks)]
            if any(len(r) != size for r in ranked):
                continue  # a block with an unprunable channel: leave the space alone
            units = []
            for r in range(size):
                bundle = tuple(ranked[k][r] for k in range(blocks))
                units.append(_Candidate(bundle, float(np.mean([scores[g.id] for g in bundle]))))
        else:
            blocks = 1
            units = sorted((_Candidate((g,), scores[g.id]) for g in groups),
                           key=lambda c: c.score)
        if round_to and len(units) * blocks == sp.channels:
            units = _chunks(units, sp.channels, round_to, blocks, scores)
        out += units
    out.sort(key=lambda c: c.score)  # stable: a space's bundles stay in their order
    return out


def _chunks(units: list[_Candidate], channels: int, multiple: int, blocks: int,
            scores: Mapping[str, float]) -> list[_Candidate]:
    """``units`` (a space's candidates, lowest score first) merged so that each brings the
    space to the next rounded count down (see the module doc)."""
    first = channels - round_down(channels - 1, multiple, blocks)
    step_ = step(multiple, blocks)
    out, i, size = [], 0, first
    while i < len(units):
        take = units[i:i + size // blocks]
        groups = tuple(g for c in take for g in c.groups)
        out.append(_Candidate(groups, float(np.mean([scores[g.id] for g in groups]))))
        i += len(take)
        size = step_
    return out


class _Selection:
    """The candidates taken so far, what they leave of each space, and the estimate."""

    def __init__(self, analysis: Analysis, targets: Mapping[str, float], band: float) -> None:
        self.est = _Estimate(analysis)
        self.targets = dict(targets)
        self.band = band
        self.branches = {f"{b.add}/depth": b for b in analysis.branches}
        # Per space: each range that must keep a channel -> the channels it still has.
        self.left = {sp.id: {p: p[1] - p[0] for p in _parts(sp)} for sp in analysis.spaces}
        # Per attention: how many heads it still has (it keeps one).
        heads: Counter[str] = Counter(_attention_key(g) for g in analysis.groups
                                      if g.kind == "head")
        self.heads_left = dict(heads)
        self.gone: set[str] = set()  # spaces whose branch was removed
        self.chosen: list[_Candidate] = []

    def frac(self) -> dict[str, float]:
        return self.est.fraction(self.est.total)

    def met(self, frac: Mapping[str, float] | None = None) -> bool:
        frac = self.frac() if frac is None else frac
        return all(frac[k] <= v + 1e-12 for k, v in self.targets.items())

    def slack(self, frac: Mapping[str, float] | None = None) -> float:
        """How far under its aim the binding count is (negative: an aim is not met)."""
        frac = self.frac() if frac is None else frac
        return min(v - frac[k] for k, v in self.targets.items())

    def far_under(self) -> bool:
        return self.met() and self.slack() > self.band

    def _layers(self, c: _Candidate) -> tuple[str, ...]:
        first = c.groups[0]
        return self.branches[first.id].layers if first.kind == "depth" else ()

    def _ranges(self, g: Group) -> list[tuple[int, int]]:
        assert g.space is not None and g.index is not None
        return [p for p in self.left[g.space] if p[0] <= g.index < p[1]]

    def allowed(self, c: _Candidate) -> bool:
        first = c.groups[0]
        if first.kind == "depth":
            return c not in self.chosen
        if first.kind == "head":
            key = _attention_key(first)
            return c not in self.chosen and key not in self.gone and self.heads_left[key] > 1
        if first.space in self.gone:
            return False
        need: Counter[tuple[int, int]] = Counter()
        for g in c.groups:
            need.update(self._ranges(g))
        return all(self.left[first.space or ""][p] - k >= 1 for p, k in need.items())

    def trial(self, c: _Candidate, undo: bool = False) -> dict[str, float]:
        return self.est.fraction(self.est.after(c.groups, self._layers(c), undo=undo))

    def take(self, c: _Candidate) -> None:
        self.est.after(c.groups, self._layers(c), apply=True)
        self.chosen.append(c)
        self.gone.update(c.covers)
        if c.groups[0].kind == "head":
            self.heads_left[_attention_key(c.groups[0])] -= 1
        for g in c.groups if c.groups[0].kind == "channel" else ():
            for p in self._ranges(g):
                self.left[g.space or ""][p] -= 1

    def give_back(self, c: _Candidate) -> None:
        self.est.after(c.groups, self._layers(c), apply=True, undo=True)
        self.chosen.remove(c)
        self.gone.difference_update(c.covers)
        if c.groups[0].kind == "head":
            self.heads_left[_attention_key(c.groups[0])] += 1
        for g in c.groups if c.groups[0].kind == "channel" else ():
            for p in self._ranges(g):
                self.left[g.space or ""][p] += 1

    def snapshot(self) -> _Snapshot:
        e = self.est
        return _Snapshot([set(x) for x in e.out_gone], [set(x) for x in e.in_gone],
                         list(e.dead), {k: list(v) for k, v in e.cost.items()}, dict(e.total),
                         {k: dict(v) for k, v in self.left.items()}, set(self.gone),
                         list(self.chosen), dict(self.heads_left))

    def restore(self, snap: _Snapshot) -> None:
        e = self.est
        e.out_gone, e.in_gone, e.dead, e.cost, e.total = (
            snap.out_gone, snap.in_gone, snap.dead, snap.cost, snap.total)
        self.left, self.gone, self.chosen = snap.left, snap.gone, snap.chosen
        self.heads_left = snap.heads_left


@dataclass
class _Snapshot:
    """A :class:`_Selection`'s state, to try a trade and go back."""

    out_gone: list[set[int]]
    in_gone: list[set[int]]
    dead: list[bool]
    cost: dict[str, list[float]]
    total: dict[str, float]
    left: dict[str, dict[tuple[int, int], int]]
    gone: set[str]
    chosen: list[_Candidate]
    heads_left: dict[str, int]


def select(analysis: Analysis, scores: Mapping[str, float], aim: Budget, band: float = BAND,
           round_to: int | None = None) -> tuple[list[Group], dict[str, float], list[str]]:
    """The groups to zero for ``aim``, the estimated fractions they give and, with
    ``round_to``, how each space was rounded (see the module doc)."""
    sel = _Selection(analysis, dict(aim.items()), band)
    ranked = candidates(analysis, scores, round_to)
    passed: list[_Candidate] = []
    for c in ranked:
        frac = sel.frac()
        if sel.met(frac):
            break
        if not sel.allowed(c):
            continue
        new = sel.trial(c)
        if not any(new[k] < frac[k] for k, v in sel.targets.items() if frac[k] > v):
            continue  # saves nothing towards an unmet budget
        if sel.met(new) and sel.slack(new) > band:
            passed.append(c)  # lands too far under: a later, cheaper candidate may fit
            continue
        sel.take(c)
    # Nothing later fitted: of what was passed over, the candidate that meets the budget
    # closest under it (the least important of equals), else the least important, again.
    while passed and not sel.met():
        ok = [c for c in passed if sel.allowed(c)]
        if not ok:
            break
        fits = [(sel.slack(f), i, c) for i, c in enumerate(ok) for f in [sel.trial(c)]
                if sel.met(f)]
        c = min(fits)[2] if fits else ok[0]
        passed.remove(c)
        sel.take(c)
    # Give back, most important first, what the budget does not need; a branch given back
    # may be traded for the channels of its spaces, where that lands closer.
    for _ in range(2):
        for c in reversed(list(sel.chosen)):
            if not sel.far_under():
                break
            if c.groups[0].kind in ("channel", "head"):
                if sel.met(sel.trial(c, undo=True)):
                    sel.give_back(c)
                continue
            before, snap = sel.slack(), sel.snapshot()
            sel.give_back(c)
            for cc in ranked:
                if sel.met():
                    break
                if cc.groups[0].space in c.covers and sel.allowed(cc):
                    sel.take(cc)
            if not sel.met() or sel.slack() >= before:
                sel.restore(snap)
    rounding = []
    for sp in analysis.spaces if round_to else ():
        k = sel.left.get(sp.id, {}).get((0, sp.channels))
        if k is not None and k < sp.channels and sp.id not in sel.gone:
            rounding.append(f"{sp.id}: {sp.channels} -> {k} channels (--round-to {round_to}: "
                            f"candidates taken in chunks that keep rounded counts)")
    return [g for c in sel.chosen for g in c.groups], sel.frac(), rounding


class ZeroGroupsToBudgetPass(PassBase[ZeroToBudgetReport]):
    """Zero the least important groups until the estimate meets ``aim`` (default
    ``budget``); see the module doc. ``scores``: normalised importance per group id
    (:mod:`onnx_ssl.importance`), made for the graph ``analysis`` describes."""

    name = "zero-groups-to-budget"

    def __init__(self, budget: Budget, scores: Mapping[str, float], analysis: Analysis,
                 importance: str = "", aim: Budget | None = None,
                 round_to: int | None = None) -> None:
        self.budget = budget
        self.aim = aim or budget
        self.scores = scores
        self.shared = SharedAnalysis(analysis)
        self.kinds = analysis.kinds  # the candidates are of the kinds handed in
        self.importance = importance
        self.round_to = round_to

    def requires(self, graph: gs.Graph) -> None:
        require_unique_node_names(graph)

    def call(self, graph: gs.Graph) -> PassResult[ZeroToBudgetReport]:
        analysis = self.shared.of(graph, self.kinds)  # checked against this graph
        chosen, est, rounding = select(analysis, self.scores, self.aim, round_to=self.round_to)
        graph = graph.copy()
        tensors = tensor_map(graph)
        values: dict[str, np.ndarray] = {}
        zeroed: Counter[str] = Counter()
        ids: list[str] = []
        for g in chosen:
            members = [m for m in g.members if m.role != "stat"]
            for m in members:
                if m.tensor not in values:
                    values[m.tensor] = np.array(tensors[m.tensor].values)
            if group_is_zero(g, values):
                continue  # already zero: nothing changes (keeps the pass idempotent)
            for m in members:
                v = values[m.tensor]
                v[m.index(v.shape)] = 0
            zeroed[g.kind] += 1
            ids.append(g.id)
        for name, v in values.items():
            tensors[name].values = v
        report = ZeroToBudgetReport(
            sum(zeroed.values()), tuple(sorted(zeroed.items())), tuple(ids), self.importance,
            self.aim.macs, self.aim.params, est.get("macs") if self.aim.macs is not None
            else None, est.get("params") if self.aim.params is not None else None,
            tuple(rounding))
        return PassResult(graph, report)
