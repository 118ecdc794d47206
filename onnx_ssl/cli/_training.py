"""What the training commands (``artifacts``, ``train``, ``ssl``, ``demo``) share: the
group-Lasso strengths, the SSL chain's options, output checks and figures."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._common import Opt, add_options, options_from

# The defaults shown by --help come from the modules that use them; the --lambda-* options
# are the penalty's structures (onnx_ssl.training.penalty.STRUCTURES, from the group kinds).
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


def add_workers(p: argparse.ArgumentParser) -> None:
    """--workers and --dist-timeout (data-parallel training, onnx_ssl.training.distributed)."""
    from onnx_ssl.training.distributed import DEFAULT_TIMEOUT

    g = p.add_argument_group(
        "workers (data-parallel training on torch.distributed; needs the [distributed] extra)",
        "Under torchrun, or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and "
        "MASTER_PORT, the same command is one worker of a run across machines. The global "
        "batch (--batch-size) is split among the workers and their gradients averaged after "
        "every step; rank 0 writes every file.")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="start N worker processes on this machine (default 1; leave it out "
                   "under a launcher)")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="how long a worker waits for the others (to start, to reach the same "
                   f"step) before it stops with an error naming the late one (default "
                   f"{DEFAULT_TIMEOUT:g})")


def with_workers(args: argparse.Namespace, body: Callable[[Any], int]) -> int:
    """Run ``body(None)`` in this process, or start --workers N workers that run the same
    command, or, as one of them, ``body(this worker's Distributed)``."""
    from onnx_ssl.training.distributed import join, launch, setup

    s = setup(getattr(args, "workers", None), getattr(args, "dist_timeout", 300.0))
    if s.spawn:
        return launch(args.argv, s.spawn)
    if not s.distributed:
        return body(None)
    w = join(s)
    try:
        return body(w)
    finally:
        w.close()


def _lambda_flags() -> tuple[str, ...]:
    from onnx_ssl.training.penalty import STRUCTURES

    return STRUCTURES


def add_lambdas(p: argparse.ArgumentParser, defaults: dict[str, float]) -> None:
    g = p.add_argument_group(
        "group-Lasso strengths (lambda_g of equation 1)",
        "Scale, measured on LeNet with 8,000 MNIST images and ssl's defaults (20 epochs of "
        "proximal SGD, lr 0.05, filter and channel lambda alike): 1e-3 prunes nothing; 3e-2 "
        "keeps 22.8% of the MACs at +0.25 points of held-out error. The step is lr x "
        "lambda, so fewer steps per epoch need a larger lambda (the demo's digits use 0.1).",
    )
    for s in _lambda_flags():
        d = defaults.get(s, 0.0)
        what = LAMBDA_HELP.get(s, f"the {s} groups of `analyze`, one per group")
        g.add_argument(f"--lambda-{s}", type=float, default=None, metavar="X",
                       help=f"{what} (default {d:g})")
    g.add_argument("--scale-by-size", action="store_true",
                   help="multiply each group's term by sqrt(its number of weights)")
    g.add_argument("--lambda-scale", action="append", default=[], metavar="STRUCTURE:LAYER=X",
                   help="multiply one term's lambda by X, e.g. filter:conv2=2 (the layer is "
                   "its node name, as `ssl`'s reports list it); repeat for more terms")


def lambdas(args: argparse.Namespace, defaults: dict[str, float]) -> Any:
    """The --lambda-* options given, or ``defaults`` when none is; --lambda-scale either way."""
    from onnx_ssl.training.penalty import Lambdas

    scales = [Lambdas.parse_scale(item) for item in getattr(args, "lambda_scale", None) or []]
    given = {s: getattr(args, f"lambda_{s}") for s in _lambda_flags()}
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
        Opt("seed", "seed of the held-out split, the batch order and the prune check's random "
            "inputs (default {default})"),
        Opt("verify", "prune check on N random inputs (default {default})", metavar="N"),
    )


