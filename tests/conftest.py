"""Test set-up: which tests this environment can run.

The compiler's tests run with any single ONNX Runtime (or, where marked, none); the training
tests (``test_training_*.py`` and tests marked ``training``) need onnxruntime-training
(the ``[train]`` extra, Python 3.10 to 3.12) and skip without it, giving the reason. CI sets
``$ONNX_SSL_REQUIRE_TRAINING`` in its training environment, where a skip would hide a broken
install, so that they fail instead.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from onnx_ssl import env


def _training_available() -> bool:
    return env.supports_training_python() and any(
        n in env.TRAINING_DISTRIBUTIONS for n, _ in env.installed_ort_distributions())


TRAINING = _training_available() or bool(os.environ.get("ONNX_SSL_REQUIRE_TRAINING"))
# Without a training build the training test modules are not even imported (they load
# training data at import time, and scikit-learn belongs to the [train] extra too).
collect_ignore_glob = [] if TRAINING else ["test_training_*.py"]


def pytest_report_header(config: pytest.Config) -> str:
    runtime = ", ".join(f"{n} {v}" for n, v in env.installed_ort_distributions()) or "none"
    line = f"onnx-ssl: ONNX Runtime: {runtime}"
    if not TRAINING:
        line += f"\nonnx-ssl: training tests not collected: {env.training_unavailable_reason()}"
    return line


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "training: needs onnxruntime-training (the [train] extra)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TRAINING:
        return
    skip = pytest.mark.skip(reason=env.training_unavailable_reason())
    for item in items:
        if item.path.name.startswith("test_training_") or item.get_closest_marker("training"):
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
