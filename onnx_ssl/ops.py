"""The shape of one entry of the op table (:data:`onnx_ssl.rules.RULES`) and the per-op
functions its entries name, other than the channel flows (those are in :mod:`onnx_ssl.rules`).

An :class:`OpRule` holds everything the project knows about one ONNX op type:

* ``flow``: how the op moves channels from inputs to outputs (a handler, called by the
  analysis with the engine, the node and the rule);
* ``rewrite``: how the op is rewritten when channels of a tensor it reads or writes are
  removed (Split sizes, Slice bounds, Reshape targets, Resize sizes, depthwise ``group``), or
  None when slicing its constants is all it needs;
* ``layer``: for a parameterised layer (Conv, ConvTranspose, Gemm, MatMul), its
  :class:`LayerSlots`: which input is the weight and which the bias, the weight's out and in
  axes, the channel axis of its activations, its MACs and whether training groups treat it
  as a convolution or a fully connected layer;
* ``out_params`` / ``stat_params``: per-channel parameter inputs (norm scales and shifts,
  running statistics), ``trained`` / ``trained_operands``: the inputs whose float
  initializer training updates by gradient;
* ``creates_from``: the input whose ``out`` members are the only data of the channels the
  op creates (a layer's weight, an embedding's table);
* ``training_lowering``: the exact composition that training uses instead of the op where
  onnxruntime-training 1.19.2 has no gradient for it (:mod:`onnx_ssl.decompositions`).

Adding an op means adding one entry to :data:`onnx_ssl.rules.RULES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_graphsurgeon as gs

from .graphutil import unique_name

if TYPE_CHECKING:
    from .channels import Engine
    from .decompositions import Lowering

Shape = tuple[int, ...]
# The positions deleted from each activation: tensor name -> (axis, positions).
Deletions = dict[str, tuple[int, set[int]]]
Rewrite = Callable[[gs.Graph, gs.Node, Deletions], None]


def _prod(shape: Shape) -> int:
    return int(np.prod(shape))


@dataclass(frozen=True)
class LayerSlots:
    """A parameterised layer's slots: input ``weight`` holds the weight (out and in axes given
    by ``axes``), input ``bias`` the bias added per output channel (None: the op has none).

    ``grouped`` is the weight axis that holds one group's channels (Conv ``[C_out, C_in/g,
    ...]``: "in"; ConvTranspose ``[C_in, C_out/g, ...]``: "out"). ``activation_axis`` maps the
    rank of an input or output activation to its channel axis. ``macs`` maps the node, the
    weight shape and the static input and output shapes (None when unknown) to the
    multiply-accumulates of one run. ``kind`` is what training groups treat it as.
    """

    kind: Literal["conv", "fc"]
    axes: Callable[[gs.Node], tuple[int, int]]
    macs: Callable[[gs.Node, Shape, Shape | None, Shape | None], int]
    activation_axis: Callable[[int], int]
    weight: int = 1
    bias: int | None = 2
    grouped: Literal["in", "out"] = "in"
    weight_ndim: int | None = None  # the only weight rank the op is a layer with
    depthwise: Callable[[gs.Node], bool] = lambda node: False

    def out_axis(self, node: gs.Node) -> int:
        return self.axes(node)[0]

    def filters(self, weight_shape: Shape, out_axis: int, groups: int) -> int:
        """Output channels of a layer with this weight (over all groups)."""
        return weight_shape[out_axis] * (groups if self.grouped == "out" else 1)

    def channels(self, weight_shape: Shape, in_axis: int, groups: int) -> int:
        """Input channels of a layer with this weight (over all groups)."""
        return weight_shape[in_axis] * (groups if self.grouped == "in" else 1)


@dataclass(frozen=True)
class OpRule:
    # How channels flow: a handler of :mod:`onnx_ssl.rules` (flow_unary, flow_conv, ...).
    flow: Callable[[Engine, gs.Node, OpRule], None]
    # Inputs that are per-channel parameters: "out" members (penalised) and "stat" members.
    out_params: tuple[int, ...] = ()
    stat_params: tuple[int, ...] = ()
    # Extra outputs that must be unused for the channels to stay prunable.
    aux_outputs_unused: bool = False
    note: str = ""
    # For blocking rules: the output keeps input 0's (blocked) layout (shape-preserving ops).
    passthrough: bool = False
    # How the op is rewritten when channels go (None: slicing its members is all).
    rewrite: Rewrite | None = None
    # A parameterised layer's weight and bias slots, axes and MACs.
    layer: LayerSlots | None = None
    # Inputs whose float initializer is a trainable parameter; ``trained_operands``: any
    # float initializer operand with more than one element is one (a bias, a per-channel
    # scale; scalars are constants of a formula, such as GELU's 0.5).
    trained: tuple[int, ...] = ()
    trained_operands: bool = False
    # The input whose "out" members are the only data of the channels the op creates.
    creates_from: int | None = None
    # The exact composition training uses where ONNX Runtime 1.19.2 has no gradient.
    training_lowering: Lowering | None = None


# --- layers --------------------------------------------------------------------------------


def _conv_macs(node: gs.Node, w: Shape, x: Shape | None, y: Shape | None) -> int:
    return _prod(y) * _prod(w[1:]) if y else 0


def _conv_transpose_macs(node: gs.Node, w: Shape, x: Shape | None, y: Shape | None) -> int:
    return _prod(x) * _prod(w[1:]) if x else 0


def _gemm_axes(node: gs.Node) -> tuple[int, int]:
    """(out axis, in axis) of a Gemm's weight B: [K, N], or [N, K] with ``transB``."""
    return (0, 1) if int(node.attrs.get("transB", 0)) else (1, 0)


