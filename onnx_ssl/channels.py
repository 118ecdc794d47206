"""Channel propagation state: layouts of tensor axes over channel spaces, with union-find.

A *layout* says which channels sit along one axis of a tensor: a sequence of segments, each a
contiguous run of channels of one raw space, every channel occupying ``block`` consecutive
positions (``block`` > 1 after a flatten into a fully connected layer or a depthwise
convolution with a channel multiplier). Raw spaces are created by producers (Conv, Gemm,
MatMul outputs, embedding lookups) and graph inputs, and are united by residual Adds,
element-wise products and depthwise convolutions. The op rules in :mod:`onnx_ssl.rules`
drive this state; the analysis in :mod:`onnx_ssl.analysis` turns it into immutable
:class:`~onnx_ssl.groups.Space` and :class:`~onnx_ssl.groups.Group` objects.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import onnx_graphsurgeon as gs

from .groups import ChannelRef, RefRole
from .reasons import Reason, ReasonCode


@dataclass(frozen=True)
class Seg:
    space: int
    start: int
    length: int


@dataclass(frozen=True)
class Layout:
    axis: int
    block: int
    segs: tuple[Seg, ...]

    @cached_property
    def channels(self) -> int:
        return sum(s.length for s in self.segs)

    @property
    def size(self) -> int:
        return self.channels * self.block

    def with_axis(self, axis: int) -> Layout:
        return Layout(axis, self.block, self.segs)

    def with_block(self, block: int) -> Layout:
        return Layout(self.axis, block, self.segs)

    def sub(self, lo: int, hi: int) -> Layout | None:
        """Positions ``lo:hi`` of the axis, or None when they cut through a channel's block."""
        if lo % self.block or hi % self.block:
            return None
        clo, chi = lo // self.block, hi // self.block
        out: list[Seg] = []
        pos = 0
        for s in self.segs:
            a, b = max(clo, pos), min(chi, pos + s.length)
            if a < b:
                out.append(Seg(s.space, s.start + a - pos, b - a))
            pos += s.length
        return Layout(self.axis, self.block, tuple(out))

    def select(self, positions: list[int] | tuple[int, ...]) -> Layout | None:
        """The channels at ``positions`` of the axis, in that order (a Gather of constant
        indices, a channel shuffle), or None when a channel spans several positions."""
        if self.block != 1 or any(not 0 <= p < self.channels for p in positions):
            return None
        out: list[Seg] = []
        for p in positions:
            s = self.sub(p, p + 1).segs[0]  # type: ignore[union-attr]
            if out and out[-1].space == s.space and out[-1].start + out[-1].length == s.start:
                out[-1] = Seg(s.space, out[-1].start, out[-1].length + 1)
            else:
                out.append(s)
        return Layout(self.axis, 1, tuple(out))


@dataclass
class RawSpace:
    length: int
    name: str
    origin: str  # "producer" | "input" | "opaque"
    reasons: list[Reason] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    # A piece of a space that a partial residual split (see Engine.split): its channels are
    # ``offset .. offset+length-1`` of the producer's, and its name says so.
    offset: int = 0
    piece: bool = False

    @property
    def label(self) -> str:
        return f"{self.name}[{self.offset}:{self.offset + self.length}]" if self.piece \
            else self.name


