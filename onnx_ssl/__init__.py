"""onnx-ssl: Structured Sparsity Learning (group Lasso) for ONNX models.

The Python API mirrors the command line; ``__all__`` is the public API::

    import onnx_ssl
    model = onnx_ssl.load_model("model.onnx")
    analysis = onnx_ssl.analyze(model)             # channel spaces and SSL groups
    result = onnx_ssl.prune(model, threshold=1e-3)  # smaller model, same outputs
    onnx_ssl.save_model(result.model, "small.onnx")
    print(onnx_ssl.benchmark([("before", model), ("after", result.model)]).to_text())
    older = onnx_ssl.convert_opset(model, 17)

Training is in :mod:`onnx_ssl.training`. The commands that need ONNX Runtime import it
when they run, so ``import onnx_ssl`` works without one.
"""

# No ``from __future__ import annotations`` and no module-level ``typing`` names here: every
# name this module binds is part of what ``dir(onnx_ssl)`` shows.
import typing as _typing

__version__ = "0.1.0"

from .analysis import analyze, format_table, prepare
from .errors import OnnxSslError
from .groups import Analysis, Group, Member, Space
from .io import convert_opset, load_model, save_model

if _typing.TYPE_CHECKING:
    from collections.abc import Sequence

    from .bench import BenchReport
    from .compiler import PruneResult
    from .io import ModelProto

__all__ = [
    "Analysis",
    "Group",
    "Member",
    "OnnxSslError",
    "Space",
    "analyze",
    "benchmark",
    "convert_opset",
    "format_table",
    "load_model",
    "prepare",
    "prune",
    "save_model",
]


def prune(model: "ModelProto", **kwargs: _typing.Any) -> "PruneResult":
    """Remove zero groups; see :func:`onnx_ssl.compiler.prune`."""
    from .compiler import prune as _prune

    return _prune(model, **kwargs)


def benchmark(models: "Sequence[tuple[str, ModelProto]]", provider: str = "cpu",
              iters: int = 20, **kwargs: _typing.Any) -> "BenchReport":
    """Time models on ONNX Runtime against their MAC bound (``onnx-ssl bench``); see
    :func:`onnx_ssl.bench.benchmark`."""
    from .bench import benchmark as _benchmark

    return _benchmark(models, provider, iters, **kwargs)
