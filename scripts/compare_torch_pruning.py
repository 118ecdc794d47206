"""SSL (onnx-ssl) against Torch-Pruning 1.6.1 at equal MACs: LeNet and ResNet-20 on real MNIST.

    python scripts/compare_torch_pruning.py --out-dir out/tp --plots docs/figures/torch_pruning \\
        --ssl-lambda 0.03 0.01
    python scripts/compare_torch_pruning.py --model resnet20 --out-dir out/tp_resnet20 \\
        --plots docs/figures/torch_pruning_resnet20
    python scripts/compare_torch_pruning.py --fast --out-dir /tmp/tp     # the CI variant
    python scripts/compare_torch_pruning.py --model resnet20 --fast --out-dir /tmp/tpr

One base model, three ways to shrink it to the same MAC fractions (default 50%, 30%, 15%):

- **onnx-ssl**: ``run_ssl`` (the ``ssl`` command's library function) with ``target_macs``:
  group-Lasso (filter and channel) training by proximal SGD whose lambdas the budget
  controller scales to the target, pruning of the zero groups, then fine-tuning of the
  pruned dense model (it has no zero groups left to regrow, so no mask is needed).
- **Torch-Pruning GroupNormPruner**: the same number of sparse-training epochs with the same
  optimizer (SGD, no momentum, same learning rate and schedule), calling
  ``pruner.regularize(model)`` after every backward pass (Torch-Pruning's group-norm
  regularizer, strength ``--tp-reg``); then, per target, global pruning by
  ``GroupMagnitudeImportance`` (L2) at the smallest pruning ratio (0.01 grid) that meets
  the target, then fine-tuning.
- **Torch-Pruning MagnitudePruner** (``GroupMagnitudeImportance``, L2, the same ratio in
  every layer, Torch-Pruning's default): pruned from the baseline at the ratio that meets the
  target, then fine-tuned for the sparse-training plus the fine-tuning epochs, so every
  method trains the same number of epochs after the baseline.

Every fine-tuning is AdamW without weight decay at onnx-ssl's fine-tuning learning rate, with
a cosine schedule, batch 64, on the same images. Every method prunes the same structures:

- ``--model lenet`` (28x28 images): conv1's and conv2's filters (with the input channels and
  fc1 columns they feed); fc1's 500 neurons and the classifier are kept by both tools
  (``ignored_layers`` in Torch-Pruning, filter and channel lambdas only in onnx-ssl).
- ``--model resnet20`` (the CIFAR ResNet-20 of scripts/reproduce_resnet_depth.py, 1 input
  channel, images resized to 14x14 as there): every conv's filters, the channels of each
  stage's residual stream as one coupled group (Torch-Pruning's dependency graph, onnx-ssl's
  analysis), and the FC's input columns; the classifier's 10 outputs are kept. The
  BatchNorms train: the baseline is trained in torch (train-mode BatchNorm); onnx-ssl gets it
  exported in training mode without constant folding (BatchNorm stays a node with the
  running statistics, as in the README's "Exporting from PyTorch for training"), every final
  model is exported in eval mode (BatchNorm folded into the convs).

**Measured the same way for every model**: each final model is an ONNX file (the torch models
exported with the TorchScript exporter, static batch 1, opset 17); its MACs and params are
counted by onnx-ssl's compiler accounting (``onnx_ssl.prune(model, verify=0).report``), and
its held-out error is ONNX Runtime inference of that file (``evaluate_model``).

Data: the MNIST folder given (only the 10,000-image test split is available offline here); a
seeded shuffle puts **8,000 images in training and the other 2,000 in the held-out set** that
every error is measured on. The baseline is trained in torch (AdamW, lr 1e-3) and exported:
the same weights start every method. ``--fast`` (the CI test) uses 400 images, 5 baseline
epochs, 1 epoch per later phase, the 50% target and one reg only.

``--methods`` runs a subset and merges its rows with those of the other methods in
``OUT_DIR/results.json`` (same setup and baseline error required); ``--report-only`` redraws
the table and the figure from that file. Needs torch and torch-pruning (the ``[export]``
extra) and onnxruntime-training (``[train]``); matplotlib for the figure.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_ssl.io import load_model, save_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from reproduce_resnet_depth import paper_layers  # noqa: E402  (the sibling script's count)


def lenet(seed: int = 0) -> Any:
    """Caffe's LeNet in torch (the model of scripts/ssl_budget_lenet_mnist.py)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )


