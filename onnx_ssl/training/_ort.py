"""Import the onnxruntime-training API without importing torch.

``import onnxruntime`` from the ``onnxruntime-training-cpu`` 1.19.2 wheel runs
``onnxruntime.capi.onnxruntime_validation``, which imports ``onnxruntime.training.ortmodule``;
that and ``onnxruntime/training/__init__.py`` (through ``onnxruntime.tools``) import torch,
about 1 GB and a second or more, although the on-device training API
(``onnxruntime.training.api``, ``onnxruntime.training.onnxblock``,
``onnxruntime.training.artifacts``) does not use it.

:func:`install_shim` registers bare package objects for ``onnxruntime.training`` and
``onnxruntime.tools`` (with the right ``__path__``, so their submodules import normally but
their ``__init__`` files do not run) and hides ``ortmodule`` while ``onnxruntime`` itself is
imported. It does nothing when torch or onnxruntime is already imported (then there is
nothing left to save). :func:`load` returns the modules and checks that the native library is
the training build: a plain ``onnxruntime`` wheel installed over ``onnxruntime-training-cpu``
replaces the native library with one that lacks the training symbols, which would otherwise
fail much later with an obscure ``AttributeError``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnx_ssl.errors import EnvironmentProblem

log = logging.getLogger(__name__)

REPAIR = (
    "pip uninstall -y onnxruntime onnxruntime-training-cpu && "
    "pip install onnxruntime-training-cpu==1.19.2"
)
# Native symbols that only the training build of the runtime has.
TRAINING_SYMBOLS = ("Module", "CheckpointState", "GradientGraphBuilder", "save_checkpoint")
_BARE_PACKAGES = ("training", "tools")


@dataclass(frozen=True)
class Ort:
    """The imported runtime modules."""

    ort: Any  # onnxruntime
    api: Any  # onnxruntime.training.api
    onnxblock: Any  # onnxruntime.training.onnxblock
    capi: Any  # onnxruntime.capi._pybind_state


_LOADED: Ort | None = None


def _bare_package(name: str, path: Path) -> types.ModuleType:
    mod = types.ModuleType(name, f"{name} (bare package registered by onnx_ssl: __init__ skipped)")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    mod.__spec__ = spec
    mod.__path__ = [str(path)]
    mod.__package__ = name
    return mod


def install_shim() -> bool:
    """Arrange for ``import onnxruntime`` not to import torch. Returns True if installed.

    Cheap and idempotent; safe to call before anything imports onnxruntime.
    """
    if "torch" in sys.modules or "onnxruntime" in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(next(iter(spec.submodule_search_locations)))
    registered: dict[str, types.ModuleType] = {}
    for sub in _BARE_PACKAGES:
        name = f"onnxruntime.{sub}"
        if name in sys.modules or not (root / sub).is_dir():
            continue
        registered[sub] = sys.modules[name] = _bare_package(name, root / sub)
    sentinel = "onnxruntime.training.ortmodule"
    hid = sentinel not in sys.modules
    if hid:
        # None in sys.modules makes `import onnxruntime.training.ortmodule` raise ImportError,
        # which onnxruntime's validation treats as "no ORTModule" and moves on.
        sys.modules[sentinel] = None  # type: ignore[assignment]
    try:
        import onnxruntime
    except ImportError:
        for sub in registered:
            sys.modules.pop(f"onnxruntime.{sub}", None)
        return False
    finally:
        if hid and sys.modules.get(sentinel, 0) is None:
            del sys.modules[sentinel]
    for sub, mod in registered.items():
        setattr(onnxruntime, sub, mod)
    log.debug("onnxruntime imported without torch (bare %s)", ", ".join(registered))
    return True


def check_training_build(capi: Any, version: str) -> None:
    """Raise EnvironmentProblem unless ``capi`` (the native module) has the training API."""
    missing = [s for s in TRAINING_SYMBOLS if not hasattr(capi, s)]
    if missing:
        raise EnvironmentProblem(
            f"the installed onnxruntime {version} is not the training build (its native "
            f"library lacks {', '.join(missing)}: plain onnxruntime installed over "
            f"onnxruntime-training-cpu?); repair with: {REPAIR}"
        )


def load() -> Ort:
    """Import and return the runtime's training API; raise EnvironmentProblem if unusable."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    install_shim()
    try:
        ort = importlib.import_module("onnxruntime")
        capi = importlib.import_module("onnxruntime.capi._pybind_state")
    except ImportError as e:
        raise EnvironmentProblem(
            f"onnxruntime cannot be imported ({e}); repair with: {REPAIR}"
        ) from e
    check_training_build(capi, getattr(ort, "__version__", "?"))
    try:
        api = importlib.import_module("onnxruntime.training.api")
        onnxblock = importlib.import_module("onnxruntime.training.onnxblock")
    except (ImportError, AttributeError) as e:
        raise EnvironmentProblem(
            f"onnxruntime training API cannot be imported ({e}); repair with: {REPAIR}"
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
            f"onnxruntime.training.artifacts: {e}; repair with: {REPAIR}"
        ) from e
