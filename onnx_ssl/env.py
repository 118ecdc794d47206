"""Which ONNX Runtime this environment holds, importing it, and what it and onnx can run.

onnx-ssl runs beside whichever single ONNX Runtime distribution the user deploys on:
``onnxruntime`` (CPU), ``onnxruntime-gpu`` (CUDA), or a training build
(``onnxruntime-training-cpu`` / ``onnxruntime-training``), which training needs. All of them
install the same ``onnxruntime`` module, so two of them overwrite each other's files and
break both; :func:`check_runtime_environment` detects that and gives advice that keeps the
runtime the user chose (training goes into an environment of its own).

Nothing here is a constant about a runtime version: :func:`runtime_limits` asks the installed
runtime which IR versions and opsets it loads (a few tiny sessions, cached per process), and
:func:`onnx_limits` reads the installed ``onnx``.

``import onnxruntime`` from the training wheel imports torch (about 1 GB) through
``onnxruntime.capi.onnxruntime_validation`` -> ``onnxruntime.training.ortmodule`` and
``onnxruntime/training/__init__.py``, although neither inference nor the on-device training
API uses it. :func:`install_shim` registers bare package objects for ``onnxruntime.training``
and ``onnxruntime.tools`` (with the right ``__path__``, so that their submodules import
normally but their ``__init__`` files do not run) and hides ``ortmodule`` while
``onnxruntime`` itself is imported. It does nothing when torch or onnxruntime is already
imported, and nothing visible for the plain inference wheels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import sys
import types
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import EnvironmentProblem, one_line

log = logging.getLogger(__name__)

# Every distribution that installs the top-level ``onnxruntime`` module.
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-training",
    "onnxruntime-training-cpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "ort-nightly",
    "ort-nightly-gpu",
)
TRAINING_DISTRIBUTIONS = ("onnxruntime-training", "onnxruntime-training-cpu")
# onnxruntime-training's last release is 1.19.2 (September 2024), with wheels for 3.10-3.12.
TRAINING_PYTHONS = ((3, 10), (3, 12))


def checkout_dir() -> Path | None:
    """The onnx-ssl checkout this package was installed from, or None when it is not known.

    onnx-ssl is on no package registry, so every install comes from a checkout: the folder
    above the package when it holds onnx-ssl's ``pyproject.toml`` (an editable install, or a
    run from the clone), else the local folder a plain ``pip install DIR`` recorded in its
    ``direct_url.json``.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        project = root / "pyproject.toml"
        if project.is_file() and 'name = "onnx-ssl"' in project.read_text(encoding="utf-8"):
            return root
    except OSError:
        pass
    try:
        raw = metadata.distribution("onnx-ssl").read_text("direct_url.json")
        url = json.loads(raw)["url"] if raw else ""
    except (metadata.PackageNotFoundError, ValueError, KeyError, TypeError):
        return None
    if url.startswith("file://") and Path(url[len("file://"):]).is_dir():
        return Path(url[len("file://"):])
    return None


def pip_install(extras: str) -> str:
    """The pip command that adds onnx-ssl's ``extras`` (``"train"``, ``"cpu,dev"``), from the
    checkout it was installed from."""
    root = checkout_dir()
    if root is None:
        return f"pip install -e '.[{extras}]' (from your onnx-ssl checkout)"
    return f"pip install -e '{root}[{extras}]'"


def install_hint() -> str:
    """How to install a runtime with one of the extras that pick one (pyproject.toml)."""
    return (f"{pip_install('cpu')} (or the [gpu] extra for CUDA, or [train] in an environment "
            f"of its own for training)")


