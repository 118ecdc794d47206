"""``onnx-ssl ssl``: the SSL chain (train with group Lasso, threshold, prune, fine-tune,
report) on a model (:func:`onnx_ssl.training.chain.run_ssl`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import needs_training, say
from ._training import add_chain_options, check_outputs, plots, progress, require_plots, ssl_options


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
    )
    p.add_argument("model", help="input .onnx (or builtin:NAME)")
    p.add_argument("--data", default="digits", metavar="SPEC",
                   help="a .npz file (x, y), a folder of MNIST IDX files, or 'digits' (the "
                   "default)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="final model")
    p.add_argument("--report", default=None, metavar="JSON", help="write the report as JSON")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run interrupted in work folder DIR (give the same model, "
                   "data and options): each phase restarts from its last finished epoch")
    defaults = add_chain_options(p, SslOptions())
    p.set_defaults(func=needs_training(lambda a: run(a, defaults)))


def run(args: argparse.Namespace, defaults: dict[str, float]) -> int:
    from onnx_ssl.loading import input_files, load
    from onnx_ssl.training.chain import run_ssl
    from onnx_ssl.training.data import load_data

    opts = ssl_options(args, defaults)
    check_outputs(args, opts, input_files(args.model))
    require_plots(args)
    model = load(args.model)
    data = load_data(args.data)
    bar = progress(args)
    try:
        res = run_ssl(model, data, opts, output=args.output, report_path=args.report,
                      name=Path(args.model).stem, progress=bar, notify=say)
    finally:
        bar.close()
    print(res.report.to_text())
    print(f"wrote {res.output}" + (f" and {args.report}" if args.report else ""))
    plots(args, model, res)
    return 0
