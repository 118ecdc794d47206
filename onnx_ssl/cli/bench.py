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
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    p.add_argument("--iters", type=int, default=20, help="timed runs per model (default 20)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnx_ssl.bench import benchmark, format_rows
    from onnx_ssl.loading import load

    if args.iters < 1:
        raise InputError("--iters must be >= 1")
    if args.threads < 0:
        raise InputError(f"--threads must be >= 0 (0: ONNX Runtime's default), got {args.threads}")
    models = [(str(p), load(p)) for p in args.models]
    rows = benchmark(models, args.provider, args.iters, threads=args.threads)
    print(format_rows(rows, args.provider))
    return 0
