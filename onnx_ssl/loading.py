"""Models named the way the commands name them: a file, or ``builtin:NAME``.

``builtin:NAME`` builds a reference network from :mod:`onnx_ssl.models`; anything else is a
path read by :func:`onnx_ssl.io.load_model`. The CLI and the library (the training chain, the
benchmarks) share this one reading of a model argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import OnnxSslError

if TYPE_CHECKING:
    from .io import ModelProto

BUILTIN = "builtin:"


def load(spec: str) -> ModelProto:
    """The model ``spec`` names: a file, or ``builtin:NAME`` from :mod:`onnx_ssl.models`."""
    from .io import load_model

    if spec.startswith(BUILTIN):
        from .models import build

        name = spec.split(":", 1)[1]
        try:
            return build(name)
        except KeyError as e:
            raise OnnxSslError(str(e).strip("'\"")) from e
    return load_model(spec)


def input_files(spec: str) -> list[Path]:
    """The files :func:`load` reads for ``spec`` (none for ``builtin:NAME``): outputs are
    checked against them with :func:`onnx_ssl.io.check_writable`."""
    from .io import model_files

    return [] if spec.startswith(BUILTIN) else model_files(spec)
