"""Reproduce Figure 6 of Wen et al. 2016 (ResNet-20, depth-wise SSL) on real MNIST.

    python scripts/reproduce_resnet_depth.py --step baseline20 --out-dir out/resnet_depth
    python scripts/reproduce_resnet_depth.py --step baseline32 --out-dir out/resnet_depth
    python scripts/reproduce_resnet_depth.py --step ssl --lambda-depth 1 --out-dir out/resnet_depth
    python scripts/reproduce_resnet_depth.py --step figure --out-dir out/resnet_depth \\
        --figures docs/figures/resnet_depth
    python scripts/reproduce_resnet_depth.py --fast --out-dir /tmp/rd   # the test's variant

The architectures are the paper's CIFAR-10 ResNets (He et al. 2016: a 3x3 conv with 16
filters, then 3 stages of basic blocks with 16, 32 and 64 filters, global average pooling
and a 10-way FC; ResNet-20 has 3 blocks per stage, ResNet-32 5), written in torch with
1x1-conv projection shortcuts where a stage starts ("option B", as ``onnx_ssl.models``) and
run on **MNIST** (1 input channel), because CIFAR-10 is not available here. Data: the
10,000-image MNIST test split (the only one available offline); a seeded shuffle puts 8,000
images in training and the other 2,000 in the held-out set every error is measured on
(``--limit N``: the first N images). The images are resized (bilinear) to 14x14 by default
(``--size``): one ResNet-20 epoch on the 8,000 images at 28x28 took 104 s on the shared
2-core machine, four times what the whole figure could afford. Defaults: baselines 8 epochs
of AdamW (lr 2e-3, cosine, batch 64); SSL 6 epochs of proximal SGD (lr 0.05, cosine),
threshold 1e-3, 3 fine-tuning epochs of AdamW (lr 5e-4). Measured here (load 10 to 15 on 2
cores): ResNet-20 baseline 7 min, ResNet-32 18 min, one SSL run 2 to 12 min.

Steps (each writes its own JSON to ``--out-dir``, so they can run as separate invocations;
``--step all`` runs them one after the other):

``baseline20`` / ``baseline32``
    the torch net exported with a static batch of 1 in training mode without constant
    folding (BatchNormalization stays a node, see the README's "Exporting from PyTorch for
    training"), trained from scratch with onnx-ssl's trainer (AdamW, cosine schedule);
``ssl``
    for each ``--lambda-depth X``: :func:`onnx_ssl.training.chain.run_ssl` on the trained
    ResNet-20 with the depth-wise group Lasso alone (one group per residual branch: both
    convolutions and both BatchNorms' scale and shift), proximal SGD, threshold, prune (the
    ``CollapseResidualPass`` deletes every branch that became zero, the numeric check
    compares the pruned model with the thresholded one), then fine-tuning of the pruned
    model without the penalty;
``figure``
    merges every JSON in ``--out-dir`` into ``figure6.png`` (held-out error against the
    number of layers, the paper's x axis) and ``table.md`` (in ``--figures`` and
    ``--out-dir``).

"Layers" counts as the paper does: the convolutions on the main path plus the FC layer
(ResNet-20: 1 + 2 x 9 + 1 = 20); the two 1x1 projection shortcuts are reported apart
(``conv_layers`` counts every Conv node of the model, projections included).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# Figure 6 of the paper (CIFAR-10): ResNet-20 8.82%, ResNet-32 7.51%, SSL-ResNet-14 8.54%.
PAPER = {"resnet20": 8.82, "resnet32": 7.51, "ssl_resnet14": 8.54}
DEFAULT_LAMBDAS = (0.5, 0.6, 0.75, 1.0, 1.25, 1.5, 2.0)
# The fast variant's: 1 SSL epoch of 8 steps on 480 images must zero some branches.
FAST_LAMBDA = 40.0
STAGES = 3

log = logging.getLogger("reproduce_resnet_depth")


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def torch_resnet(depth: int, width: int = 16, in_ch: int = 1, seed: int = 0) -> Any:
    """The CIFAR ResNet-``depth`` (``6n + 2``) in torch, widths ``width`` x (1, 2, 4)."""
    import torch
    from torch import nn

    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.downsample(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = self.stage(width, width, 1)
            self.layer2 = self.stage(width, 2 * width, 2)
            self.layer3 = self.stage(2 * width, 4 * width, 2)
            self.fc = nn.Linear(4 * width, 10)

        @staticmethod
        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(*[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                   for i in range(n)])

        def forward(self, x: Any) -> Any:
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))

    torch.manual_seed(seed)
    net = ResNet()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def export_resnet(depth: int, path: Path, width: int, size: int, seed: int = 0) -> None:
    """Export with a static batch of 1, in training mode and without constant folding, so
    that every BatchNormalization stays a node that trains."""
    import warnings

    import torch

    net = torch_resnet(depth, width, 1, seed).train()
    with warnings.catch_warnings():  # "Removing mutation ... num_batches_tracked": expected
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(net, (torch.zeros(1, 1, size, size),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"],
                          training=torch.onnx.TrainingMode.TRAINING,
                          do_constant_folding=False)


def block_names(depth: int) -> list[tuple[int, int]]:
    n = (depth - 2) // 6
    return [(s, i) for s in range(1, STAGES + 1) for i in range(n)]


def paper_layers(model: onnx.ModelProto) -> int:
    """Layers counted as the paper counts a ResNet's: the convs on the main path (not the 1x1
    projection shortcuts, named ``downsample`` by both exporters) plus the FC layers."""
    return sum(1 for n in model.graph.node if n.op_type in ("Gemm", "MatMul")
               or (n.op_type == "Conv" and "downsample" not in n.name))


def structure(model: onnx.ModelProto, depth: int) -> dict[str, Any]:
    """Which residual blocks of ``model`` (a ResNet-``depth`` export, perhaps pruned) still
    have their branch, and the layer counts."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    proj = [n for n in convs if "downsample" in n.name]
    kept: dict[int, int] = dict.fromkeys(range(1, STAGES + 1), 0)
    for s, i in block_names(depth):
        if any(f"layer{s}.{i}/conv" in n.name for n in convs):
            kept[s] += 1
    n = (depth - 2) // 6
    return {
        "conv_layers": len(convs),
        "projection_convs": len(proj),
        "layers": paper_layers(model),
        "blocks_kept": [kept[s] for s in range(1, STAGES + 1)],
        "blocks_removed": [n - kept[s] for s in range(1, STAGES + 1)],
    }


