"""Detect a broken ONNX Runtime installation (two distributions sharing one module)."""

from __future__ import annotations

from importlib import metadata

from .errors import EnvironmentProblem

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
EXPECTED = "onnxruntime-training-cpu"
EXPECTED_VERSION = "1.19.2"


def installed_ort_distributions() -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in ORT_DISTRIBUTIONS:
            found[name] = dist.version
    return sorted(found.items())


def check_runtime_environment() -> None:
    """Raise EnvironmentProblem when zero or several ONNX Runtime distributions are present."""
    dists = installed_ort_distributions()
    names = [n for n, _ in dists]
    repair = (f"repair with: pip uninstall -y {' '.join(names) or 'onnxruntime'} && "
              f"pip install {EXPECTED}=={EXPECTED_VERSION}")
    if len(dists) > 1:
        listed = ", ".join(f"{n}=={v}" for n, v in dists)
        raise EnvironmentProblem(
            f"several ONNX Runtime distributions are installed ({listed}); they overwrite "
            f"each other's files and break onnxruntime.training; {repair}")
    if not dists:
        raise EnvironmentProblem(f"no ONNX Runtime distribution is installed; {repair}")