class Engine:
    """Mutable propagation state used by the op rules."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.parent: list[int] = []
        self.spaces: list[RawSpace] = []
        self.layouts: dict[str, Layout] = {}
        self.refs: list[ChannelRef[int]] = []
        self.weight_users: dict[str, set[str]] = {}
        self.graph_output_names: set[str] = {t.name for t in graph.outputs}
        self.opset: int = int(graph.opset or 17)
        # Space -> [(cut, tail space)]: where Engine.split cut it, in its own channel numbers.
        self.cuts: dict[int, list[tuple[int, int]]] = {}

    # --- spaces -----------------------------------------------------------------------
    def new_space(self, length: int, name: str, origin: str = "producer") -> int:
        self.parent.append(len(self.parent))
        self.spaces.append(RawSpace(length, name, origin))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        keep, gone = (ra, rb) if ra < rb else (rb, ra)
        self.parent[gone] = keep
        sk, sg = self.spaces[keep], self.spaces[gone]
        sk.reasons.extend(sg.reasons)
        sk.partitions.extend(sg.partitions)
        sk.nodes.extend(sg.nodes)
        if sg.origin != "producer":
            sk.origin = sg.origin if sk.origin == "producer" else sk.origin
        return keep

    def block(self, layout: Layout | None, reason: Reason) -> None:
        if layout is None:
            return
        for s in self.resolve(layout).segs:
            r = self.spaces[self.find(s.space)].reasons
            if reason not in r:
                r.append(reason)

    def block_space(self, space: int, reason: Reason) -> None:
        r = self.spaces[self.find(space)].reasons
        if reason not in r:
            r.append(reason)

    def touch(self, layout: Layout | None, node: gs.Node) -> None:
        if layout is None:
            return
        for s in self.resolve(layout).segs:
            self.spaces[self.find(s.space)].nodes.append(node.name)

    # --- pieces of spaces -------------------------------------------------------------
    def _pieces(self, seg: Seg) -> list[Seg]:
        cuts = self.cuts.get(seg.space)
        if not cuts:
            return [seg]
        bounds = [(0, seg.space)] + cuts + [(seg.start + seg.length, -1)]
        out: list[Seg] = []
        lo, hi = seg.start, seg.start + seg.length
        for (a, sp), (b, _) in zip(bounds, bounds[1:], strict=False):
            x, y = max(lo, a), min(hi, b)
            if x < y and sp == seg.space:  # the head: its own cuts are these
                out.append(Seg(sp, x - a, y - x))
            elif x < y:
                out.extend(self._pieces(Seg(sp, x - a, y - x)))
        return out

    def resolve(self, layout: Layout) -> Layout:
        """``layout`` in terms of the current pieces of its spaces (see :meth:`split`)."""
        if not self.cuts or not any(s.space in self.cuts for s in layout.segs):
            return layout
        segs = [p for s in layout.segs for p in self._pieces(s)]
        return Layout(layout.axis, layout.block, tuple(segs))

    def split(self, space: int, at: int) -> None:
        """Cut every space united with ``space`` (a current piece) into channels ``0..at-1``
        and ``at..``: two spaces from now on, each removable on its own. A residual Add of a
        slice of a space (a partial residual) ties only that slice to the other operand."""
        root = self.find(space)
        members = [i for i in range(len(self.spaces)) if self.find(i) == root]
        tails: list[int] = []
        for m in members:
            sm = self.spaces[m]
            t = self.new_space(sm.length - at, sm.name, sm.origin)
            st = self.spaces[t]
            st.reasons, st.partitions, st.nodes = list(sm.reasons), list(sm.partitions), \
                list(sm.nodes)
            st.offset, st.piece = sm.offset + at, True
            sm.length, sm.piece = at, True
            self.cuts.setdefault(m, []).insert(0, (at, t))
            tails.append(t)
        for t in tails[1:]:
            self.union(tails[0], t)
        refs: list[ChannelRef[int]] = []
        for r in self.refs:
            if r.space not in self.cuts or self.cuts[r.space][0][1] not in tails or (
                    r.space_start + r.length <= at):
                refs.append(r)
                continue
            tail = self.cuts[r.space][0][1]
            head = max(0, at - r.space_start)
            if head:
                refs.append(replace(r, length=head))
            refs.append(replace(r, space=tail, space_start=r.space_start + head - at,
                                tensor_start=r.tensor_start + head, length=r.length - head))
        self.refs = refs

    def _cut(self, a: Layout, b: Layout) -> tuple[int, int] | None:
        """A cut that lines ``a`` and ``b`` up: where a segment of one ends inside a segment
        of the other, or where a segment paired with different channels is part of a space."""
        ends: set[int] = set()
        for lay in (a, b):
            pos = 0
            for s in lay.segs:
                pos += s.length
                ends.add(pos)
        bounds = sorted(ends)
        for lay in (a, b):
            pos = 0
            for s in lay.segs:
                q = bounds[bisect_right(bounds, pos)]  # the first end after pos (one exists)
                if q < pos + s.length:
                    return s.space, s.start + q - pos
                pos += s.length
        for sa, sb in zip(a.segs, b.segs, strict=True):
            if self.find(sa.space) == self.find(sb.space) and sa.start == sb.start:
                continue
            for s in (sa, sb):
                if s.start:
                    return s.space, s.start
                if s.length < self.spaces[s.space].length:
                    return s.space, s.length
        return None

    def unite(self, a: Layout, b: Layout, node: gs.Node) -> bool:
        """Tie two layouts channel by channel (a residual Add, an element-wise product).

        Where a segment of one meets only part of a space in the other (a residual Add on a
        slice, a concatenation added to one tensor), the space is split first (:meth:`split`),
        unless a grouped convolution reads or writes it (its groups must stay equal)."""
        ok = a.block == b.block and a.channels == b.channels
        why = Reason(ReasonCode.LAYOUT_MISMATCH,
                     f"{node.name} ({node.op}): joins channel layouts that do not line up",
                     node=node.name)
        while ok:
            a, b = self.resolve(a), self.resolve(b)
            cut = self._cut(a, b)
            if cut is None:
                break
            space, at = cut
            if self.spaces[self.find(space)].partitions:
                why = Reason(ReasonCode.LAYOUT_MISMATCH,
                             f"{node.name} ({node.op}): ties part of the channels of a grouped "
                             f"convolution's space to other channels", node=node.name)
                ok = False
            else:
                self.split(space, at)
        if not ok:
            self.block(a, why)
            self.block(b, why)
            return False
        for sa, sb in zip(a.segs, b.segs, strict=True):
            self.union(sa.space, sb.space)
        return True

    def opaque(self, length: int, node: gs.Node, why: Reason) -> Layout:
        """A blocked space for channels whose origin is not tracked."""
        s = self.new_space(length, f"opaque:{node.name}", "opaque")
        self.spaces[s].reasons.append(why)
        return Layout(0, 1, (Seg(s, 0, length),))

    # --- refs -------------------------------------------------------------------------
    def add_refs(self, tensor: gs.Tensor, axis: int, role: RefRole, layout: Layout, node: gs.Node,
                 *, is_weight: bool, block: int | None = None, conv_groups: int = 1) -> None:
        pos = 0
        blk = layout.block if block is None else block
        layout = self.resolve(layout)
        for s in layout.segs:
            self.refs.append(ChannelRef(tensor.name, axis, role, s.space, s.start, pos, s.length,
                                    blk, node.name, is_weight, conv_groups))
            pos += s.length
        if is_weight:
            self.weight_users.setdefault(tensor.name, set()).add(node.name)
        self.touch(layout, node)

    def set_layout(self, tensor: gs.Tensor, layout: Layout, node: gs.Node) -> None:
        shape = dims(tensor)
        if shape is not None:
            d = shape[layout.axis] if 0 <= layout.axis < len(shape) else -1
            # A dim that is not static (a named or unknown dim) is not checked here.
            if isinstance(d, int) and d != layout.size:
                self.block(layout, Reason(
                    ReasonCode.LAYOUT_MISMATCH, f"{node.name} ({node.op}): output "
                    f"{tensor.name} has shape {list(shape)}, which does not match its channel "
                    f"layout", node=node.name, tensor=tensor.name))
        self.layouts[tensor.name] = layout
        self.add_refs(tensor, layout.axis, "act", layout, node, is_weight=False)

    def layout(self, tensor: gs.Tensor) -> Layout | None:
        lay = self.layouts.get(tensor.name)
        return None if lay is None else self.resolve(lay)


# --- tensor helpers --------------------------------------------------------------------


def const_value(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def is_const(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant)


def static_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    shape = t.shape
    if shape is None:
        return None
    if all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return tuple(int(d) for d in shape)
    return None


Dim = int | str | None


def dims(t: gs.Tensor) -> tuple[Dim, ...] | None:
    """The tensor's dims when its rank is known: an int for a static dim, a str for a named
    symbolic dim (a dynamic batch axis), None for an unknown one."""
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    if t.shape is None:
        return None
    out: list[Dim] = []
    for d in t.shape:
        if isinstance(d, (int, np.integer)) and d >= 0:
            out.append(int(d))
        elif isinstance(d, str) and d:
            out.append(d)
        else:
            out.append(None)
    return tuple(out)


def rank(t: gs.Tensor) -> int | None:
    if isinstance(t, gs.Constant):
        return len(t.shape)
    return None if t.shape is None else len(t.shape)
