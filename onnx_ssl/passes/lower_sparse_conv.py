"""LowerSparseConvPass: exact lowerings of convolutions with zero fibers or zero 2D filters.

Shape-wise SSL zeroes fibers ``W[:, c, m, k]`` and 2D-filter SSL zeroes ``W[n, c, :, :]``.
``ShrinkKernelsPass`` only cuts kernel borders zero in every filter; a zero inside the
kernel costs a dense Conv as much as before. This pass rewrites such a Conv (2-D, constant
weight, ``auto_pad`` NOTSET/VALID) into an exact equivalent that does less work. With
``y = conv(x, W) + b`` and ``X_col`` the im2col matrix (rows ``(c, m, k)``, columns the
output positions ``p = (i, j)``), ``y[n, p] = sum_{c,m,k} W[n, c, m, k] X_col[(c,m,k), p]
+ b[n]``; a zero column of ``W`` (a zero fiber) drops one row of ``X_col``. Candidates
(``group-classes``, ``compact-gemm``, ``row-gather`` and ``blocks`` lower a grouped conv
group by group):

* ``kernel-classes``: input channels are grouped by the bounding box ``[r0, r1] x [c0, c1]``
  of the kernel positions they still use (channels with no position are dropped). Because
  the sum over ``c`` splits into classes, ``y = b + sum_K conv(x[:, K], W[:, K, r0:r1+1,
  c0:c1+1])`` with the pads of each cropped conv ``b' = b - r0*d``, ``e' = e - (kh-1-r1)*d``
  (a negative pad crops the input with a Slice, as in ``ShrinkKernelsPass``); the output
  size is unchanged. Classes with fewer than ``min_class`` channels merge into the smallest
  class whose box contains theirs (zero fibers inside a box cost work, a class costs a node).
  A grouped conv gets one grouped Conv per box, each group's channel list padded to the
  longest with zero-weight channels.
* ``group-classes``: the kernel classes of each conv group apart, so no group is padded to
  another's class sizes: per group ``g`` (filters ``F_g``) and class ``K`` of it, an
  ungrouped Conv; ``y[:, F_g] = b[F_g] + sum_K conv(x[:, K], W[F_g, K, box_K])``, the sum a
  chain of Adds, the groups concatenated. ORT runs a Conv in its blocked NCHWc layout
  (MLAS's direct kernels: a 3x3 conv of 16 channels ran at 36 GMAC/s, one of 20 at 27)
  only when the input channels are a multiple of the block (16 floats) or fewer; a class is
  padded with zero-weight channels to the next multiple when that costs at most 15% of its
  channels, else split into a multiple and the rest (``aligned_chunks``). ORT folds each
  Add into the NCHWc Conv before it.
* ``compact-gemm``: the paper's Caffe lowering restricted to the non-zero rows of
  ``X_col``: the input is padded once; one Gather per conv group takes the channels still
  read at each kernel position ``(m, k)``, position after position (a position that reads
  a contiguous range of channels needs none), and for each position a strided Slice its
  channels and the window ``x_p[:, :, m*d + i*s, k*d + j*s]``; the pieces
  are concatenated into ``[N, K, Ho*Wo]`` (``K`` the non-zero columns), and one MatMul with
  the compacted ``W[:, cols]`` (shape ``[N_f, K]``) plus the bias gives ``[N, N_f,
  Ho*Wo]``, reshaped to ``[N, N_f, Ho, Wo]``. (One Gather with flat indices builds the same
  matrix but copies element by element: measured 4x slower.)
* ``row-gather``: the same im2col matrix and MatMul in fewer nodes: one strided Slice per
  kernel column ``k`` of the padded input (``x_p[:, :, :, k*d + j*s]``, all channels and rows),
  concatenated into rows of ``Wo`` values, and one Gather per group of the ``Ho`` rows of
  each kept column ``(c, m, k)``. It copies the input once per kernel column and gathers whole
  output rows: ahead of ``compact-gemm`` where many kernel positions each read few channels
  (CaffeNet's 5x5 conv2 with random zero columns: 110 nodes become 17), behind it on 3x3
  kernels.
* ``blocks``: filters and channels joined by a non-zero 2D filter ``W[n, c]`` form the
  connected components of a bipartite graph; ``y[:, F] = conv(x[:, C_F], W[F, C_F])`` for
  each component ``(F, C_F)``, so the conv is the concatenation of smaller convs, the output
  channels put back in order with a Gather. When all components have one size this is a
  single grouped Conv on a channel permutation of ``x``. Filters with no non-zero 2D filter
  join the first component (they output their bias).
* ``dense``: the Conv as it is; always a candidate, so a lowering is never slower than the
  input by measurement.

With ``strategy="auto"`` each candidate that does fewer MACs than the dense conv is built as
a one-layer model and timed with ONNX Runtime (all graph optimisations on) for the execution
provider, batch size and thread count compiled for; the fastest wins, and a lowering must
beat the dense conv by ``margin`` (noise). Timings are cached as JSON under ``cache_dir``
keyed by the layer's shapes, attributes, zero pattern and the runtime settings. A named
strategy is applied wherever it does fewer MACs, without timing (deterministic). Emitted
nodes are named ``<conv>.lowered...``; the pass leaves them alone, so a second run reports no
change (with ``auto``, a conv kept dense is decided again from the cached timings; without
a cache, timing noise could decide otherwise).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_ssl.errors import InputError
from onnx_ssl.graphutil import clear_inner_shapes, export, unique_name
from onnx_ssl.pipeline import PassBase, PassResult, Report

log = logging.getLogger(__name__)

CANDIDATES = ("kernel-classes", "group-classes", "compact-gemm", "row-gather", "blocks")
STRATEGIES = ("auto", "off", *CANDIDATES)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MARKER = ".lowered"
# MLAS's NCHWc block on AVX-512 (16 floats; AVX2's 8 divides it).
NCHWC_BLOCK = 16
ALIGN_WASTE = 0.15
INT64_MAX = int(np.iinfo(np.int64).max)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnx-ssl-lowering"


@dataclass(frozen=True)
class LayerLowering:
    """The choice for one conv: MACs per sample, params, and the measured times (ms)."""

    node: str
    strategy: str
    filters: int
    channels: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    times_ms: tuple[tuple[str, float], ...] = ()
    cached: bool = False


@dataclass(frozen=True)
class LowerSparseConvReport(Report):
    lowered: tuple[LayerLowering, ...] = ()
    # Convs with zero fibers or 2D filters that measurement kept dense.
    dense: tuple[LayerLowering, ...] = field(default=(), metadata={"info": True})
    kept: tuple[str, ...] = field(default=(), metadata={"info": True})


@dataclass(frozen=True)
class ConvSpec:
    """A 2-D Conv with constant weight ``w`` ``[N, C/group, kh, kw]`` on input ``[C, H, W]``."""

    w: np.ndarray
    b: np.ndarray | None
    group: int
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]
    in_shape: tuple[int, int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        kh, kw = self.w.shape[2:]
        (sh, sw), (dh, dw), p = self.strides, self.dilations, self.pads
        _, h, wd = self.in_shape
        return ((h + p[0] + p[2] - dh * (kh - 1) - 1) // sh + 1,
                (wd + p[1] + p[3] - dw * (kw - 1) - 1) // sw + 1)

    def groups(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Per conv group: global input channel ids, its weight slice, its bias slice."""
        n, cg = self.w.shape[:2]
        ng = n // self.group
        out = []
        for g in range(self.group):
            f = slice(g * ng, (g + 1) * ng)
            out.append((np.arange(g * cg, (g + 1) * cg), self.w[f],
                        None if self.b is None else self.b[f]))
        return out


