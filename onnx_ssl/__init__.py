"""onnx-ssl: Structured Sparsity Learning (group Lasso) for ONNX models.

The Python API mirrors the command line::

    import onnx_ssl
    model = onnx_ssl.load_model("model.onnx")
    analysis = onnx_ssl.analyze(model)             # channel spaces and SSL groups
    result = onnx_ssl.prune(model, threshold=1e-3)  # smaller model, same outputs
    onnx_ssl.save_model(result.model, "small.onnx")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .analysis import analyze, format_table, prepare
from .errors import OnnxSslError
from .groups import Analysis, Group, Member, Space
from .io import load_model, save_model

if TYPE_CHECKING:
    from .compiler import PruneResult

__all__ = [
    "Analysis",
    "Group",
    "Member",
    "OnnxSslError",
    "Space",
    "analyze",
    "format_table",
    "load_model",
    "prepare",
    "prune",
    "save_model",
]


def prune(model: Any, **kwargs: Any) -> PruneResult:
    """Remove zero groups; see :func:`onnx_ssl.compiler.prune`."""
    from .compiler import prune as _prune

    return _prune(model, **kwargs)
