"""SSL learns which attention heads to drop: ``--lambda-head`` regularises each head (its Q,
K and V rows and its output projection rows) as one group, and the heads it zeroes are
pruned (onnx_ssl.training.penalty's head terms, onnx_ssl.passes.remove_heads)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from test_heads import C, T, gqa_model

from onnx_ssl.cli import main


def test_ssl_with_a_head_lambda_drops_a_grouped_query_unit(tmp_path):
    m = gqa_model(seed=0, dynamic=True)
    onnx.save(m, str(tmp_path / "gqa.onnx"))
    x = np.random.default_rng(0).standard_normal((200, T, C)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)  # no labels: the model distils itself
    rc = main(["ssl", str(tmp_path / "gqa.onnx"), "--data", str(tmp_path / "x.npz"),
               "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"),
               "--epochs", "8", "--finetune-epochs", "1", "--lr", "0.05",
               "--lambda-head", "1", "--target-macs", "0.7", "--max-drop", "1",
               "--batch-size", "16", "--work-dir", str(tmp_path / "work"), "--start", "ssl"])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["options"]["lambdas"]["head"] == 1.0
    assert rep["macs_after"] <= 0.7 * rep["macs_before"]
    out = onnx.load(str(tmp_path / "out.onnx"))
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    # One K/V head and its two Q heads are gone: half of every projection.
    assert shapes["Wq"] == (C, 8) and shapes["Wk"] == (C, 4) and shapes["Wv"] == (C, 4)
    assert shapes["Wo"] == (8, C)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