def dense_macs(spec: ConvSpec) -> int:
    ho, wo = spec.out_hw
    return int(spec.w.size) * ho * wo


# --- candidate plans: lists of (channels, weight, bias) pieces, their MACs ----------------

def _boxes(wg: np.ndarray) -> dict[tuple[int, int, int, int], list[int]]:
    used = np.any(wg != 0, axis=0)  # [Cg, kh, kw]
    boxes: dict[tuple[int, int, int, int], list[int]] = {}
    for c in range(wg.shape[1]):
        rows = np.flatnonzero(used[c].any(axis=1))
        cols = np.flatnonzero(used[c].any(axis=0))
        if rows.size == 0:
            continue
        boxes.setdefault((int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])),
                         []).append(c)
    return boxes


def kernel_classes(wg: np.ndarray, min_class: int) -> list[tuple[tuple[int, int, int, int],
                                                                  list[int]]]:
    """Classes ``(box, channels)`` of one conv group, small ones merged into containing."""
    boxes = _boxes(wg)

    def area(b: tuple[int, int, int, int]) -> int:
        return (b[1] - b[0] + 1) * (b[3] - b[2] + 1)

    changed = True
    while changed:
        changed = False
        for box in sorted(boxes, key=lambda b: (len(boxes[b]), area(b), b)):
            if len(boxes[box]) >= min_class:
                continue
            hosts = [o for o in boxes if o != box and o[0] <= box[0] and o[1] >= box[1]
                     and o[2] <= box[2] and o[3] >= box[3]]
            if hosts:
                host = min(hosts, key=lambda o: (area(o), o))
                boxes[host] = sorted(boxes[host] + boxes.pop(box))
                changed = True
                break
    return sorted(boxes.items(), key=lambda kv: kv[1][0])


def aligned_classes(spec: ConvSpec, min_class: int
                    ) -> list[tuple[tuple[int, int, int, int], list[list[int]]]]:
    """Kernel classes of every conv group, aligned by box: ``(box, [channels of group g])``.

    One grouped Conv per box serves all groups; a group with fewer channels in a box is
    padded with zero-weight copies of a channel (exact, a few wasted MACs).
    """
    per: dict[tuple[int, int, int, int], list[list[int]]] = {}
    for g, (_, wg, _) in enumerate(spec.groups()):
        for box, cls in kernel_classes(wg, min_class):
            per.setdefault(box, [[] for _ in range(spec.group)])[g] = cls
    return sorted(per.items(), key=lambda kv: min((c[0] for c in kv[1] if c), default=0))


def _classes_macs(spec: ConvSpec, min_class: int) -> int:
    ho, wo = spec.out_hw
    total = 0
    for box, cls in aligned_classes(spec, min_class):
        total += spec.w.shape[0] * max(len(c) for c in cls) * (box[1] - box[0] + 1) * (
            box[3] - box[2] + 1)
    return total * ho * wo


