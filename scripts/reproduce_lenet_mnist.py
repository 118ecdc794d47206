"""Reproduce the LeNet rows of Table 1 of Wen et al. 2016 on real MNIST images.

    python scripts/reproduce_lenet_mnist.py [--data ../shared/data/mnist] [--out-dir out/lenet]
    python scripts/reproduce_lenet_mnist.py --limit 600 --baseline-epochs 2 --epochs 2 \\
        --finetune-epochs 1 --lambdas 0.05 --out-dir /tmp/t1    # the test's fast variant

Data: the folder of MNIST IDX files (only the 10,000-image test split is available offline
here): a seeded shuffle puts 8,000 images in training and 2,000 in the held-out set every
error is measured on. Steps:

1. LeNet (Caffe's, from ``onnx_ssl.models``) trained from scratch: the baseline (LeNet 1);
2. for each strength, the SSL chain from the baseline with filter-wise and channel-wise
   group Lasso (``onnx-ssl ssl`` defaults except lambda): proximal SGD, threshold, prune
   (verified), fine-tune (LeNet 2 and 3);
3. per conv layer: filters, channels, FLOP (MACs) as % of the baseline and the speedup
   measured with ONNX Runtime CPU (1 thread, batch 64), printed beside the paper's numbers.

Takes about 10 minutes on two cores; not run in CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnx_ssl import models
from onnx_ssl.io import save_model
from onnx_ssl.training.artifacts import ArtifactOptions, build_artifacts
from onnx_ssl.training.chain import SslOptions, add_speedups, run_ssl
from onnx_ssl.training.data import load_idx_folder
from onnx_ssl.training.penalty import Lambdas
from onnx_ssl.training.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
# Table 1 of the paper (LeNet on MNIST): error, filters, channels, FLOP, CPU speedup.
PAPER = [
    ("LeNet 1 (baseline)", "0.9%", "20 - 50", "1 - 20", "100% - 100%", "1.00x - 1.00x"),
    ("LeNet 2 (SSL)", "0.8%", "5 - 19", "1 - 4", "25% - 7.6%", "1.64x - 5.23x"),
    ("LeNet 3 (SSL)", "1.0%", "3 - 12", "1 - 3", "15% - 3.6%", "1.99x - 7.44x"),
]


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--out-dir", default=None, help="write the models and a JSON summary here")
    ap.add_argument(
        "--lambdas",
        default="0.02,0.04",
        help="filter and channel lambda of each SSL run (default 0.02,0.04)",
    )
    ap.add_argument("--lambda-scale", action="append", default=[], metavar="STRUCTURE:LAYER=X",
                    help="multiply one term's lambda by X in every SSL run (as ssl's option), "
                    "e.g. filter:conv2=2")
    ap.add_argument("--baseline-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=SslOptions().epochs, help="SSL epochs")
    ap.add_argument("--finetune-epochs", type=int, default=SslOptions().finetune_epochs)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only (the "
                    "test's fast variant)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    data = load_idx_folder(Path(args.data))
    if args.limit:
        data = data.subset(np.arange(args.limit), f"{data.name}[:{args.limit}]")
    val_fraction = 0.2
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    _say(
        f"MNIST: {len(data)} images from {args.data}; training on "
        f"{round(len(data) * (1 - val_fraction))}, evaluating on "
        f"{round(len(data) * val_fraction)}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        art = build_artifacts(
            models.build("lenet"), Path(tmp) / "baseline", ArtifactOptions(), name="lenet"
        )
        _say(f"baseline: {args.baseline_epochs} epochs, AdamW lr 1e-3 cosine")
        base = Trainer(
            art,
            TrainConfig(
                epochs=args.baseline_epochs,
                lr=1e-3,
                val_fraction=val_fraction,
                seed=args.seed,
                save_state=False,
            ),
        ).fit(data)
    assert base.model is not None
    baseline, base_err = base.model, base.val_error
    _say(f"baseline held-out error {100 * (base_err or 0):.2f}%")
    if out_dir:
        save_model(baseline, out_dir / "lenet_baseline.onnx")

    scales = tuple(Lambdas.parse_scale(x) for x in args.lambda_scale)
    rows = [("LeNet 1 (baseline)", base_err, None)]
    summary: dict[str, object] = {"baseline_error": base_err, "runs": []}
    for k, lam in enumerate(float(v) for v in args.lambdas.split(",")):
        opts = SslOptions(
            lambdas=Lambdas(filter=lam, channel=lam, scales=scales),
            epochs=args.epochs,
            finetune_epochs=args.finetune_epochs,
            val_fraction=val_fraction,
            seed=args.seed,
        )
        _say(f"SSL run {k + 1}: lambda filter = channel = {lam:g}")
        res = run_ssl(
            baseline,
            data,
            opts,
            name="lenet",
            notify=_say,
            output=out_dir / f"lenet_ssl_{lam:g}.onnx" if out_dir else None,
        )
        rep = add_speedups(res.report, baseline, res.model, batch=64, threads=1)
        rows.append((f"LeNet {k + 2} (SSL, lambda {lam:g})", rep.error_final, rep))
        summary["runs"].append({"lambda": lam, **rep.to_json()})  # type: ignore[attr-defined]

    def conv(rep):  # type: ignore[no-untyped-def]
        return [r for r in rep.layers if r.op == "Conv"]

    header = "| | error | filters | channels | FLOP | speedup (ORT CPU) | model speedup |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, err, rep in rows:
        e = "-" if err is None else f"{100 * err:.2f}%"
        if rep is None:
            lines.append(
                f"| ours: {name} | {e} | 20 - 50 | 1 - 20 | 100% - 100% | 1.00x - 1.00x | 1.00x |"
            )
            continue
        c = conv(rep)
        lines.append(
            f"| ours: {name} | {e} | {' - '.join(str(r.filters_after) for r in c)} | "
            f"{' - '.join(str(r.channels_after) for r in c)} | "
            f"{' - '.join(f'{100 * r.mac_fraction:.1f}%' for r in c)} | "
            f"{' - '.join('-' if r.speedup is None else f'{r.speedup:.2f}x' for r in c)} | "
            f"{'-' if rep.speedup is None else f'{rep.speedup:.2f}x'} |"
        )
    for p in PAPER:
        lines.append(f"| paper: {p[0]} | {' | '.join(p[1:])} | - |")
    table = "\n".join(lines)
    print(
        f"LeNet on MNIST ({len(data)} images of the test split: {len(base.train)} for "
        f"training, {len(base.val) if base.val is not None else 0} held out; errors on the "
        f"held-out images)\n"
    )
    print(table)
    print(f"\ntotal time {time.perf_counter() - t0:.0f}s")
    if out_dir:
        summary["table"] = table
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
