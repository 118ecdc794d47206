"""The fast variant of scripts/reproduce_lenet_mnist.py (the paper's Table 1, filter-wise and
channel-wise SSL on LeNet), with a per-term lambda scale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.mark.training
@pytest.mark.skipif(not MNIST.exists(), reason="needs the MNIST folder")
def test_lenet_table1_script_fast_variant(tmp_path):
    # conv1's width is left alone (scale 0 on both terms that cut it); how such scales act on
    # the penalty and the proximal step is tested in test_training_penalty.py
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce_lenet_mnist.py"), "--limit", "600",
         "--baseline-epochs", "2", "--epochs", "3", "--finetune-epochs", "1", "--lambdas",
         "0.5", "--lambda-scale", "filter:conv1=0", "--lambda-scale", "channel:conv2=0",
         "--data", str(MNIST), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    (run,) = s["runs"]
    assert run["lambda"] == 0.5
    assert run["options"]["lambdas"]["scales"] == {"filter:conv1": 0.0, "channel:conv2": 0.0}
    assert (run["train_samples"], run["val_samples"]) == (480, 120)
    conv = [x for x in run["layers"] if x["op"] == "Conv"]
    assert [x["filters_before"] for x in conv] == [20, 50]
    assert conv[0]["filters_after"] == 20, conv
    # the table's numbers are the written model's: its conv weights and its held-out error
    from onnxruntime import InferenceSession

    from onnx_ssl.io import load_model
    from onnx_ssl.training.data import load_idx_folder

    model = load_model(tmp_path / "lenet_ssl_0.5.onnx")
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    assert [dims[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"] == \
        [x["filters_after"] for x in conv]
    _, val = load_idx_folder(MNIST).subset(np.arange(600)).split(0.2, seed=0)
    sess = InferenceSession(str(tmp_path / "lenet_ssl_0.5.onnx"),
                            providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
    pred = np.array([sess.run(None, {name: img.reshape(shape)})[0].argmax()
                     for img in val.x[next(iter(val.x))]])
    assert run["error"]["final"] == pytest.approx(float(np.mean(pred != val.y)))
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ours")]
    assert len(table) == 2 and f"20 - {conv[1]['filters_after']}" in table[1]
