"""CIFAR-10 ResNets (He et al. 2016, option B projection shortcuts): ResNet-20/32/56."""

from __future__ import annotations

import onnx

from ._builder import GraphBuilder


def basic_block(g: GraphBuilder, x: str, out_ch: int, stride: int, prefix: str) -> str:
    """conv3x3-BN-Relu-conv3x3-BN + shortcut, Add, Relu.

    The shortcut is the identity when shape is preserved, else a 1x1 conv (no bias) + BN
    named ``<prefix>.downsample.conv`` / ``<prefix>.downsample.bn``.
    """
    y = g.conv(x, out_ch, 3, stride, 1, bias=False, name=f"{prefix}.conv1")
    y = g.bn(y, name=f"{prefix}.bn1")
    y = g.relu(y, name=f"{prefix}.relu1")
    y = g.conv(y, out_ch, 3, 1, 1, bias=False, name=f"{prefix}.conv2")
    y = g.bn(y, name=f"{prefix}.bn2")
    shortcut = x
    if stride != 1 or g.channels(x) != out_ch:
        shortcut = g.conv(x, out_ch, 1, stride, bias=False, name=f"{prefix}.downsample.conv")
        shortcut = g.bn(shortcut, name=f"{prefix}.downsample.bn")
    y = g.add(y, shortcut, name=f"{prefix}.add")
    return g.relu(y, name=f"{prefix}.relu2")


def cifar_resnet(
    depth: int, batch: int = 1, seed: int = 0, num_classes: int = 10
) -> onnx.ModelProto:
    """ResNet-``depth`` for ``[N,3,32,32]`` inputs, ``depth = 6n + 2``."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    g = GraphBuilder(f"resnet{depth}", seed)
    x = g.input("input", (batch, 3, 32, 32))
    x = g.conv(x, 16, 3, 1, 1, bias=False, name="conv1")
    x = g.bn(x, name="bn1")
    x = g.relu(x, name="relu")
    for stage, width in enumerate((16, 32, 64), start=1):
        for i in range(n):
            stride = 2 if stage > 1 and i == 0 else 1
            x = basic_block(g, x, width, stride, f"layer{stage}.{i}")
    x = g.gap(x, name="avgpool")
    x = g.flatten(x, name="flatten")
    x = g.gemm(x, num_classes, name="fc")
    return g.build({"logits": x})


def resnet20(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """CIFAR ResNet-20 (3 blocks per stage)."""
    return cifar_resnet(20, batch, seed)


def resnet32(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """CIFAR ResNet-32 (5 blocks per stage)."""
    return cifar_resnet(32, batch, seed)


def resnet56(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """CIFAR ResNet-56 (9 blocks per stage)."""
    return cifar_resnet(56, batch, seed)
