"""Shape-wise sparsity as speed: the paper's Table 4 pattern (AlexNet 2) on CaffeNet's convs.

    python benchmarks/bench_lowering.py [--iters 10] [--batches 1 8] [--threads 1] [--seeds 0 1]
        [--profile RUNS]

Each conv of ``onnx_ssl.models.build("caffenet")`` (random weights) is taken alone, as a
one-layer model (the whole layer is timed: the Conv, or every node of its lowering: Gather,
Slice, Pad, Conv pieces, Sum, MatMul, Reshape). Its weight gets the row (filter) and column
(``W[:, c, m, k]`` of the lowered matrix, per conv group) zero fractions of the paper's
AlexNet 2: rows 9.4 / 12.9 / 40.6 / 46.9 / 0 %, columns 0 / 63.2 / 76.9 / 84.7 / 80.7 %.
The zero columns are drawn two ways: ``random`` (uniform: the worst case) and ``structured``
(as group Lasso leaves them: the columns of weak channels and of kernel borders first, so
whole channels go and kernels shrink). ``--seeds`` draws other zero rows and columns at the
same fractions (seed ``s`` draws layer ``k`` with seed ``k + s``; 0 is the published one).

Three models are timed in alternation (ONNX Runtime CPU, all graph optimisations; the
minimum over ``--iters`` runs, as other jobs on a shared machine only ever add time). At
``--threads 1`` ORT computes on the calling thread, so the clock is that thread's CPU time
(``--clock cpu``): a job that takes the core away no longer counts, only its cache effects.

* ``dense``: the original conv;
* ``removal``: what ``onnx-ssl prune`` gives without ``--lower``: zero filters and whole zero
  channels removed (the same number per conv group, as ``RemoveZeroChannelsPass`` does) and
  ``ShrinkKernelsPass`` applied. In CaffeNet, LRN blocks the channels of conv1 and conv2; the
  benchmark removes them anyway, as if the layers were in a prunable network;
* ``lowered``: ``removal`` then ``LowerSparseConvPass("auto")`` for the same batch and threads
  (its choice is in the table; ``dense`` means it kept the conv).

The FLOP bound is ``1/((1-rows)(1-cols))``; the paper's column is its measured CPU speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table  # noqa: E402

from onnx_ssl import models  # noqa: E402
from onnx_ssl.graphutil import export  # noqa: E402
from onnx_ssl.io import to_graph  # noqa: E402
from onnx_ssl.passes.lower_sparse_conv import (  # noqa: E402
    CANDIDATES,
    ConvSpec,
    LowerSparseConvPass,
    layer_model,
)
from onnx_ssl.passes.shrink_kernels import ShrinkKernelsPass  # noqa: E402
from onnx_ssl.runtime import session  # noqa: E402

ROWS = {"conv1": 0.094, "conv2": 0.129, "conv3": 0.406, "conv4": 0.469, "conv5": 0.0}
COLS = {"conv1": 0.0, "conv2": 0.632, "conv3": 0.769, "conv4": 0.847, "conv5": 0.807}
PAPER = {"conv1": 1.05, "conv2": 3.37, "conv3": 6.27, "conv4": 9.73, "conv5": 4.93}


def flop_bound(name: str) -> float:
    """The FLOP bound of CaffeNet conv ``name`` at the paper's rows and columns."""
    return 1 / ((1 - ROWS[name]) * (1 - COLS[name]))


def caffenet_convs() -> dict[str, ConvSpec]:
    m = onnx.shape_inference.infer_shapes(models.build("caffenet"))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*m.graph.value_info, *m.graph.input]}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type != "Conv":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        w, b = inits[n.input[1]], inits[n.input[2]]
        c, h, wd = shapes[n.input[0]][1:]
        out[n.name] = ConvSpec(w.astype(np.float32), b.astype(np.float32),
                               int(a.get("group", 1)), tuple(a.get("strides", (1, 1))),
                               tuple(a.get("pads", (0, 0, 0, 0))),
                               tuple(a.get("dilations", (1, 1))), (c, h, wd))
    return out


