"""Small classic networks used in the SSL paper: Caffe LeNet, an MLP and the CIFAR-10 ConvNet."""

from __future__ import annotations

import onnx

from ._builder import GraphBuilder


def lenet(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Caffe LeNet (``lenet_train_test.prototxt``): no ReLU after the convolutions.

    ``[N,1,28,28]`` -> conv1 20 5x5 -> MaxPool 2 -> conv2 50 5x5 -> MaxPool 2 -> Flatten
    -> ip1 500 -> Relu -> ip2 10 -> ``logits [N,10]``.
    """
    g = GraphBuilder("lenet", seed)
    x = g.input("input", (batch, 1, 28, 28))
    x = g.conv(x, 20, 5, name="conv1")
    x = g.maxpool(x, 2, 2, name="pool1")
    x = g.conv(x, 50, 5, name="conv2")
    x = g.maxpool(x, 2, 2, name="pool2")
    x = g.flatten(x, name="flatten")
    x = g.gemm(x, 500, name="ip1")
    x = g.relu(x, name="relu1")
    x = g.gemm(x, 10, name="ip2")
    return g.build({"logits": x})


def mlp(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """LeNet-300-100 style MLP: ``[N,784]`` -> 500 -> Relu -> 300 -> Relu -> 10."""
    g = GraphBuilder("mlp", seed)
    x = g.input("input", (batch, 784))
    x = g.relu(g.gemm(x, 500, name="fc1"), name="relu1")
    x = g.relu(g.gemm(x, 300, name="fc2"), name="relu2")
    x = g.gemm(x, 10, name="fc3")
    return g.build({"logits": x})


def cifar_convnet(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Caffe ``cifar10_full`` without the LRN layers.

    Caffe pools with ceil rounding; the extra bottom/right pad of 1 reproduces its output
    sizes (32 -> 16 -> 8 -> 4).  ``[N,3,32,32]`` -> ``logits [N,10]``.
    """
    ceil_pads = (0, 0, 1, 1)
    g = GraphBuilder("cifar_convnet", seed)
    x = g.input("input", (batch, 3, 32, 32))
    x = g.conv(x, 32, 5, pad=2, name="conv1")
    x = g.maxpool(x, 3, 2, pads=ceil_pads, name="pool1")
    x = g.relu(x, name="relu1")
    x = g.conv(x, 32, 5, pad=2, name="conv2")
    x = g.relu(x, name="relu2")
    x = g.avgpool(x, 3, 2, pads=ceil_pads, name="pool2")
    x = g.conv(x, 64, 5, pad=2, name="conv3")
    x = g.relu(x, name="relu3")
    x = g.avgpool(x, 3, 2, pads=ceil_pads, name="pool3")
    x = g.flatten(x, name="flatten")
    x = g.gemm(x, 10, name="ip1")
    return g.build({"logits": x})
