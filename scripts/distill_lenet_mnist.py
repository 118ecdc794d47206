"""Labelled SSL against label-free (self-distilling) SSL at the same MAC budget, on LeNet.

    python scripts/distill_lenet_mnist.py --data ../shared/data/mnist --out-dir out/distill \\
        [--target-macs 0.33]
    python scripts/distill_lenet_mnist.py --fast --out-dir out/distill_fast   # the test's

1. LeNet (Caffe's: conv 20 5x5, pool, conv 50 5x5, pool, FC 500, ReLU, FC 10) written in
   torch and exported with a static batch of 1 (as ``scripts/ssl_budget_lenet_mnist.py``);
2. a baseline trained from it with onnx-ssl's trainer on the labels (AdamW, lr 1e-3);
3. (a) ``onnx-ssl ssl BASELINE --data x_and_y.npz --target-macs F``: SSL on the labels;
   (b) ``onnx-ssl ssl BASELINE --data x_only.npz --target-macs F``: the same images without
   labels, so the baseline is the teacher and the loss is the distillation loss: KL at
   temperature 1 on the logits by default (``--distill-loss``, ``--distill-temperature``).
   At T = 1 its gradient is the cross-entropy's with the teacher's probabilities as the
   labels, so the labelled run's lr (0.05) and lambdas apply unchanged and the two runs
   differ only in what they fit. At that lr, one epoch of proximal SGD on the 8,000 images
   diverged with ssl's defaults for label-free data (MSE, at step 9) and with KL at T = 2
   (at step ~120): both have a larger curvature than the cross-entropy; they trained at lr
   0.01 and 0.02;
   (c) the same label-free data with ``--start oneshot``: no SSL phase; prune's one-shot
   selection (activation importance) cuts to the budget at once and all the epochs of (b)
   (SSL + fine-tuning) go to distilling the pruned model;
4. a table of the final models on the same held-out images: error against the labels,
   top-1 agreement with the baseline (:func:`onnx_ssl.training.fidelity.fidelity`, the
   measure the chain reports) and MACs; written to ``OUT_DIR/summary.json``.

Data: the MNIST folder given (only the 10,000-image test split is available offline here);
a seeded shuffle puts 8,000 images in training and 2,000 in the held-out set, the same for
every phase and both runs (the split depends only on the number of samples and the seed).
``--fast`` (600 images, 2 + 3 + 1 epochs) is the variant the test runs. A run whose
result is over ``--max-drop`` (exit status 3) is reported as such, with its model.
Needs torch (the ``[export]`` extra).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from ssl_budget_lenet_mnist import lenet_budget_parser, train_baseline  # noqa: E402


def run_ssl_cli(baseline: Path, spec: str, out: Path, tag: str, args: argparse.Namespace,
                extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``onnx-ssl ssl`` on ``spec``; its JSON report (accepted or not)."""
    cmd = [sys.executable, "-m", "onnx_ssl", "ssl", str(baseline), "--data", spec,
           "-o", str(out / f"lenet_{tag}.onnx"), "--report", str(out / f"report_{tag}.json"),
           "--target-macs", str(args.target_macs), "--epochs", str(args.epochs),
           "--finetune-epochs", str(args.finetune_epochs),
           "--log", str(out / f"log_{tag}.jsonl")]
    if args.lam is not None:
        cmd += ["--lambda-filter", str(args.lam), "--lambda-channel", str(args.lam)]
    cmd += list(extra)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd)
    if r.returncode not in (0, 3):  # 3: written, but over --max-drop
        raise SystemExit(f"onnx-ssl ssl failed with status {r.returncode}")
    rep: dict[str, Any] = json.loads((out / f"report_{tag}.json").read_text())
    rep["seconds_run"] = round(time.perf_counter() - t0, 1)
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = lenet_budget_parser(__doc__.splitlines()[0])
    ap.add_argument("--distill-loss", default="kl", choices=("mse", "kl", "cosine"),
                    help="the label-free run's loss (default kl)")
    ap.add_argument("--distill-temperature", type=float, default=1.0,
                    help="its KL temperature (default 1)")
    ap.add_argument("--fast", action="store_true",
                    help="600 images, 2 baseline, 3 SSL and 1 fine-tuning epochs (the test)")
    args = ap.parse_args(argv)
    if args.fast:
        args.limit = args.limit or 600
        args.baseline_epochs, args.epochs, args.finetune_epochs = 2, 3, 1

    from onnx_ssl.io import load_model
    from onnx_ssl.training.data import Dataset, load_idx_folder
    from onnx_ssl.training.distill import teacher_targets
    from onnx_ssl.training.evaluate import evaluate_fidelity, evaluate_model
    from onnx_ssl.training.fidelity import output_kind
    from onnx_ssl.training.spec import TensorSpec

    t0 = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_idx_folder(Path(args.data))
    if args.limit:
        data = data.subset(np.arange(args.limit), f"{data.name}[:{args.limit}]")
    x = next(iter(data.x.values()))
    labelled, unlabelled = str(out / "x_and_y.npz"), str(out / "x_only.npz")
    np.savez(labelled, x=x, y=data.y)
    np.savez(unlabelled, x=x)
    base, baseline = train_baseline(data, out, args.baseline_epochs)
    print(f"baseline: {len(base.train)} training, {len(base.val or [])} held-out images; "
          f"held-out error {100 * (base.val_error or 0):.2f}% "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    distill = ("--distill-loss", args.distill_loss, "--distill-temperature",
               str(args.distill_temperature))
    ssl = ("--start", "ssl")
    reports = {"labelled": run_ssl_cli(baseline, labelled, out, "labelled", args, ssl),
               "distilled": run_ssl_cli(baseline, unlabelled, out, "distilled", args,
                                        (*distill, *ssl)),
               # The same number of epochs, all of them fine-tuning after the one-shot cut.
               "distilled_oneshot": run_ssl_cli(baseline, unlabelled, out, "distilled_oneshot",
                                                args, (*distill, "--start", "oneshot"))}

    # Both final models on the same held-out images, measured the same way.
    _, val = data.split(0.2, seed=0)
    teacher = load_model(baseline)
    held = teacher_targets(teacher, Dataset(val.x, val.y, val.name))
    kinds = {o.name: output_kind(o.name, TensorSpec.of(o).shape)
             for o in teacher.graph.output}
    rows = [{"run": "baseline (input model)", "error": base.val_error, "fidelity": 1.0,
             "fidelity_kind": next(iter(kinds.values())), "mac_fraction": 1.0,
             "budget_met": None, "accepted": None}]
    for tag, rep in reports.items():
        model = load_model(rep["written_to"])
        _, err = evaluate_model(model, val)
        (fid,) = evaluate_fidelity(model, held, kinds)
        run = {"labelled": "SSL, labelled", "distilled": "SSL, distilled (no labels)",
               "distilled_oneshot": "one-shot cut, then distilled (no labels; --start oneshot)"}
        rows.append({"run": run[tag],
                     "error": err, "fidelity": fid.value, "fidelity_kind": fid.kind,
                     "mac_fraction": rep["budget"]["mac_fraction"],
                     "budget_met": rep["budget"]["met"], "accepted": rep["accepted"],
                     "model": rep["written_to"], "seconds": rep["seconds_run"]})
    summary = {"train_samples": len(base.train), "val_samples": len(val),
               "target_macs": args.target_macs, "epochs": args.epochs,
               "distill_loss": args.distill_loss, "distill_temperature": args.distill_temperature,
               "finetune_epochs": args.finetune_epochs, "rows": rows,
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{len(val)} held-out images; MAC budget {args.target_macs:.0%}\n")
    print("| run | held-out error | top-1 agreement with the baseline | MACs | accepted |")
    print("|---|---|---|---|---|")
    for r in rows:
        ok = {None: "", True: "yes", False: "no (over --max-drop)"}[r["accepted"]]
        print(f"| {r['run']} | {100 * r['error']:.2f}% | {100 * r['fidelity']:.2f}% | "
              f"{100 * r['mac_fraction']:.1f}% | {ok} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
