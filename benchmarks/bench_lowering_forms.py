"""Forms of the shape-wise lowering that were measured and not kept, against `compact-gemm`.

    python benchmarks/bench_lowering_forms.py [--layers conv2 conv3 conv4 conv5]
        [--pattern random] [--seed 0] [--batch 1] [--iters 60]

Each CaffeNet conv gets the Table 4 zero pattern of ``bench_lowering.py`` (channels removed
as ``prune`` removes them), and each form below is built as a one-layer model, checked
against the conv (relative difference at most 1e-5) and timed in alternation with
``compact-gemm`` and the conv itself (ORT CPU, 1 thread, thread CPU time, the minimum of
``--iters`` runs), and with ``row-gather``, the form that was kept (a candidate of
``--lower auto``). Both build the same im2col matrix as ``compact-gemm`` (one row per kept
column ``W[:, c, m, k]``) with fewer nodes, and neither moved less data:

* ``shift-rows``: the output as rows of the padded width (``Ho`` rows of ``Wp`` values, the
  last ``Wp - Wo`` of each row wasted), so that a kernel position's window is one
  contiguous Slice of the flattened padded input; one Gather per group takes the channels of
  every position, a 2-D Slice each position's rows and window; a crop at the end.
* ``batched-gather``: one Gather for every group (each position's channel count padded to
  the largest group's with zero weights), a Slice per kernel position and one batched
  MatMul ``[G, N_g, K] x [N, G, K, P]``.

Stride 1 only (``shift-rows``); the CaffeNet convs conv2 to conv5 are. The results are in
docs/results.md (Table 4 section, "Forms tried and measured slower").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lowering import (  # noqa: E402
    COLS,
    ROWS,
    caffenet_convs,
    flop_bound,
    remove_channels,
    sparsify,
)
from common import table  # noqa: E402

from onnx_ssl.graphutil import export  # noqa: E402
from onnx_ssl.io import ModelProto  # noqa: E402
from onnx_ssl.passes.lower_sparse_conv import (  # noqa: E402
    ConvSpec,
    Timer,
    _Emitter,
    layer_model,
    padded,
)
from onnx_ssl.runtime import session  # noqa: E402

FORMS = ("shift-rows", "batched-gather")


def _used(spec: ConvSpec) -> list[np.ndarray]:
    return [np.any(wg != 0, axis=0) for _, wg, _ in spec.groups()]  # [Cg, kh, kw] each


def _finish(em: _Emitter, outs: list[gs.Variable], spec: ConvSpec) -> gs.Variable:
    """The groups' ``[N, N_g, L]`` products concatenated, plus the bias."""
    cat = em.join(outs, "Concat", "concat", None)
    if spec.b is None:
        return cat
    return em.node("Add", "bias", [cat, em.const("b", spec.b.reshape(-1, 1), True)])


def emit_shift_rows(em: _Emitter, x: gs.Tensor, spec: ConvSpec, y: gs.Variable) -> None:
    c, (ho, wo), (dh, dw) = spec.in_shape[0], spec.out_hw, spec.dilations
    p = spec.pads
    hp, wp = spec.in_shape[1] + p[0] + p[2], spec.in_shape[2] + p[1] + p[3]
    flat = em.node("Reshape", "flat", [padded(em, x, spec), em.ints("fs", [0, c, hp * wp])])
    length = (ho - 1) * wp + wo  # output (i, j) is column i * wp + j
    outs = []
    for g, ((chans, wg, _), used) in enumerate(zip(spec.groups(), _used(spec), strict=True)):
        rows: list[int] = []
        pieces, cols = [], []
        for m, k in zip(*np.nonzero(used.any(axis=0)), strict=True):
            cs = np.flatnonzero(used[:, m, k])
            o = int(m) * dh * wp + int(k) * dw
            pieces.append((len(rows), len(rows) + len(cs), o))
            rows += [int(chans[i]) for i in cs]
            cols.append(wg[:, cs, m, k])
        xg = em.node("Gather", f"g{g}rows", [flat, em.ints(f"g{g}idx", rows)], {"axis": 1})
        sl = [em.node("Slice", f"g{g}s{i}", [xg, em.ints(f"g{g}s{i}a", [a, o]),
                                             em.ints(f"g{g}s{i}b", [b, o + length]),
                                             em.ints(f"g{g}s{i}x", [1, 2])])
              for i, (a, b, o) in enumerate(pieces)]
        cat = em.join(sl, "Concat", f"g{g}cat", None)
        outs.append(em.node("MatMul", f"g{g}mm", [em.const(f"g{g}w", np.concatenate(cols, 1),
                                                           True), cat]))
    out = em.node("Pad", "tail", [_finish(em, outs, spec),
                                  em.ints("tail_pads", [0, 0, 0, 0, 0, wp - wo])])
    rows4 = em.node("Reshape", "unflat", [out, em.ints("us", [0, spec.w.shape[0], ho, wp])])
    em.node("Slice", "crop", [rows4, em.ints("ca", [0]), em.ints("cb", [wo]), em.ints("cx", [3])],
            out=y)


