"""``onnx-ssl prune``: remove zero groups and write a smaller model with the same outputs
(:func:`onnx_ssl.compiler.prune`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from onnx_ssl.errors import InputError


def register(sub: Any) -> None:
    from onnx_ssl.importance import IMPORTANCES
    from onnx_ssl.passes.lower_sparse_conv import CANDIDATES

    p = sub.add_parser("prune", help="remove zero groups; write a smaller model with the same "
                                     "outputs")
    p.add_argument("model", help="input .onnx (or builtin:NAME)")
    p.add_argument("-o", "--output", required=True, help="output .onnx (never the input)")
    p.add_argument("--threshold", "--l2-threshold", dest="threshold", type=float, default=None,
                   metavar="T",
                   help="first zero every prunable coupled channel group (analyze's 'channel' "
                        "kind: all weights tied to one channel) and residual branch whose L2 "
                        "norm ||w||_2 is <= T; an L2 norm, not the RMS of `ssl --threshold` "
                        "(changes the function; the report gives the output difference)")
    p.add_argument("--target-macs", type=float, default=None, metavar="F",
                   help="budget: zero the least important channel groups and residual "
                        "branches until the pruned model has at most F (in (0, 1]) of the "
                        "input's MACs, landing within 2 points under it where the groups "
                        "allow (changes the function; the report gives the output "
                        "difference and top-1 agreement); not with --threshold")
    p.add_argument("--target-params", type=float, default=None, metavar="F",
                   help="budget on params, like --target-macs (both given: both must hold)")
    p.add_argument("--importance", default=None, choices=list(IMPORTANCES),
                   help="how a budget ranks groups: magnitude (normalised group L2 norm, "
                        "data-free) or activation (Wanda |W| x ||X|| on --data); default "
                        "activation with --data, else magnitude")
    p.add_argument("--data", default=None, metavar="CALIB",
                   help="calibration inputs: an .npz with one array per model input, named "
                        "as the inputs, samples on the first axis; scores the budget's "
                        "groups and measures how the function changed")
    p.add_argument("--verify", type=int, default=3, metavar="N",
                   help="check outputs on N seeded random inputs before writing (default 3)")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric check")
    p.add_argument("--report", metavar="JSON", help="write the report as JSON")
    p.add_argument("--bind-batch", type=int, default=None, metavar="N",
                   help="bind a symbolic batch dim of the inputs to N, for a model whose batch "
                        "is declared dynamic but does not run at other sizes (the result is "
                        "static at N)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random inputs: those of the numeric check, of the "
                        "threshold's output difference, and the two that tell a constant "
                        "channel or branch from one that varies (default 0)")
    p.add_argument("--lower", default="off", choices=["off", "auto", *CANDIDATES],
                   help="lower convs with zero fibers or 2D filters into exact cheaper "
                        "graphs: auto picks per layer by timing it with ONNX Runtime on "
                        "--provider/--batch/--threads; a strategy name applies it wherever it "
                        "saves MACs (default off)")
    p.add_argument("--round-to", default=None, metavar="N|auto",
                   help="keep a few zero channels per space so that the kept counts are "
                        "multiples of N (or the original size; exact), the way vectorised "
                        "kernels prefer them; auto times each space's convs on --provider/"
                        "--batch/--threads and rounds to 4, 8 or 16 only where measured "
                        "faster; with a budget the selection lands on such counts itself "
                        "(default off)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                   help="execution provider --lower auto and --round-to auto time on "
                        "(default cpu)")
    p.add_argument("--batch", type=int, default=1,
                   help="batch size --lower auto times at (default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads --lower auto times with (default 0: ORT's default)")
    p.add_argument("--lower-cache", default=None, metavar="DIR",
                   help="folder of cached lowering timings (default ~/.cache/onnx-ssl-lowering;"
                        " '' disables it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnx_ssl.analysis import bind_batch_to
    from onnx_ssl.compiler import prune
    from onnx_ssl.io import check_writable, save_model, write_text_atomic
    from onnx_ssl.loading import input_files, load
    from onnx_ssl.passes.round_channels import parse_round_to

    inputs = [*input_files(str(args.model)), *([args.data] if args.data else [])]
    check_writable(args.output, *inputs)
    if args.report:
        check_writable(args.report, *inputs, outputs=[args.output])
    if args.threshold is not None and not (math.isfinite(args.threshold)
                                           and args.threshold >= 0):
        raise InputError(f"--threshold must be a finite number >= 0, got {args.threshold}")
    if args.verify < 0:
        raise InputError(f"--verify must be >= 0 (--verify 0 or --no-verify skips the "
                         f"numeric check), got {args.verify}")
    parse_round_to(args.round_to)  # a bad value is one line before the model is read
    model = bind_batch_to(load(args.model), args.bind_batch)
    n = 0 if args.no_verify else args.verify
    result = prune(model, threshold=args.threshold, verify=n, seed=args.seed,
                   name=str(args.model), lower=args.lower, provider=args.provider,
                   batch=args.batch, threads=args.threads, lower_cache=args.lower_cache,
                   target_macs=args.target_macs, target_params=args.target_params,
                   importance=args.importance, calib=args.data, round_to=args.round_to)
    save_model(result.model, args.output)
    if args.report:
        write_text_atomic(args.report, json.dumps(result.report.to_json(), indent=1) + "\n")
    print(result.report.to_text())
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
