"""Budgeted one-shot pruning (``prune --target-macs F``) on the exported test networks.

For every (network, exporter) pair of ``tests/exported.py`` (transformers and hand-written
PyTorch networks, random weights with BatchNorm statistics randomised, TorchScript and
dynamo exports, static and dynamic batch) and every target F, prune with
``onnx_ssl.prune(model, target_macs=F)`` (magnitude importance; with ``--calib N``, the
activation importance on N seeded random calibration samples) and report the MAC fraction
reached, whether it lands in [F - 0.02, F], the groups zeroed, the output change on the
numeric check's inputs and the time.

Usage: ``python benchmarks/bench_budget.py [--targets 0.5,0.3] [--exporters ts,dynamo]
[--nets hf_resnet_basic,...] [--calib N]`` (prints a markdown table and a summary line).
Needs the exports (torch, the ``[export]`` extra, or the test cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import exported as X  # noqa: E402

import onnx_ssl  # noqa: E402
from onnx_ssl.errors import InputError, VerificationError  # noqa: E402
from onnx_ssl.runtime import random_inputs, session  # noqa: E402

LANDING = 0.02


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.5,0.3")
    ap.add_argument("--exporters", default="", help="comma-separated (default: all)")
    ap.add_argument("--nets", default="", help="comma-separated (default: all)")
    ap.add_argument("--calib", type=int, default=0,
                    help="activation importance on N seeded random samples (default: magnitude)")
    args = ap.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]
    exporters = set(filter(None, args.exporters.split(",")))
    nets = set(filter(None, args.nets.split(",")))
    how = f"activation on {args.calib} random samples" if args.calib else "magnitude"
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; importance {how}\n")
    print("| network | exporter | target | MACs reached | in window | groups zeroed | "
          "max output change (relative) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    landed = total = 0
    for name, ex in X.cases():
        if (exporters and ex not in exporters) or (nets and name not in nets):
            continue
        model = X.load(name, ex)
        # (a static batch keeps its own size: the samples are then that many)
        calib = random_inputs(session(model), seed=0, batch=args.calib) if args.calib else None
        for t in targets:
            t0 = time.perf_counter()
            try:
                rep = onnx_ssl.prune(model, target_macs=t, verify=1, calib=calib).report
            except (InputError, VerificationError) as e:  # (an ill-conditioned export)
                print(f"| {name} | {ex} | {t:.2f} | {type(e).__name__}: {e} | | | | |")
                continue
            secs = time.perf_counter() - t0
            frac = rep.mac_fraction
            ok = t - LANDING - 1e-9 <= frac <= t + 1e-9
            landed += ok
            total += 1
            change = max((d.relative for d in rep.effect), default=float("nan"))
            print(f"| {name} | {ex} | {t:.2f} | {frac:.3f} | {'yes' if ok else 'NO'} | "
                  f"{rep.groups_zeroed} | {change:.3g} | {secs:.1f} |", flush=True)
    print(f"\n{landed} of {total} land in [F - {LANDING:g}, F]; load average "
          f"{os.getloadavg()[0]:.1f}")
    return 0 if total else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