def resnet20(seed: int = 0) -> Any:
    """The CIFAR ResNet-20 with one input channel (scripts/reproduce_resnet_depth.py's)."""
    from reproduce_resnet_depth import torch_resnet

    return torch_resnet(20, 16, 1, seed)


@dataclass(frozen=True)
class Net:
    """What differs between the compared networks."""

    make: Callable[[], Any]
    size: int  # image side
    baseline_lr: float
    ignored: Callable[[Any], list[Any]]  # the layers whose outputs both tools keep
    batch_norm: bool  # onnx-ssl gets a training-mode export (BatchNorm trains)


NETS_DEFAULT = {"model": "lenet", "image_size": 28}  # results.json written before --model
NETS = {
    "lenet": Net(lenet, 28, 1e-3, lambda m: [m[5], m[7]], False),
    "resnet20": Net(resnet20, 14, 2e-3, lambda m: [m.fc], True),
}


def export(net: Any, path: Path, size: int = 28, training: bool = False) -> onnx.ModelProto:
    """``net`` exported with a static batch of 1 (TorchScript exporter, opset 17): in eval
    mode (BatchNorm folded), or with ``training`` in training mode without constant folding,
    the form in which onnx-ssl trains BatchNorm."""
    import warnings

    import torch

    kw: dict[str, Any] = {}
    if training:
        net.train()
        kw = {"training": torch.onnx.TrainingMode.TRAINING, "do_constant_folding": False}
    else:
        net.eval()
    with warnings.catch_warnings():  # "Removing mutation ... num_batches_tracked": expected
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(net, (torch.zeros(1, 1, size, size),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"], **kw)
    net.eval()
    return load_model(path)


def count(model: onnx.ModelProto) -> tuple[int, int]:
    """(MACs, params) of ``model`` by onnx-ssl's compiler accounting."""
    from onnx_ssl import prune

    rep = prune(model, verify=0).report
    return rep.macs_before, rep.params_before


def filters(model: onnx.ModelProto) -> list[int]:
    """The output channels of every Conv, in graph order."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    return [dims[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"]


def stage_filters(model: onnx.ModelProto) -> list[int]:
    """A ResNet's conv filters summed per part: the stem, then each ``layer{s}`` by node name
    (both exporters name a block's nodes ``/layer{s}/layer{s}.{i}/...``)."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    parts = [0, 0, 0, 0]
    for n, k in zip(convs, filters(model), strict=True):
        parts[next((s for s in (1, 2, 3) if f"layer{s}" in n.name), 0)] += k
    return parts


def fit_torch(net: Any, data: Any, epochs: int, optimizer: str, lr: float, seed: int,
              after_backward: Callable[[], None] | None = None, size: int = 28) -> None:
    """Train ``net`` like onnx-ssl's trainer: batch 64 reshuffled each epoch (seed + epoch),
    cross-entropy, a cosine learning rate over all steps, AdamW without weight decay or plain
    SGD."""
    import torch
    from torch.nn import functional as F

    from onnx_ssl.training.trainer import TrainConfig

    if epochs <= 0:
        return
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=64, seed=seed)
    opt = (torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0) if optimizer == "adamw"
           else torch.optim.SGD(net.parameters(), lr=lr))
    total = epochs * data.num_batches(cfg.batch_size)
    step = 0
    net.train()
    for epoch in range(epochs):
        for xb, yb in data.batches(cfg.batch_size, shuffle=True, seed=seed + epoch):
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step, total)
            x = torch.from_numpy(xb["x"]).reshape(-1, 1, size, size)
            loss = F.cross_entropy(net(x), torch.from_numpy(yb))
            opt.zero_grad()
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            step += 1
    net.eval()


