"""Small models and data for the training tests (no tests here)."""

from __future__ import annotations

import functools
import tempfile

import numpy as np
import onnx

from onnx_ssl.models._builder import GraphBuilder
from onnx_ssl.training.data import Dataset, load_digits


def tiny_cnn(
    *, bn: bool = True, residual: bool = True, batch: int = 1, seed: int = 0, grouped: bool = False
) -> onnx.ModelProto:
    """[N,1,8,8] -> conv 6 (BN, Relu) -> [residual conv 6 + BN] -> conv 8 /2 (grouped: 2
    groups) -> Relu -> Flatten -> fc 12 -> Relu -> fc 10 -> logits."""
    g = GraphBuilder("tiny", seed)
    x = g.input("input", (batch, 1, 8, 8))
    x = g.conv(x, 6, 3, 1, 1, name="c1")
    if bn:
        x = g.bn(x, name="bn1")
    x = g.relu(x, name="r1")
    if residual:
        y = g.conv(x, 6, 3, 1, 1, name="c2")
        if bn:
            y = g.bn(y, name="bn2")
        x = g.relu(g.add(x, y, name="add"), name="r2")
    if grouped:
        x = g.conv(x, 8, 3, 2, 1, group=2, name="c3")
    else:
        x = g.conv(x, 8, 3, 2, 1, name="c3")
    x = g.relu(x, name="r3")
    x = g.flatten(x, name="fl")
    x = g.relu(g.gemm(x, 12, name="fc1"), name="r4")
    x = g.gemm(x, 10, name="fc2")
    return g.build({"logits": x})


def digits(n: int | None = None) -> Dataset:
    """scikit-learn's digits as [N, 8, 8] in [0, 1] (optionally the first n)."""
    d = load_digits()
    if n is not None:
        d = d.subset(np.arange(n))
    return d


@functools.lru_cache(maxsize=1)
def _pretrained_bytes() -> bytes:
    from onnx_ssl.training.artifacts import build_artifacts
    from onnx_ssl.training.trainer import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        art = build_artifacts(tiny_cnn(bn=False), f"{tmp}/base")
        res = Trainer(art, TrainConfig(epochs=5, lr=1e-2, batch_size=32, save_state=False)).fit(
            digits()
        )
    assert res.val_error is not None and res.val_error < 0.15, res.val_error
    assert res.model is not None
    return res.model.SerializeToString()


def pretrained_tiny() -> onnx.ModelProto:
    """The tiny CNN (no BatchNorm) trained on all digits for 5 epochs (~5% held-out error)."""
    m = onnx.ModelProto()
    m.ParseFromString(_pretrained_bytes())
    return m
