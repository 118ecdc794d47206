"""Prune speed, and the pruned ResNet-50's ONNX Runtime CPU latency against its MACs and
against the same network pruned by Torch-Pruning.

    python benchmarks/bench_prune.py              # needs torch, transformers, torch-pruning

1. Speed: analyse + prune (``verify=0``: the numeric check is excluded) of HF ResNet-50 with
   half the channels of every prunable space zeroed, and of residual chains to 10k nodes.
2. Latency: the same ResNet-50 (random weights, HF ``ResNetConfig()``), half the channels of
   every prunable space zeroed (``out`` and ``in`` members), pruned by onnx-ssl; ONNX
   Runtime CPU, all graph optimisations, 1 and 2 intra-op threads, batch 1 and 8; the
   original and the pruned models are timed in alternation in the same run (median).
   Target (issue 3): latency reduction >= 0.9 x MAC reduction at batch 1.
3. Torch-Pruning (``MagnitudePruner``, 50% per group, classifier ignored) on the same torch
   network, exported with the same exporter, timed in the same loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, chain, export_torch, hf_resnet50_module, resnet50, table  # noqa: E402

from onnx_ssl.analysis import analyze, prepare  # noqa: E402
from onnx_ssl.compiler import prune  # noqa: E402
from onnx_ssl.groups import Analysis  # noqa: E402
from onnx_ssl.runtime import session  # noqa: E402


def zero_half(model: onnx.ModelProto, seed: int = 0) -> tuple[onnx.ModelProto, Analysis]:
    """Zero a random half of the channels of every prunable space (out and in members)."""
    m = prepare(model)
    a = analyze(m, prepared=True)
    rng = np.random.default_rng(seed)
    arrs = {t.name: onnx.numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    for sp in a.spaces:
        if not sp.prunable:
            continue
        groups = [g for g in a.groups if g.kind == "channel" and g.space == sp.id]
        for i in rng.choice(len(groups), size=len(groups) // 2, replace=False):
            for mem in groups[i].members:
                if mem.role != "stat":
                    v = arrs[mem.tensor]
                    v[mem.index(v.shape)] = 0
    for t in m.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(arrs[t.name], t.name))
    return m, a


def macs(model: onnx.ModelProto) -> int:
    return analyze(model).macs


def latency(models: dict[str, onnx.ModelProto], batch: int, iters: int, threads: int
            ) -> dict[str, float]:
    sessions = {name: session(m, optimize=True, threads=threads) for name, m in models.items()}
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for s in sessions.values():
        for _ in range(2):
            s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(iters):
        for n, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: x})
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) * 1000 for n, v in times.items()}


def torch_pruning_model(batch: int) -> onnx.ModelProto | None:
    path = CACHE / f"hf_resnet50_tp50_b{batch}.onnx"
    if path.exists():
        return onnx.load(str(path))
    try:
        import torch
        import torch_pruning as tp
    except ImportError:
        print("torch-pruning is not installed; skipping the comparison", file=sys.stderr)
        return None
    module, x = hf_resnet50_module(batch)
    pruner = tp.pruner.MagnitudePruner(module, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[module.classifier])
    pruner.step()
    with torch.no_grad():
        module(x)
    return export_torch(module, x, path)


def speed(args: argparse.Namespace) -> list[tuple[str, ...]]:
    rows = [("graph", "nodes", "channels removed", "analyse+prune (s), no verify")]
    cases: list[tuple[str, onnx.ModelProto]] = [("HF ResNet-50, half zeroed", zero_half(
        resnet50())[0])]
    for blocks in (143, 357, 715, 1430):
        m, _ = zero_half(chain(blocks))
        cases.append((f"residual chain {blocks} blocks, half zeroed", m))
    for name, m in cases:
        prune(m, verify=0)  # warm-up
        t = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            r = prune(m, verify=0)
            t.append(time.perf_counter() - t0)
        removed = dict(r.report.passes)["remove-zero-channels"].to_json()["channels_removed"]
        rows.append((name, str(len(m.graph.node)), str(removed), f"{statistics.median(t):.3f}"))
        print(f"{name}: {statistics.median(t):.3f} s", file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20, help="timed runs per model at batch 1")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="intra-op thread counts to time (default 1 2)")
    args = ap.parse_args()
    if not args.skip_speed:
        print(table(speed(args)))
        print()
    if args.skip_latency:
        return 0
    rows = [("batch", "threads", "model", "MACs", "MAC reduction", "latency (ms)", "speed-up",
             "speed-up / MAC reduction")]
    for batch, iters in ((1, args.iters), (8, max(3, args.iters // 4))):
        original = resnet50(batch)
        zeroed, _ = zero_half(original)
        t0 = time.perf_counter()
        pruned = prune(zeroed, verify=1).model
        print(f"batch {batch}: pruned and verified in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        models = {"original": original, "onnx-ssl (half zeroed, pruned)": pruned}
        tp_model = torch_pruning_model(batch)
        if tp_model is not None:
            models["Torch-Pruning 50% per group"] = tp_model
        base_macs = macs(original)
        for threads in args.threads:
            lat = latency(models, batch, iters, threads)
            for name, m in models.items():
                mm = macs(m)
                red = base_macs / mm
                sp = lat["original"] / lat[name]
                rows.append((str(batch), str(threads), name, f"{mm / 1e9:.3f} G", f"{red:.2f}x",
                             f"{lat[name]:.1f}", f"{sp:.2f}x", f"{sp / red:.2f}"))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
