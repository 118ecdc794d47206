"""The training subcommands of ``onnx-ssl``: ``artifacts``, ``train``, ``ssl`` and ``demo``.

:func:`register` adds them to the main parser's subparsers; each handler returns an exit
code and raises :class:`~onnx_ssl.errors.OnnxSslError` subclasses for bad input (printed as
one line, exit code 2). Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnx_ssl import env

# The defaults shown by --help come from the modules that use them.
_LAMBDA_FLAGS = ("filter", "channel", "shape", "filter2d", "neuron", "depth", "coupled")
_LAMBDA_HELP = {
    "filter": "filter-wise groups W[n,:,:,:] of every convolution (eq. 2)",
    "channel": "channel-wise groups W[:,c,:,:] of every convolution (eq. 2)",
    "shape": "shape fibers W[:,c,m,k] of every convolution (eq. 3)",
    "filter2d": "2D filters W[n,c,:,:] of every convolution",
    "neuron": "rows and columns of every fully connected weight",
    "depth": "all weights of each residual branch",
    "coupled": "one group per channel of each prunable channel space, holding every "
    "out and in slice tied to it (filter, bias, BatchNorm, next layers' inputs)",
}


def _needs_training(cmd: Callable[[argparse.Namespace], int]
                    ) -> Callable[[argparse.Namespace], int]:
    """``cmd`` after checking, before any work, that onnxruntime-training is importable (a
    one-line error that says why and how to get it otherwise)."""

    def run(args: argparse.Namespace) -> int:
        from . import _ort

        _ort.load()
        return cmd(args)

    return run


def _progress(args: argparse.Namespace | None = None, prefix: str = "  ") -> Any:
    """tqdm bars on a terminal, per-epoch lines elsewhere, JSON lines with --log."""
    from .progress import Progress

    return Progress(prefix=prefix, log_path=getattr(args, "log", None) if args else None)


def _say(msg: str) -> None:
    print(f"onnx-ssl: {msg}", file=sys.stderr, flush=True)


def _add_lambdas(p: argparse.ArgumentParser, defaults: dict[str, float]) -> None:
    g = p.add_argument_group(
        "group-Lasso strengths (lambda_g of equation 1)",
        "Scale, measured on LeNet with 8,000 MNIST images and ssl's defaults (20 epochs of "
        "proximal SGD, lr 0.05, filter and channel lambda alike): 1e-3 prunes nothing; 3e-2 "
        "keeps 22.8% of the MACs at +0.25 points of held-out error. The step is lr x "
        "lambda, so fewer steps per epoch need a larger lambda (the demo's digits use 0.1).",
    )
    for s in _LAMBDA_FLAGS:
        d = defaults.get(s, 0.0)
        g.add_argument(
            f"--lambda-{s}",
            type=float,
            default=None,
            metavar="X",
            help=f"{_LAMBDA_HELP[s]} (default {d:g})",
        )
    g.add_argument(
        "--scale-by-size",
        action="store_true",
        help="multiply each group's term by sqrt(its number of weights)",
    )


def _lambdas(args: argparse.Namespace, defaults: dict[str, float]) -> Any:
    from .penalty import Lambdas

    given = {s: getattr(args, f"lambda_{s}") for s in _LAMBDA_FLAGS}
    if any(v is not None for v in given.values()):
        return Lambdas(**{s: float(v or 0.0) for s, v in given.items()})
    return Lambdas(**defaults)


def _load(path: str) -> Any:
    from onnx_ssl.cli import _load as load_model

    return load_model(path)


# --- artifacts ------------------------------------------------------------------------------


def _cmd_artifacts(args: argparse.Namespace) -> int:
    from .artifacts import ArtifactOptions, build_artifacts

    opts = ArtifactOptions(
        loss=args.loss,
        lambdas=_lambdas(args, {}),
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        scale_by_size=args.scale_by_size,
        output=args.output_name,
        fallback_batch=args.batch_size,
    )
    from onnx_ssl.cli import model_inputs
    from onnx_ssl.io import check_writable

    from .artifacts import ARTIFACT_FILES

    inputs = model_inputs(args.model)
    for f in ARTIFACT_FILES:
        check_writable(Path(args.output) / f, *inputs, create_folders=True)
    model = _load(args.model)
    art = build_artifacts(model, args.output, opts, name=Path(args.model).stem)
    info = art.info
    counts: dict[str, int] = {}
    for t in info.penalty.active_terms:
        counts[t.structure] = counts.get(t.structure, 0) + t.groups
    print(
        f"wrote {art.path}: training_model.onnx, eval_model.onnx, optimizer_model.onnx, "
        f"checkpoint, inference_model.onnx, ssl.json"
    )
    print(
        f"  trainable parameters: {len(info.trainable)}, frozen (BatchNorm statistics): "
        f"{len(info.frozen)}; loss {info.loss} on '{info.loss_output}', optimizer "
        f"{info.optimizer}"
    )
    print(
        f"  group Lasso: {info.penalty.lambdas.describe()}"
        + (f" ({', '.join(f'{k} {v} groups' for k, v in counts.items())})" if counts else "")
    )
    if info.fixed_batch:
        print(f"  batch size fixed at {info.fixed_batch} (the model's shapes depend on it)")
    if info.converted_from_opset is not None:
        lim = env.runtime_limits()
        print(f"  converted from opset {info.converted_from_opset} to {lim.max_opset} with "
              f"onnx.version_converter: {lim.name} {lim.version} trains no newer opset")
    return 0


def _add_artifacts(sub: Any) -> None:
    p = sub.add_parser(
        "artifacts",
        help="write onnxruntime-training artifacts with the group-Lasso loss",
        description="Write the four onnxruntime-training artifacts (training, eval and "
        "optimizer models, checkpoint) whose loss is E_D(W) + weight_decay/2 "
        "||W||^2 + sum_g lambda_g sum_groups ||w_group||_2 (SSL, eq. 1), plus "
        "ssl.json and the inference model the trained weights go into.",
    )
    p.add_argument("model", help="input .onnx (or builtin:NAME)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="artifacts folder")
    p.add_argument(
        "--loss",
        default="cross-entropy",
        choices=("cross-entropy", "mse", "bce", "l1"),
        help="data loss on the model output (default cross-entropy)",
    )
    p.add_argument(
        "--output-name",
        default=None,
        metavar="NAME",
        help="model output the loss reads (default: the first)",
    )
    _add_lambdas(p, {})
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        metavar="X",
        help="lambda R(W) of eq. 1: X/2 times the squared L2 norm of every "
        "layer weight, in the loss (default 0)",
    )
    p.add_argument(
        "--optimizer",
        default="adamw",
        choices=("adamw", "sgd"),
        help="optimizer model (default adamw)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="B",
        help="batch size to fix when the model's shapes depend on it (default 64)",
    )
    p.set_defaults(func=_needs_training(_cmd_artifacts))


# --- train ----------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from .artifacts import load_artifacts
    from .data import data_files, load_data
    from .trainer import LOG, TRAINED, TrainConfig, Trainer

    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        prox=args.prox,
        penalty=not args.no_penalty,
        resume=args.resume,
        val_fraction=args.val_fraction,
        seed=args.seed,
        zero_tol=args.zero_tol,
        log_path=Path(args.log) if args.log else None,
        export_path=Path(args.output) if args.output else None,
    )
    trainer = Trainer(load_artifacts(args.dir), cfg, reads=data_files(args.data))
    data = load_data(args.data)
    if trainer.start_epoch >= cfg.epochs:
        _say(f"already trained for {trainer.start_epoch} epochs (--epochs {cfg.epochs}); exporting")
    bar = _progress(prefix="")
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
        print(
            f"  final: loss {last.loss:.4f} (data {last.data_loss:.4f}, penalty "
            f"{last.penalty:.4f}), held-out error {err}"
        )
        zero = [f"{k} {v:.0%}" for k, v in last.zero_groups if v > 0]
        if zero:
            print(f"  zero groups: {', '.join(zero)}")
    print(
        f"  model: {out}; log: {res.log_path or Path(args.dir) / LOG}; checkpoint: "
        f"{trainer.state_path}"
    )
    return 0


def _add_train(sub: Any) -> None:
    from .trainer import TrainConfig

    d = TrainConfig()
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
    p.add_argument(
        "--data",
        default="digits",
        metavar="SPEC",
        help="a .npz file (x, y), a folder of MNIST IDX files, or 'digits' "
        "(scikit-learn's bundled 8x8 digits, resized; the default)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"(default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument(
        "--schedule",
        default=d.schedule,
        choices=("cosine", "step", "constant"),
        help=f"cosine decay to 0, or x0.1 at 50%% and 75%% of the steps (default {d.schedule})",
    )
    p.add_argument(
        "--prox",
        action="store_true",
        help="proximal group Lasso: after each step w <- w max(0, 1 - lr "
        "lambda/||w||) (groups become exactly zero; the penalty's gradient "
        "is then left out of the loss)",
    )
    p.add_argument(
        "--no-penalty", action="store_true", help="train on the data loss alone (penalty scale 0)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the folder's train_state.ckpt"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help=f"held-out fraction of the data (default {d.val_fraction:g})",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--zero-tol",
        type=float,
        default=d.zero_tol,
        metavar="T",
        help=f"a group counts as zero when its RMS is <= T (default {d.zero_tol:g})",
    )
    p.add_argument(
        "--log",
        default=None,
        metavar="PATH",
        help="log file, .csv or .json (default DIR/train_log.csv)",
    )
    p.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="OUT.onnx",
        help="trained model (default DIR/trained_model.onnx)",
    )
    p.set_defaults(func=_needs_training(_cmd_train))


# --- ssl ------------------------------------------------------------------------------------


def _ssl_options(args: argparse.Namespace, defaults: dict[str, float]) -> Any:
    from .chain import SslOptions

    return SslOptions(
        lambdas=_lambdas(args, defaults),
        loss=args.loss,
        epochs=args.epochs,
        lr=args.lr,
        optimizer=args.optimizer,
        prox=not args.no_prox,
        schedule=args.schedule,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        scale_by_size=args.scale_by_size,
        threshold=args.threshold,
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
        val_fraction=args.val_fraction,
        seed=args.seed,
        verify=args.verify,
        work_dir=_work_dir(args),
        resume=bool(getattr(args, "resume", None)),
        target_macs=args.target_macs,
        target_params=args.target_params,
    )


def _work_dir(args: argparse.Namespace) -> Path | None:
    """--work-dir, or the folder of --resume (they must agree when both are given)."""
    from onnx_ssl.errors import InputError

    resume = getattr(args, "resume", None)
    if resume and args.work_dir and Path(resume).resolve() != Path(args.work_dir).resolve():
        raise InputError("--resume DIR and --work-dir name different folders")
    work = resume or args.work_dir
    return Path(work) if work else None


def _add_chain_options(p: argparse.ArgumentParser, d: Any) -> dict[str, float]:
    defaults = {s: d.lambdas.get(s) for s in _LAMBDA_FLAGS if d.lambdas.get(s) > 0}
    _add_lambdas(p, defaults)
    b = p.add_argument_group(
        "budget (instead of choosing lambdas: they become the controller's starting point)")
    b.add_argument(
        "--target-macs",
        type=float,
        default=None,
        metavar="F",
        help="prune to at most F times the input model's MACs, F in (0, 1]: the lambdas are "
        "scaled by 1.3 after every SSL epoch whose projected MACs are above F (and relaxed "
        "below 0.75 F), and the prune threshold is raised if needed",
    )
    b.add_argument(
        "--target-params",
        type=float,
        default=None,
        metavar="F",
        help="the same for the parameter count",
    )
    o = p.add_argument_group("output")
    o.add_argument("--plots", default=None, metavar="DIR",
                   help="write figures (conv1 filters before/after, zero groups per layer over "
                   "the epochs, error against MACs) as PNG into DIR (needs matplotlib: "
                   "pip install 'onnx-ssl[plots]')")
    o.add_argument("--log", default=None, metavar="F.jsonl",
                   help="append every epoch of every phase to F as one JSON object per line")
    g = p.add_argument_group("training (SSL phase, then fine-tuning)")
    g.add_argument(
        "--loss",
        default=d.loss,
        choices=("cross-entropy", "mse", "bce", "l1"),
        help=f"(default {d.loss})",
    )
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"SSL epochs (default {d.epochs})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"SSL learning rate (default {d.lr:g})")
    g.add_argument(
        "--optimizer",
        default=d.optimizer,
        choices=("adamw", "sgd"),
        help=f"SSL optimizer (default {d.optimizer})",
    )
    g.add_argument(
        "--no-prox",
        action="store_true",
        help="put the group Lasso in the loss gradient instead of the proximal "
        "step (default: proximal step, groups become exactly zero)",
    )
    g.add_argument(
        "--schedule",
        default=d.schedule,
        choices=("cosine", "step", "constant"),
        help=f"(default {d.schedule})",
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default {d.batch_size})")
    g.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help=f"(default {d.weight_decay:g})"
    )
    g.add_argument(
        "--threshold",
        type=float,
        default=d.threshold,
        metavar="T",
        help="after SSL, zero every regularised group whose RMS ||w||/sqrt(size) "
        f"is <= T (default {d.threshold:g})",
    )
    g.add_argument(
        "--finetune-epochs",
        type=int,
        default=d.finetune_epochs,
        help=f"fine-tuning epochs after pruning (default {d.finetune_epochs})",
    )
    g.add_argument(
        "--finetune-lr",
        type=float,
        default=d.finetune_lr,
        help=f"fine-tuning learning rate, AdamW (default {d.finetune_lr:g})",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help=f"held-out fraction of the data (default {d.val_fraction:g})",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--verify",
        type=int,
        default=d.verify,
        metavar="N",
        help=f"prune check on N random inputs (default {d.verify})",
    )
    g.add_argument(
        "--work-dir",
        default=None,
        metavar="DIR",
        help="keep the artifacts, checkpoints and logs of each phase here (a run "
        "checkpoints every epoch there; --resume DIR continues it)",
    )
    return defaults


def _check_outputs(args: argparse.Namespace, opts: Any, inputs: list[Path]) -> None:
    """Refuse -o, --report and the --work-dir files when one would overwrite an input (the
    model and the data files) or another output."""
    from onnx_ssl.io import check_writable

    from .chain import work_files
    from .data import data_files

    inputs = [*inputs, *data_files(args.data)]
    work = work_files(opts.work_dir)
    outs = [Path(p) for p in (args.output, args.report, getattr(args, "log", None)) if p]
    for k, out in enumerate(outs):
        check_writable(out, *inputs, outputs=[*outs[:k], *outs[k + 1 :], *work])
    for w in work:
        check_writable(w, *inputs, create_folders=True)


def _cmd_ssl(args: argparse.Namespace, defaults: dict[str, float]) -> int:
    from onnx_ssl.cli import model_inputs

    from .chain import run_ssl
    from .data import load_data

    opts = _ssl_options(args, defaults)
    _check_outputs(args, opts, model_inputs(args.model))
    if args.plots:
        from .plots import require_matplotlib

        require_matplotlib()
    model = _load(args.model)
    data = load_data(args.data)
    bar = _progress(args)
    try:
        res = run_ssl(
            model,
            data,
            opts,
            output=args.output,
            report_path=args.report,
            name=Path(args.model).stem,
            progress=bar,
            notify=_say,
        )
    finally:
        bar.close()
    print(res.report.to_text())
    print(f"wrote {res.output}" + (f" and {args.report}" if args.report else ""))
    _plots(args, model, res)
    return 0


def _plots(args: argparse.Namespace, before: Any, res: Any) -> None:
    if not args.plots:
        return
    from .plots import write_plots

    paths = write_plots(args.plots, before, res)
    print(f"wrote {', '.join(str(p) for p in paths)}")


def _add_ssl(sub: Any) -> None:
    from .chain import SslOptions

    p = sub.add_parser(
        "ssl",
        help="SSL chain: train with group Lasso, prune, fine-tune, report",
        description="The paper's procedure (section 4.3): train with SSL (proximal group "
        "Lasso, SGD), zero the groups whose RMS is below the threshold, prune them "
        "(the result is verified to compute the same outputs), fine-tune without "
        "the penalty, and report error, filters, channels, MACs and params per "
        "layer. Without --lambda-* options, filter- and channel-wise sparsity "
        "are used with the defaults shown.",
    )
    p.add_argument("model", help="input .onnx (or builtin:NAME)")
    p.add_argument(
        "--data",
        default="digits",
        metavar="SPEC",
        help="a .npz file (x, y), a folder of MNIST IDX files, or 'digits' (the default)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="final model")
    p.add_argument("--report", default=None, metavar="JSON", help="write the report as JSON")
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run interrupted in work folder DIR (give the same model, data "
        "and options): each phase restarts from its last finished epoch",
    )
    defaults = _add_chain_options(p, SslOptions())
    p.set_defaults(func=_needs_training(lambda a: _cmd_ssl(a, defaults)))


# --- demo -----------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace, defaults: dict[str, float]) -> int:
    from onnx_ssl.errors import InputError

    from .chain import run_demo
    from .data import load_data

    if args.baseline_epochs < 0:
        raise InputError(f"--baseline-epochs must be >= 0, got {args.baseline_epochs}")
    opts = _ssl_options(args, defaults)
    _check_outputs(args, opts, [])
    if args.plots:
        from .plots import require_matplotlib

        require_matplotlib()
    data = load_data(args.data)
    bar = _progress(args)
    try:
        res = run_demo(
            data=data,
            baseline_epochs=args.baseline_epochs,
            options=opts,
            output=args.output,
            progress=bar,
            notify=_say,
        )
    finally:
        bar.close()
    rep = res.ssl.report
    print(
        "LeNet on scikit-learn's digits (8x8 resized to 28x28): baseline, then SSL with "
        "filter- and channel-wise group Lasso, pruned and fine-tuned"
    )
    print(
        f"({rep.train_samples} training and {rep.val_samples} held-out images; error on the "
        f"held-out images; FLOP as % of the baseline; speedup measured with ONNX Runtime "
        f"CPU, 1 thread, batch 64)"
    )
    print()
    print(res.table)
    print()
    print(rep.to_text())
    if res.ssl.output:
        print(f"wrote {res.ssl.output}")
    if args.report:
        from onnx_ssl.io import write_text_atomic

        write_text_atomic(
            args.report,
            json.dumps({"baseline_error": res.baseline_error, "ssl": rep.to_json()}, indent=1)
            + "\n",
        )
        print(f"wrote {args.report}")
    _plots(args, res.baseline, res.ssl)
    print(f"demo finished in {res.seconds:.0f}s")
    return 0


def _add_demo(sub: Any) -> None:
    from .chain import demo_options

    p = sub.add_parser(
        "demo",
        help="the main job on built-in data: LeNet + digits, SSL, Table 1",
        description="Build LeNet, train a baseline on scikit-learn's digits, run the SSL "
        "chain with filter- and channel-wise sparsity and print a table in the "
        "form of the paper's Table 1 (error, filters and channels per layer, "
        "FLOP per layer, measured ONNX Runtime CPU speedups). A few minutes on "
        "two cores.",
    )
    p.add_argument(
        "--data",
        default="digits",
        metavar="SPEC",
        help="data instead of the digits (a .npz or a folder of MNIST IDX files)",
    )
    p.add_argument(
        "--baseline-epochs",
        type=int,
        default=10,
        help="epochs of the baseline (AdamW, lr 1e-3; default 10)",
    )
    p.add_argument(
        "-o", "--output", default=None, metavar="OUT.onnx", help="also write the final pruned LeNet"
    )
    p.add_argument("--report", default=None, metavar="JSON", help="write the report as JSON")
    defaults = _add_chain_options(p, demo_options())
    p.set_defaults(func=_needs_training(lambda a: _cmd_demo(a, defaults)))


def register(subparsers: Any) -> None:
    """Add ``artifacts``, ``train``, ``ssl`` and ``demo`` to the main parser."""
    _add_artifacts(subparsers)
    _add_train(subparsers)
    _add_ssl(subparsers)
    _add_demo(subparsers)