def emit_batched_gather(em: _Emitter, x: gs.Tensor, spec: ConvSpec, y: gs.Variable) -> None:
    (ho, wo), (sh, sw), (dh, dw) = spec.out_hw, spec.strides, spec.dilations
    groups, used = spec.groups(), _used(spec)
    n_g = len(groups)
    mks = sorted({(int(m), int(k)) for u in used for m, k in zip(*np.nonzero(u.any(axis=0)),
                                                                 strict=True)})
    idx: list[list[int]] = [[] for _ in groups]
    ws: list[list[np.ndarray]] = [[] for _ in groups]
    pieces = []
    for m, k in mks:
        width = max(int(u[:, m, k].sum()) for u in used)
        pieces.append((len(idx[0]), len(idx[0]) + width, m, k))
        for g, ((chans, wg, _), u) in enumerate(zip(groups, used, strict=True)):
            cs = np.flatnonzero(u[:, m, k])
            # A group with fewer channels here reads one again with zero weights.
            idx[g] += [int(chans[i]) for i in cs] + [int(chans[0])] * (width - len(cs))
            wk = np.zeros((wg.shape[0], width), np.float32)
            wk[:, :len(cs)] = wg[:, cs, m, k]
            ws[g].append(wk)
    xg = em.node("Gather", "rows", [padded(em, x, spec),
                                    em.const("idx", np.array(idx, np.int64))], {"axis": 1})
    sl = [em.node("Slice", f"s{i}", [xg, em.ints(f"s{i}a", [a, m * dh, k * dw]),
                                     em.ints(f"s{i}b", [b, m * dh + sh * (ho - 1) + 1,
                                                        k * dw + sw * (wo - 1) + 1]),
                                     em.ints(f"s{i}x", [2, 3, 4]), em.ints(f"s{i}s", [1, sh, sw])])
          for i, (a, b, m, k) in enumerate(pieces)]
    cat = em.node("Concat", "cat", sl, {"axis": 2}) if len(sl) > 1 else sl[0]
    xc = em.node("Reshape", "xc", [cat, em.ints("xs", [0, n_g, len(idx[0]), ho * wo])])
    w = np.stack([np.concatenate(wg_, axis=1) for wg_ in ws])  # [G, N_g, K]
    out = em.node("MatMul", "mm", [em.const("w", w, True), xc])  # [N, G, N_g, P]
    if spec.b is not None:
        out = em.node("Add", "bias", [out, em.const("b", spec.b.reshape(n_g, -1, 1), True)])
    em.node("Reshape", "unflat", [out, em.ints("us", [0, spec.w.shape[0], ho, wo])], out=y)


EMIT = {"shift-rows": emit_shift_rows, "batched-gather": emit_batched_gather}


def form_model(spec: ConvSpec, form: str, batch: int) -> ModelProto:
    """A one-layer model of ``spec`` in ``form`` (one of FORMS, or a lowering strategy)."""
    if form not in EMIT:
        return layer_model(spec, form, batch)
    if form == "shift-rows" and spec.strides != (1, 1):
        raise ValueError("shift-rows needs stride 1")
    x = gs.Variable("x", dtype=np.float32, shape=[batch, *spec.in_shape])
    ho, wo = spec.out_hw
    y = gs.Variable("y", dtype=np.float32, shape=[batch, spec.w.shape[0], ho, wo])
    g = gs.Graph(inputs=[x], outputs=[y], opset=17)
    EMIT[form](_Emitter(g, "conv"), x, spec, y)
    g.cleanup().toposort()
    return export(g)


def max_rel_diff(models: dict[str, ModelProto], spec: ConvSpec, batch: int) -> dict[str, float]:
    """Each model's largest difference from the conv, relative to the conv's largest output."""
    x = np.random.default_rng(0).standard_normal((batch, *spec.in_shape)).astype(np.float32)
    ref = session(layer_model(spec, "dense", batch)).run(None, {"x": x})[0]
    return {k: float(np.abs(session(m).run(None, {"x": x})[0] - ref).max() / np.abs(ref).max())
            for k, m in models.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", nargs="+", default=["conv2", "conv3", "conv4", "conv5"])
    ap.add_argument("--pattern", choices=["random", "structured"], default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=60)
    args = ap.parse_args()
    convs = caffenet_convs()
    names = list(ROWS)
    rows: list[tuple[str, ...]] = [("layer", "form", "ms", "speed-up", "speed-up / bound",
                                    "max rel diff")]
    timer = Timer(batch=args.batch, threads=1, iters=args.iters, budget_s=60)
    for name in args.layers:
        k = names.index(name)
        red = remove_channels(sparsify(convs[name], ROWS[name], COLS[name], args.pattern,
                                       seed=k + args.seed))
        ms = {f: form_model(red, f, args.batch)
              for f in ("compact-gemm", "row-gather", *FORMS)}
        diff = max_rel_diff(ms, red, args.batch)
        bad = {f: d for f, d in diff.items() if d > 1e-5}
        if bad:
            raise SystemExit(f"{name}: forms not exact: {bad}")
        t = timer._time(ms)
        dense = timer._time({"dense": layer_model(convs[name], "dense", args.batch)})["dense"]
        bound = flop_bound(name)
        for f, v in t.items():
            rows.append((name, f, f"{v:.3f}", f"{dense / v:.2f}x", f"{dense / v / bound:.2f}",
                         f"{diff[f]:.1e}"))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    print(f"{args.pattern} pattern, seed {args.seed}, batch {args.batch}, 1 thread, thread CPU "
          "time; the dense conv timed right after, alone")
    if hasattr(os, "getloadavg"):
        print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
