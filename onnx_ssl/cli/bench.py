"""``onnx-ssl bench``: ONNX Runtime latency of models against their MAC bound
(:mod:`onnx_ssl.bench`)."""

from __future__ import annotations

import argparse
from typing import Any

from onnx_ssl.errors import InputError


def register(sub: Any) -> None:
    from onnx_ssl.bench import PROVIDERS

    p = sub.add_parser("bench", help="time models on ONNX Runtime against their MAC bound")
    p.add_argument("models", nargs="+", help="models to compare; the first is the baseline")
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu",
                   help="ONNX Runtime execution provider (default cpu; cuda needs "
                        "onnxruntime-gpu)")
    p.add_argument("--iters", type=int, default=20, help="timed runs per model (default 20)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="batch to run a model whose batch is symbolic at (default: a static "
                        "model's batch among those given, else 1); the report says which "
                        "batch ran")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnx_ssl.bench import benchmark
    from onnx_ssl.loading import load

    if args.iters < 1:
        raise InputError("--iters must be >= 1")
    if args.threads < 0:
        raise InputError(f"--threads must be >= 0 (0: ONNX Runtime's default), got {args.threads}")
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    models = [(str(p), load(p)) for p in args.models]
    report = benchmark(models, args.provider, args.iters, threads=args.threads,
                       batch=args.batch)
    print(report.to_text())
    return 0
