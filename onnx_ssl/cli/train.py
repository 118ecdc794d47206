"""``onnx-ssl train``: train an artifacts folder with onnxruntime-training
(:class:`onnx_ssl.training.trainer.Trainer`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import Opt, add_options, needs_training, options_from, say
from ._training import add_workers, progress, with_workers


def _opts() -> tuple[Opt, ...]:
    from onnx_ssl.training.trainer import SCHEDULES

    return (
        Opt("epochs", "(default {default})"),
        Opt("batch_size", "(default {default})"),
        Opt("lr", "peak learning rate (default {default:g})"),
        Opt("schedule", "cosine decay to 0, or x0.1 at 50%% and 75%% of the steps (default "
            "{default})", choices=SCHEDULES),
        Opt("prox", "proximal group Lasso: after each step w <- w max(0, 1 - lr "
            "lambda/||w||) (groups become exactly zero; the penalty's gradient is then left "
            "out of the loss)"),
        Opt("penalty", "train on the data loss alone (penalty scale 0)", flags=("--no-penalty",),
            negate=True),
        Opt("resume", "continue from the folder's train_state.ckpt"),
        Opt("val_fraction", "held-out fraction of the data (default {default:g})"),
        Opt("seed", "seed of the held-out split and of the batch order (default {default})"),
        Opt("zero_tol", "a group counts as zero when its RMS is <= T (default {default:g})",
            metavar="T"),
        Opt("log_path", "log file, .csv or .json (default DIR/train_log.csv)", flags=("--log",),
            metavar="PATH"),
        Opt("export_path", "trained model (default DIR/trained_model.onnx)",
            flags=("-o", "--output"), metavar="OUT.onnx"),
    )


def register(sub: Any) -> None:
    from onnx_ssl.training.trainer import TrainConfig

    p = sub.add_parser(
        "train",
        help="train an artifacts folder with onnxruntime-training",
        description="Train with onnxruntime.training.api. Each epoch logs the training loss, "
        "data loss, penalty, held-out error and the fraction of zero groups per "
        "layer and structure (CSV or JSON), and saves a resumable checkpoint; at "
        "the end the trained model is exported with the original inputs and "
        "outputs.",
    )
    p.add_argument("dir", help="artifacts folder (from `onnx-ssl artifacts`)")
    p.add_argument("--data", default="digits", metavar="SPEC",
                   help="a .npz file (x, y; without y, one array per model input, for "
                   "artifacts built with --distill-loss), a folder of MNIST IDX files, or 'digits' "
                   "(scikit-learn's bundled 8x8 digits, resized; the default)")
    add_options(p, TrainConfig(), _opts())
    add_workers(p)
    p.set_defaults(func=needs_training(lambda a: with_workers(a, lambda w: run(a, w))))


def run(args: argparse.Namespace, workers: Any = None) -> int:
    from onnx_ssl.training.data import data_files, load_data
    from onnx_ssl.training.spec import load_artifacts
    from onnx_ssl.training.trainer import LOG, TRAINED, TrainConfig, Trainer

    cfg = options_from(TrainConfig, args, _opts())
    trainer = Trainer(load_artifacts(args.dir), cfg, reads=data_files(args.data), dist=workers)
    data = load_data(args.data)
    if trainer.distilling:
        # The teacher: the artifacts' inference model holds the weights they were built from.
        from onnx_ssl.io import load_model
        from onnx_ssl.training.distill import teacher_targets

        data = teacher_targets(load_model(trainer.art.inference_model), data)
    if workers is not None and not workers.is_writer:  # rank 0 reports and writes
        trainer.fit(data)
        return 0
    if trainer.start_epoch >= cfg.epochs:
        say(f"already trained for {trainer.start_epoch} epochs (--epochs {cfg.epochs}); exporting")
    bar = progress(prefix="")
    res = trainer.fit(data, progress=bar)
    bar.close()
    out = res.export_path or Path(args.dir) / TRAINED
    last = res.history[-1] if res.history else None
    print(
        f"trained {len(res.history)} epoch(s) on {data.name} ({len(res.train)} training, "
        f"{len(res.val) if res.val is not None else 0} held-out samples)"
    )
    if last is not None:
        err = "-" if last.val_error is None else f"{100 * last.val_error:.2f}%"
        fid = ", ".join(f"{k.split(':', 2)[2]} {k.split(':', 2)[1]} {v:.4f}"
                        for k, v in last.fidelity)
        print(
            f"  final: loss {last.loss:.4f} (data {last.data_loss:.4f}, penalty "
            f"{last.penalty:.4f}), held-out error {err}"
            + (f", fidelity to the teacher: {fid}" if fid else "")
        )
        zero = [f"{k} {v:.0%}" for k, v in last.zero_groups if v > 0]
        if zero:
            print(f"  zero groups: {', '.join(zero)}")
    print(
        f"  model: {out}; log: {res.log_path or Path(args.dir) / LOG}; checkpoint: "
        f"{trainer.state_path}"
    )
    return 0
