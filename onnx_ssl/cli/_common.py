"""What the commands share: parsers built from the options dataclasses, one-line messages.

:class:`Opt` names the dataclass field an option fills; :func:`add_options` adds the options
with the field's type and default (``{default}`` in a help text is the dataclass default)
and :func:`options_from` builds the dataclass from the parsed arguments, so that a default,
a choice list or a field is written once.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Command = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Opt:
    """One command-line option that fills the dataclass field ``field``.

    ``flags`` defaults to ``--field-name``; ``negate`` makes a ``store_true`` flag that sets
    a boolean field to False (``--no-prox`` fills ``prox``). ``help`` may use ``{default}``
    with a format spec, for example ``(default {default:g})``.
    """

    field: str
    help: str | None = None
    flags: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    negate: bool = False

    def names(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.field.replace("_", "-"),)

    def dest(self) -> str:
        long = next(f for f in self.names() if f.startswith("--"))
        return long[2:].replace("-", "_")


def _scalar(hint: Any) -> Any:
    """int, float, str, bool or Path from a field's annotation (``X | None`` gives X)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def _hints(cls: type) -> dict[str, Any]:
    return {k: _scalar(v) for k, v in typing.get_type_hints(cls).items()}


def add_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, defaults: Any,
                opts: Sequence[Opt]) -> None:
    """Add ``opts`` to ``p`` with the types and defaults of the dataclass ``defaults``."""
    hints = _hints(type(defaults))
    for o in opts:
        kind = hints[o.field]
        default = getattr(defaults, o.field)
        text = None if o.help is None else o.help.format(default=default)
        if kind is bool:
            p.add_argument(*o.names(), dest=o.dest(), action="store_true", help=text)
            continue
        p.add_argument(*o.names(), dest=o.dest(), type=str if kind is Path else kind,
                       default=default, choices=o.choices, metavar=o.metavar, help=text)


def options_from(cls: Callable[..., Any], args: argparse.Namespace, opts: Sequence[Opt],
                 **extra: Any) -> Any:
    """``cls(**fields)`` from the options ``opts`` parsed into ``args``, plus ``extra``."""
    hints = _hints(cls)  # type: ignore[arg-type]
    kw: dict[str, Any] = {}
    for o in opts:
        v = getattr(args, o.dest())
        if o.negate:
            v = not v
        elif hints[o.field] is Path and v is not None:
            v = Path(v)
        kw[o.field] = v
    return cls(**kw, **extra)


def error_line(e: BaseException, internal: bool = False) -> str:
    """The one line ``onnx-ssl`` prints for an exception (``internal``: a bug, not bad input)."""
    from onnx_ssl.errors import one_line

    if not internal:
        return f"onnx-ssl: error: {e}"
    msg = one_line(e) if str(e).strip() else ""
    return (f"onnx-ssl: internal error: {type(e).__name__}: {msg} (rerun with --debug for "
            f"the traceback)")


def say(msg: str) -> None:
    """A progress line on stderr."""
    print(f"onnx-ssl: {msg}", file=sys.stderr, flush=True)


def needs_training(cmd: Command) -> Command:
    """``cmd`` after checking, before any work, that onnxruntime-training is importable (a
    one-line error that says why and how to get it otherwise)."""

    def run(args: argparse.Namespace) -> int:
        from onnx_ssl.training import _ort

        _ort.load()
        return cmd(args)

    return run