def aligned_chunks(n: int, block: int = NCHWC_BLOCK, waste: float = ALIGN_WASTE
                   ) -> list[tuple[int, int, int]]:
    """Channel ranges ``(start, stop, width)`` of a class of ``n`` channels for NCHWc.

    ORT runs a Conv in its blocked NCHWc layout (MLAS's direct kernels, the fastest for
    these shapes) only when its input channels are a multiple of ``block`` or fewer. A class
    is padded up to the next multiple (``width > stop - start``, zero weights) when that adds
    at most ``waste`` of its channels, else split into a multiple of ``block`` and the rest.
    """
    if n <= block or n % block == 0:
        return [(0, n, n)]
    up = n + (-n) % block
    if (up - n) / n <= waste:
        return [(0, n, up)]
    cut = n - n % block
    return [(0, cut, cut), (cut, n, n - cut)]


def _group_classes_macs(spec: ConvSpec, min_class: int) -> int:
    ho, wo = spec.out_hw
    total = 0
    for _, wg, _ in spec.groups():
        for (r0, r1, c0, c1), cls in kernel_classes(wg, min_class):
            width = sum(w for _, _, w in aligned_chunks(len(cls)))
            total += wg.shape[0] * width * (r1 - r0 + 1) * (c1 - c0 + 1)
    return total * ho * wo


def _gemm_macs(spec: ConvSpec) -> int:
    ho, wo = spec.out_hw
    ng = spec.w.shape[0] // spec.group
    total = sum(ng * int(np.any(wg != 0, axis=0).sum()) for _, wg, _ in spec.groups())
    return total * ho * wo


def blocks(wg: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """Connected components ``(filters, channels)`` of the non-zero 2D filters of a group."""
    nz = np.any(wg != 0, axis=(2, 3))  # [Ng, Cg]
    ng, cg = nz.shape
    parent = list(range(ng + cg))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for n, c in zip(*np.nonzero(nz), strict=True):
        ra, rb = find(int(n)), find(ng + int(c))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, tuple[list[int], list[int]]] = {}
    for n in range(ng):
        if nz[n].any():
            comps.setdefault(find(n), ([], []))[0].append(n)
    for c in range(cg):
        if nz[:, c].any():
            comps.setdefault(find(ng + c), ([], []))[1].append(c)
    out = sorted(comps.values(), key=lambda fc: fc[0][0])
    orphans = [n for n in range(ng) if not nz[n].any()]
    if orphans:
        if not out:
            out = [([], [0])]
        out[0] = (sorted(out[0][0] + orphans), out[0][1])
    return out


def _blocks_macs(spec: ConvSpec) -> int:
    ho, wo = spec.out_hw
    kk = spec.w.shape[2] * spec.w.shape[3]
    return sum(len(f) * len(c) * kk for _, wg, _ in spec.groups() for f, c in blocks(wg)
               ) * ho * wo


def candidate_macs(spec: ConvSpec, strategy: str, min_class: int = 4) -> int:
    if strategy == "kernel-classes":
        return _classes_macs(spec, min_class)
    if strategy == "group-classes":
        return _group_classes_macs(spec, min_class)
    if strategy in ("compact-gemm", "row-gather"):
        return _gemm_macs(spec)
    if strategy == "blocks":
        return _blocks_macs(spec)
    return dense_macs(spec)


# --- emitting a candidate into a graph ---------------------------------------------------

class _Emitter:
    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph, self.prefix, self.params = graph, prefix, 0

    def const(self, tag: str, value: np.ndarray, param: bool = False) -> gs.Constant:
        if param:
            self.params += int(value.size)
        return gs.Constant(unique_name(self.graph, f"{self.prefix}.{tag}"),
                           np.ascontiguousarray(value))

    def ints(self, tag: str, values: Sequence[int]) -> gs.Constant:
        return self.const(tag, np.array(list(values), dtype=np.int64))

    def node(self, op: str, tag: str, inputs: list[gs.Tensor],
             attrs: dict[str, Any] | None = None, out: gs.Variable | None = None
             ) -> gs.Variable:
        name = unique_name(self.graph, f"{self.prefix}{MARKER}.{tag}")
        y = out if out is not None else gs.Variable(unique_name(self.graph, f"{name}_out"),
                                                    dtype=np.float32)
        self.graph.nodes.append(gs.Node(op, name=name, attrs=attrs or {}, inputs=inputs,
                                        outputs=[y]))
        return y

    def channels(self, x: gs.Tensor, chans: np.ndarray, total: int, tag: str) -> gs.Tensor:
        """``x[:, chans]``: nothing, a Slice (a contiguous range) or a Gather."""
        if len(chans) == total and np.array_equal(chans, np.arange(total)):
            return x
        if np.array_equal(chans, np.arange(chans[0], chans[0] + len(chans))):
            return self.node("Slice", f"{tag}_ch", [
                x, self.ints(f"{tag}.starts", [int(chans[0])]),
                self.ints(f"{tag}.ends", [int(chans[0]) + len(chans)]),
                self.ints(f"{tag}.axes", [1])])
        return self.node("Gather", f"{tag}_ch",
                         [x, self.ints(f"{tag}.idx", [int(c) for c in chans])], {"axis": 1})

    def conv(self, x: gs.Tensor, w: np.ndarray, b: np.ndarray | None, spec: ConvSpec,
             tag: str, pads: Sequence[int] | None = None, group: int = 1,
             out: gs.Variable | None = None) -> gs.Variable:
        inputs: list[gs.Tensor] = [x, self.const(f"{tag}.w", w, True)]
        if b is not None:
            inputs.append(self.const(f"{tag}.b", b, True))
        return self.node("Conv", tag, inputs, {
            "kernel_shape": list(w.shape[2:]), "strides": list(spec.strides),
            "dilations": list(spec.dilations), "pads": list(pads or spec.pads),
            "group": group}, out)

    def join(self, parts: list[gs.Variable], op: str, tag: str,
             out: gs.Variable | None) -> gs.Variable:
        if len(parts) == 1:
            if out is None:
                return parts[0]
            return self.node("Identity", tag, [parts[0]], out=out)
        attrs = {"axis": 1} if op == "Concat" else {}
        return self.node(op, tag, list(parts), attrs, out)