def prune_to_macs(net: Any, make_pruner: Callable[[Any, float], Any], target: float,
                  macs0: int, tmp: Path, size: int = 28) -> tuple[Any, float]:
    """A pruned copy of ``net`` at the smallest pruning ratio on a 0.01 grid whose MACs
    (onnx-ssl's count of the export) are at most ``target`` x ``macs0``, and the ratio. (A
    scan, not a bisection: global pruning skips a layer it would empty, so the MACs are not
    monotone in the ratio near 1.)"""
    seen: dict[tuple[int, ...], int] = {}
    for k in range(1, 100):
        m = copy.deepcopy(net)
        make_pruner(m, k / 100).step()
        key = tuple(int(p.shape[0]) for p in m.parameters() if p.dim() == 4)
        if key not in seen:
            seen[key] = count(export(m, tmp / "probe.onnx", size))[0]
        if seen[key] <= target * macs0:
            return m, k / 100
    raise RuntimeError(f"Torch-Pruning reaches no ratio with {target:.0%} of the MACs")


def row(method: str, target: float | None, model: onnx.ModelProto, val: Any,
        macs0: int, path: Path, seconds: float, **extra: Any) -> dict[str, Any]:
    """One result: the final ONNX model saved to ``path``, counted and evaluated."""
    from onnx_ssl.training.chain import evaluate_model

    save_model(model, path)
    macs, params = count(model)
    err = evaluate_model(model, val)[1]
    return {"method": method, "target": target, "macs": macs, "mac_fraction": macs / macs0,
            "params": params, "error": err, "filters": filters(model),
            "stage_filters": stage_filters(model), "layers": paper_layers(model),
            "model": path.name,
            "seconds": round(seconds, 1), **extra}


def merged(path: Path, setup: dict[str, Any], rows: list[dict[str, Any]]
           ) -> list[dict[str, Any]]:
    """``rows`` with the rows of the methods they lack from an earlier run's ``path``, which
    must have the same setup and the same baseline (seeded training on one thread repeats)."""
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    same = ("data", "train_samples", "val_samples", "baseline_epochs", "sparse_epochs",
            "finetune_epochs", "batch_size", "targets", "baseline_macs", "model", "image_size")
    diff = [k for k in same if old["setup"].get(k, NETS_DEFAULT.get(k)) != setup[k]]
    if diff:
        raise SystemExit(f"{path}: another setup ({', '.join(diff)}); use another --out-dir")
    if old["rows"][0]["error"] != rows[0]["error"]:
        raise SystemExit(f"{path}: its baseline's error differs from this run's")
    for k in ("tp_reg", "ssl_lambda"):
        setup[k] = sorted(set(old["setup"].get(k) or []) | set(setup[k] or []))
    new = {r["method"] for r in rows}
    keep = [r for r in old["rows"][1:] if r["method"] not in new]
    return [rows[0], *sorted(keep + rows[1:], key=lambda r: -r["target"])]


def markdown(rows: Sequence[dict[str, Any]], model: str = "lenet") -> str:
    what = ("filters (conv1 - conv2)" if model == "lenet" else
            "layers | conv filters (stem - stage 1 - 2 - 3)")
    lines = [f"| method | MAC target | MACs (measured) | params | {what} | "
             "held-out error |", "|---|---|---|---|---|---|" + ("---|" if model != "lenet"
                                                               else "")]
    for r in rows:
        t = "-" if r["target"] is None else f"{r['target']:.0%}"
        f = " - ".join(str(x) for x in (r["filters"] if model == "lenet"
                                        else r["stage_filters"]))
        if model != "lenet":
            f = f"{r['layers']} | {f}"
        lines.append(f"| {r['method']} | {t} | {r['macs']:,} ({r['mac_fraction']:.1%}) | "
                     f"{r['params']:,} | {f} | {100 * r['error']:.2f}% |")
    return "\n".join(lines)


# Line style and colours per family of methods (a colour per variant, in order of appearance).
FAMILIES = (("onnx-ssl", "o-", ("tab:blue", "tab:purple", "navy")),
            ("TP GroupNorm", "^-", ("tab:orange", "tab:red", "tab:brown")),
            ("TP Magnitude", "s--", ("tab:green", "olive")))


