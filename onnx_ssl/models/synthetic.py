"""Small synthetic graphs, one per graph pattern a channel-pruning pass has to handle.

All take ``[N,3,16,16]`` images (``syn_mlp_input_gather``: ``[N,64]`` features), have a few
channels, and run in ONNX Runtime.  The ``syn_block_*`` graphs are valid models built
around a pattern that must *block* (not prune) the channels that flow through it.
"""

from __future__ import annotations

import onnx

from ._builder import INT64, GraphBuilder
from .resnet import basic_block

IMAGE = (3, 16, 16)


def _start(name: str, batch: int, seed: int, **kwargs: bool) -> tuple[GraphBuilder, str]:
    g = GraphBuilder(name, seed, **kwargs)
    return g, g.input("input", (batch, *IMAGE))


def syn_concat(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Two convs on the same input, concatenated on the channel axis, then a conv."""
    g, x = _start("syn_concat", batch, seed)
    a = g.relu(g.conv(x, 4, 3, pad=1, name="branch_a"), name="relu_a")
    b = g.relu(g.conv(x, 6, 1, name="branch_b"), name="relu_b")
    y = g.concat([a, b], axis=1, name="concat")
    y = g.conv(y, 4, 3, pad=1, name="conv_out")
    return g.build({"output": y})


def _split_merge(name: str, batch: int, seed: int, *, use_slice: bool) -> onnx.ModelProto:
    g, x = _start(name, batch, seed)
    x = g.relu(g.conv(x, 8, 3, pad=1, name="conv1"), name="relu1")
    if use_slice:
        a = g.slice(x, 0, 3, axis=1, name="slice_a")
        b = g.slice(x, 3, 8, axis=1, name="slice_b")
    else:
        a, b = g.split(x, [3, 5], axis=1, name="split")
    a = g.relu(g.conv(a, 4, 3, pad=1, name="branch_a"), name="relu_a")
    b = g.relu(g.conv(b, 4, 3, pad=1, name="branch_b"), name="relu_b")
    y = g.concat([a, b], axis=1, name="concat")
    y = g.conv(y, 4, 3, pad=1, name="conv_out")
    return g.build({"output": y})


def syn_split(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv 8 -> Split [3, 5] (sizes as an input tensor) -> conv per branch -> Concat -> conv."""
    return _split_merge("syn_split", batch, seed, use_slice=False)


def syn_slice(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Like ``syn_split`` with two constant-bound ``Slice`` nodes ([0:3] and [3:8])."""
    return _split_merge("syn_slice", batch, seed, use_slice=True)


def _depthwise(name: str, batch: int, seed: int, multiplier: int) -> onnx.ModelProto:
    g, x = _start(name, batch, seed)
    x = g.conv(x, 8, 3, pad=1, bias=False, name="conv1")
    x = g.relu(g.bn(x, name="bn1"), name="relu1")
    c = g.channels(x)
    x = g.conv(x, c * multiplier, 3, pad=1, group=c, bias=False, name="conv_dw")
    x = g.relu(g.bn(x, name="bn_dw"), name="relu_dw")
    x = g.conv(x, 8, 1, name="conv_pw")
    return g.build({"output": x})


def syn_depthwise(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """MobileNet block: conv-BN-Relu -> depthwise 3x3 (group = C) -BN-Relu -> pointwise 1x1."""
    return _depthwise("syn_depthwise", batch, seed, 1)


def syn_depthwise_mult(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Like ``syn_depthwise`` with channel multiplier 2 (group = C_in, C_out = 2 C_in)."""
    return _depthwise("syn_depthwise_mult", batch, seed, 2)


def syn_grouped(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv 8 -> conv 8 3x3 group 2 -> conv 8 3x3 group 4 -> conv 1x1."""
    g, x = _start("syn_grouped", batch, seed)
    x = g.relu(g.conv(x, 8, 3, pad=1, name="conv1"), name="relu1")
    x = g.relu(g.conv(x, 8, 3, pad=1, group=2, name="conv2"), name="relu2")
    x = g.relu(g.conv(x, 8, 3, pad=1, group=4, name="conv3"), name="relu3")
    x = g.conv(x, 4, 1, name="conv4")
    return g.build({"output": x})


def syn_se(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv-BN-Relu -> squeeze-excitation gate multiplied back into the stream -> conv."""
    g, x = _start("syn_se", batch, seed)
    x = g.conv(x, 8, 3, pad=1, name="conv1")
    x = g.relu(g.bn(x, name="bn1"), name="relu1")
    s = g.gap(x, name="se.pool")
    s = g.relu(g.conv(s, 2, 1, name="se.reduce"), name="se.relu")
    s = g.sigmoid(g.conv(s, 8, 1, name="se.expand"), name="se.gate")
    x = g.mul(x, s, name="se.scale")
    x = g.conv(x, 4, 3, pad=1, name="conv2")
    return g.build({"output": x})


def syn_flatten_fc(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv -> Relu -> Flatten -> Gemm -> Relu -> Gemm (channel c owns 64 fc1 inputs)."""
    g, x = _start("syn_flatten_fc", batch, seed)
    x = g.relu(g.conv(x, 4, 3, stride=2, pad=1, name="conv1"), name="relu1")
    x = g.flatten(x, name="flatten")
    x = g.relu(g.gemm(x, 16, name="fc1"), name="relu2")
    x = g.gemm(x, 10, name="fc2")
    return g.build({"logits": x})


def syn_reshape_fc(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Like ``syn_flatten_fc`` with Reshape [N, -1] and MatMul ``[K, M]`` + Add bias."""
    g, x = _start("syn_reshape_fc", batch, seed)
    x = g.relu(g.conv(x, 4, 3, stride=2, pad=1, name="conv1"), name="relu1")
    x = g.reshape(x, [batch, -1], name="reshape")
    x = g.relu(g.matmul_const(x, 16, name="fc1"), name="relu2")
    x = g.matmul_const(x, 10, name="fc2")
    return g.build({"logits": x})


def syn_transpose(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv -> Transpose NHWC -> MatMul [C, C2] + bias -> Transpose NCHW -> conv."""
    g, x = _start("syn_transpose", batch, seed)
    x = g.relu(g.conv(x, 8, 3, pad=1, name="conv1"), name="relu1")
    x = g.transpose(x, [0, 2, 3, 1], name="to_nhwc")
    x = g.matmul_const(x, 12, name="proj")
    x = g.transpose(x, [0, 3, 1, 2], name="to_nchw")
    x = g.relu(x, name="relu2")
    x = g.conv(x, 4, 3, pad=1, name="conv2")
    return g.build({"output": x})


def syn_residual(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Stem -> identity block (8) -> projection block (16, stride 2) -> GAP -> Gemm."""
    g, x = _start("syn_residual", batch, seed)
    x = g.conv(x, 8, 3, pad=1, bias=False, name="conv1")
    x = g.relu(g.bn(x, name="bn1"), name="relu")
    x = basic_block(g, x, 8, 1, "layer1.0")
    x = basic_block(g, x, 16, 2, "layer2.0")
    x = g.flatten(g.gap(x, name="avgpool"), name="flatten")
    x = g.gemm(x, 10, name="fc")
    return g.build({"logits": x})


def syn_constant_nodes(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Small conv net whose weights are ``Constant`` nodes (no initializers at all)."""
    g, x = _start("syn_constant_nodes", batch, seed, weights_as_constants=True)
    x = g.conv(x, 8, 3, pad=1, name="conv1")
    x = g.relu(g.bn(x, name="bn1"), name="relu1")
    x = g.relu(g.conv(x, 8, 3, pad=1, name="conv2"), name="relu2")
    x = g.flatten(g.gap(x, name="avgpool"), name="flatten")
    x = g.gemm(x, 10, name="fc")
    return g.build({"logits": x})


def syn_same_pad(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """TF-style 'same' padding computed in the graph, then a stride-2 conv without pads.

    ``pads = Concat(0, 0, before, 0, 0, after)`` with ``out = ceil(in / s)``,
    ``total = max((out - 1) s + k - in, 0)``, ``before = total // 2`` from
    ``Shape -> Gather(H, W)``; everything is static, so it constant-folds.
    """
    k, s = 3, 2
    g, x = _start("syn_same_pad", batch, seed)
    x = g.relu(g.conv(x, 8, 3, pad=1, name="conv1"), name="relu1")

    p = "same_pad"
    shape = g.op("Shape", [x], (4,), name=f"{p}.shape", dtype=INT64)
    hw = g.op(
        "Gather",
        [shape, g.const_i64(f"{p}.hw_idx", [2, 3])],
        (2,),
        name=f"{p}.hw",
        dtype=INT64,
        axis=0,
    )
    stride = g.const_i64(f"{p}.stride", s)
    out = g.div(
        g.add(hw, g.const_i64(f"{p}.stride_m1", s - 1), name=f"{p}.ceil_num"),
        stride,
        name=f"{p}.out",
    )
    span = g.mul(
        g.sub(out, g.const_i64(f"{p}.one", 1), name=f"{p}.out_m1"), stride, name=f"{p}.span"
    )
    need = g.sub(
        g.add(span, g.const_i64(f"{p}.kernel", k), name=f"{p}.reach"), hw, name=f"{p}.need"
    )
    total = g.max(need, g.const_i64(f"{p}.zero", 0), name=f"{p}.total")
    before = g.div(total, g.const_i64(f"{p}.two", 2), name=f"{p}.before")
    after = g.sub(total, before, name=f"{p}.after")
    zeros = g.const_i64(f"{p}.nc_zeros", [0, 0])
    pads = g.concat([zeros, before, zeros, after], axis=0, name=f"{p}.pads")

    h, w = g.shape(x)[2:]
    static = [0, 0, 0, 0, 0, 0, 0, 0]
    for i, size in enumerate((h, w)):
        tot = max((-(-size // s) - 1) * s + k - size, 0)
        static[2 + i], static[6 + i] = tot // 2, tot - tot // 2
    x = g.pad(x, pads, static, name=p)
    x = g.relu(g.conv(x, 16, k, stride=s, name="conv2"), name="relu2")
    x = g.conv(x, 8, 3, pad=1, name="conv3")
    return g.build({"output": x})


def syn_padded_const(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv-BN-Relu -> padded conv-BN-Relu -> conv 1x1.

    A zeroed conv1 filter still yields the nonzero constant ``relu(bn.bias - ...)`` channel
    in front of the zero-padded conv2, so removing it exactly must account for the borders.
    """
    g, x = _start("syn_padded_const", batch, seed)
    x = g.relu(g.bn(g.conv(x, 8, 3, pad=1, name="conv1"), name="bn1"), name="relu1")
    x = g.relu(g.bn(g.conv(x, 8, 3, pad=1, name="conv2"), name="bn2"), name="relu2")
    x = g.conv(x, 4, 1, name="conv3")
    return g.build({"output": x})


def syn_block_output(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv1's output feeds conv2 and is also the graph output ``features``."""
    g, x = _start("syn_block_output", batch, seed)
    f = g.conv(x, 8, 3, pad=1, name="conv1")
    y = g.relu(g.conv(f, 8, 3, pad=1, name="conv2"), name="relu2")
    y = g.conv(y, 4, 1, name="conv3")
    return g.build({"output": y, "features": f})


def syn_block_layernorm(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv -> Transpose NHWC -> LayerNormalization(axis=-1, over channels) -> NCHW -> conv."""
    g, x = _start("syn_block_layernorm", batch, seed)
    x = g.relu(g.conv(x, 8, 3, pad=1, name="conv1"), name="relu1")
    x = g.transpose(x, [0, 2, 3, 1], name="to_nhwc")
    x = g.layernorm(x, axis=-1, name="ln")
    x = g.transpose(x, [0, 3, 1, 2], name="to_nchw")
    x = g.conv(x, 4, 3, pad=1, name="conv2")
    return g.build({"output": x})


def syn_block_reshape_split(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv 8 -> Reshape [N,2,4,H,W] -> Relu -> Reshape [N,8,H,W] -> conv."""
    g, x = _start("syn_block_reshape_split", batch, seed)
    x = g.conv(x, 8, 3, pad=1, name="conv1")
    n, c, h, w = g.shape(x)
    x = g.reshape(x, [n, 2, c // 2, h, w], name="split_channels")
    x = g.relu(x, name="relu1")
    x = g.reshape(x, [n, c, h, w], name="merge_channels")
    x = g.conv(x, 4, 3, pad=1, name="conv2")
    return g.build({"output": x})


def syn_block_shared_weight(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """One weight ``shared.weight`` used by two convs on different inputs, outputs concatenated."""
    g, x = _start("syn_block_shared_weight", batch, seed)
    a = g.relu(g.conv(x, 8, 3, pad=1, name="conv_a"), name="relu_a")
    b = g.relu(g.conv(x, 8, 1, name="conv_b"), name="relu_b")
    shared = g.param("shared.weight", g.he_normal((8, 8, 3, 3), 8 * 9))
    a = g.conv(a, 8, 3, pad=1, bias=False, name="shared_a", weight=shared)
    b = g.conv(b, 8, 3, pad=1, bias=False, name="shared_b", weight=shared)
    y = g.concat([g.relu(a, name="relu_sa"), g.relu(b, name="relu_sb")], axis=1, name="concat")
    y = g.conv(y, 4, 1, name="conv_out")
    return g.build({"output": y})


def syn_block_unknown_op(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv -> Hardmax(axis=1) -> conv -> DepthToSpace(2) -> conv (channel-mixing ops)."""
    g, x = _start("syn_block_unknown_op", batch, seed)
    x = g.conv(x, 8, 3, pad=1, name="conv1")
    x = g.hardmax(x, axis=1, name="hardmax")
    x = g.conv(x, 8, 3, pad=1, name="conv2")
    x = g.depth_to_space(x, 2, name="depth_to_space")
    x = g.conv(x, 4, 3, pad=1, name="conv3")
    return g.build({"output": x})


def syn_mlp_input_gather(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """``[N,64]`` -> Gemm 32 -> Relu -> Gemm 10 (input-feature pruning of fc1)."""
    g = GraphBuilder("syn_mlp_input_gather", seed)
    x = g.input("input", (batch, 64))
    x = g.relu(g.gemm(x, 32, name="fc1"), name="relu1")
    x = g.gemm(x, 10, name="fc2")
    return g.build({"logits": x})