def _emit_classes(em: _Emitter, x: gs.Tensor, spec: ConvSpec, y: gs.Variable,
                  min_class: int) -> None:
    c_total = spec.in_shape[0]
    kh, kw = spec.w.shape[2:]
    groups = spec.groups()
    parts = []
    for k, (box, cls) in enumerate(aligned_classes(spec, min_class)):
        r0, r1, c0, c1 = box
        tag = f"c{k}"
        n = max(len(c) for c in cls)
        idx: list[int] = []
        ws = []
        for (chans, wg, _), cg in zip(groups, cls, strict=True):
            idx += [int(chans[c]) for c in cg] + [int(chans[0])] * (n - len(cg))
            wk = np.zeros((wg.shape[0], n, r1 - r0 + 1, c1 - c0 + 1), np.float32)
            wk[:, :len(cg)] = wg[:, cg, r0:r1 + 1, c0:c1 + 1]
            ws.append(wk)
        pads, lo, hi = _box_pads(spec, box)
        xs = _crop(em, em.channels(x, np.array(idx), c_total, tag), lo, hi, tag)
        parts.append(em.conv(xs, np.concatenate(ws), spec.b if k == 0 else None, spec, tag,
                             pads, group=spec.group))
    if not parts:  # every weight is zero: the output is the bias
        xs = em.channels(x, np.array([int(c[0]) for c, _, _ in groups]), c_total, "zero")
        parts.append(em.conv(xs, np.zeros((spec.w.shape[0], 1, kh, kw), np.float32), spec.b,
                             spec, "zero", group=spec.group))
    em.join(parts, "Sum", "sum", y)


def _box_pads(spec: ConvSpec, box: tuple[int, int, int, int]
              ) -> tuple[list[int], list[int], list[int]]:
    """Pads of the conv cropped to ``box``; a negative pad is a crop: (pads, lo, hi)."""
    r0, r1, c0, c1 = box
    kh, kw = spec.w.shape[2:]
    (dh, dw), p = spec.dilations, spec.pads
    b = [p[0] - r0 * dh, p[1] - c0 * dw, p[2] - (kh - 1 - r1) * dh, p[3] - (kw - 1 - c1) * dw]
    return ([max(0, v) for v in b], [max(0, -b[0]), max(0, -b[1])],
            [max(0, -b[2]), max(0, -b[3])])


def _crop(em: _Emitter, x: gs.Tensor, lo: Sequence[int], hi: Sequence[int], tag: str
          ) -> gs.Tensor:
    """``x[:, :, lo0:H-hi0, lo1:W-hi1]``, or ``x`` when there is nothing to cut."""
    axes = [a for a in (0, 1) if lo[a] or hi[a]]
    if not axes:
        return x
    return em.node("Slice", f"{tag}_crop", [
        x, em.ints(f"{tag}.crop_starts", [lo[a] for a in axes]),
        em.ints(f"{tag}.crop_ends", [-hi[a] if hi[a] else INT64_MAX for a in axes]),
        em.ints(f"{tag}.crop_axes", [a + 2 for a in axes])])


def _emit_group_classes(em: _Emitter, x: gs.Tensor, spec: ConvSpec, y: gs.Variable,
                        min_class: int) -> None:
    c_total = spec.in_shape[0]
    outs = []
    for g, (chans, wg, bg) in enumerate(spec.groups()):
        parts: list[gs.Variable] = []
        for k, (box, cls) in enumerate(kernel_classes(wg, min_class)):
            r0, r1, c0, c1 = box
            pads, lo, hi = _box_pads(spec, box)
            for j, (a, e, width) in enumerate(aligned_chunks(len(cls))):
                tag = f"g{g}c{k}s{j}"
                sub = cls[a:e]
                # A chunk padded to ``width`` reads a channel again with zero weights.
                idx = [int(chans[c]) for c in sub] + [int(chans[sub[0]])] * (width - len(sub))
                wk = np.zeros((wg.shape[0], width, r1 - r0 + 1, c1 - c0 + 1), np.float32)
                wk[:, :len(sub)] = wg[:, sub, r0:r1 + 1, c0:c1 + 1]
                xs = _crop(em, em.channels(x, np.array(idx), c_total, tag), lo, hi, tag)
                parts.append(em.conv(xs, wk, None if parts else bg, spec, tag, pads))
        if not parts:
            parts.append(_zero_group(em, x, spec, g, bg))
        # Adds, not one Sum: ORT's NCHWc transformer folds each Add into the Conv before it.
        while len(parts) > 2:
            parts = [em.node("Add", f"g{g}add", parts[:2]), *parts[2:]]
        outs.append(em.join(parts, "Add", f"g{g}add", y if spec.group == 1 else None))
    if spec.group > 1:
        em.join(outs, "Concat", "concat", y)