_BUDGET = (
    Opt("target_macs", "prune to at most F times the input model's MACs, F in (0, 1]: the "
        "lambdas are scaled by 1.3 after every SSL epoch whose projected MACs are above F (and "
        "relaxed below 0.75 F), and the prune threshold is raised if needed", metavar="F"),
    Opt("target_params", "the same for the parameter count", metavar="F"),
    Opt("max_drop", "the most the held-out metric may worsen from the better of its values "
        "before and after SSL to the end, in its units (0.03 is 3 points of error, the "
        "default; 0.1 of fidelity). Without this option only a budget met by raising the "
        "prune threshold above --threshold (zeroing groups that were not near zero) is "
        "checked; with it, every run. A run over it exits with status 3 and its model is "
        "written as OUT.over-max-drop.onnx, not to -o OUT.onnx", metavar="X"),
    Opt("start", "how the budget is reached: ssl trains with the group Lasso from the input "
        "model, then thresholds; oneshot skips SSL: prune's one-shot selection (activation "
        "importance on up to 256 training samples) cuts to the budget at once and "
        "--epochs + --finetune-epochs of fine-tuning recover; auto is oneshot when "
        "distilling (no labels) to a budget, else ssl (default {default})",
        choices=("auto", "ssl", "oneshot")),
)


def _distill_opts() -> tuple[Opt, ...]:
    from onnx_ssl.training.distill import DISTILL_LOSSES

    return (
        Opt("distill", "train the sparse model to reproduce the input model's outputs (the "
            "teacher, run once over the data) instead of fitting the labels; automatic when "
            "the data has no 'y' (an .npz with one array per model input)"),
        Opt("distill_loss", "over every float output: mse on outputs divided by the "
            "teacher's RMS, kl at --distill-temperature (logits), cosine (1 - cos over "
            "the last axis, embeddings), or auto: per output, kl for logits, cosine for "
            "vectors and mse for the rest (default {default})", choices=DISTILL_LOSSES),
        Opt("distill_temperature", "KL temperature T, with the T^2 factor (default "
            "{default:g})", metavar="T"),
        Opt("distill_weights", "weights of the outputs: W1,W2,... in the model's output "
            "order or NAME=W,... (default equal; normalised to sum 1)", metavar="W,..."),
    )


def add_chain_options(p: argparse.ArgumentParser, d: Any) -> dict[str, float]:
    """The options of ``ssl`` and ``demo`` (defaults from the SslOptions ``d``); returns the
    lambdas used when no --lambda-* option is given."""
    defaults = {s: d.lambdas.get(s) for s in _lambda_flags() if d.lambdas.get(s) > 0}
    add_lambdas(p, defaults)
    add_options(p.add_argument_group(
        "budget (instead of choosing lambdas: they become the controller's starting point)"),
        d, _BUDGET)
    o = p.add_argument_group("output")
    o.add_argument("--plots", default=None, metavar="DIR",
                   help="write figures (conv1 filters before/after, zero groups per layer over "
                   "the epochs, error against MACs) as PNG into DIR (needs matplotlib: "
                   "the [plots] extra: pip install -e '.[plots]' in the checkout)")
    o.add_argument("--log", default=None, metavar="F.jsonl",
                   help="append every epoch of every phase to F as one JSON object per line")
    add_options(p.add_argument_group(
        "distillation (label-free SSL: the input model is the teacher; the held-out metric is "
        "the fidelity to it, per output)"), d, _distill_opts())
    g = p.add_argument_group("training (SSL phase, then fine-tuning)")
    add_options(g, d, _chain_opts())
    g.add_argument("--work-dir", default=None, metavar="DIR",
                   help="keep the artifacts, checkpoints and logs of each phase here (a run "
                   "checkpoints every epoch there; --resume DIR continues it)")
    return defaults


def ssl_options(args: argparse.Namespace, defaults: dict[str, float]) -> Any:
    from onnx_ssl.training.chain import SslOptions

    return options_from(SslOptions, args, (*_chain_opts(), *_BUDGET, *_distill_opts()),
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
    from onnx_ssl.training.acceptance import rejected_path

    # (a run over --max-drop writes its model beside -o: check that name too)
    outs = [Path(p) for p in (args.output, args.output and rejected_path(args.output),
                              args.report, getattr(args, "log", None)) if p]
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
