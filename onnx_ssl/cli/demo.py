"""``onnx-ssl demo``: LeNet on scikit-learn's digits, a baseline, the SSL chain and the
paper's Table 1 (:func:`onnx_ssl.training.demo.run_demo`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._common import needs_training, say
from ._training import add_chain_options, check_outputs, plots, progress, require_plots, ssl_options


def register(sub: Any) -> None:
    from onnx_ssl.training.demo import demo_options

    p = sub.add_parser(
        "demo",
        help="the main job on built-in data: LeNet + digits, SSL, Table 1",
        description="Build LeNet, train a baseline on scikit-learn's digits, run the SSL "
        "chain with filter- and channel-wise sparsity and print a table in the "
        "form of the paper's Table 1 (error, filters and channels per layer, "
        "FLOP per layer, measured ONNX Runtime CPU speedups). About 37 s of CPU: "
        "a quarter of a minute to a minute and a half on two cores, with the load.",
    )
    p.add_argument("--data", default="digits", metavar="SPEC",
                   help="data instead of the digits (a .npz or a folder of MNIST IDX files)")
    p.add_argument("--baseline-epochs", type=int, default=10,
                   help="epochs of the baseline (AdamW, lr 1e-3; default 10)")
    p.add_argument("-o", "--output", default=None, metavar="OUT.onnx",
                   help="also write the final pruned LeNet")
    p.add_argument("--report", default=None, metavar="JSON", help="write the report as JSON")
    defaults = add_chain_options(p, demo_options())
    p.set_defaults(func=needs_training(lambda a: run(a, defaults)))


def run(args: argparse.Namespace, defaults: dict[str, float]) -> int:
    from onnx_ssl.errors import InputError
    from onnx_ssl.training.data import load_data
    from onnx_ssl.training.demo import run_demo

    if args.baseline_epochs < 0:
        raise InputError(f"--baseline-epochs must be >= 0, got {args.baseline_epochs}")
    opts = ssl_options(args, defaults)
    check_outputs(args, opts, [])
    require_plots(args)
    data = load_data(args.data)
    bar = progress(args)
    try:
        res = run_demo(data=data, baseline_epochs=args.baseline_epochs, options=opts,
                       output=args.output, progress=bar, notify=say)
    finally:
        bar.close()
    rep = res.ssl.report
    print("LeNet on scikit-learn's digits (8x8 resized to 28x28): baseline, then SSL with "
          "filter- and channel-wise group Lasso, pruned and fine-tuned")
    print(f"({rep.train_samples} training and {rep.val_samples} held-out images; error on the "
          f"held-out images; FLOP as % of the baseline; speedup measured with ONNX Runtime "
          f"CPU, 1 thread, batch 64)")
    print()
    print(res.table)
    print()
    print(rep.to_text())
    if res.ssl.output:
        print(f"wrote {res.ssl.output}")
    if args.report:
        from onnx_ssl.io import write_text_atomic

        write_text_atomic(args.report, json.dumps(
            {"baseline_error": res.baseline_error, "ssl": rep.to_json()}, indent=1) + "\n")
        print(f"wrote {args.report}")
    plots(args, res.baseline, res.ssl)
    print(f"demo finished in {res.seconds:.0f}s")
    if not rep.accepted:  # over --max-drop: the verdict last, and its exit status
        from onnx_ssl.training.acceptance import EXIT_OVER_MAX_DROP

        print(rep.last_line())
        return EXIT_OVER_MAX_DROP
    return 0
