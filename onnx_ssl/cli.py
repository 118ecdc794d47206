"""The ``onnx-ssl`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .errors import OnnxSslError

if TYPE_CHECKING:
    from pathlib import Path

    import onnx

log = logging.getLogger("onnx_ssl")


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze, format_table
    from .io import check_writable, write_text_atomic

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.json:
        check_writable(args.json, *model_inputs(args.model))
    model = _load(args.model)
    a = analyze(model, kinds=kinds, name=str(args.model))
    if args.json:
        write_text_atomic(args.json, a.dumps() + "\n")
        print(f"wrote {args.json}: {len(a.spaces)} spaces, {len(a.groups)} groups",
              file=sys.stderr)
    else:
        print(format_table(a))
    return 0


def _load(path: str) -> onnx.ModelProto:
    """Load a model file, or build one from onnx_ssl/models/ for ``builtin:NAME``."""
    from .io import load_model

    if path.startswith("builtin:"):
        from .models import build

        name = path.split(":", 1)[1]
        try:
            return build(name)
        except KeyError as e:
            raise OnnxSslError(str(e).strip("'\"")) from e
    return load_model(path)


def model_inputs(path: str) -> list[Path]:
    """The files :func:`_load` reads for ``path`` (none for ``builtin:NAME``): outputs are
    checked against them with :func:`onnx_ssl.io.check_writable`."""
    from .io import model_files

    return [] if path.startswith("builtin:") else model_files(path)


def _cmd_convert(args: argparse.Namespace) -> int:
    """Convert a model's default-domain opset (for a runtime that runs no newer one)."""
    from . import env
    from .io import check_writable, convert_opset, default_opset, save_model
    from .runtime import verify

    if args.verify < 0:
        raise OnnxSslError("--verify must be >= 0 (0 skips the numeric check)")
    check_writable(args.output, *model_inputs(args.model))
    model = _load(args.model)
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


def _cmd_prune(args: argparse.Namespace) -> int:
    from .compiler import run_prune_cli

    return run_prune_cli(args)


def _add_prune(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("prune", help="remove zero groups; write a smaller model with the same "
                                     "outputs")
    p.add_argument("model", help="input .onnx (or builtin:NAME)")
    p.add_argument("-o", "--output", required=True, help="output .onnx (never the input)")
    p.add_argument("--threshold", type=float, default=None,
                   help="first zero every prunable group with L2 norm <= T (changes the "
                        "function; the report gives the output difference)")
    p.add_argument("--verify", type=int, default=3, metavar="N",
                   help="check outputs on N seeded random inputs before writing (default 3)")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric check")
    p.add_argument("--report", metavar="JSON", help="write the report as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lower", default="off",
                   choices=["off", "auto", "kernel-classes", "compact-gemm", "blocks"],
                   help="lower convs with zero fibers or 2D filters into exact cheaper "
                        "graphs: auto picks per layer by timing it with ONNX Runtime on "
                        "--provider/--batch/--threads; a strategy name applies it wherever it "
                        "saves MACs (default off)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                   help="execution provider --lower auto times on (default cpu)")
    p.add_argument("--batch", type=int, default=1,
                   help="batch size --lower auto times at (default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads --lower auto times with (default 0: ORT's default)")
    p.add_argument("--lower-cache", default=None, metavar="DIR",
                   help="folder of cached lowering timings (default ~/.cache/onnx-ssl-lowering;"
                        " '' disables it)")
    p.set_defaults(func=_cmd_prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-ssl",
        description="Structured Sparsity Learning for ONNX models: analyse coupled groups, "
                    "train with group Lasso in ONNX Runtime, compile a smaller exact model.")
    parser.add_argument("--version", action="version", version=f"onnx-ssl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="info logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    a = sub.add_parser("analyze", help="list channel spaces and SSL groups of a model")
    a.add_argument("model", help="input .onnx (or builtin:NAME for a model from onnx_ssl/models/)")
    a.add_argument("--json", metavar="OUT", help="write the analysis as JSON (see README)")
    a.add_argument("--kinds", default="channel,depth",
                   help="group kinds: channel,depth,shape,filter2d,neuron (default "
                        "channel,depth)")
    a.set_defaults(func=_cmd_analyze)

    _add_prune(sub)
    c = sub.add_parser("convert", help="convert a model to another opset (onnx.version_converter)",
                       description="Convert a model's default-domain opset with "
                                   "onnx.version_converter, for a runtime that runs no newer "
                                   "opset; the outputs are compared when ONNX Runtime runs both.")
    c.add_argument("model", help="input .onnx")
    c.add_argument("--opset", type=int, required=True, help="target opset")
    c.add_argument("-o", "--output", required=True, help="output .onnx (never the input)")
    c.add_argument("--verify", type=int, default=3, metavar="N",
                   help="compare outputs on N seeded random inputs (0: skip; default 3)")
    c.set_defaults(func=_cmd_convert)
    from .bench import add_parser as add_bench

    add_bench(sub)
    try:
        from .training import cli as training_cli
    except ImportError as e:  # pragma: no cover - the training package is part of onnx-ssl
        log.debug("training commands unavailable: %s", e)
    else:
        training_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        from .env import check_runtime_environment

        check_runtime_environment()
        return int(args.func(args) or 0)
    except OnnxSslError as e:
        if args.debug:
            raise
        print(f"onnx-ssl: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into head & co.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("onnx-ssl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal error: one line unless --debug
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"onnx-ssl: internal error: {type(e).__name__}: {msg} (rerun with --debug for "
              f"the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
