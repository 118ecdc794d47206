"""RoundChannelCounts: keep a few zero channels per space so that the channel counts prune
leaves land on multiples the runtime's kernels prefer (``prune --round-to N|auto``).

The counts a prune leaves are whatever the zero groups were (51 of 96, 283 of 576), while
vectorised kernels work in blocks of channels (ONNX Runtime's NCHWc convolutions in blocks of
8 or 16) and pay for the padding. :class:`~onnx_ssl.passes.remove_channels.
RemoveZeroChannelsPass` asks this policy, once its plan is made and before any constant is
folded, how many of the zero channels it would remove each space should keep. Keeping a zero
channel is exact: the model keeps a channel that nobody reads, or that carries a constant
its readers still fold in as before, and computes the same function.

For a space of ``C`` channels of which removal alone leaves ``k`` (the *bare* count), split
into ``B`` equal blocks by grouped convolutions (``B = lcm(partitions)``, 1 without), rounding
to a multiple ``N`` keeps::

    t = ceil(k / L) * L,  L = lcm(N, B)       (t >= C: keep all C, remove nothing)

so the kept count is a multiple of ``N`` and of ``B`` (equal per block), or the original
size. The channels kept are those removal ties up least: nobody reads them and they carry a
constant, then zero filters, then the lowest index; per block alike.

``--round-to auto`` measures per space: for each candidate ``t`` in ``{k, round(k) to 4, 8,
16}`` the space's convolutions (those that produce it and those that read it, the other
axis at its own bare count) are built as one-layer models and timed with ONNX Runtime on the
provider, batch and threads compiled for, through the timer and cache of
:mod:`onnx_ssl.passes.lower_sparse_conv`. The fastest sum wins, and a rounded count must beat
the bare one by ``margin``: auto never picks a count slower than the bare one by
measurement. Identical layers (same op, shapes and attributes) are timed once per prune.

A budget (:mod:`onnx_ssl.passes.zero_to_budget`) with a fixed N selects in chunks that
land on rounded counts (:func:`round_down`), so that the prune lands at or under the target
with rounded counts; there the channels removed for rounding may be non-zero ones, zeroed
(and reported) by the budget. With ``auto`` the selection is not chunked: the channel pass
keeps zero channels as measured, and the budget's trials correct their aim by what the prune
really left.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_ssl.channels import static_shape
from onnx_ssl.errors import InputError
from onnx_ssl.graphutil import export
from onnx_ssl.groups import Analysis, Layer, Space
from onnx_ssl.passes.lower_sparse_conv import ConvSpec, Timer, emit

log = logging.getLogger(__name__)

# The multiples `auto` chooses between (besides the bare count).
AUTO_MULTIPLES = (4, 8, 16)
# The name of the timed model (in the cache key too: apart from the lowering's entries).
CONTEXT = "round-to"
# Per one-layer timing: a rounding measured must be this much faster than the bare count.
MARGIN = 0.05

RoundTo = int | str  # a multiple N >= 1, or "auto"
Measure = Callable[[ConvSpec, dict[str, onnx.ModelProto]], tuple[dict[str, float], bool]]
# What a plan removes per space: (channels nobody reads, channels that carry a constant).
Plan = dict[str, tuple[set[int], set[int]]]


def parse_round_to(value: object) -> RoundTo | None:
    """``--round-to``: None, a multiple ``N >= 1`` or ``"auto"``; anything else is an
    :class:`InputError`."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = int(value.strip())
        except ValueError:
            raise InputError(f"--round-to must be an integer N >= 1 or 'auto', got "
                             f"{value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"--round-to must be an integer N >= 1 or 'auto', got {value!r}")
    return int(value)


def step(multiple: int, blocks: int = 1) -> int:
    return math.lcm(multiple, max(blocks, 1))


def round_up(kept: int, size: int, multiple: int, blocks: int = 1) -> int:
    """The count ``kept`` rounded up to a multiple of ``multiple`` and ``blocks``; the
    original ``size`` where that would reach it (see the module doc)."""
    s = step(multiple, blocks)
    t = -(-kept // s) * s
    return size if t >= size else t


def round_down(kept: int, multiple: int, blocks: int = 1) -> int:
    """The largest multiple of ``multiple`` and ``blocks`` at most ``kept`` (0: none)."""
    s = step(multiple, blocks)
    return kept // s * s


def blocks_of(space: Space) -> int:
    return math.lcm(*space.partitions) if space.partitions else 1


@dataclass(frozen=True)
class RoundedSpace:
    """What rounding kept in one space: ``bare`` channels left by removal alone, ``kept``
    after rounding (``kept - bare`` zero channels kept), of ``channels`` before (before the
    first round of the fixpoint, in a merged report)."""

    space: str
    channels: int
    bare: int
    kept: int
    multiple: int
    # "--round-to N", or "measured" (auto) with the sums per candidate count.
    how: str
    times_ms: tuple[tuple[str, float], ...] = ()
    cached: bool = False

    def text(self) -> str:
        times = ", ".join(f"{k} ch {t:.3g} ms" for k, t in self.times_ms)
        what = (f"a multiple of {self.multiple}" if self.kept % self.multiple == 0 else
                "the size before")
        measured = f"{' (cached)' if self.cached else ''}: {times}" if times else ""
        return (f"{self.space}: keeps {self.kept - self.bare} zero channel(s) for rounding: "
                f"{self.bare} -> {self.kept} channels, {what} ({self.how}{measured})")


class RoundChannelCounts:
    """The rounding policy (see the module doc): ``round_to`` a multiple or ``"auto"``;
    ``provider``, ``batch``, ``threads`` and ``cache_dir`` as for ``--lower auto``;
    ``timer`` replaces the measurement (tests)."""

    def __init__(self, round_to: RoundTo, *, provider: str = "cpu", batch: int = 1,
                 threads: int = 0, cache_dir: Path | None = None, margin: float = MARGIN,
                 timer: Measure | None = None) -> None:
        parsed = parse_round_to(round_to)
        assert parsed is not None
        self.round_to = parsed
        self.batch = batch
        self.margin = margin
        self.measure: Measure = timer or Timer(provider, batch, threads, iters=10,
                                               budget_s=0.25, min_s=0.1,
                                               cache_dir=cache_dir).measure
        # Per distinct layer shape: the time measured (and whether from the cache).
        self._memo: dict[tuple[object, ...], tuple[dict[str, float], bool]] = {}

    @property
    def multiple(self) -> int | None:
        """The fixed multiple, or None for ``auto``."""
        return self.round_to if isinstance(self.round_to, int) else None

    def apply(self, graph: gs.Graph, analysis: Analysis, plan: Plan
              ) -> tuple[Plan, list[str], list[RoundedSpace]]:
        """``plan`` with the zero channels kept for rounding taken out, the "kept:" lines and
        the report entries."""
        bare_of = {sid: analysis.space(sid).channels - len(u | c) for sid, (u, c) in
                   plan.items()}
        nodes = {n.name: n for n in graph.nodes}
        out = dict(plan)
        kept: list[str] = []
        entries: list[RoundedSpace] = []
        for sid in sorted(plan):
            sp = analysis.space(sid)
            if not sp.prunable:
                continue  # graph input features: a Gather, not a layer's channels
            bare, blocks = bare_of[sid], blocks_of(sp)
            times: tuple[tuple[str, float], ...] = ()
            if self.multiple is not None:
                target, mult = round_up(bare, sp.channels, self.multiple, blocks), self.multiple
                how, cached = f"--round-to {self.multiple}", False
            else:
                target, mult, times, cached = self._choose(sp, bare, blocks, analysis, nodes,
                                                           bare_of)
                how = "measured"
            if target <= bare:
                continue
            unread, const = plan[sid]
            keep = _pick(sp, unread, const, target - bare, blocks)
            unread, const = unread - keep, const - keep
            if unread | const:
                out[sid] = (unread, const)
            else:
                del out[sid]
            e = RoundedSpace(sid, sp.channels, bare, target, mult, how, times, cached)
            entries.append(e)
            kept.append(e.text())
        return out, kept, entries

    # --- auto -----------------------------------------------------------------------------

    def _choose(self, sp: Space, bare: int, blocks: int, analysis: Analysis,
                nodes: Mapping[str, gs.Node], bare_of: Mapping[str, int]
                ) -> tuple[int, int, tuple[tuple[str, float], ...], bool]:
        cands: dict[int, int] = {}  # count -> the multiple that gives it
        for m in AUTO_MULTIPLES:
            t = round_up(bare, sp.channels, m, blocks)
            if t > bare:  # labelled by its largest multiple (1: the original size)
                cands[t] = max((k for k in AUTO_MULTIPLES if t % k == 0), default=1)
        if not cands:
            return bare, 1, (), False
        counts = [bare, *sorted(cands)]
        layers = [la for la in analysis.layers if sp.id in (la.out_space, la.in_space)]
        total = dict.fromkeys(counts, 0.0)
        cached_all, timed = True, False
        for la in layers:
            specs = {t: _conv_spec(la, nodes.get(la.node), sp.id, t, analysis, bare_of,
                                   cands.get(t)) for t in counts}
            if any(s is None for s in specs.values()):
                continue  # not a 2-D Conv with static shapes: not timed
            times, cached = self._time(specs)  # type: ignore[arg-type]
            timed = True
            cached_all &= cached
            for t in counts:
                total[t] += times[str(t)]
        if not timed:
            return bare, 1, (), False
        best = min(counts, key=lambda t: (total[t], t))
        shown = tuple((str(t), total[t]) for t in counts)
        if best == bare or total[best] >= total[bare] * (1 - self.margin):
            log.info("round-to auto %s: bare %d kept (%s)", sp.id, bare, shown)
            return bare, 1, shown, cached_all
        return best, cands[best], shown, cached_all

    def _time(self, specs: Mapping[int, ConvSpec]) -> tuple[dict[str, float], bool]:
        """Per count, the time of its one-layer model. Each is timed on its own (the timer
        feeds its models one input, and the counts differ in input channels); a layer shape
        already timed in this prune is not timed again."""
        times: dict[str, float] = {}
        cached = True
        for t, s in sorted(specs.items()):
            key = (s.w.shape, s.b is not None, s.group, s.strides, s.pads, s.dilations,
                   s.in_shape)
            if key not in self._memo:
                self._memo[key] = self.measure(s, {CONTEXT: context_model(s, self.batch)})
            got, hit = self._memo[key]
            times[str(t)] = got[CONTEXT]
            cached &= hit
        return times, cached


def context_model(spec: ConvSpec, batch: int, opset: int = 17) -> onnx.ModelProto:
    """``x -> 1x1 depthwise conv -> the conv -> 1x1 depthwise conv -> y``: the conv between
    neighbours. ONNX Runtime runs a chain of convs whose channels are multiples of its block in
    the blocked (NCHWc) layout and converts the layout only where the chain starts and ends;
    alone, a conv of rounded counts would pay both conversions and one of bare counts none,
    while in a network a bare count is what breaks the chain. Between two neighbours of its
    own channel counts, either pays the conversions at most once."""
    cin, h, w = spec.in_shape
    ho, wo = spec.out_hw
    cout = int(spec.w.shape[0])
    x = gs.Variable("x", dtype=np.float32, shape=[batch, cin, h, w])
    a = gs.Variable("a", dtype=np.float32, shape=[batch, cin, h, w])
    c = gs.Variable("c", dtype=np.float32, shape=[batch, cout, ho, wo])
    y = gs.Variable("y", dtype=np.float32, shape=[batch, cout, ho, wo])
    g = gs.Graph(inputs=[x], outputs=[y], opset=opset)
    g.nodes.append(gs.Node("Conv", "pre", {"group": cin, "kernel_shape": [1, 1]},
                           [x, gs.Constant("pre.w", np.ones((cin, 1, 1, 1), np.float32))], [a]))
    emit(g, a, spec, c, "dense", "conv")
    g.nodes.append(gs.Node("Conv", "post", {"group": cout, "kernel_shape": [1, 1]},
                           [c, gs.Constant("post.w", np.ones((cout, 1, 1, 1), np.float32))],
                           [y]))
    g.cleanup().toposort()
    return export(g)


def _pick(sp: Space, unread: set[int], const: set[int], n: int, blocks: int) -> set[int]:
    """``n`` channels of ``unread | const`` to keep, equally per block: those that tie up
    least (unread and constant, then constant, then the lowest index)."""
    pool = unread | const

    def rank(c: int) -> tuple[bool, bool, int]:
        return (not (c in unread and c in const), c not in const, c)

    if blocks <= 1:
        return set(sorted(pool, key=rank)[:n])
    size = sp.channels // blocks
    per = n // blocks
    out: set[int] = set()
    for b in range(blocks):
        out.update(sorted((c for c in pool if c // size == b), key=rank)[:per])
    return out


def _count(la: Layer, side: str, sid: str, t: int, analysis: Analysis,
           bare_of: Mapping[str, int], multiple: int | None) -> int:
    """The channels of ``la``'s ``side`` ("out"/"in") when space ``sid`` keeps ``t``, and the
    other spaces their bare counts, rounded to ``multiple`` where given: a conv runs in the
    blocked layout only when both its counts are multiples, so a space's rounding is timed
    with its neighbours rounded alike."""
    space = la.out_space if side == "out" else la.in_space
    if space == sid:
        return t
    if side == "out":
        full = la.weight_shape[la.out_axis]
    else:
        full = la.weight_shape[la.in_axis] * la.conv_groups
    if space is not None and space in bare_of and analysis.space(space).channels == full:
        other = analysis.space(space)
        return bare_of[space] if multiple is None else round_up(
            bare_of[space], full, multiple, blocks_of(other))
    return full


def _conv_spec(la: Layer, node: gs.Node | None, sid: str, t: int, analysis: Analysis,
               bare_of: Mapping[str, int], multiple: int | None = None) -> ConvSpec | None:
    """The one-layer model of conv ``la`` with space ``sid`` at ``t`` channels (dense,
    all-ones weights: only shapes matter to the time), or None when it is not timed."""
    if la.op_type != "Conv" or node is None or len(la.weight_shape) != 4:
        return None
    shape = static_shape(node.inputs[0])
    if shape is None or len(shape) != 4:
        return None
    depthwise = la.conv_groups > 1 and la.weight_shape[1] == 1
    cin = _count(la, "in", sid, t, analysis, bare_of, multiple)
    cout = _count(la, "out", sid, t, analysis, bare_of, multiple)
    if depthwise:
        mult = la.weight_shape[0] // la.conv_groups
        if la.out_space == sid or la.in_space == sid:
            cin = t if la.in_space == sid else cout // mult
        cout, group = cin * mult, cin
    else:
        group = la.conv_groups
        if cin % group or cout % group:
            return None
    kh, kw = la.weight_shape[2:]
    attrs = node.attrs
    return ConvSpec(np.ones((cout, cin // group, kh, kw), np.float32),
                    np.ones(cout, np.float32) if la.bias else None, group,
                    tuple(int(v) for v in attrs.get("strides", [1, 1])),  # type: ignore[arg-type]
                    tuple(int(v) for v in attrs.get("pads", [0, 0, 0, 0])),  # type: ignore[arg-type]
                    tuple(int(v) for v in attrs.get("dilations", [1, 1])),  # type: ignore[arg-type]
                    (cin, int(shape[2]), int(shape[3])))
