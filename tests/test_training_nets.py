"""torchvision-like networks exported from PyTorch at a static batch train with the SSL
penalty at batch 8 (and another batch size), and the trained model keeps the original ops."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import training_nets
from training_nets import BATCH, CLASSES, SIZE

from onnx_ssl.runtime import session
from onnx_ssl.training.artifacts import ArtifactOptions, build_artifacts
from onnx_ssl.training.data import Dataset
from onnx_ssl.training.penalty import Lambdas
from onnx_ssl.training.trainer import TrainConfig, Trainer

CASES = [("mobilenet_v3_small", "eval"), ("mobilenet_v3_small", "train"),
         ("efficientnet_b0", "eval"), ("resnet18", "eval"), ("resnet18", "train"),
         ("resnet18", "dynamo"), ("mobilenet_v3_small", "dynamo")]
# Ops the training graph lowers and the inference model must keep.
LOWERED = ("HardSwish", "HardSigmoid")


def _data(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    x = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32) * 0.5
    x[:, 0] += y[:, None, None] / CLASSES  # a little signal to learn
    return Dataset({"x": x}, y, "random")


@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_static_batch_export_trains_with_the_penalty(tmp_path, name, mode):
    model = training_nets.load(name, mode)
    art = build_artifacts(model, tmp_path / "a", ArtifactOptions(
        lambdas=Lambdas(filter=1e-3, channel=1e-3), optimizer="adamw"))
    assert art.info.fixed_batch is None  # the static batch of 8 is not imposed
    assert art.info.penalty.active_terms
    if mode == "train":
        assert art.info.bn_stats  # BatchNorm survived the export: it fine-tunes
    data = _data(4 * BATCH)
    res = Trainer(art, TrainConfig(epochs=3, lr=3e-3, batch_size=BATCH, save_state=False,
                                   val_fraction=0, schedule="constant")).fit(data)
    losses = [h.loss for h in res.history]
    assert all(np.isfinite(losses)) and all(h.penalty > 0 for h in res.history)
    assert losses[-1] < losses[0], losses

    assert res.model is not None
    ops = Counter(n.op_type for n in res.model.graph.node)
    want = Counter(n.op_type for n in model.graph.node)
    for op in LOWERED:
        assert ops[op] == want[op]
    dims = [d.dim_value for d in res.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [BATCH, 3, SIZE, SIZE]  # the original's input shape
    x = data.x["x"][:BATCH]
    y = session(res.model).run(None, {"x": x})[0]
    assert y.shape == (BATCH, CLASSES) and np.all(np.isfinite(y))
    if mode != "train":  # (a training-mode export normalises with batch statistics)
        assert not np.allclose(y, session(model).run(None, {"x": x})[0])

    # The same artifacts at another batch size: the training graph's batch is symbolic.
    again = Trainer(art, TrainConfig(epochs=1, lr=1e-3, batch_size=12, save_state=False,
                                     val_fraction=0, export=False)).fit(_data(24))
    assert np.isfinite(again.history[-1].loss)