def _zero_group(em: _Emitter, x: gs.Tensor, spec: ConvSpec, g: int,
                bg: np.ndarray | None) -> gs.Variable:
    """A conv group whose weights are all zero: a zero conv of the same geometry on one
    channel gives the output size, plus the bias."""
    x0 = em.channels(x, np.array([0]), spec.in_shape[0], f"g{g}z")
    ng, _, kh, kw = spec.w.shape
    return em.conv(x0, np.zeros((ng // spec.group, 1, kh, kw), np.float32), bg, spec,
                   f"g{g}zero")


def padded(em: _Emitter, x: gs.Tensor, spec: ConvSpec) -> gs.Tensor:
    """``x`` with the conv's pads applied (one Pad), or ``x`` when it has none."""
    p = spec.pads
    if not any(p):
        return x
    return em.node("Pad", "pad", [x, em.ints("pads", [0, 0, p[0], p[1], 0, 0, p[2], p[3]])])


def _gemm_output(em: _Emitter, x: gs.Tensor, spec: ConvSpec,
                 outs: list[gs.Variable | None], y: gs.Variable) -> None:
    """``y`` from each group's product ``[N, N_g, Ho*Wo]`` (None: a group whose weights are
    all zero): the groups concatenated, plus the bias, reshaped to ``[N, N_f, Ho, Wo]``."""
    ng = spec.w.shape[0] // spec.group
    full: list[gs.Variable] = []
    for g, o in enumerate(outs):
        if o is None:
            z = _zero_group(em, x, spec, g, None)
            o = em.node("Reshape", f"g{g}zflat", [z, em.ints(f"g{g}zs", [0, ng, -1])])
        full.append(o)
    cat = em.join(full, "Concat", "concat", None)
    if spec.b is not None:
        cat = em.node("Add", "bias", [cat, em.const("b", spec.b.reshape(-1, 1), True)])
    ho, wo = spec.out_hw
    em.node("Reshape", "unflatten", [cat, em.ints("out_shape", [0, spec.w.shape[0], ho, wo])],
            out=y)


def _emit_gemm(em: _Emitter, x: gs.Tensor, spec: ConvSpec, y: gs.Variable) -> None:
    c = spec.in_shape[0]
    (sh, sw), (dh, dw) = spec.strides, spec.dilations
    ho, wo = spec.out_hw
    x_in, x = x, padded(em, x, spec)
    outs: list[gs.Variable | None] = []
    for g, (chans, wg, _) in enumerate(spec.groups()):
        used = np.any(wg != 0, axis=0)  # [Cg, kh, kw]
        # The rows (c, m, k) of X_col, position after position: the channels read at (m, k),
        # then the window. A position that reads a contiguous range of channels is one Slice
        # of x; the channels of all other positions come from one Gather, which each
        # position's Slice then cuts (a Gather per position cost a node each: up to 7% of
        # conv3's time; one Gather of a whole range would copy x once more per position).
        spans: list[tuple[bool, int, int, int, int]] = []
        rows: list[int] = []
        cols = []
        for m, k in zip(*np.nonzero(used.any(axis=0)), strict=True):
            cs = np.flatnonzero(used[:, m, k])
            cc = chans[cs]
            if np.array_equal(cc, np.arange(cc[0], cc[0] + len(cc))):
                spans.append((False, int(cc[0]), int(cc[0]) + len(cc), int(m), int(k)))
            else:
                spans.append((True, len(rows), len(rows) + len(cs), int(m), int(k)))
                rows += [int(v) for v in cc]
            cols.append(wg[:, cs, m, k])
        if not spans:
            outs.append(None)
            continue
        xg = em.channels(x, np.array(rows), c, f"g{g}") if rows else x
        pieces = [em.node("Slice", f"g{g}m{m}k{k}_win", [
            xg if gathered else x, em.ints(f"g{g}m{m}k{k}.starts", [a, m * dh, k * dw]),
            em.ints(f"g{g}m{m}k{k}.ends",
                    [b, m * dh + sh * (ho - 1) + 1, k * dw + sw * (wo - 1) + 1]),
            em.ints(f"g{g}m{m}k{k}.axes", [1, 2, 3]),
            em.ints(f"g{g}m{m}k{k}.steps", [1, sh, sw])]) for gathered, a, b, m, k in spans]
        cat = em.join(pieces, "Concat", f"g{g}im2col", None)  # [N, K, Ho, Wo]
        xcol = em.node("Reshape", f"g{g}xcol", [cat, em.ints(f"g{g}.xshape", [0, -1, ho * wo])])
        wc = np.concatenate(cols, axis=1)  # [Ng, K]
        outs.append(em.node("MatMul", f"g{g}gemm", [em.const(f"g{g}.w", wc, True), xcol]))
    _gemm_output(em, x_in, spec, outs, y)


def _emit_row_gather(em: _Emitter, x: gs.Tensor, spec: ConvSpec, y: gs.Variable) -> None:
    c = spec.in_shape[0]
    (sh, sw), (dh, dw) = spec.strides, spec.dilations
    ho, wo = spec.out_hw
    hp = spec.in_shape[1] + spec.pads[0] + spec.pads[2]
    xp = padded(em, x, spec)
    groups = spec.groups()
    used = [np.any(wg != 0, axis=0) for _, wg, _ in groups]  # [Cg, kh, kw] each
    ks = sorted({int(k) for u in used for k in np.flatnonzero(u.any(axis=(0, 1)))})
    rows: gs.Tensor | None = None
    if ks:
        # Copy k of the input holds x_p[:, :, r, k*dw + j*sw]: a row r of channel c is the
        # Wo values the output row reads at kernel column k.
        shifted = [em.node("Slice", f"k{k}", [
            xp, em.ints(f"k{k}.starts", [k * dw]),
            em.ints(f"k{k}.ends", [k * dw + sw * (wo - 1) + 1]),
            em.ints(f"k{k}.axes", [3]), em.ints(f"k{k}.steps", [sw])]) for k in ks]
        cat = em.join(shifted, "Concat", "shifts", None)  # [N, len(ks)*C, Hp, Wo]
        rows = em.node("Reshape", "rows", [cat, em.ints("rows_shape",
                                                        [0, len(ks) * c * hp, wo])])
    outs: list[gs.Variable | None] = []
    for g, ((chans, wg, _), u) in enumerate(zip(groups, used, strict=True)):
        idx, cols = [], []
        for m, k in zip(*np.nonzero(u.any(axis=0)), strict=True):
            cs = np.flatnonzero(u[:, m, k])
            base = ks.index(int(k)) * c * hp + int(m) * dh
            idx += [[base + int(chans[i]) * hp + r * sh for r in range(ho)] for i in cs]
            cols.append(wg[:, cs, m, k])
        if rows is None or not idx:
            outs.append(None)
            continue
        xg = em.node("Gather", f"g{g}im2col", [rows, em.const(f"g{g}.idx", np.array(
            idx, dtype=np.int64))], {"axis": 1})  # [N, K, Ho, Wo]
        xcol = em.node("Reshape", f"g{g}xcol", [xg, em.ints(f"g{g}.xshape",
                                                             [0, len(idx), ho * wo])])
        outs.append(em.node("MatMul", f"g{g}gemm", [
            em.const(f"g{g}.w", np.concatenate(cols, axis=1), True), xcol]))
    _gemm_output(em, x, spec, outs, y)


def _emit_blocks(em: _Emitter, x: gs.Tensor, spec: ConvSpec, y: gs.Variable) -> None:
    c_total = spec.in_shape[0]
    ng = spec.w.shape[0] // spec.group
    order: list[int] = []
    comps_all: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]] = []
    for g, (chans, wg, bg) in enumerate(spec.groups()):
        for f, c in blocks(wg):
            fi, ci = np.array(f, dtype=np.int64), np.array(c, dtype=np.int64)
            comps_all.append((chans[ci], wg[fi][:, ci], None if bg is None else bg[fi],
                              fi + g * ng))
            order += [int(v) + g * ng for v in f]
    sizes = {(len(cc), w.shape[0]) for cc, w, _, _ in comps_all}
    if len(sizes) == 1 and len(comps_all) > 1:
        allc = np.concatenate([cc for cc, _, _, _ in comps_all])
        xs = em.channels(x, allc, c_total, "blk")
        w = np.concatenate([w for _, w, _, _ in comps_all])
        b = None if spec.b is None else np.concatenate([b for _, _, b, _ in comps_all
                                                        if b is not None])
        cat = em.conv(xs, w, b, spec, "blkconv", group=len(comps_all))
    else:
        parts = [em.conv(em.channels(x, cc, c_total, f"b{k}"), w, b, spec, f"b{k}")
                 for k, (cc, w, b, _) in enumerate(comps_all)]
        cat = em.join(parts, "Concat", "concat", None)
    inv = np.argsort(np.array(order))
    if np.array_equal(inv, np.arange(len(order))):
        em.node("Identity", "out", [cat], out=y)
    else:
        em.node("Gather", "unpermute", [cat, em.ints("perm", [int(v) for v in inv])],
                {"axis": 1}, out=y)


