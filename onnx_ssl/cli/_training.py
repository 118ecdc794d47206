"""What the training commands (``artifacts``, ``train``, ``ssl``, ``demo``) share: the
group-Lasso strengths, the SSL chain's options, output checks and figures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import Opt, add_options, options_from

# The defaults shown by --help come from the modules that use them.
LAMBDA_FLAGS = ("filter", "channel", "shape", "filter2d", "neuron", "depth", "coupled")
LAMBDA_HELP = {
    "filter": "filter-wise groups W[n,:,:,:] of every convolution (eq. 2)",
    "channel": "channel-wise groups W[:,c,:,:] of every convolution (eq. 2): one input "
    "channel of one layer's weight, not the coupled channel of `analyze` (that is "
    "--lambda-coupled)",
    "shape": "shape fibers W[:,c,m,k] of every convolution (eq. 3)",
    "filter2d": "2D filters W[n,c,:,:] of every convolution",
    "neuron": "rows and columns of every fully connected weight",
    "depth": "all weights of each residual branch",
    "coupled": "one group per channel of each prunable channel space, holding every "
    "out and in slice tied to it (filter, bias, BatchNorm, next layers' inputs)",
}


def progress(args: argparse.Namespace | None = None, prefix: str = "  ") -> Any:
    """tqdm bars on a terminal, per-epoch lines elsewhere, JSON lines with --log."""
    from onnx_ssl.training.progress import Progress

    return Progress(prefix=prefix, log_path=getattr(args, "log", None) if args else None)


def add_lambdas(p: argparse.ArgumentParser, defaults: dict[str, float]) -> None:
    g = p.add_argument_group(
        "group-Lasso strengths (lambda_g of equation 1)",
        "Scale, measured on LeNet with 8,000 MNIST images and ssl's defaults (20 epochs of "
        "proximal SGD, lr 0.05, filter and channel lambda alike): 1e-3 prunes nothing; 3e-2 "
        "keeps 22.8% of the MACs at +0.25 points of held-out error. The step is lr x "
        "lambda, so fewer steps per epoch need a larger lambda (the demo's digits use 0.1).",
    )
    for s in LAMBDA_FLAGS:
        d = defaults.get(s, 0.0)
        g.add_argument(f"--lambda-{s}", type=float, default=None, metavar="X",
                       help=f"{LAMBDA_HELP[s]} (default {d:g})")
    g.add_argument("--scale-by-size", action="store_true",
                   help="multiply each group's term by sqrt(its number of weights)")
    g.add_argument("--lambda-scale", action="append", default=[], metavar="STRUCTURE:LAYER=X",
                   help="multiply one term's lambda by X, e.g. filter:conv2=2 (the layer is "
                   "its node name, as `ssl`'s reports list it); repeat for more terms")


def lambdas(args: argparse.Namespace, defaults: dict[str, float]) -> Any:
    """The --lambda-* options given, or ``defaults`` when none is; --lambda-scale either way."""
    from onnx_ssl.training.penalty import Lambdas

    scales = [Lambdas.parse_scale(item) for item in getattr(args, "lambda_scale", None) or []]
    given = {s: getattr(args, f"lambda_{s}") for s in LAMBDA_FLAGS}
    if any(v is not None for v in given.values()):
        return Lambdas(**{s: float(v or 0.0) for s, v in given.items()}, scales=tuple(scales))
    return Lambdas(**defaults, scales=tuple(scales))


def _chain_opts() -> tuple[Opt, ...]:
    from onnx_ssl.training.spec import LOSSES, OPTIMIZERS
    from onnx_ssl.training.trainer import SCHEDULES

    return (
        Opt("loss", "(default {default})", choices=LOSSES),
        Opt("epochs", "SSL epochs (default {default})"),
        Opt("lr", "SSL learning rate (default {default:g})"),
        Opt("optimizer", "SSL optimizer (default {default})", choices=OPTIMIZERS),
        Opt("prox", "put the group Lasso in the loss gradient instead of the proximal step "
            "(default: proximal step, groups become exactly zero)", flags=("--no-prox",),
            negate=True),
        Opt("schedule", "(default {default})", choices=SCHEDULES),
        Opt("batch_size", "(default {default})"),
        Opt("weight_decay", "(default {default:g})"),
        Opt("threshold", "after SSL, zero every regularised group whose RMS "
            "||w||/sqrt(size) is <= T; an RMS, not the L2 norm of `prune --threshold` "
            "(default {default:g})", flags=("--threshold", "--rms-threshold"), metavar="T"),
        Opt("finetune_epochs", "fine-tuning epochs after pruning (default {default})"),
        Opt("finetune_lr", "fine-tuning learning rate, AdamW (default {default:g})"),
        Opt("val_fraction", "held-out fraction of the data (default {default:g})"),
        Opt("seed"),
        Opt("verify", "prune check on N random inputs (default {default})", metavar="N"),
    )


_BUDGET = (
    Opt("target_macs", "prune to at most F times the input model's MACs, F in (0, 1]: the "
        "lambdas are scaled by 1.3 after every SSL epoch whose projected MACs are above F (and "
        "relaxed below 0.75 F), and the prune threshold is raised if needed", metavar="F"),
    Opt("target_params", "the same for the parameter count", metavar="F"),
)


def add_chain_options(p: argparse.ArgumentParser, d: Any) -> dict[str, float]:
    """The options of ``ssl`` and ``demo`` (defaults from the SslOptions ``d``); returns the
    lambdas used when no --lambda-* option is given."""
    defaults = {s: d.lambdas.get(s) for s in LAMBDA_FLAGS if d.lambdas.get(s) > 0}
    add_lambdas(p, defaults)
    add_options(p.add_argument_group(
        "budget (instead of choosing lambdas: they become the controller's starting point)"),
        d, _BUDGET)
    o = p.add_argument_group("output")
    o.add_argument("--plots", default=None, metavar="DIR",
                   help="write figures (conv1 filters before/after, zero groups per layer over "
                   "the epochs, error against MACs) as PNG into DIR (needs matplotlib: "
                   "pip install 'onnx-ssl[plots]')")
    o.add_argument("--log", default=None, metavar="F.jsonl",
                   help="append every epoch of every phase to F as one JSON object per line")
    g = p.add_argument_group("training (SSL phase, then fine-tuning)")
    add_options(g, d, _chain_opts())
    g.add_argument("--work-dir", default=None, metavar="DIR",
                   help="keep the artifacts, checkpoints and logs of each phase here (a run "
                   "checkpoints every epoch there; --resume DIR continues it)")
    return defaults


def ssl_options(args: argparse.Namespace, defaults: dict[str, float]) -> Any:
    from onnx_ssl.training.chain import SslOptions

    return options_from(SslOptions, args, (*_chain_opts(), *_BUDGET),
                        lambdas=lambdas(args, defaults), scale_by_size=args.scale_by_size,
                        work_dir=_work_dir(args), resume=bool(getattr(args, "resume", None)))


def _work_dir(args: argparse.Namespace) -> Path | None:
    """--work-dir, or the folder of --resume (they must agree when both are given)."""
    from onnx_ssl.errors import InputError

    resume = getattr(args, "resume", None)
    if resume and args.work_dir and Path(resume).resolve() != Path(args.work_dir).resolve():
        raise InputError("--resume DIR and --work-dir name different folders")
    work = resume or args.work_dir
    return Path(work) if work else None


def check_outputs(args: argparse.Namespace, opts: Any, inputs: list[Path]) -> None:
    """Refuse -o, --report and the --work-dir files when one would overwrite an input (the
    model and the data files) or another output."""
    from onnx_ssl.io import check_writable
    from onnx_ssl.training.chain import work_files
    from onnx_ssl.training.data import data_files

    inputs = [*inputs, *data_files(args.data)]
    work = work_files(opts.work_dir)
    outs = [Path(p) for p in (args.output, args.report, getattr(args, "log", None)) if p]
    for k, out in enumerate(outs):
        check_writable(out, *inputs, outputs=[*outs[:k], *outs[k + 1 :], *work])
    for w in work:
        check_writable(w, *inputs, create_folders=True)


def require_plots(args: argparse.Namespace) -> None:
    if args.plots:
        from onnx_ssl.training.plots import require_matplotlib

        require_matplotlib()


def plots(args: argparse.Namespace, before: Any, res: Any) -> None:
    if not args.plots:
        return
    from onnx_ssl.training.plots import write_plots

    paths = write_plots(args.plots, before, res)
    print(f"wrote {', '.join(str(p) for p in paths)}")
