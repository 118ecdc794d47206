"""Reference networks as ONNX models (installed as ``onnx_ssl.models``).

Every builder has the signature ``NAME(batch: int = 1, seed: int = 0) -> onnx.ModelProto``
and returns a checked float32 model with static shapes (batch included), IR version 10 and
default-domain opset 17.  The graph input is ``"input"``; the output is ``"logits"`` for
classifiers and ``"output"`` otherwise.  Weights are deterministic functions of ``seed``.

* From Wen et al. 2016, "Learning Structured Sparsity in Deep Neural Networks":
  ``lenet``, ``mlp``, ``cifar_convnet``, ``resnet20``, ``resnet32``, ``resnet56``,
  ``alexnet`` and ``caffenet``.
* ``syn_*``: small synthetic graphs, each exercising one graph pattern of channel pruning;
  the ``syn_block_*`` ones contain a pattern that must block pruning.

>>> from onnx_ssl import models
>>> model = models.build("resnet20", batch=8, seed=1)
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from . import alexnet as _alexnet
from . import classic as _classic
from . import resnet as _resnet
from . import synthetic as _syn

__all__ = ["MODELS", "build", "names"]

MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "lenet": _classic.lenet,
    "mlp": _classic.mlp,
    "cifar_convnet": _classic.cifar_convnet,
    "resnet20": _resnet.resnet20,
    "resnet32": _resnet.resnet32,
    "resnet56": _resnet.resnet56,
    "alexnet": _alexnet.alexnet,
    "caffenet": _alexnet.caffenet,
    "syn_concat": _syn.syn_concat,
    "syn_split": _syn.syn_split,
    "syn_slice": _syn.syn_slice,
    "syn_depthwise": _syn.syn_depthwise,
    "syn_depthwise_mult": _syn.syn_depthwise_mult,
    "syn_grouped": _syn.syn_grouped,
    "syn_se": _syn.syn_se,
    "syn_flatten_fc": _syn.syn_flatten_fc,
    "syn_reshape_fc": _syn.syn_reshape_fc,
    "syn_transpose": _syn.syn_transpose,
    "syn_residual": _syn.syn_residual,
    "syn_constant_nodes": _syn.syn_constant_nodes,
    "syn_same_pad": _syn.syn_same_pad,
    "syn_padded_const": _syn.syn_padded_const,
    "syn_block_output": _syn.syn_block_output,
    "syn_block_layernorm": _syn.syn_block_layernorm,
    "syn_block_reshape_split": _syn.syn_block_reshape_split,
    "syn_block_shared_weight": _syn.syn_block_shared_weight,
    "syn_block_unknown_op": _syn.syn_block_unknown_op,
    "syn_mlp_input_gather": _syn.syn_mlp_input_gather,
}


def names() -> list[str]:
    """Names of all registered models, in registry order."""
    return list(MODELS)


def build(name: str, **kwargs: object) -> onnx.ModelProto:
    """Build the model registered as ``name`` (``batch=``, ``seed=`` ... are passed on).

    Raises ``KeyError`` listing the known names when ``name`` is not registered.
    """
    try:
        builder = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}") from None
    return builder(**kwargs)
