"""Import the onnxruntime-training API (torch-free, through :func:`onnx_ssl.env.install_shim`).

Training needs a training build of ONNX Runtime (the ``[train]`` extra: onnxruntime-training-cpu
1.19.2, the last release, for Python 3.10 to 3.12). :func:`load` returns its modules and checks
that the native library is the training build: a plain ``onnxruntime`` wheel installed over
``onnxruntime-training-cpu`` replaces the native library with one that lacks the training
symbols, which would otherwise fail much later with an obscure ``AttributeError``. Without a
training build, the error says why in one line and how to make an environment for training.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

from onnx_ssl import env
from onnx_ssl.errors import EnvironmentProblem

log = logging.getLogger(__name__)

# Native symbols that only the training build of the runtime has.
TRAINING_SYMBOLS = ("Module", "CheckpointState", "GradientGraphBuilder", "save_checkpoint")


def _repair() -> str:
    return (f"reinstall the training build: pip uninstall -y onnxruntime "
            f"onnxruntime-training-cpu && {env.pip_install('train')} (in an environment "
            f"of its own: {env.train_venv_hint()})")


@dataclass(frozen=True)
class Ort:
    """The imported runtime modules."""

    ort: Any  # onnxruntime
    api: Any  # onnxruntime.training.api
    onnxblock: Any  # onnxruntime.training.onnxblock
    capi: Any  # onnxruntime.capi._pybind_state


_LOADED: Ort | None = None


def check_training_build(capi: Any, version: str) -> None:
    """Raise EnvironmentProblem unless ``capi`` (the native module) has the training API."""
    missing = [s for s in TRAINING_SYMBOLS if not hasattr(capi, s)]
    if missing:
        raise EnvironmentProblem(
            f"the installed onnxruntime {version} is not the training build (its native "
            f"library lacks {', '.join(missing)}: plain onnxruntime installed over "
            f"onnxruntime-training-cpu?); {_repair()}"
        )


def load() -> Ort:
    """Import and return the runtime's training API; raise EnvironmentProblem if unusable."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    if not any(n in env.TRAINING_DISTRIBUTIONS for n, _ in env.installed_ort_distributions()):
        raise EnvironmentProblem(env.training_unavailable_reason())
    ort = env.import_ort("training")
    try:
        capi = importlib.import_module("onnxruntime.capi._pybind_state")
    except ImportError as e:
        raise EnvironmentProblem(f"onnxruntime cannot be imported ({e}); {_repair()}") from e
    check_training_build(capi, getattr(ort, "__version__", "?"))
    try:
        api = importlib.import_module("onnxruntime.training.api")
        onnxblock = importlib.import_module("onnxruntime.training.onnxblock")
    except (ImportError, AttributeError) as e:
        raise EnvironmentProblem(
            f"onnxruntime training API cannot be imported ({e}); {_repair()}"
        ) from e
    _LOADED = Ort(ort=ort, api=api, onnxblock=onnxblock, capi=capi)
    return _LOADED


def artifacts_module() -> Any:
    """``onnxruntime.training.artifacts`` (torch-free through the shim)."""
    load()
    try:
        return importlib.import_module("onnxruntime.training.artifacts")
    except ImportError as e:
        raise EnvironmentProblem(
            f"onnxruntime.training.artifacts: {e}; {_repair()}"
        ) from e
