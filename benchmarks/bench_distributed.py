"""Data-parallel training throughput: steps per second with 1 and 2 workers.

    python benchmarks/bench_distributed.py [--model lenet] [--batch 64] [--steps 40]
                                           [--rounds 3] [--repeats 3] [--workers 1 2]
                                           [--threads 1]

Each run starts N worker processes on this machine (gloo over localhost, as
``onnx-ssl train --workers N`` does), each an onnxruntime-training Module with ``--threads``
intra-op threads, that train SSL (proximal SGD, filter + channel group Lasso) on random
MNIST-shaped data with a global batch of ``--batch`` (each worker computes batch/N samples
and all-reduces its gradients after every step). It prints, per N, the global steps per
second (median over ``--repeats`` interleaved launches of the median of ``--rounds`` timed
epochs of ``--steps`` steps, after a warm-up epoch), the speed-up over 1 worker, the share
of the time spent in the gradient all-reduce (waiting for the slower worker included), and
the all-reduce alone (the workers start it together: the cost of the communication itself)
in ms and as a share of a step. For reference it also times one plain process (no
torch.distributed) with ONNX Runtime's default threads (all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _worker(args: argparse.Namespace) -> None:
    from onnx_ssl import models
    from onnx_ssl.training.artifacts import ArtifactOptions, build_artifacts
    from onnx_ssl.training.data import Dataset
    from onnx_ssl.training.distributed import Distributed, Setup
    from onnx_ssl.training.penalty import Lambdas
    from onnx_ssl.training.trainer import TrainConfig, Trainer

    world = int(os.environ.get("WORLD_SIZE", "0"))
    rank = int(os.environ.get("RANK", "0"))
    dist = None
    if world:  # (world 1 too: the same code path as 2 workers, all-reduce included)
        dist = Distributed(Setup(rank, world, rank, world, "127.0.0.1",
                                 int(os.environ["MASTER_PORT"]), timeout=120.0))
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    data = Dataset({"input": rng.random((n, 1, 28, 28), dtype=np.float32)},
                   rng.integers(0, 10, n).astype(np.int64), "random")
    warm = Dataset({"input": data.x["input"][: args.batch * 5]}, data.y[: args.batch * 5], "w")
    with tempfile.TemporaryDirectory() as tmp:
        art = build_artifacts(models.build(args.model), Path(tmp) / "art",
                              ArtifactOptions(lambdas=Lambdas(filter=1e-3, channel=1e-3)))
        cfg = TrainConfig(epochs=1, batch_size=args.batch, lr=0.01, prox=True, val_fraction=0.0,
                          save_state=False, export=False, schedule="constant")
        tr = Trainer(art, cfg, dist=dist)
        tr.fit(warm)
        rates, shares = [], []
        for _ in range(args.rounds):
            if dist is not None:
                dist.allreduce_seconds = 0.0
            t0 = time.perf_counter()
            tr.fit(data)
            dt = time.perf_counter() - t0
            rates.append(args.steps / dt)
            shares.append(dist.allreduce_seconds / dt if dist is not None else 0.0)
        pure = 0.0
        if dist is not None:  # the all-reduce alone: the workers start it together
            import torch

            size = sum(tr.state.parameters[p].data.size for p in tr.info.trainable) + 5
            buf = torch.zeros(size)
            for k in range(60):
                dist.tdist.barrier()
                t0 = time.perf_counter()
                dist.tdist.all_reduce(buf)
                pure += (time.perf_counter() - t0) if k >= 10 else 0.0
            pure /= 50
            dist.close()
    if rank == 0:
        print(json.dumps({"steps_per_s": statistics.median(rates),
                          "allreduce_share": statistics.median(shares),
                          "allreduce_ms": 1e3 * pure}), flush=True)


def _run(args: argparse.Namespace, workers: int, threads: int | None) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--batch",
           str(args.batch), "--steps", str(args.steps), "--rounds", str(args.rounds)]
    procs = []
    for rank in range(max(workers, 1)):
        env = dict(os.environ, WORLD_SIZE=str(workers), RANK=str(rank), MASTER_PORT=str(port))
        if threads:
            env["ONNX_SSL_THREADS"] = str(threads)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    return dict(json.loads(outs[0].strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--steps", type=int, default=40, help="steps per timed epoch")
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs per launch")
    ap.add_argument("--repeats", type=int, default=3,
                    help="launches per configuration, interleaved (load from other processes "
                    "then hits every configuration alike); the median is shown")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    print(f"{args.model}, global batch {args.batch}, {args.steps} steps x {args.rounds} rounds "
          f"x {args.repeats} launches, {os.cpu_count()} cores, {args.threads} intra-op "
          f"thread(s) per worker:")
    configs = [0, *args.workers]  # 0: one plain process, ONNX Runtime's default threads
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in configs}
    for _ in range(args.repeats):
        for n in configs:
            runs[n].append(_run(args, n, args.threads if n else None))

    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[n])

    print(f"  1 plain process, default threads: {med(0, 'steps_per_s'):7.1f} steps/s")
    base = med(args.workers[0], "steps_per_s")
    for n in args.workers:
        rate = med(n, "steps_per_s")
        pure = med(n, "allreduce_ms")
        print(f"  {n} worker(s): {rate:7.1f} steps/s, speed-up {rate / base:4.2f}x, "
              f"all-reduce {100 * med(n, 'allreduce_share'):4.1f}% of the time (waiting for "
              f"the slower worker included; alone: {pure:.2f} ms, "
              f"{100 * pure * rate / 1e3:.1f}% of a step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
