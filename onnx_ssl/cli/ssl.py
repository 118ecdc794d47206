"""``onnx-ssl ssl``: the SSL chain (train with group Lasso, threshold, prune, fine-tune,
report) on a model (:func:`onnx_ssl.training.chain.run_ssl`).

The report goes to stdout and its last line is the verdict: cost, the held-out metric
before SSL, after SSL, after the cut and after fine-tuning, its drop, and whether the run is
accepted. Exit status: 0 done; 2 bad input, or training collapsed (one line on stderr); 3
the result is over ``--max-drop`` (:data:`onnx_ssl.training.acceptance.EXIT_OVER_MAX_DROP`):
its model is written as ``OUT.over-max-drop.onnx``, not to ``-o OUT.onnx``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import needs_training, say
from ._training import (
    add_chain_options,
    add_workers,
    check_outputs,
    plots,
    progress,
    require_plots,
    ssl_options,
    with_workers,
)


def register(sub: Any) -> None:
    from onnx_ssl.training.chain import SslOptions

    p = sub.add_parser(
        "ssl",
        help="SSL chain: train with group Lasso, prune, fine-tune, report",
        description="The paper's procedure (section 4.3): train with SSL (proximal group "
        "Lasso, SGD), zero the groups whose RMS is below the threshold, prune them "
        "(the result is verified to compute the same outputs), fine-tune without "
        "the penalty, and report error, filters, channels, MACs and params per "
        "layer. Without --lambda-* options, filter- and channel-wise sparsity "
        "are used with the defaults shown.",
        epilog="The last line of the report is the verdict: MACs and params kept, the "
        "held-out metric before SSL, after SSL, after the cut (threshold and prune) and "
        "after fine-tuning, and its drop. Exit status: 0 done; 2 bad input or training "
        "collapsed; 3 the final metric dropped more than --max-drop allows (checked by "
        "default when a budget is met by raising the prune threshold): the model is then "
        "written as OUT.over-max-drop.onnx, not to -o OUT.onnx.",
    )
    p.add_argument("model", help="input .onnx (or builtin:NAME)")
    p.add_argument("--data", default="digits", metavar="SPEC",
                   help="a .npz file (x, y; without y, one array per model input named as "
                   "the inputs, and the input model is distilled), a folder of MNIST IDX "
                   "files, or 'digits' (the default)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="final model")
    p.add_argument("--report", default=None, metavar="JSON", help="write the report as JSON")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run interrupted in work folder DIR (give the same model, "
                   "data and options): each phase restarts from its last finished epoch")
    defaults = add_chain_options(p, SslOptions())
    add_workers(p)
    p.set_defaults(func=needs_training(lambda a: with_workers(a, lambda w: run(a, defaults, w))))


def run(args: argparse.Namespace, defaults: dict[str, float], workers: Any = None) -> int:
    from onnx_ssl.loading import input_files, load
    from onnx_ssl.training.acceptance import EXIT_OVER_MAX_DROP
    from onnx_ssl.training.chain import run_ssl
    from onnx_ssl.training.data import load_data

    opts = ssl_options(args, defaults)
    check_outputs(args, opts, input_files(args.model))
    require_plots(args)
    model = load(args.model)
    data = load_data(args.data)
    writer = workers is None or workers.is_writer  # (the other workers stay silent)
    bar = progress(args) if writer else None
    try:
        res = run_ssl(model, data, opts, output=args.output, report_path=args.report,
                      name=Path(args.model).stem, progress=bar,
                      notify=say if writer else lambda _: None, workers=workers)
    finally:
        if bar is not None:
            bar.close()
    if not writer:
        return 0 if res.report.accepted else EXIT_OVER_MAX_DROP
    plots(args, model, res)
    print(f"wrote {res.output}" + (f" and {args.report}" if args.report else ""))
    # The report last: its last line is the verdict, what a pipeline reads.
    print(res.report.to_text())
    return 0 if res.report.accepted else EXIT_OVER_MAX_DROP
