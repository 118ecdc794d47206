"""A seeded generator of random CNN graphs and the properties ``onnx-ssl prune`` must keep.

A :class:`Case` is plain data: the blocks of a graph (residual blocks with identity and 1x1
shortcuts, concat, split and slices on channels, depthwise convolutions with multipliers,
grouped convolutions, squeeze-excitation, NHWC transpose round trips, pads, pools), its
head (GAP or flatten to an FC layer, or a convolution), an extra graph output, and how its
channels are zeroed. :func:`build` and :func:`zeroed` turn it into models, deterministically.
:func:`check` prunes the zeroed model and checks, independently of the passes:

* the outputs are equal within the numeric check's tolerance (:mod:`onnx_ssl.runtime`);
* the graph inputs and outputs are unchanged;
* params (every float initializer and Constant element, bias maps included) and MACs
  (recomputed from inferred shapes) never grow;
* pruning is idempotent: pruning the result again reports no change;
* every prunable channel whose members are all zero is gone, or its space is listed under
  "kept:" with the reason;
* the prune finishes within :data:`SLOW_S` seconds.

:class:`Worker` runs cases in a child process with a time limit, so that a hang (ONNX Runtime
never returns on a convolution with 0 input channels) is a failure, not a stuck suite.
``tests/test_fuzz.py`` runs a fixed set of seeds; ``scripts/fuzz_prune.py`` runs thousands,
writes the failing graphs and shrinks each to a minimal reproduction (:func:`shrink`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from helpers import arrays, with_arrays

from onnx_ssl.models._builder import GraphBuilder

BLOCKS = ("conv", "res_identity", "res_proj", "res_block", "concat", "split", "slice",
          "depthwise", "grouped", "se", "nhwc", "pad", "pool")
# Blocks that keep their input's channel count (the inside of a generic residual branch).
INNER = ("conv", "depthwise", "grouped", "se", "nhwc", "split", "pad", "pool")
HEADS = ("gap_fc", "flatten_fc", "conv", "gap", "reshape_matmul")
# out+in members, out members only, filters only (BatchNorm shifts and biases stay), in
# members only, and weights zeroed directly (whole filters, input channels, branches).
SCHEMES = ("both", "out", "filter", "in", "direct")
CHANNELS = (8, 8, 12, 16, 16, 24, 32, 48, 64)
SLOW_S = 10.0  # a prune of one of these graphs (< 100 nodes) that takes longer fails
TIMEOUT_S = 90.0  # the whole check of one case; past it the case hangs


@dataclass(frozen=True)
class Block:
    kind: str
    ch: int  # output channels (or the size of the part the block's variant uses)
    bn: bool  # convolutions followed by BatchNormalization (else a bias)
    opt: int  # seeds the block's variant (split sizes, kernel, group count, ...)


@dataclass(frozen=True)
class Case:
    seed: int
    batch: int
    size: int
    stem: int
    blocks: tuple[Block, ...]
    head: str
    extra_output: int | None  # index of the block whose output is also a graph output
    scheme: str
    zero_seed: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> Case:
        blocks = tuple(Block(**b) for b in d["blocks"])
        return Case(**{**d, "blocks": blocks})

    def describe(self) -> str:
        blocks = " ".join(f"{b.kind}({b.ch}{',bn' if b.bn else ''})" for b in self.blocks)
        extra = "" if self.extra_output is None else f" +output@{self.extra_output}"
        return (f"seed {self.seed}: [{self.batch},3,{self.size},{self.size}] stem {self.stem}"
                f" {blocks} -> {self.head}{extra}; zero '{self.scheme}' ({self.zero_seed})")


def random_case(seed: int) -> Case:
    """The case of ``seed``; the zeroing scheme cycles with the seed (``seed % 5``)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    blocks = tuple(Block(str(rng.choice(BLOCKS)), int(rng.choice(CHANNELS)),
                         bool(rng.random() < 0.6), int(rng.integers(2**31)))
                   for _ in range(n))
    extra = int(rng.integers(n)) if rng.random() < 0.25 else None
    return Case(seed=seed, batch=int(rng.choice((1, 2))), size=int(rng.choice((6, 8, 10))),
                stem=int(rng.choice(CHANNELS)), blocks=blocks, head=str(rng.choice(HEADS)),
                extra_output=extra, scheme=SCHEMES[seed % len(SCHEMES)],
                zero_seed=int(rng.integers(2**31)))


