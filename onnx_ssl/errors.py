"""Errors the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class OnnxSslError(Exception):
    """Base class of every error onnx-ssl reports to the user (exit code 2)."""

    exit_code = 2


class InputError(OnnxSslError):
    """The model, data or arguments the user gave cannot be used."""


class UnsupportedModelError(InputError):
    """A valid ONNX model that onnx-ssl or the bundled ONNX Runtime cannot handle."""


class VerificationError(OnnxSslError):
    """A rewrite changed the model's outputs beyond the tolerance; nothing was written."""


class PassError(OnnxSslError):
    """A graph pass failed; the message names the passes that ran before it."""


class EnvironmentProblem(OnnxSslError):
    """The Python environment is broken (for example two ONNX Runtime distributions)."""


def one_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