def plot(rows: Sequence[dict[str, Any]], setup: dict[str, Any], path: Path) -> None:
    """Held-out error (with one binomial standard error) against measured MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = setup["val_samples"]
    base = next(r for r in rows if r["target"] is None)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for t in setup["targets"]:
        ax.axvline(100 * t, color="0.85", lw=1, zorder=0)
    ax.axhline(100 * base["error"], color="0.4", ls="--", lw=1,
               label=f"baseline ({100 * base['error']:.2f}%, 100% MACs)")
    used: dict[str, int] = {}
    for m in dict.fromkeys(r["method"] for r in rows if r["target"] is not None):
        fam, style, colors = next(f for f in FAMILIES if m.startswith(f[0]))
        color = colors[used.get(fam, 0) % len(colors)]
        used[fam] = used.get(fam, 0) + 1
        pts = sorted((r["mac_fraction"], r["error"]) for r in rows if r["method"] == m)
        err = [100 * math.sqrt(e * (1 - e) / n) for _, e in pts]
        ax.errorbar([100 * x for x, _ in pts], [100 * e for _, e in pts], yerr=err,
                    fmt=style, color=color, lw=2 if fam == "onnx-ssl" else 1.3, capsize=2,
                    label=m)
    ax.set_xlabel("MACs of the final model, % of the baseline (onnx-ssl's count of the ONNX)")
    ax.set_ylabel(f"held-out error, % (ORT, {n} images; bars: 1 s.e.)")
    title = ("LeNet, MNIST" if setup.get("model", "lenet") == "lenet"
             else f"ResNet-20, MNIST at {setup['image_size']}x{setup['image_size']}")
    ax.set_title(f"{title} ({setup['train_samples']} training / {n} held-out images): "
                 f"{setup['sparse_epochs']} sparse + {setup['finetune_epochs']} fine-tuning "
                 f"epochs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(setup: dict[str, Any], rows: list[dict[str, Any]], out: Path,
                 fig: Path) -> None:
    """results.json, results.md (the table) and the figure."""
    table = markdown(rows, setup.get("model", "lenet"))
    (out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1)
                                      + "\n")
    (out / "results.md").write_text(table + "\n")
    plot(rows, setup, fig)
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {fig}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--model", choices=sorted(NETS), default="lenet",
                    help="the network (default lenet)")
    ap.add_argument("--plots", default=None, help="figure folder (default OUT_DIR)")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3, 0.15],
                    help="MAC fractions of the baseline")
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only")
    ap.add_argument("--baseline-epochs", type=int, default=None,
                    help="default 10 (lenet), 8 (resnet20)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="sparse-training epochs (onnx-ssl SSL, GroupNormPruner); default 20 "
                    "(lenet), 6 (resnet20)")
    ap.add_argument("--finetune-epochs", type=int, default=None,
                    help="default 10 (lenet), 3 (resnet20)")
    ap.add_argument("--tp-reg", type=float, nargs="+", default=[1e-3, 1e-2],
                    help="GroupNormPruner's regularization coefficients (reg; its default "
                    "1e-4 barely shrinks in this many steps): one sparse training and one "
                    "curve each")
    ap.add_argument("--ssl-lambda", type=float, nargs="+", default=None,
                    help="onnx-ssl's starting filter and channel lambdas (default: ssl's, "
                    "0.03): one curve each")
    ap.add_argument("--ssl-lambda-scale", action="append", default=[],
                    metavar="STRUCTURE:LAYER=X",
                    help="per-term lambda multipliers for onnx-ssl (ssl's --lambda-scale; the "
                    "layer names are the export's, e.g. filter:/2/Conv=2.5); its rows are "
                    "named 'onnx-ssl scaled'")
    ap.add_argument("--methods", nargs="+", choices=("ssl", "groupnorm", "magnitude"),
                    default=["groupnorm", "magnitude", "ssl"],
                    help="what to run; with a subset, the other methods' rows are kept from "
                    "OUT_DIR/results.json when it has the same setup and baseline")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the table and the figure from OUT_DIR/results.json")
    ap.add_argument("--fast", action="store_true",
                    help="CI variant: 400 images, 5 baseline epochs, 1 epoch per later phase, "
                    "the 50%% target and the last --tp-reg only")
    args = ap.parse_args(argv)
    spec = NETS[args.model]
    for k, v in zip(("baseline_epochs", "epochs", "finetune_epochs"),
                    (10, 20, 10) if args.model == "lenet" else (8, 6, 3), strict=True):
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.fast:
        args.limit, args.baseline_epochs, args.epochs, args.finetune_epochs = 400, 5, 1, 1
        args.targets, args.tp_reg = [0.5], args.tp_reg[-1:]
    out = Path(args.out_dir)
    fig = Path(args.plots or out) / "error_vs_macs.png"
    if args.report_only:
        res = json.loads((out / "results.json").read_text())
        for r in res["rows"]:  # counts added since the run: from the model files it wrote
            if "layers" not in r or "stage_filters" not in r:
                m = load_model(out / r["model"])
                r.update(layers=paper_layers(m), stage_filters=stage_filters(m))
        write_report(res["setup"], res["rows"], out, fig)
        return 0

    import torch
    import torch_pruning as tp

    from onnx_ssl.training.chain import (
        DEFAULT_FINETUNE_LR,
        DEFAULT_LAMBDA,
        DEFAULT_SSL_LR,
        SslOptions,
        evaluate_model,
        run_ssl,
    )
    from onnx_ssl.training.data import Dataset, load_idx_folder, resize_bilinear
    from onnx_ssl.training.penalty import Lambdas

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    data = load_idx_folder(Path(args.data))
    if args.limit:
        data = data.subset(np.arange(args.limit), f"{data.name}[:{args.limit}]")
    size = spec.size
    if size != 28:
        data = Dataset({"x": resize_bilinear(data.x["x"], size, size)}, data.y,
                       f"{data.name}@{size}x{size}")
    train, val = data.split(0.2, seed=0)  # run_ssl's split (val_fraction 0.2, seed 0)
    print(f"{len(train)} training and {len(val)} held-out images from {args.data}", flush=True)
    ex = torch.zeros(1, 1, size, size)
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="tp-compare-"))

    t = time.perf_counter()
    base_net = spec.make()
    fit_torch(base_net, train, args.baseline_epochs, "adamw", spec.baseline_lr, seed=0,
              size=size)
    base = export(base_net, out / "baseline.onnx", size)
    macs0, _ = count(base)
    rows.append(row("baseline", None, base, val, macs0, out / "baseline.onnx",
                    time.perf_counter() - t))
    # onnx-ssl starts from the same weights; with BatchNorm, in the form that trains it
    ssl_base = export(base_net, tmp / "train.onnx", size, training=True) if spec.batch_norm \
        else base
    print(f"baseline: error {100 * rows[0]['error']:.2f}%, {macs0:,} MACs", flush=True)

    ignored = spec.ignored

    def magnitude(m: Any, ratio: float) -> Any:
        return tp.pruner.MagnitudePruner(
            m, ex, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=ignored(m))

    def group_norm(reg: float) -> Callable[[Any, float], Any]:
        def make(m: Any, ratio: float) -> Any:
            return tp.pruner.GroupNormPruner(
                m, ex, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=reg,
                global_pruning=True, pruning_ratio=ratio, ignored_layers=ignored(m))
        return make

    # Torch-Pruning's group-norm sparse training, once per reg; every target prunes its result.
    sparse: list[tuple[str, Any, Callable[[Any, float], Any], float]] = []
    for reg in args.tp_reg if "groupnorm" in args.methods else []:
        t = time.perf_counter()
        net = copy.deepcopy(base_net)
        regularizer = group_norm(reg)(net, 0.5)
        fit_torch(net, train, args.epochs, "sgd", DEFAULT_SSL_LR, seed=0,
                  after_backward=functools.partial(regularizer.regularize, net), size=size)
        secs = time.perf_counter() - t
        err = evaluate_model(export(net, tmp / "sparse.onnx", size), val)[1]
        print(f"GroupNormPruner sparse training, reg {reg:g}: error {100 * (err or 0):.2f}% "
              f"({secs:.0f}s)", flush=True)
        sparse.append((f"TP GroupNormPruner reg {reg:g}", net, group_norm(reg), secs))

    scales = tuple(Lambdas.parse_scale(x) for x in args.ssl_lambda_scale)
    for target in args.targets:
        tag = f"{round(100 * target)}"
        runs = [(m, net, make, args.finetune_epochs, secs) for m, net, make, secs in sparse]
        if "magnitude" in args.methods:
            runs.append(("TP MagnitudePruner", base_net, magnitude,
                         args.epochs + args.finetune_epochs, 0.0))
        for i, (method, start, make, epochs, before) in enumerate(runs):
            t = time.perf_counter()
            net, ratio = prune_to_macs(start, make, target, macs0, tmp, size)
            fit_torch(net, train, epochs, "adamw", DEFAULT_FINETUNE_LR, seed=0, size=size)
            name = f"groupnorm{i}" if i < len(sparse) else "magnitude"
            rows.append(row(method, target, export(net, tmp / "final.onnx", size), val, macs0,
                            out / f"tp_{name}_{tag}.onnx", time.perf_counter() - t + before,
                            pruning_ratio=ratio, finetune_epochs=epochs))
            print(f"{method} {target:.0%}: {rows[-1]['mac_fraction']:.1%} MACs, error "
                  f"{100 * rows[-1]['error']:.2f}%", flush=True)

        for lam in (args.ssl_lambda or [DEFAULT_LAMBDA]) if "ssl" in args.methods else []:
            t = time.perf_counter()
            lambdas = Lambdas(filter=lam, channel=lam, scales=scales)
            opts = SslOptions(lambdas=lambdas, epochs=args.epochs,
                              finetune_epochs=args.finetune_epochs, target_macs=target,
                              batch_size=64, val_fraction=0.2, seed=0)
            res = run_ssl(ssl_base, data, opts, name=args.model)
            rep = res.report
            assert (rep.train_samples, rep.val_samples) == (len(train), len(val))
            method = "onnx-ssl" if lam == DEFAULT_LAMBDA else f"onnx-ssl lambda {lam:g}"
            if scales:
                method = method.replace("onnx-ssl", "onnx-ssl scaled")
            rows.append(row(method, target, res.model, val, macs0,
                            out / f"ssl{'_scaled' if scales else ''}_{lam:g}_{tag}.onnx",
                            time.perf_counter() - t, lambda_scales=dict(scales),
                            budget_met=rep.budget_met, lambda_start=lam,
                            lambda_scale=round(rep.lambda_scale, 4),
                            threshold_used=rep.threshold_used,
                            finetune_epochs=args.finetune_epochs))
            print(f"{method} {target:.0%}: {rows[-1]['mac_fraction']:.1%} MACs, error "
                  f"{100 * rows[-1]['error']:.2f}%", flush=True)

    setup = {
        "data": str(args.data), "model": args.model, "image_size": size,
        "train_samples": len(train), "val_samples": len(val),
        "baseline_epochs": args.baseline_epochs, "sparse_epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs, "batch_size": 64,
        "ssl_lr": DEFAULT_SSL_LR, "finetune_lr": DEFAULT_FINETUNE_LR,
        "ssl_lambda": (args.ssl_lambda or [DEFAULT_LAMBDA]) if "ssl" in args.methods else [],
        "tp_reg": args.tp_reg if "groupnorm" in args.methods else [],
        "targets": args.targets, "baseline_macs": macs0,
        # (torch_pruning.__version__ says 1.6.0 in the 1.6.1 wheel)
        "torch_pruning": importlib.metadata.version("torch-pruning"),
        "torch": torch.__version__,
    }
    if set(args.methods) != {"ssl", "groupnorm", "magnitude"}:
        rows = merged(out / "results.json", setup, rows)
    write_report(setup, rows, out, fig)
    if any(not math.isfinite(r["error"]) for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
