"""BVLC AlexNet and CaffeNet (ImageNet, ``[N,3,227,227]`` -> ``logits [N,1000]``).

Both keep Caffe's two-tower grouping (conv2, conv4, conv5 with ``group=2``) and the LRN
layers (size 5, alpha 1e-4, beta 0.75).  AlexNet normalises before pooling
(conv-relu-LRN-pool), CaffeNet pools first (conv-relu-pool-LRN).  About 61M parameters.
"""

from __future__ import annotations

import onnx

from ._builder import GraphBuilder


def _alexnet(name: str, batch: int, seed: int, *, pool_before_lrn: bool) -> onnx.ModelProto:
    g = GraphBuilder(name, seed)
    x = g.input("input", (batch, 3, 227, 227))
    convs = (
        # name, out, k, stride, pad, group
        ("conv1", 96, 11, 4, 0, 1),
        ("conv2", 256, 5, 1, 2, 2),
        ("conv3", 384, 3, 1, 1, 1),
        ("conv4", 384, 3, 1, 1, 2),
        ("conv5", 256, 3, 1, 1, 2),
    )
    for i, (cname, out, k, stride, pad, group) in enumerate(convs, start=1):
        x = g.conv(x, out, k, stride, pad, group, name=cname)
        x = g.relu(x, name=f"relu{i}")
        has_pool, has_lrn = i in (1, 2, 5), i in (1, 2)
        if has_lrn and not pool_before_lrn:
            x = g.lrn(x, 5, 1e-4, 0.75, name=f"norm{i}")
        if has_pool:
            x = g.maxpool(x, 3, 2, name=f"pool{i}")
        if has_lrn and pool_before_lrn:
            x = g.lrn(x, 5, 1e-4, 0.75, name=f"norm{i}")
    x = g.flatten(x, name="flatten")
    for i in (6, 7):
        x = g.gemm(x, 4096, name=f"fc{i}")
        x = g.relu(x, name=f"relu{i}")
        x = g.dropout(x, name=f"drop{i}")
    x = g.gemm(x, 1000, name="fc8")
    return g.build({"logits": x})


def alexnet(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """BVLC AlexNet: conv -> relu -> LRN -> pool."""
    return _alexnet("alexnet", batch, seed, pool_before_lrn=False)


def caffenet(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """BVLC reference CaffeNet: conv -> relu -> pool -> LRN."""
    return _alexnet("caffenet", batch, seed, pool_before_lrn=True)
