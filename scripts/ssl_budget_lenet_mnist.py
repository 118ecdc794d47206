"""SSL to a MAC budget on a LeNet exported from PyTorch, on real MNIST images.

    python scripts/ssl_budget_lenet_mnist.py --data ../shared/data/mnist --out-dir out/budget \\
        [--target-macs 0.33] [--plots docs/figures/lenet_budget]

1. LeNet (Caffe's: conv 20 5x5, pool, conv 50 5x5, pool, FC 500, ReLU, FC 10) written in
   torch and exported with a **static batch of 1** (TorchScript exporter, opset 17);
2. a baseline trained from it with onnx-ssl's trainer (AdamW, lr 1e-3, no penalty);
3. ``onnx-ssl ssl BASELINE --target-macs F`` (the budget controller, then prune and
   fine-tune), with figures written by ``--plots``. A run whose error dropped more than
   ``--max-drop`` allows (exit status 3: the budget was met only by raising the prune
   threshold) is recorded as not accepted in ``summary.json``; its model is then
   ``lenet_ssl.over-max-drop.onnx``.

Data: the MNIST folder given (only the 10,000-image test split is available offline here);
a seeded shuffle puts 8,000 images in training and 2,000 in the held-out set that every
error is measured on. ``--limit N`` and the epoch options make a fast variant (the test).
Needs torch (the ``[export]`` extra).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def export_lenet(path: Path, seed: int = 0) -> None:
    """LeNet in torch, exported to ONNX with a static batch of 1."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    ).eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["logits"])



def load_mnist(folder: str, limit: int, out: Path) -> tuple[Any, str]:
    """The MNIST IDX ``folder`` as a Dataset, and the ``--data`` spec that gives onnx-ssl the
    same images: the folder itself, or with ``limit`` its first ``limit`` images written to
    ``out/data.npz``."""
    from onnx_ssl.training.data import load_idx_folder

    data = load_idx_folder(Path(folder))
    if not limit:
        return data, folder
    data = data.subset(np.arange(limit), f"{data.name}[:{limit}]")
    spec = str(out / "data.npz")
    np.savez(spec, x=next(iter(data.x.values())), y=data.y)
    return data, spec

def train_baseline(data: Any, out: Path, epochs: int) -> tuple[Any, Path]:
    """LeNet exported to ``out/lenet_torch_b1.onnx`` and trained on ``data`` with onnx-ssl's
    trainer (AdamW, lr 1e-3, 20% held out, no penalty); the result and
    ``out/lenet_baseline.onnx``, where it is written."""
    from onnx_ssl.io import load_model, save_model
    from onnx_ssl.training.artifacts import ArtifactOptions, build_artifacts
    from onnx_ssl.training.trainer import TrainConfig, Trainer

    exported = out / "lenet_torch_b1.onnx"
    export_lenet(exported)
    with tempfile.TemporaryDirectory() as tmp:
        art = build_artifacts(load_model(exported), Path(tmp) / "base", ArtifactOptions(),
                              name="lenet")
        base = Trainer(art, TrainConfig(epochs=epochs, lr=1e-3, val_fraction=0.2, seed=0,
                                        save_state=False)).fit(data)
    assert base.model is not None
    baseline = out / "lenet_baseline.onnx"
    save_model(base.model, baseline)
    return base, baseline


def lenet_budget_parser(description: str) -> argparse.ArgumentParser:
    """The options of a LeNet/MNIST run to a MAC budget (this script's and the label-free
    one's, scripts/distill_lenet_mnist.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--target-macs", type=float, default=0.33)
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only")
    ap.add_argument("--baseline-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20, help="SSL epochs")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--lambda", dest="lam", type=float, default=None,
                    help="starting filter and channel lambda (default: ssl's)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = lenet_budget_parser(__doc__.splitlines()[0])
    ap.add_argument("--plots", default=None, help="figures folder (default OUT_DIR/figures)")
    args = ap.parse_args(argv)


    t0 = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, spec = load_mnist(args.data, args.limit, out)
    base, baseline = train_baseline(data, out, args.baseline_epochs)
    t_base = time.perf_counter() - t0
    print(f"baseline: {len(base.train)} training, {len(base.val or [])} held-out images; "
          f"held-out error {100 * (base.val_error or 0):.2f}% ({t_base:.0f}s)", flush=True)

    plots = args.plots or str(out / "figures")
    cmd = [sys.executable, "-m", "onnx_ssl", "ssl", str(baseline), "--data", spec,
           "-o", str(out / "lenet_ssl.onnx"), "--report", str(out / "report.json"),
           "--target-macs", str(args.target_macs), "--epochs", str(args.epochs),
           "--finetune-epochs", str(args.finetune_epochs), "--plots", plots,
           "--log", str(out / "log.jsonl"), "--work-dir", str(out / "work")]
    if args.lam is not None:
        cmd += ["--lambda-filter", str(args.lam), "--lambda-channel", str(args.lam)]
    print("$ " + " ".join(cmd), flush=True)
    t1 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    if rc not in (0, 3):  # 3: done, but over --max-drop (the summary says so)
        raise SystemExit(f"onnx-ssl ssl failed with exit status {rc}")
    rep = json.loads((out / "report.json").read_text())
    summary = {
        "train_samples": rep["train_samples"],
        "val_samples": rep["val_samples"],
        "baseline_error": base.val_error,
        "final_error": rep["error"]["final"],
        "error": rep["error"],
        "accepted": rep["accepted"],
        "drop": rep["drop"],
        "max_drop": rep["max_drop"],
        "exit_status": rc,
        "mac_fraction": rep["budget"]["mac_fraction"],
        "target_macs": args.target_macs,
        "budget_met": rep["budget"]["met"],
        "lambda_scale": rep["budget"]["lambda_scale"],
        "threshold_used": rep["budget"]["threshold_used"],
        "filters": [(r["node"], r["filters_after"], r["filters_before"]) for r in rep["layers"]],
        "seconds_baseline": round(t_base, 1),
        "seconds_ssl": round(time.perf_counter() - t1, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
