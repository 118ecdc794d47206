"""``onnx-ssl analyze``: the channel spaces and SSL groups of a model, as a table or JSON."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    a = sub.add_parser("analyze", help="list channel spaces and SSL groups of a model")
    a.add_argument("model", help="input .onnx (or builtin:NAME for a model from onnx_ssl/models/)")
    a.add_argument("--json", metavar="OUT", help="write the analysis as JSON (see README)")
    a.add_argument("--kinds", default="channel,depth",
                   help="group kinds: channel,depth,shape,filter2d,neuron (default "
                        "channel,depth)")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnx_ssl.analysis import analyze, format_table
    from onnx_ssl.io import check_writable, write_text_atomic
    from onnx_ssl.loading import input_files, load

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.json:
        check_writable(args.json, *input_files(args.model))
    model = load(args.model)
    a = analyze(model, kinds=kinds, name=str(args.model))
    if args.json:
        write_text_atomic(args.json, a.dumps() + "\n")
        print(f"wrote {args.json}: {len(a.spaces)} spaces, {len(a.groups)} groups",
              file=sys.stderr)
    else:
        print(format_table(a))
    return 0