def load_data(folder: str, limit: int, size: int) -> Any:
    """The MNIST IDX ``folder`` as a Dataset ([N, size, size] images in [0, 1])."""
    from onnx_ssl.training.data import Dataset, load_idx_folder, resize_bilinear

    data = load_idx_folder(Path(folder))
    if limit:
        data = data.subset(np.arange(limit), f"{data.name}[:{limit}]")
    x = next(iter(data.x.values()))
    if size != x.shape[-1]:
        x = resize_bilinear(x, size, size)
        data = Dataset({"x": x}, data.y, f"{data.name}@{size}x{size}")
    return data


def macs_of(model: onnx.ModelProto) -> int:
    from onnx_ssl import prune

    return int(prune(model, verify=0).report.macs_before)


def train_baseline(depth: int, data: Any, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from onnx_ssl.io import load_model, save_model
    from onnx_ssl.training.artifacts import ArtifactOptions, build_artifacts
    from onnx_ssl.training.trainer import TrainConfig, Trainer

    t0 = time.perf_counter()
    exported = out / f"resnet{depth}_torch_b1.onnx"
    export_resnet(depth, exported, args.width, args.size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        art = build_artifacts(load_model(exported), Path(tmp) / "base",
                              ArtifactOptions(optimizer="adamw"), name=f"resnet{depth}")
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          val_fraction=0.2, seed=args.seed, save_state=False)
        res = Trainer(art, cfg).fit(data)
    assert res.model is not None and res.val is not None
    path = out / f"resnet{depth}_baseline.onnx"
    save_model(res.model, path)  # first: a failure below must not lose the training
    row = {
        "kind": "baseline", "depth": depth, "error": res.val_error,
        "train_samples": len(res.train), "val_samples": len(res.val),
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "width": args.width, "size": args.size, "macs": macs_of(res.model),
        "model": str(path), "seconds": round(time.perf_counter() - t0, 1),
        "history": [h.row() for h in res.history],
        **structure(res.model, depth),
    }
    _say(f"ResNet-{depth} baseline: {row['train_samples']} training, {row['val_samples']} "
         f"held-out images; held-out error {100 * (res.val_error or 0):.2f}% "
         f"({row['seconds']:.0f}s)")
    (out / f"baseline_resnet{depth}.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def run_depth_ssl(lam: float, data: Any, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from onnx_ssl.io import load_model
    from onnx_ssl.training.chain import SslOptions, run_ssl
    from onnx_ssl.training.penalty import Lambdas

    base_path = out / "resnet20_baseline.onnx"
    if not base_path.exists():
        raise SystemExit(f"{base_path}: run --step baseline20 first")
    opts = SslOptions(lambdas=Lambdas(depth=lam), epochs=args.ssl_epochs, lr=args.ssl_lr,
                      batch_size=args.batch_size, finetune_epochs=args.finetune_epochs,
                      finetune_lr=args.finetune_lr, seed=args.seed, val_fraction=0.2,
                      stop_on_collapse=False)
    tag = f"{lam:g}"
    res = run_ssl(load_model(base_path), data, opts, output=out / f"resnet20_ssl_{tag}.onnx",
                  report_path=out / f"ssl_{tag}_report.json", name="resnet20", notify=_say)
    rep = res.report
    prune_text = rep.prune_text
    row = {
        "kind": "ssl", "depth": 20, "lambda_depth": lam, "error": rep.error_final,
        "error_before": rep.error_before, "error_ssl": rep.error_ssl,
        "error_pruned": rep.error_pruned, "groups_zeroed": rep.groups_zeroed,
        "train_samples": rep.train_samples, "val_samples": rep.val_samples,
        "ssl_epochs": args.ssl_epochs, "ssl_lr": args.ssl_lr,
        "finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr,
        "width": args.width, "size": args.size,
        "macs": rep.macs_after, "macs_before": rep.macs_before,
        "params": rep.params_after, "params_before": rep.params_before,
        "model": str(out / f"resnet20_ssl_{tag}.onnx"),
        "seconds": round(rep.seconds, 1), "prune_text": prune_text,
        **structure(res.model, 20),
    }
    _say(f"lambda-depth {lam:g}: {row['layers']} layers (blocks removed per stage "
         f"{row['blocks_removed']}), held-out error {100 * (rep.error_final or 0):.2f}% "
         f"(after SSL {100 * (rep.error_ssl or 0):.2f}%, pruned "
         f"{100 * (rep.error_pruned or 0):.2f}%), MACs {rep.macs_after / rep.macs_before:.1%} "
         f"({row['seconds']:.0f}s)")
    (out / f"ssl_{tag}.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def load_rows(out: Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    base = {}
    for d in (20, 32):
        p = out / f"baseline_resnet{d}.json"
        if p.exists():
            base[d] = json.loads(p.read_text())
    ssl = sorted((json.loads(p.read_text()) for p in out.glob("ssl_*.json")
                  if not p.name.endswith("_report.json")), key=lambda r: r["lambda_depth"])
    return base, ssl


def table(base: dict[int, dict[str, Any]], ssl: Sequence[dict[str, Any]]) -> str:
    ref = base[20]["macs"] if 20 in base else None

    def macs(m: int) -> str:
        return f"{m / 1e6:.2f} M" + (f" ({100 * m / ref:.0f}%)" if ref else "")

    lines = ["| model | lambda-depth | layers left | blocks removed (stage 1-2-3) | "
             "held-out error | MACs |", "|---|---|---|---|---|---|"]
    for d in sorted(base):
        r = base[d]
        lines.append(f"| ResNet-{d} baseline | - | {r['layers']} | - | "
                     f"{100 * r['error']:.2f}% | {macs(r['macs'])} |")
    for r in ssl:
        lines.append(f"| SSL ResNet-20 | {r['lambda_depth']:g} | {r['layers']} | "
                     f"{'-'.join(str(b) for b in r['blocks_removed'])} | "
                     f"{100 * r['error']:.2f}% | {macs(r['macs'])} |")
    return "\n".join(lines) + "\n"


def figure(base: dict[int, dict[str, Any]], ssl: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = {20: "tab:blue", 32: "tab:green"}
    for d, r in sorted(base.items()):
        e = 100 * r["error"]
        ax.axhline(e, color=colors[d], ls="--", lw=1)
        ax.plot([r["layers"]], [e], "s", color=colors[d], label=f"ResNet-{d} baseline ({e:.2f}%)")
    if ssl:
        xs = [r["layers"] for r in ssl]
        ys = [100 * r["error"] for r in ssl]
        ax.plot(xs, ys, "o", color="tab:red", ms=7, label="SSL ResNet-20 (depth-wise)")
        seen: dict[int, int] = {}
        for r, x, y in zip(ssl, xs, ys, strict=True):
            k = seen[x] = seen.get(x, -1) + 1  # points at the same x: labels one under another
            ax.annotate(f"$\\lambda$={r['lambda_depth']:g}: {y:.2f}%", (x, y),
                        textcoords="offset points", xytext=(7, 4 - 11 * k), fontsize=8)
    ax.set_xlabel("# layers (main-path convolutions + FC)")
    ax.set_ylabel("held-out error (%, log scale)")
    # log scale: a run that lost every block sits at tens of percent, the others near 1-2%
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 1.3)
    ticks = [t for t in (0.5, 1, 1.5, 2, 3, 5, 10, 20, 50, 100)
             if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    any_row = next(iter(base.values()), ssl[0] if ssl else None)
    if any_row is not None:
        n_tr, n_val, size = any_row["train_samples"], any_row["val_samples"], any_row["size"]
        ax.set_title(f"Figure 6 on MNIST resized to {size}x{size} ({n_tr} training / {n_val} "
                     "held-out images):\nthe paper's CIFAR ResNet-20 with depth-wise SSL, "
                     "pruned and fine-tuned", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--out-dir", default="out/resnet_depth",
                    help="models and the JSON of every step (merged by --step figure)")
    ap.add_argument("--step", choices=("baseline20", "baseline32", "ssl", "figure", "all"),
                    default="all")
    ap.add_argument("--lambda-depth", type=float, action="append", default=None,
                    help=f"depth strength of one SSL run (repeatable; default "
                    f"{', '.join(f'{x:g}' for x in DEFAULT_LAMBDAS)})")
    ap.add_argument("--figures", default=None,
                    help="folder of figure6.png (default OUT_DIR)")
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only")
    ap.add_argument("--size", type=int, default=14,
                    help="image side (bilinear resize of the 28x28 images; 14 costs 4x less)")
    ap.add_argument("--width", type=int, default=16, help="filters of the first stage")
    ap.add_argument("--epochs", type=int, default=8, help="baseline epochs")
    ap.add_argument("--lr", type=float, default=2e-3, help="baseline AdamW learning rate")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ssl-epochs", type=int, default=6)
    ap.add_argument("--ssl-lr", type=float, default=0.05, help="proximal SGD learning rate")
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast", action="store_true",
                    help="the test's variant: 600 images at 14x14, width 4, 1 epoch per "
                    f"phase, lambda-depth {FAST_LAMBDA:g}")
    args = ap.parse_args(argv)
    lams = tuple(args.lambda_depth or DEFAULT_LAMBDAS)
    if args.fast:
        args.limit, args.size, args.width = 600, 14, 4
        args.epochs = args.ssl_epochs = args.finetune_epochs = 1
        lams = tuple(args.lambda_depth or (FAST_LAMBDA,))
    logging.basicConfig(level=logging.WARNING)

    # Import the library now, not after an hour of training (the tree may change meanwhile).
    import onnx_ssl.compiler  # noqa: F401
    import onnx_ssl.training.chain  # noqa: F401

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = (("baseline20", "baseline32", "ssl", "figure") if args.step == "all"
             else (args.step,))
    data = load_data(args.data, args.limit, args.size) if args.step != "figure" else None
    t0 = time.perf_counter()
    for step in steps:
        if step in ("baseline20", "baseline32"):
            train_baseline(int(step[-2:]), data, out, args)
        elif step == "ssl":
            for lam in lams:
                run_depth_ssl(lam, data, out, args)
        else:
            base, ssl = load_rows(out)
            if not base and not ssl:
                raise SystemExit(f"{out}: no results to plot; run the other steps first")
            fig_dir = Path(args.figures) if args.figures else out
            figure(base, ssl, fig_dir / "figure6.png")
            text = table(base, ssl)
            for folder in dict.fromkeys((out, fig_dir)):
                (folder / "table.md").write_text(text)
            print(text)
    _say(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
