"""``onnx-ssl convert``: a model's default-domain opset converted (for a runtime that runs no
newer one), the outputs compared when ONNX Runtime runs both."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from onnx_ssl.errors import OnnxSslError


def register(sub: Any) -> None:
    c = sub.add_parser("convert", help="convert a model to another opset (onnx.version_converter)",
                       description="Convert a model's default-domain opset with "
                                   "onnx.version_converter, for a runtime that runs no newer "
                                   "opset; the outputs are compared when ONNX Runtime runs both.")
    c.add_argument("model", help="input .onnx")
    c.add_argument("--opset", type=int, required=True, help="target opset")
    c.add_argument("-o", "--output", required=True, help="output .onnx (never the input)")
    c.add_argument("--verify", type=int, default=3, metavar="N",
                   help="compare outputs on N seeded random inputs (0: skip; default 3)")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnx_ssl import env
    from onnx_ssl.io import check_writable, convert_opset, default_opset, save_model
    from onnx_ssl.loading import input_files, load
    from onnx_ssl.runtime import verify

    if args.verify < 0:
        raise OnnxSslError("--verify must be >= 0 (0 skips the numeric check)")
    check_writable(args.output, *input_files(args.model))
    model = load(args.model)
    source = default_opset(model)
    converted = convert_opset(model, args.opset)
    checked = ""
    if args.verify and env.has_ort():
        top = env.runtime_limits().max_opset
        if max(source, args.opset) <= top:
            diffs = verify(model, converted, n=args.verify)
            worst = max((d.relative for d in diffs), default=0.0)
            checked = f"; numeric check passed, max difference {worst:.2g} x max |output|"
        else:
            checked = (f"; not checked numerically: the installed ONNX Runtime runs opset <= "
                       f"{top}")
    save_model(converted, args.output)
    print(f"converted {args.model} from opset {source} to {args.opset}{checked}")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