def sparsify(spec: ConvSpec, rows: float, cols: float, pattern: str, seed: int) -> ConvSpec:
    rng = np.random.default_rng(seed)
    w = spec.w.copy()
    n, cg, kh, kw = w.shape
    ng = n // spec.group
    ring = np.maximum(np.abs(np.arange(kh) - kh // 2)[:, None] / max(1, kh // 2),
                      np.abs(np.arange(kw) - kw // 2)[None, :] / max(1, kw // 2))
    for g in range(spec.group):
        f = slice(g * ng, (g + 1) * ng)
        z = int(round(cols * cg * kh * kw))
        if pattern == "random":
            score = rng.random((cg, kh, kw))
        else:  # weak channels first, then kernel borders (ties broken at random)
            u: np.ndarray = rng.random((cg,))
            score = 2.0 * (1 - u)[:, None, None] + ring[None] + 1e-3 * rng.random((cg, kh, kw))
        cut = np.argsort(-score.ravel(), kind="stable")[:z]
        flat = w[f].reshape(ng, -1)
        flat[:, cut] = 0
        w[f] = flat.reshape(ng, cg, kh, kw)
        dead = rng.choice(ng, int(round(rows * ng)), replace=False)
        w[g * ng + dead] = 0
    return ConvSpec(w, spec.b, spec.group, spec.strides, spec.pads, spec.dilations,
                    spec.in_shape)


def remove_channels(spec: ConvSpec) -> ConvSpec:
    """Zero filters and whole zero channels removed, the same number in every conv group."""
    n, cg = spec.w.shape[:2]
    g, ng = spec.group, n // spec.group
    w4 = spec.w.reshape(g, ng, cg, *spec.w.shape[2:])
    zf = [np.flatnonzero(~w4[i].reshape(ng, -1).any(axis=1)) for i in range(g)]
    zc = [np.flatnonzero(~w4[i].any(axis=(0, 2, 3))) for i in range(g)]
    kf, kc = min(len(z) for z in zf), min(len(z) for z in zc)
    keep_f = [np.setdiff1d(np.arange(ng), zf[i][:kf]) for i in range(g)]
    keep_c = [np.setdiff1d(np.arange(cg), zc[i][:kc]) for i in range(g)]
    w = np.concatenate([w4[i][keep_f[i]][:, keep_c[i]] for i in range(g)])
    b = None if spec.b is None else np.concatenate(
        [spec.b[i * ng:(i + 1) * ng][keep_f[i]] for i in range(g)])
    c, h, wd = spec.in_shape
    return ConvSpec(np.ascontiguousarray(w), b, g, spec.strides, spec.pads, spec.dilations,
                    (g * (cg - kc), h, wd))


def time_models(models_: dict[str, onnx.ModelProto], iters: int, threads: int,
                clock: str = "wall") -> dict[str, float]:
    sessions = {name: session(m, optimize=True, threads=threads)
                for name, m in models_.items()}
    rng = np.random.default_rng(0)
    feeds = {}
    for name, s in sessions.items():
        i = s.get_inputs()[0]
        feeds[name] = {i.name: rng.standard_normal(i.shape).astype(np.float32)}
        s.run(None, feeds[name])
    times: dict[str, list[float]] = {n: [] for n in sessions}
    now = time.thread_time if clock == "cpu" else time.perf_counter
    names = list(sessions)
    for i in range(iters):
        # Each round starts one model later: a model run after a larger one finds less of
        # its data in cache, and a fixed order would charge that to the same model.
        for name in names[i % len(names):] + names[:i % len(names)]:
            t = now()
            sessions[name].run(None, feeds[name])
            times[name].append(now() - t)
    # The minimum, not the median: on a shared machine other jobs only ever add time.
    return {n: 1e3 * min(v) for n, v in times.items()}


PROFILE_HEADER = (
    "pattern", "seed", "batch", "layer", "choice", "dense kernels (ms)", "dense GMAC/s",
    "compute (ms)", "compute GMAC/s", "movement (ms)", "movement nodes", "MACs / bound MACs",
    "compute-only / bound", "profiled / bound", "im2col+GEMM dense (ms)",
    "profiled / bound over im2col+GEMM")
COMPUTE = ("Conv", "MatMul", "Gemm")


def profile_row(models_: dict[str, onnx.ModelProto], runs: int, bound: float
                ) -> tuple[str, ...]:
    """Where the lowered layer's time goes, from ORT's profiler (each node's fastest run):
    compute nodes against data movement, the MACs done (channels rounded up to NCHWc blocks)
    against the bound's, and the ratio to the bound with and without the data movement; last,
    the ratio over ``im2col`` (the dense conv lowered to im2col + GEMM, the paper's Caffe
    baseline) instead of the dense Conv."""
    from bench_networks import profile_models

    # One at a time: the lowered layer reads fewer channels than the dense one.
    prof = {k: profile_models({k: m}, runs)[k] for k, m in models_.items()}
    d, lo = prof["dense"], prof["lowered"]
    comp = sum(v for k, v in lo.ms.items() if k.startswith(COMPUTE))
    move = lo.kernel_ms - comp
    moves = sum(n for k, n in lo.nodes.items() if not k.startswith(COMPUTE))
    dense_macs, done = sum(d.macs.values()), lo.block_macs
    c = prof["im2col"].kernel_ms
    return (f"{d.kernel_ms:.3f}", f"{dense_macs / d.kernel_ms / 1e6:.0f}", f"{comp:.3f}",
            f"{done / comp / 1e6:.0f}", f"{move:.3f}", str(moves),
            f"{done * bound / dense_macs:.2f}", f"{d.kernel_ms / bound / comp:.2f}",
            f"{d.kernel_ms / bound / lo.kernel_ms:.2f}", f"{c:.3f}",
            f"{c / bound / lo.kernel_ms:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--patterns", nargs="+", default=["structured", "random"])
    ap.add_argument("--layers", nargs="+", default=list(ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--before", nargs="+", choices=CANDIDATES, default=None,
                    help="also time 'before': auto over only these candidates, in the same "
                         "alternation (kernel-classes compact-gemm blocks: before group-classes)")
    ap.add_argument("--profile", type=int, default=0, metavar="RUNS",
                    help="also profile dense and lowered with ONNX Runtime's profiler over RUNS "
                         "runs of each (one at a time) and print where the lowered layer's time "
                         "goes: "
                         "compute nodes (Conv, MatMul) against data movement (Gather, Slice, "
                         "Pad, Concat, NCHWc reorders), and the ratio to the bound it would "
                         "reach if data movement took no time")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="cpu: the calling thread's CPU time, where ORT runs at 1 thread "
                         "(the default there); wall: elapsed time (the default otherwise)")
    args = ap.parse_args()
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    convs = caffenet_convs()
    rows: list[tuple[str, ...]] = [(
        "pattern", "seed", "batch", "layer", "dense (ms)", "removal (ms)",
        *(("before (ms)", "before choice", "before / bound") if args.before else ()),
        "lowered (ms)", "choice",
        "speed-up removal", "speed-up lowered", "FLOP bound", "lowered / bound", "paper")]
    prof_rows: list[tuple[str, ...]] = [PROFILE_HEADER]
    runs = [(p, s, b, k, name) for p in args.patterns for s in args.seeds for b in args.batches
            for k, name in enumerate(args.layers)]
    for pattern, seed, batch, k, name in runs:
        sp = sparsify(convs[name], ROWS[name], COLS[name], pattern, seed=k + seed)
        dense = layer_model(convs[name], "dense", batch)
        red = remove_channels(sp)
        g = to_graph(layer_model(red, "dense", batch))
        g = ShrinkKernelsPass()(g).graph
        removal = export(g.copy())
        ms = {"dense": dense, "removal": removal}
        choice = {}
        for tag, cands in [("lowered", CANDIDATES), *([("before", args.before)]
                                                      if args.before else [])]:
            res = LowerSparseConvPass("auto", batch=batch, threads=args.threads,
                                      candidates=cands)(g)
            ms[tag] = export(res.graph)
            choice[tag] = res.report.lowered[0].strategy if res.report.lowered else "dense"
        t = time_models(ms, args.iters, args.threads, clock)
        bound = flop_bound(name)
        s_rem, s_low = t["dense"] / t["removal"], t["dense"] / t["lowered"]
        before = ((f"{t['before']:.2f}", choice["before"],
                   f"{t['dense'] / t['before'] / bound:.2f}") if args.before else ())
        rows.append((pattern, str(seed), str(batch), name, f"{t['dense']:.2f}",
                     f"{t['removal']:.2f}", *before, f"{t['lowered']:.2f}", choice["lowered"],
                     f"{s_rem:.2f}x", f"{s_low:.2f}x", f"{bound:.2f}x",
                     f"{s_low / bound:.2f}", f"{PAPER[name]:.2f}x"))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        if args.profile and choice["lowered"] != "dense":
            prof_rows.append((pattern, str(seed), str(batch), name, choice["lowered"],
                              *profile_row({"dense": dense, "lowered": ms["lowered"],
                                            "im2col": layer_model(convs[name], "compact-gemm",
                                                                  batch)},
                                           args.profile, bound)))
            print(" | ".join(prof_rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if len(prof_rows) > 1:
        print()
        print(table(prof_rows))
    print(f"clock: {clock}")
    if hasattr(os, "getloadavg"):
        print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
