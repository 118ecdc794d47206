"""Cost of the group-Lasso term: one LeNet training step with and without the penalty.

    python benchmarks/bench_penalty.py [--batch 64] [--rounds 15] [--steps 20] [--threads 1]

Builds LeNet's training artifacts three times (no penalty; filter + channel, as in the
paper's LeNet experiment; every structure the model has: filter, channel, shape, filter2d,
neuron, coupled), then times training steps (forward + backward through the loss graph +
AdamW) in interleaved rounds so that load from other processes hits all variants alike, and
prints the median time per step and the overhead against the step without the penalty.
The issue's budget: at most 10% for the paper's filter + channel setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnx_ssl import models
from onnx_ssl.training import _ort
from onnx_ssl.training.artifacts import PENALTY_SCALE, ArtifactOptions, build_artifacts
from onnx_ssl.training.penalty import Lambdas

VARIANTS = {
    "no penalty": Lambdas(),
    "filter+channel": Lambdas(filter=1e-3, channel=1e-3),
    "all structures": Lambdas(
        filter=1e-3, channel=1e-3, shape=1e-3, filter2d=1e-3, neuron=1e-3, coupled=1e-3
    ),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = ap.parse_args(argv)

    o = _ort.load()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int64)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, lam in VARIANTS.items():
            art = build_artifacts(
                models.build("lenet"),
                Path(tmp) / name.replace(" ", "_"),
                ArtifactOptions(lambdas=lam),
            )
            state = o.api.CheckpointState.load_checkpoint(str(art.checkpoint))
            so = o.ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.log_severity_level = 3
            module = o.api.Module(
                str(art.training_model), state, str(art.eval_model), session_options=so
            )
            opt = o.api.Optimizer(str(art.optimizer_model), module)
            feeds = {"input": x, "labels": y, PENALTY_SCALE: np.ones(1, np.float32)}
            inputs = [feeds[n] for n in module.input_names()]
            runs[name] = (module, opt, inputs, state)

        def step(name: str) -> None:
            module, opt, inputs, _ = runs[name]
            module.lazy_reset_grad()
            module(*inputs)
            opt.step()

        for name in runs:  # warm-up
            for _ in range(5):
                step(name)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name in runs:
                t = time.perf_counter()
                for _ in range(args.steps):
                    step(name)
                times[name].append((time.perf_counter() - t) / args.steps)

    base = statistics.median(times["no penalty"])
    print(
        f"LeNet training step, batch {args.batch}, {args.threads} thread(s), median of "
        f"{args.rounds} rounds x {args.steps} steps (forward + backward + AdamW):"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:15s} {1e3 * med:8.2f} ms/step   overhead {100 * (med / base - 1):+6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