def _gemm_macs(node: gs.Node, w: Shape, x: Shape | None, y: Shape | None) -> int:
    return _prod(y) * int(w[_gemm_axes(node)[1]]) if y else 0


def _matmul_macs(node: gs.Node, w: Shape, x: Shape | None, y: Shape | None) -> int:
    return _prod(y) * int(w[0]) if y else 0


def _is_depthwise(node: gs.Node) -> bool:
    """Conv with one input channel per group: output channel j reads input channel
    j // multiplier only (a per-channel op)."""
    return int(node.attrs.get("group", 1)) > 1 and (
        np.asarray(node.inputs[1].values).shape[1] == 1)


CONV = LayerSlots("conv", axes=lambda node: (0, 1), macs=_conv_macs,
                  activation_axis=lambda r: 1, depthwise=_is_depthwise)
CONV_TRANSPOSE = LayerSlots("conv", axes=lambda node: (1, 0), macs=_conv_transpose_macs,
                            activation_axis=lambda r: 1, grouped="out")
GEMM = LayerSlots("fc", axes=_gemm_axes, macs=_gemm_macs, activation_axis=lambda r: 1)
MATMUL = LayerSlots("fc", axes=lambda node: (1, 0), macs=_matmul_macs,
                    activation_axis=lambda r: r - 1, bias=None, weight_ndim=2)


# --- rewrites when channels go -------------------------------------------------------------


def rewrite_split(graph: gs.Graph, node: gs.Node, deletions: Deletions) -> None:
    """Split along the channel axis: each output's size loses its deleted positions."""
    d = deletions.get(node.inputs[0].name)
    if d is None:
        return
    axis, pos = d
    if int(node.attrs.get("axis", 0)) % len(node.inputs[0].shape) != axis:
        return
    sizes = []
    lo = 0
    for out in node.outputs:
        n = out.shape[axis]
        sizes.append(n - sum(1 for p in pos if lo <= p < lo + n))
        lo += n
    arr = np.array(sizes, dtype=np.int64)
    if len(node.inputs) > 1 and node.inputs[1].name:
        node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}.split"), arr)
    else:
        node.attrs.pop("num_outputs", None)
        if graph.opset and graph.opset >= 13:
            node.inputs.append(gs.Constant(unique_name(graph, f"{node.name}.split"), arr))
        else:
            node.attrs["split"] = sizes


def rewrite_slice(graph: gs.Graph, node: gs.Node, deletions: Deletions) -> None:
    """Slice of the channel axis: the bounds shift by the deleted positions before them."""
    d = deletions.get(node.inputs[0].name)
    if d is None:
        return
    axis, pos = d
    r = len(node.inputs[0].shape)
    size = node.inputs[0].shape[axis]
    starts = [int(v) for v in np.asarray(node.inputs[1].values)]
    ends = [int(v) for v in np.asarray(node.inputs[2].values)]
    axes = ([int(v) for v in np.asarray(node.inputs[3].values)]
            if len(node.inputs) > 3 and node.inputs[3].name else list(range(len(starts))))
    axes = [a + r if a < 0 else a for a in axes]
    if axis not in axes:
        return
    k = axes.index(axis)
    lo = min(size, max(0, starts[k] + size if starts[k] < 0 else starts[k]))
    hi = min(size, max(0, ends[k] + size if ends[k] < 0 else ends[k]))
    starts[k] = lo - sum(1 for p in pos if p < lo)
    ends[k] = hi - sum(1 for p in pos if p < hi)
    node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}.starts"),
                                 np.array(starts, dtype=np.int64))
    node.inputs[2] = gs.Constant(unique_name(graph, f"{node.name}.ends"),
                                 np.array(ends, dtype=np.int64))


def rewrite_reshape(graph: gs.Graph, node: gs.Node, deletions: Deletions) -> None:
    """Reshape: a static target size on the output's channel axis loses the deleted count."""
    d = deletions.get(node.outputs[0].name)
    if d is None:
        return
    axis, pos = d
    target = np.asarray(node.inputs[1].values).astype(np.int64).copy()
    if target[axis] > 0:
        target[axis] -= len(pos)
        node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}.shape"), target)


def rewrite_resize(graph: gs.Graph, node: gs.Node, deletions: Deletions) -> None:
    """Resize with ``sizes``: the output's channel count loses the deleted count."""
    d = deletions.get(node.outputs[0].name)
    if d is None or len(node.inputs) < 4 or not node.inputs[3].name:
        return
    axis, pos = d
    new_sizes = np.asarray(node.inputs[3].values).astype(np.int64).copy()
    new_sizes[axis] -= len(pos)
    node.inputs[3] = gs.Constant(unique_name(graph, f"{node.name}.sizes"), new_sizes)


def rewrite_conv(graph: gs.Graph, node: gs.Node, deletions: Deletions) -> None:
    """Depthwise Conv: ``group`` (one per input channel) loses the deleted input channels."""
    if int(node.attrs.get("group", 1)) <= 1 or not _is_depthwise(node):
        return
    d = deletions.get(node.inputs[0].name)
    if d is not None:
        node.attrs["group"] = int(node.attrs["group"]) - len(d[1])