# --- building ------------------------------------------------------------------------------
def _conv(g: GraphBuilder, x: str, ch: int, k: int, name: str, *, bn: bool, relu: bool = True,
          stride: int = 1, pad: int | None = None, group: int = 1) -> str:
    y = g.conv(x, ch, k, stride, k // 2 if pad is None else pad, group=group, bias=not bn,
               name=name)
    if bn:
        y = g.bn(y, name=f"{name}.bn")
    return g.relu(y, name=f"{name}.relu") if relu else y


def _block(g: GraphBuilder, x: str, b: Block, p: str) -> str:
    rng = np.random.default_rng(b.opt)
    c = g.channels(x)
    size = g.shape(x)[2]
    if b.kind == "conv":
        return _conv(g, x, b.ch, int(rng.choice((1, 3))), p, bn=b.bn)
    if b.kind == "res_identity":
        h = _conv(g, x, c, 3, f"{p}.conv1", bn=b.bn)
        h = _conv(g, h, c, 3, f"{p}.conv2", bn=b.bn, relu=False)
        y = g.add(x, h, name=f"{p}.add") if rng.random() < 0.5 else g.add(h, x, name=f"{p}.add")
        return g.relu(y, name=f"{p}.relu")
    if b.kind == "res_proj":
        s = 2 if size >= 6 and rng.random() < 0.5 else 1
        h = _conv(g, x, b.ch, 3, f"{p}.conv1", bn=b.bn, stride=s)
        h = _conv(g, h, b.ch, 3, f"{p}.conv2", bn=b.bn, relu=False)
        sc = _conv(g, x, b.ch, 1, f"{p}.short", bn=b.bn, relu=False, stride=s)
        return g.relu(g.add(h, sc, name=f"{p}.add"), name=f"{p}.relu")
    if b.kind == "res_block":  # a branch of other blocks, back to c channels
        h = x
        for i in range(int(rng.integers(1, 4))):
            inner = Block(str(rng.choice(INNER)), int(rng.choice(CHANNELS)), b.bn,
                          int(rng.integers(2**31)))
            h = _block(g, h, inner, f"{p}.{i}")
        h = _conv(g, h, c, int(rng.choice((1, 3))), f"{p}.last", bn=b.bn, relu=False)
        k = 0
        while g.shape(x)[2] != g.shape(h)[2]:  # a pool inside: the shortcut pools too
            x = g.maxpool(x, 2, name=f"{p}.short_pool{k}")
            k += 1
        sc = x if rng.random() < 0.6 else _conv(g, x, c, 1, f"{p}.short", bn=b.bn,
                                               relu=False)
        return g.relu(g.add(sc, h, name=f"{p}.add"), name=f"{p}.relu")
    if b.kind == "concat":
        a = _conv(g, x, b.ch, 3, f"{p}.a", bn=b.bn)
        parts = [a, _conv(g, x, int(rng.choice(CHANNELS[:5])), 1, f"{p}.b", bn=b.bn)]
        if rng.random() < 0.3:
            parts.append(x)  # the block's input passes through into the concat
        return g.concat(parts, axis=1, name=f"{p}.concat")
    if b.kind == "split":
        h = _conv(g, x, b.ch, 3, f"{p}.conv", bn=b.bn)
        k = int(rng.integers(2, 4)) if b.ch >= 3 else 2
        cuts = sorted(rng.choice(np.arange(1, b.ch), size=k - 1, replace=False).tolist())
        sizes = [e - s for s, e in zip([0, *cuts], [*cuts, b.ch], strict=True)]
        outs = g.split(h, sizes, axis=1, name=f"{p}.split")
        outs = [o if rng.random() < 0.3 else _conv(g, o, int(rng.choice(CHANNELS[:5])),
                                                   int(rng.choice((1, 3))), f"{p}.part{i}",
                                                   bn=b.bn)
                for i, o in enumerate(outs)]
        return g.concat(outs, axis=1, name=f"{p}.concat")
    if b.kind == "slice":
        h = _conv(g, x, b.ch, 3, f"{p}.conv", bn=b.bn)
        cut = int(rng.integers(1, b.ch))
        lo = [(0, cut), (cut, b.ch)]
        if rng.random() < 0.3:
            lo[1] = (cut, 2**62)  # an end past the axis, as exporters write it
        if rng.random() < 0.3 and b.ch - cut > 1:
            lo[1] = (cut, -1)  # the last channel is read by nobody
        outs = [_conv(g, g.slice(h, s, e, axis=1, name=f"{p}.slice{i}"),
                      int(rng.choice(CHANNELS[:5])), int(rng.choice((1, 3))), f"{p}.part{i}",
                      bn=b.bn) for i, (s, e) in enumerate(lo)]
        return g.concat(outs, axis=1, name=f"{p}.concat")
    if b.kind == "depthwise":
        m = int(rng.choice((1, 2)))
        h = _conv(g, x, c * m, 3, f"{p}.dw", bn=b.bn, group=c)
        return _conv(g, h, b.ch, 1, f"{p}.pw", bn=b.bn)
    if b.kind == "grouped":
        grp = next((k for k in (4, 2) if c % k == 0 and rng.random() < 0.7), 2 if c % 2 == 0
                   else 1)
        out = max(grp, b.ch - b.ch % grp)
        return _conv(g, x, out, 3, p, bn=b.bn, group=grp)
    if b.kind == "se":
        s = g.gap(x, name=f"{p}.pool")
        s = g.relu(g.conv(s, max(2, c // 4), 1, name=f"{p}.reduce"), name=f"{p}.sr")
        s = g.sigmoid(g.conv(s, c, 1, name=f"{p}.expand"), name=f"{p}.gate")
        return g.mul(x, s, name=f"{p}.scale")
    if b.kind == "nhwc":
        t = g.transpose(x, [0, 2, 3, 1], name=f"{p}.to_nhwc")
        if rng.random() < 0.5:
            t = g.matmul_const(t, b.ch, name=f"{p}.proj")
        else:
            t = g.mul(t, g.param(f"{p}.gamma", rng.uniform(0.5, 1.5, c)), name=f"{p}.gamma_mul")
        return g.relu(g.transpose(t, [0, 3, 1, 2], name=f"{p}.to_nchw"), name=f"{p}.relu")
    if b.kind == "pad":
        q = int(rng.choice((1, 2)))
        static = [0, 0, q, q, 0, 0, q, q]
        if rng.random() < 0.7:
            h = g.pad(x, g.const_i64(f"{p}.pads", static), static, name=f"{p}.pad")
        else:  # edge or reflect padding, or a constant other than zero
            mode = str(rng.choice(("edge", "reflect", "constant")))
            ins = [x, g.const_i64(f"{p}.pads", static)]
            if mode == "constant":
                ins.append(g.param(f"{p}.value", np.float32(rng.uniform(-1, 1))))
            n, ch, hh, ww = g.shape(x)
            h = g.op("Pad", ins, (n, ch, hh + 2 * q, ww + 2 * q), name=f"{p}.pad", mode=mode)
        return _conv(g, h, b.ch, 2 * q + 1, f"{p}.conv", bn=b.bn, pad=0)
    if b.kind == "pool":
        if size >= 4 and rng.random() < 0.5:
            return g.maxpool(x, 2, name=f"{p}.maxpool")
        return g.avgpool(x, 3, 1, 1, name=f"{p}.avgpool")
    raise ValueError(f"unknown block kind {b.kind}")


def build(case: Case) -> onnx.ModelProto:
    g = GraphBuilder(f"fuzz_{case.seed}", case.seed)
    x = g.input("input", (case.batch, 3, case.size, case.size))
    x = _conv(g, x, case.stem, 3, "stem", bn=True)
    taps = []
    for i, b in enumerate(case.blocks):
        x = _block(g, x, b, f"b{i}")
        taps.append(x)
    if case.head in ("gap_fc", "gap"):
        y = g.flatten(g.gap(x, name="head.pool"), name="head.flatten")
        if case.head == "gap_fc":
            y = g.gemm(y, 10, name="head.fc")
    elif case.head == "flatten_fc":
        y = g.gemm(g.flatten(x, name="head.flatten"), 10, name="head.fc")
    elif case.head == "reshape_matmul":
        y = g.reshape(g.gap(x, name="head.pool"), [case.batch, -1], name="head.reshape")
        y = g.matmul_const(y, 10, name="head.fc")
    else:
        y = g.conv(x, 10, 1, name="head.conv")
    outputs = {"output": y}
    if case.extra_output is not None and case.extra_output < len(taps):
        outputs["extra"] = taps[case.extra_output]
    return g.build(outputs)


# --- zeroing -------------------------------------------------------------------------------
def zeroed(model: onnx.ModelProto, case: Case) -> onnx.ModelProto:
    """``model`` with channels zeroed by ``case.scheme``: channel groups of the analysis
    picked per space (all of a space's channels, a contiguous run, or a random subset), or
    for ``direct`` whole filters, input channels and residual branches of random layers."""
    from helpers import zero_groups

    from onnx_ssl.analysis import analyze

    a = analyze(model, kinds=("channel",))
    rng = np.random.default_rng(case.zero_seed)
    if case.scheme == "direct":
        return _zero_direct(model, a, rng)
    by_space: dict[str, list[Any]] = defaultdict(list)
    for grp in a.groups:
        if grp.kind == "channel" and grp.prunable and grp.space is not None:
            by_space[grp.space].append(grp)
    chosen = []
    for sid in sorted(by_space):
        groups = by_space[sid]
        if rng.random() > 0.6:
            continue
        mode = int(rng.integers(5))
        n = len(groups)
        if mode == 0:
            chosen += groups
        elif mode == 4:  # every channel of one activation (a Split or Slice part, say)
            acts = [r for r in a.space(sid).refs if r.role == "act"]
            r = acts[int(rng.integers(len(acts)))] if acts else None
            if r is not None:
                chosen += groups[r.space_start:r.space_start + r.length]
        elif mode == 1:
            lo = int(rng.integers(n))
            hi = int(rng.integers(lo + 1, n + 1))
            chosen += groups[lo:hi]
        else:
            k = max(1, int(round(n * float(rng.choice((0.25, 0.5, 0.75))))))
            chosen += [groups[i] for i in sorted(rng.choice(n, size=k, replace=False))]
    if case.scheme == "out":
        arrs = arrays(model)
        for grp in chosen:
            for mem in grp.members:
                if mem.role == "out":
                    v = arrs[mem.tensor]
                    v[mem.index(v.shape)] = 0
        return with_arrays(model, arrs)
    return zero_groups(model, chosen, side=case.scheme)


def _zero_direct(model: onnx.ModelProto, a: Any, rng: np.random.Generator) -> onnx.ModelProto:
    arrs = arrays(model)
    layers = [la for la in a.layers if la.weight in arrs]
    for la in layers:
        w = arrs[la.weight]
        r = rng.random()
        if r < 0.3:  # whole filters
            n = w.shape[la.out_axis]
            idx = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
            sl: list[Any] = [slice(None)] * w.ndim
            sl[la.out_axis] = idx
            w[tuple(sl)] = 0
        elif r < 0.55:  # input channels
            n = w.shape[la.in_axis]
            idx = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
            sl = [slice(None)] * w.ndim
            sl[la.in_axis] = idx
            w[tuple(sl)] = 0
    by_node = {la.node: la for la in layers}
    for br in a.branches:
        if rng.random() < 0.5:  # a whole branch: every layer weight in it
            for n in br.layers:
                if n in by_node:
                    arrs[by_node[n].weight][...] = 0
    return with_arrays(model, arrs)


# --- independent measures ------------------------------------------------------------------
def float_params(model: onnx.ModelProto) -> int:
    """Elements of every float initializer and float Constant node (bias maps included)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    n = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in floats)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for at in node.attribute:
                if at.name == "value" and at.t.data_type in floats:
                    n += math.prod(at.t.dims)
    return n


def macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul, from inferred shapes."""
    m = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    total = 0
    for n in m.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        w = shapes[n.input[1]]
        if n.op_type == "Conv":
            total += math.prod(shapes[n.output[0]]) * math.prod(w[1:])
        elif n.op_type == "ConvTranspose":
            total += math.prod(shapes[n.input[0]]) * math.prod(w[1:])
        elif n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            total += math.prod(shapes[n.output[0]]) * w[1 if trans_b else 0]
        else:
            total += math.prod(shapes[n.output[0]]) * w[0]
    return total


def _all_zero_groups(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """(space, channel) of every prunable channel group whose out and in members are all
    zero."""
    from onnx_ssl.analysis import analyze

    arrs = arrays(model)
    out = []
    for grp in analyze(model, kinds=("channel",)).groups:
        if grp.kind != "channel" or not grp.prunable or grp.space is None:
            continue
        mems = [m for m in grp.members if m.role != "stat" and m.tensor in arrs]
        if mems and not any(np.any(arrs[m.tensor][m.index(arrs[m.tensor].shape)])
                            for m in mems):
            out.append((grp.space, int(grp.index or 0)))
    return out


# --- the check -----------------------------------------------------------------------------
Failure = tuple[str, str]  # (class, message)


def check(case: Case) -> list[Failure]:
    """Prune the zeroed model of ``case`` and check every property; the failures found."""
    from onnx_ssl.compiler import prune
    from onnx_ssl.runtime import compare

    model = build(case)
    z = zeroed(model, case)
    try:
        t0 = time.perf_counter()
        res = prune(z, verify=2)
        took = time.perf_counter() - t0
    except Exception as e:  # any error on a valid graph is a failure of the pass
        return [("crash", f"{type(e).__name__}: {_first_line(e)}")]
    fails: list[Failure] = []
    if took > SLOW_S:
        fails.append(("slow", f"prune took {took:.1f}s"))
    for d in compare(z, res.model, n=2, seed=101):
        if not d.within_tolerance:
            fails.append(("wrong-output", f"output '{d.output}' differs by {d.max_abs:.3g} "
                                          f"(max |ref| {d.ref_max_abs:.3g})"))
    if (list(res.model.graph.input) != list(z.graph.input)
            or list(res.model.graph.output) != list(z.graph.output)):
        fails.append(("io-changed", "graph inputs or outputs changed"))
    p0, p1 = float_params(z), float_params(res.model)
    if p1 > p0:
        fails.append(("params-grew", f"float params {p0} -> {p1}"))
    m0, m1 = macs(z), macs(res.model)
    if m1 > m0:
        fails.append(("macs-grew", f"MACs {m0} -> {m1}"))
    kept = "\n".join(res.report.kept)
    left = [(s, c) for s, c in _all_zero_groups(res.model) if s not in kept]
    if left:
        shown = ", ".join(f"{s}/{c}" for s, c in left[:6])
        fails.append(("zero-left", f"{len(left)} all-zero prunable channel(s) neither removed "
                                   f"nor listed under kept: {shown}"))
    try:
        again = prune(res.model, verify=1)
    except Exception as e:
        fails.append(("crash-again", f"{type(e).__name__}: {_first_line(e)}"))
    else:
        if again.report.modified:
            changed = [f"{n}: {r.to_json()}" for n, r in again.report.passes if r.modified]
            fails.append(("not-idempotent", "; ".join(changed)[:600]))
    return fails


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:400] if text else ""


def check_safely(case: Case) -> list[Failure]:
    """:func:`check`, with an unexpected error of the check itself as a failure."""
    try:
        return check(case)
    except Exception as e:
        tb = traceback.format_exc(limit=-3).strip().splitlines()
        return [("check-error", f"{type(e).__name__}: {_first_line(e)} | {' / '.join(tb)}")]


# --- running cases with a time limit -------------------------------------------------------
class Worker:
    """One child process that runs checks; one that runs past its time limit is killed (and
    a fresh one started for the next case)."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._pool: Any = None

    def run(self, case: Case, timeout: float = TIMEOUT_S) -> list[Failure]:
        """The failures of ``case`` (:func:`check`); a check past ``timeout`` is a hang."""
        try:
            return list(self.call(check_safely, case, timeout=timeout))
        except TimeoutError:
            return [("hang", f"no result after {timeout:.0f}s")]

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """``fn(*args)`` in the child; TimeoutError (and a killed child) past ``timeout``."""
        if self._pool is None:
            self._pool = self._ctx.Pool(1, maxtasksperchild=50)
        job = self._pool.apply_async(fn, args)
        try:
            return job.get(timeout)
        except multiprocessing.TimeoutError:
            self.close()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} ran past {timeout:.0f}s") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


# --- shrinking -----------------------------------------------------------------------------
def _simpler(case: Case) -> Iterable[Case]:
    """Cases one step simpler than ``case``, most drastic first."""
    for i in range(len(case.blocks)):
        blocks = case.blocks[:i] + case.blocks[i + 1:]
        extra = case.extra_output
        if extra is not None:
            extra = None if extra == i else extra - (extra > i)
        yield dataclasses.replace(case, blocks=blocks, extra_output=extra)
    if case.extra_output is not None:
        yield dataclasses.replace(case, extra_output=None)
    for head in HEADS:
        if HEADS.index(head) < HEADS.index(case.head):
            yield dataclasses.replace(case, head=head)
    if case.batch > 1:
        yield dataclasses.replace(case, batch=1)
    if case.stem > 8:
        yield dataclasses.replace(case, stem=8)
    for i, b in enumerate(case.blocks):
        if b.ch > 8:
            yield dataclasses.replace(case, blocks=case.blocks[:i] + (
                dataclasses.replace(b, ch=max(8, b.ch // 2)),) + case.blocks[i + 1:])
        if b.bn:
            yield dataclasses.replace(case, blocks=case.blocks[:i] + (
                dataclasses.replace(b, bn=False),) + case.blocks[i + 1:])
    if case.size > 6:
        yield dataclasses.replace(case, size=6)


def shrink(case: Case, fails: Callable[[Case], bool], budget: int = 60) -> Case:
    """A simpler case for which ``fails`` still holds (greedy, at most ``budget`` tries)."""
    tries = 0
    progress = True
    while progress and tries < budget:
        progress = False
        for cand in _simpler(case):
            tries += 1
            if fails(cand):
                case, progress = cand, True
                break
            if tries >= budget:
                break
    return case


def dumps(case: Case) -> str:
    return json.dumps(case.to_json(), indent=1)
