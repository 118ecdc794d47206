"""Does rounding the kept channel counts (``prune --round-to 8|auto``) buy speed?

For a few networks of ``tests/exported.py`` (random weights, BatchNorm statistics randomised
as there; exported with TorchScript, BatchNorm folded, at 1x3xSxS, S = 96 by default), zero a
seeded random half (``--fraction``) of every prunable channel space (equal per block where
grouped convolutions split a space), prune without rounding, with ``--round-to 8``, ``16``
and ``auto`` (timed at 1 thread, batch 1, CPU, with a fresh timing cache), and time the
original, the pruned and the rounded models with ONNX Runtime (CPU, 1 intra-op thread,
batch 1, all graph optimisations) in alternating runs in one process: each round runs every
model once, in a rotated order; the table gives the median per model.

Columns: ms per run; speed-up over the original; the MAC bound (MACs before / after, the
speed-up if time followed MACs); speed-up / bound. The load average (``os.getloadavg``) is
printed before and after: on a shared machine only the ratios of one run mean anything.

    python benchmarks/bench_round_to.py [--nets hf_resnet_basic ... | hf_resnet50]
        [--size 96] [--fraction 0.5] [--seconds 20] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import CACHE, single_thread_session, table  # noqa: E402

NETS = ("hf_resnet_basic", "hf_resnet_bottleneck", "hf_mobilenet_v2", "hf_regnet",
        "hf_efficientnet", "hf_convnext")
# Not by default: HF ResNet-50 (default config, widths 64..2048) at 224x224 (common.resnet50).
EXTRA = ("hf_resnet50",)


def export(name: str, size: int) -> onnx.ModelProto:
    """``name`` from tests/exported.py at 1x3x``size``x``size`` (TorchScript, folded; cached)."""
    if name == "hf_resnet50":
        from common import resnet50

        return resnet50(batch=1)
    import exported as X

    path = CACHE / f"round_to.{name}.{size}.onnx"
    if path.exists():
        return onnx.load(str(path))
    import torch

    net = X.NETS[name]
    module, args, names = net.build(size=size)
    args = tuple(a[:1] for a in args)  # batch 1
    with torch.no_grad():
        model = X._export_module(net, "ts", X.OPSET, module, args, names)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return model


def zero_half(model: onnx.ModelProto, seed: int, fraction: float = 0.5) -> onnx.ModelProto:
    """A seeded random half (``fraction``, rounded down) of the prunable channels of every
    space zeroed (the same positions in every block of a space that grouped convolutions
    split)."""
    from helpers import zero_groups

    from onnx_ssl.analysis import analyze

    a = analyze(model)
    rng = np.random.default_rng(seed)
    by_space: dict[str, dict[int, Any]] = {}
    for g in a.groups:
        if g.kind == "channel" and g.prunable and g.space is not None and g.index is not None:
            by_space.setdefault(g.space, {})[g.index] = g
    pick = []
    for sid, groups in sorted(by_space.items()):
        sp = a.space(sid)
        blocks = int(np.lcm.reduce(sp.partitions)) if sp.partitions else 1
        size = sp.channels // blocks
        chosen = rng.choice(size, int(size * fraction), replace=False)
        idx = [b * size + int(c) for b in range(blocks) for c in chosen]
        if all(i in groups for i in idx):
            pick += [groups[i] for i in idx]
    return zero_groups(model, pick)


def time_models(models: dict[str, onnx.ModelProto], seconds: float) -> dict[str, float]:
    """Median ms per run of each model, in alternating runs (1 thread, batch 1)."""
    sessions = {k: single_thread_session(m) for k, m in models.items()}
    inp = next(iter(sessions.values())).get_inputs()[0]
    x = np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)
    names = list(sessions)
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {inp.name: x})
    samples: dict[str, list[float]] = {k: [] for k in names}
    end = time.perf_counter() + seconds
    r = 0
    while time.perf_counter() < end or r < 20:
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t = time.perf_counter()
            sessions[k].run(None, {inp.name: x})
            samples[k].append(time.perf_counter() - t)
        r += 1
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS + EXTRA,
                    help="networks (default: the six of tests/exported.py; hf_resnet50 is "
                         "HF ResNet-50 at 224x224, whatever --size)")
    ap.add_argument("--size", type=int, default=96, help="image side (default 96)")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="timing per network, all its models together (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="fraction of every space zeroed (default 0.5: half; half of a "
                         "power-of-two width is already a multiple of 8)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()

    from onnx_ssl.compiler import prune

    load0 = os.getloadavg()
    rows = [("network", "model", "MACs", "ms", "speed-up", "MAC bound", "speed-up/bound",
             "spaces rounded (zero ch kept)", "prune s")]
    cache = tempfile.mkdtemp(prefix="round-to-cache-")
    for name in args.nets:
        model = export(name, args.size)
        zeroed = zero_half(model, args.seed, args.fraction)
        variants: dict[str, tuple[onnx.ModelProto, int, str, float]] = {}
        macs0 = 0
        for label, rt in (("pruned", None), ("pruned+round 8", 8), ("pruned+round 16", 16),
                          ("pruned+round auto", "auto")):
            t = time.perf_counter()
            res = prune(zeroed, round_to=rt, verify=2, threads=1, batch=1, lower_cache=cache)
            dt = time.perf_counter() - t
            macs0 = res.report.macs_before
            rounded = [e for _, r in res.report.passes for e in getattr(r, "rounded", ())]
            info = (f"{len(rounded)} ({sum(e.kept - e.bare for e in rounded)})" if rt else "-")
            variants[label] = (res.model, res.report.macs_after, info, dt)
        models = {"original": model, **{k: v[0] for k, v in variants.items()}}
        ms = time_models(models, args.seconds)
        for k in models:
            macs = macs0 if k == "original" else variants[k][1]
            speed = ms["original"] / ms[k]
            bound = macs0 / macs if macs else float("inf")
            rows.append((name, k, f"{macs / 1e6:.1f}M", f"{ms[k]:.3f}", f"{speed:.2f}x",
                         f"{bound:.2f}x", f"{speed / bound:.2f}",
                         variants[k][2] if k != "original" else "-",
                         f"{variants[k][3]:.2f}" if k != "original" else "-"))
        print(f"{name}: done", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    import onnxruntime as ort

    text = "\n".join([
        f"bench_round_to: {args.size}x{args.size}"
        + (" (hf_resnet50: 224x224)" if "hf_resnet50" in args.nets else "") +
        ", batch 1, 1 thread, ONNX Runtime "
        f"{ort.__version__} CPU; {args.fraction:g} of every prunable space zeroed (seed "
        f"{args.seed}); "
        f"median of alternating runs, {args.seconds:g} s per network",
        f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after "
        f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} CPUs)", "",
        table(rows)])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