def emit(graph: gs.Graph, x: gs.Tensor, spec: ConvSpec, y: gs.Variable, strategy: str,
         prefix: str, min_class: int = 4) -> int:
    """Append the nodes of ``strategy`` computing ``y`` from ``x``; returns its params."""
    em = _Emitter(graph, prefix)
    if strategy == "kernel-classes":
        _emit_classes(em, x, spec, y, min_class)
    elif strategy == "compact-gemm":
        _emit_gemm(em, x, spec, y)
    elif strategy == "row-gather":
        _emit_row_gather(em, x, spec, y)
    elif strategy == "blocks":
        _emit_blocks(em, x, spec, y)
    elif strategy == "group-classes":
        _emit_group_classes(em, x, spec, y, min_class)
    elif strategy == "dense":  # the conv itself: no lowering marker in its name
        em.conv(x, spec.w, spec.b, spec, "dense", group=spec.group, out=y)
        graph.nodes[-1].name = unique_name(graph, prefix)
    else:
        raise ValueError(f"unknown lowering strategy {strategy!r}")
    return em.params


def layer_model(spec: ConvSpec, strategy: str, batch: int, opset: int = 17,
                min_class: int = 4) -> onnx.ModelProto:
    """A one-layer model ``x [batch, C, H, W] -> y`` computing the conv with ``strategy``."""
    x = gs.Variable("x", dtype=np.float32, shape=[batch, *spec.in_shape])
    ho, wo = spec.out_hw
    y = gs.Variable("y", dtype=np.float32, shape=[batch, spec.w.shape[0], ho, wo])
    g = gs.Graph(inputs=[x], outputs=[y], opset=opset)
    emit(g, x, spec, y, strategy, "conv", min_class)
    g.cleanup().toposort()
    return export(g)