def train_venv_hint() -> str:
    """How to make an environment of its own for training."""
    return f"python3.12 -m venv .venv-train && .venv-train/bin/{pip_install('train')}"


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def installed_ort_distributions() -> list[tuple[str, str]]:
    """(name, version) of every installed distribution that provides ``onnxruntime``."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = _normalise(dist.metadata["Name"] or "")
        if name in ORT_DISTRIBUTIONS:
            found[name] = dist.version
    return sorted(found.items())


def mix_advice(dists: list[tuple[str, str]]) -> str:
    """How to repair two runtimes in one environment, keeping the one the user chose.

    A training build beside an inference build was almost always added by something else
    (onnx-ssl <= 0.1 depended on it): keep the inference build and move training to an
    environment of its own. Of two inference builds, keep the GPU one.
    """
    names = [n for n, _ in dists]
    versions = dict(dists)
    inference = [n for n in names if n not in TRAINING_DISTRIBUTIONS]
    if inference:
        keep = next((n for n in inference if "gpu" in n), inference[0])
    else:
        keep = names[0]
    others = " ".join(n for n in names if n != keep)
    advice = (f"keep {keep} {versions[keep]}: pip uninstall -y {others} {keep} && "
              f"pip install {keep}=={versions[keep]}")
    if keep not in TRAINING_DISTRIBUTIONS and any(n in TRAINING_DISTRIBUTIONS for n in names):
        advice += f"; train in an environment of its own: {train_venv_hint()}"
    return advice


def check_runtime_environment() -> list[tuple[str, str]]:
    """The (name, version) of the one ONNX Runtime distribution installed, or none; raise
    EnvironmentProblem when several share the module.

    No runtime at all is not a problem here: ``analyze`` needs none, and the commands that do
    say which extra to install when they import it (:func:`import_ort`).
    """
    dists = installed_ort_distributions()
    if len(dists) > 1:
        listed = ", ".join(f"{n}=={v}" for n, v in dists)
        raise EnvironmentProblem(
            f"several ONNX Runtime distributions are installed ({listed}); they overwrite "
            f"each other's files in the one 'onnxruntime' module and break both; "
            f"{mix_advice(dists)}")
    return dists


def has_ort() -> bool:
    """Whether an ``onnxruntime`` module can be found (without importing it)."""
    if "onnxruntime" in sys.modules:
        mod = sys.modules["onnxruntime"]
        return mod is not None and not getattr(mod, "__onnx_ssl_stand_in__", False)
    try:
        return importlib.util.find_spec("onnxruntime") is not None
    except (ImportError, ValueError):
        return False


def _bare_package(name: str, path: Path) -> types.ModuleType:
    mod = types.ModuleType(name, f"{name} (bare package registered by onnx_ssl: __init__ skipped)")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    mod.__spec__ = spec
    mod.__path__ = [str(path)]
    mod.__package__ = name
    return mod


_BARE_PACKAGES = ("training", "tools")


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
    if not (root / "training").is_dir():
        return False  # an inference build: its import does not reach torch
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


# The module once the environment check passed and it imported: the check reads every
# installed distribution's metadata (about 50 ms), too slow to repeat for each session.
_IMPORTED: Any = None


def import_ort(purpose: str = "this command") -> Any:
    """Import ``onnxruntime`` (torch-free); a one-line EnvironmentProblem if it cannot be.

    ``purpose`` names what needs the runtime, for the message. The environment is checked
    once per process (again only if ``onnxruntime`` was replaced in ``sys.modules``).
    """
    global _IMPORTED
    if _IMPORTED is not None and sys.modules.get("onnxruntime") is _IMPORTED:
        return _IMPORTED
    check_runtime_environment()
    if not has_ort():
        raise EnvironmentProblem(f"{purpose} needs ONNX Runtime, and none is installed: "
                                 f"{install_hint()}")
    install_shim()
    try:
        _IMPORTED = importlib.import_module("onnxruntime")
    except ImportError as e:
        raise EnvironmentProblem(
            f"onnxruntime cannot be imported ({one_line(e)}); reinstall the one "
            f"runtime you use, for example: pip install --force-reinstall onnxruntime") from e
    return _IMPORTED


@dataclass(frozen=True)
class Limits:
    """What a library reads or runs: the newest IR version and default-domain opset."""

    name: str
    version: str
    max_ir: int
    max_opset: int

    def describe(self) -> str:
        return f"{self.name} {self.version} (IR <= {self.max_ir}, opset <= {self.max_opset})"


@functools.cache
def onnx_limits() -> Limits:
    """What the installed ``onnx`` reads (its newest IR version and opset)."""
    import onnx

    return Limits("onnx", onnx.__version__, onnx.IR_VERSION, onnx.defs.onnx_opset_version())


def _probe_model(ir: int, opset: int) -> bytes:
    import onnx.parser

    m = onnx.parser.parse_model(
        f'<ir_version: {ir}, opset_import: ["" : {opset}]>\n'
        "probe (float[2] x) => (float[2] y) { y = Relu(x) }")
    return bytes(m.SerializeToString())


@functools.cache
def runtime_limits() -> Limits:
    """What the installed ONNX Runtime loads, asked of it with tiny one-node models.

    ORT refuses a model whose IR version or default-domain opset is newer than it knows, at
    load time; each probe is a session of one Relu (about 2 ms).
    """
    rt = import_ort()
    so = rt.SessionOptions()
    so.log_severity_level = 4

    def loads(ir: int, opset: int) -> bool:
        try:
            rt.InferenceSession(_probe_model(ir, opset), so, providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime raises its own exception types
            return False
        return True

    top = onnx_limits()
    base_opset = 13  # every runtime onnx-ssl supports (ORT >= 1.17) runs opset 13, IR 7
    max_ir = next((ir for ir in range(top.max_ir, 6, -1) if loads(ir, base_opset)), 7)
    max_opset = next((o for o in range(top.max_opset, base_opset, -1) if loads(max_ir, o)),
                     base_opset)
    dists = installed_ort_distributions()
    name = dists[0][0] if len(dists) == 1 else "onnxruntime"
    return Limits(name, getattr(rt, "__version__", "?"), max_ir, max_opset)


def supports_training_python(version: tuple[int, int] | None = None) -> bool:
    v = version or (sys.version_info.major, sys.version_info.minor)
    return TRAINING_PYTHONS[0] <= v <= TRAINING_PYTHONS[1]


def training_unavailable_reason(version: tuple[int, int] | None = None) -> str:
    """Why training cannot run here, as one line with the fix (for a missing training build)."""
    v = version or (sys.version_info.major, sys.version_info.minor)
    if not supports_training_python(v):
        return (f"training needs onnxruntime-training, whose last release (1.19.2, September "
                f"2024) has wheels for Python 3.10 to 3.12 only, and this is Python "
                f"{v[0]}.{v[1]}; create an environment of its own: {train_venv_hint()}")
    dists = installed_ort_distributions()
    have = (f"this environment has {dists[0][0]} {dists[0][1]}, an inference build"
            if dists else "this environment has no ONNX Runtime")
    return (f"training needs onnxruntime-training and {have}; install onnx-ssl's [train] "
            f"extra in an environment of its own (keeping your runtime here): "
            f"{train_venv_hint()}")
