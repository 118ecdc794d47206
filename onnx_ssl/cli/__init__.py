"""The ``onnx-ssl`` command line: one module per command.

Each command module has ``register(subparsers)`` and a handler that returns an exit code and
raises :class:`~onnx_ssl.errors.OnnxSslError` subclasses for bad input (printed as one line,
exit code 2). A handler may also return 3 (``ssl`` and ``demo``: the run finished but its
held-out metric dropped more than ``--max-drop`` allows; see
:mod:`onnx_ssl.training.acceptance`), so that a pipeline can tell it from a success.
Progress goes to stderr, results to stdout. The CLI imports the library; no library module
imports the CLI (tests/test_static.py checks it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from onnx_ssl import __version__
from onnx_ssl.errors import OnnxSslError

from . import analyze, artifacts, bench, convert, demo, prune, ssl, train
from ._common import error_line

log = logging.getLogger("onnx_ssl")

# In the order of `onnx-ssl --help`.
COMMANDS = (analyze, prune, convert, bench, artifacts, train, ssl, demo)


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
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # (--workers N starts N copies of this command)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        from onnx_ssl.env import check_runtime_environment

        check_runtime_environment()
        return int(args.func(args) or 0)
    except OnnxSslError as e:
        if args.debug:
            raise
        if not getattr(e, "quiet", False):  # (a worker whose launcher reports for it)
            print(error_line(e), file=sys.stderr)
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
        print(error_line(e, internal=True), file=sys.stderr)
        return 1