# --- measurement ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Timer:
    """Times one-layer models with ONNX Runtime (graph optimisations on, in alternation, each
    round starting one model later; the minimum of ``iters`` runs, fewer once ``budget_s``
    is spent, and more, up to ten times ``iters``, until ``min_s`` has passed: a burst of
    another job's work on a shared core, which slows every model it overlaps, then covers
    only part of the rounds). At one CPU thread the clock is the calling thread's CPU
    time."""

    provider: str = "cpu"
    batch: int = 1
    threads: int = 0
    iters: int = 30
    budget_s: float = 0.5
    min_s: float = 0.2
    cache_dir: Path | None = None

    def key(self, spec: ConvSpec, names: Sequence[str]) -> str:
        from onnx_ssl import env

        lim = env.runtime_limits()
        h = hashlib.sha256()
        h.update(json.dumps([lim.name, lim.version, self.provider, self.batch, self.threads,
                             list(spec.w.shape), spec.b is not None, spec.group,
                             spec.strides, spec.pads, spec.dilations, spec.in_shape,
                             list(names)]).encode())
        h.update(np.packbits(spec.w != 0).tobytes())
        return h.hexdigest()[:32]

    def measure(self, spec: ConvSpec, models: dict[str, onnx.ModelProto]
                ) -> tuple[dict[str, float], bool]:
        """Latency (ms) of each model; ``True`` when read from the cache."""
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{self.key(spec, sorted(models))}.json"
            if path.is_file():
                try:
                    got = json.loads(path.read_text())
                    if set(got) == set(models):
                        return {k: float(v) for k, v in got.items()}, True
                except (OSError, ValueError):
                    pass
        times = self._time(models)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(times))
                tmp.replace(path)
            except OSError as e:  # a cache that cannot be written only costs time
                log.info("lowering cache not written: %s", e)
        return times, False

    def _time(self, models: dict[str, onnx.ModelProto]) -> dict[str, float]:
        from onnx_ssl.runtime import ort

        rt = ort("prune --lower")
        ep = PROVIDERS[self.provider]
        if ep not in rt.get_available_providers():
            raise InputError(f"--provider {self.provider}: {ep} is not available in this "
                             f"ONNX Runtime (available: "
                             f"{', '.join(rt.get_available_providers())})")
        sessions = {}
        for name, m in models.items():
            so = rt.SessionOptions()
            so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.threads:
                so.intra_op_num_threads = self.threads
            so.log_severity_level = 3
            sessions[name] = rt.InferenceSession(m.SerializeToString(), so, providers=[ep])
        first = next(iter(sessions.values())).get_inputs()[0]
        rng = np.random.default_rng(0)
        feeds = {first.name: rng.standard_normal(first.shape).astype(np.float32)}
        for s in sessions.values():
            s.run(None, feeds)
        samples: dict[str, list[float]] = {n: [] for n in sessions}
        # At one thread ORT runs on the calling thread: its CPU time is the layer's time
        # without the time slices other jobs on a shared machine take.
        clock = time.thread_time if self.threads == 1 and self.provider == "cpu" else (
            time.perf_counter)
        t0 = time.perf_counter()
        t_min, t_end = t0 + min(self.min_s, self.budget_s), t0 + self.budget_s
        names = list(sessions)
        for i in range(10 * self.iters):
            # A rotating order: the model after a larger one finds less of its data cached.
            for n in names[i % len(names):] + names[:i % len(names)]:
                t = clock()
                sessions[n].run(None, feeds)
                samples[n].append(clock() - t)
            now = time.perf_counter()
            if i >= 2 and now > t_end or i + 1 >= self.iters and now > t_min:
                break
        # The minimum: other jobs on the machine only ever add time.
        return {n: 1e3 * min(v) for n, v in samples.items()}


# --- the pass ---------------------------------------------------------------------------------

def _spec(node: gs.Node, in_shape: Sequence[int] | None) -> ConvSpec | str:
    """The conv as a ConvSpec, or why it is not lowered."""
    w = np.asarray(node.inputs[1].values)
    if w.ndim != 4:
        return f"{w.ndim - 2}-D convolution (only 2-D is lowered)"
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad {node.attrs['auto_pad']}"
    if len(node.inputs[1].outputs) > 1:
        return "weight shared"
    if w.dtype != np.float32:
        return f"weight dtype {w.dtype}"
    b = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        if not isinstance(node.inputs[2], gs.Constant):
            return "bias is not a constant"
        b = np.asarray(node.inputs[2].values)
    if in_shape is None or len(in_shape) != 4 or any(
            not isinstance(d, (int, np.integer)) or d <= 0 for d in list(in_shape)[1:]):
        return "input channels and spatial size are not static"
    group = int(node.attrs.get("group", 1))
    return ConvSpec(w, b, group,
                    tuple(int(v) for v in node.attrs.get("strides", [1, 1])),  # type: ignore[arg-type]
                    tuple(int(v) for v in node.attrs.get("pads", [0, 0, 0, 0])),  # type: ignore[arg-type]
                    tuple(int(v) for v in node.attrs.get("dilations", [1, 1])),  # type: ignore[arg-type]
                    (int(in_shape[1]), int(in_shape[2]), int(in_shape[3])))


def _input_shapes(graph: gs.Graph, names: Sequence[str]) -> dict[str, list[Any]]:
    model = onnx.shape_inference.infer_shapes(export(graph.copy()))
    out: dict[str, list[Any]] = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if vi.name in names and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                            for d in vi.type.tensor_type.shape.dim]
    return out


class LowerSparseConvPass(PassBase[LowerSparseConvReport]):
    """Lower convs with zero fibers or 2D filters; ``strategy`` auto, off or a candidate
    (``candidates``: those ``auto`` times)."""

    name = "lower-sparse-conv"

    def __init__(self, strategy: str = "auto", *, provider: str = "cpu", batch: int = 1,
                 threads: int = 0, cache_dir: Path | None = None, margin: float = 0.05,
                 min_class: int = 4, max_groups: int = 8,
                 candidates: Sequence[str] = CANDIDATES,
                 timer: Callable[[ConvSpec, dict[str, onnx.ModelProto]],
                                 tuple[dict[str, float], bool]] | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"--lower must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if provider not in PROVIDERS:
            raise ValueError(f"--provider must be one of {', '.join(PROVIDERS)}")
        if not candidates or any(c not in CANDIDATES for c in candidates):
            raise ValueError(f"candidates must be among {', '.join(CANDIDATES)}, "
                             f"got {', '.join(candidates) or 'none'}")
        self.strategy, self.batch, self.margin = strategy, batch, margin
        self.candidates = tuple(candidates)
        self.min_class, self.max_groups = min_class, max_groups
        self.measure = timer or Timer(provider, batch, threads, cache_dir=cache_dir).measure

    def call(self, graph: gs.Graph) -> PassResult[LowerSparseConvReport]:
        if self.strategy == "off":
            return PassResult(graph, LowerSparseConvReport())
        kept: list[str] = []
        convs = [n for n in graph.nodes if n.op == "Conv" and MARKER not in n.name
                 and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)]
        todo = []
        for n in convs:
            w = np.asarray(n.inputs[1].values)
            if w.ndim < 3 or bool(np.all(np.any(w != 0, axis=0))) and bool(
                    np.all(np.any(w != 0, axis=tuple(range(2, w.ndim))))):
                continue  # no zero fiber, no zero 2D filter: nothing to lower
            todo.append(n)
        if not todo:
            return PassResult(graph, LowerSparseConvReport())
        shapes = _input_shapes(graph, [n.inputs[0].name for n in todo])
        graph = graph.copy()
        nodes = {n.name: n for n in graph.nodes}
        opset = int(graph.opset)
        lowered: list[LayerLowering] = []
        dense: list[LayerLowering] = []
        for orig in todo:
            node = nodes[orig.name]
            spec = _spec(node, shapes.get(node.inputs[0].name))
            if isinstance(spec, str):
                kept.append(f"{node.name}: zero fibers/2D filters not lowered ({spec})")
                continue
            if spec.group > self.max_groups:
                kept.append(f"{node.name}: zero fibers/2D filters not lowered (group "
                            f"{spec.group} > {self.max_groups}: one lowering per conv group)")
                continue
            base = dense_macs(spec)
            names = self.candidates if self.strategy == "auto" else (self.strategy,)
            macs = {s: candidate_macs(spec, s, self.min_class) for s in names}
            useful = [s for s in names if macs[s] < base]
            if not useful:
                if self.strategy != "auto":
                    kept.append(f"{node.name}: {self.strategy} does no fewer MACs; kept dense")
                continue
            times: dict[str, float] = {}
            cached = False
            if self.strategy == "auto":
                models = {s: layer_model(spec, s, self.batch, opset, self.min_class)
                          for s in ["dense", *useful]}
                times, cached = self.measure(spec, models)
                best = min(useful, key=lambda s: (times[s], s))
                choice = best if times[best] < (1 - self.margin) * times["dense"] else "dense"
            else:
                choice = useful[0]
            # MACs as the layer table counts them: per sample, times a static batch.
            n0 = shapes[node.inputs[0].name][0]
            mult = int(n0) if isinstance(n0, (int, np.integer)) and n0 > 0 else 1
            entry = LayerLowering(
                node.name, choice, int(spec.w.shape[0]), spec.in_shape[0], base * mult,
                (base if choice == "dense" else macs[choice]) * mult, int(spec.w.size) + (
                    0 if spec.b is None else int(spec.b.size)), 0,
                tuple(sorted(times.items())), cached)
            if choice == "dense":
                dense.append(entry)
                continue
            y = node.outputs[0]
            node.outputs.clear()
            params = emit(graph, node.inputs[0], spec, y, choice, node.name, self.min_class)
            lowered.append(LayerLowering(**{**entry.__dict__, "params_after": params}))
        if not lowered:
            return PassResult(graph, LowerSparseConvReport(dense=tuple(dense),
                                                           kept=tuple(kept)))
        clear_inner_shapes(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, LowerSparseConvReport(tuple(lowered), tuple(dense),
                                                       tuple(kept)))
