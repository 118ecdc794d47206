"""The fast variant of scripts/compare_torch_pruning.py (SSL against Torch-Pruning at equal
MACs): every pruned model meets its MAC target, and every row's numbers are those of the
ONNX file it names."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"


def lenet_counts(k1: int, k2: int) -> tuple[int, int]:
    """(MACs, params) of LeNet with k1 conv1 and k2 conv2 filters, by hand: conv1 24x24x25
    per filter, conv2 8x8x25 per filter and input channel, fc1 16 k2 -> 500, fc2 500 -> 10."""
    macs = k1 * 24 * 24 * 25 + k2 * k1 * 8 * 8 * 25 + 16 * k2 * 500 + 500 * 10
    params = (k1 * 25 + k1) + (k2 * k1 * 25 + k2) + (16 * k2 * 500 + 500) + (500 * 10 + 10)
    return macs, params


@pytest.mark.training
@pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                    reason="needs torch-pruning (and torch), the [export] extra")
@pytest.mark.skipif(not MNIST.exists(), reason="needs the MNIST folder")
def test_compare_torch_pruning_fast_variant(tmp_path):
    r = subprocess.run(
        [sys.executable, "-W", "ignore", str(REPO / "scripts" / "compare_torch_pruning.py"),
         "--fast", "--data", str(MNIST), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    setup, rows = res["setup"], res["rows"]
    assert (setup["train_samples"], setup["val_samples"]) == (320, 80)
    assert [x["method"] for x in rows] == [
        "baseline", "TP GroupNormPruner reg 0.01", "TP MagnitudePruner", "onnx-ssl"]
    macs0 = setup["baseline_macs"]
    assert macs0 == lenet_counts(20, 50)[0] == 2_293_000

    from onnxruntime import InferenceSession

    from onnx_ssl.training.data import load_idx_folder

    data = load_idx_folder(MNIST)
    _, val = data.subset(np.arange(400)).split(0.2, seed=0)
    for x in rows:
        # the counts are the named model's: by hand from its filters, and its fraction
        k1, k2 = x["filters"]
        assert (x["macs"], x["params"]) == lenet_counts(k1, k2), x
        assert x["mac_fraction"] == pytest.approx(x["macs"] / macs0)
        # the error is ORT inference of that ONNX file on the 80 held-out images
        sess = InferenceSession(str(tmp_path / x["model"]), providers=["CPUExecutionProvider"])
        pred = np.array([sess.run(None, {"x": img[None, None]})[0].argmax()
                         for img in val.x["x"]])
        assert x["error"] == pytest.approx(float(np.mean(pred != val.y))), x
        if x["method"] == "baseline":
            assert x["target"] is None and (k1, k2) == (20, 50)
            continue
        assert x["target"] == 0.5 and k1 <= 20 and k2 <= 50 and (k1, k2) != (20, 50)
        assert x["macs"] <= 0.5 * macs0, x  # every method meets its budget
        if x["method"] == "onnx-ssl":
            # the budget controller lands below the target (whole groups go at once)
            assert x["budget_met"] and x["mac_fraction"] >= 0.3, x
        else:
            # the smallest pruning ratio (0.01 grid) that meets the target
            assert x["mac_fraction"] >= 0.45 and 0 < x["pruning_ratio"] < 1, x
    # the table: one line per row, with its measured MACs and error
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(rows)
    for x, line in zip(rows, table[2:], strict=True):
        assert line.startswith(f"| {x['method']} |") and f"{x['macs']:,}" in line
        assert f"{100 * x['error']:.2f}%" in line
    png = (tmp_path / "error_vs_macs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def conv_fc_macs(path: Path) -> int:
    """MACs of every Conv and Gemm of the ONNX file, by hand from its weight shapes and the
    conv output sizes that onnx's shape inference gives (an oracle apart from onnx-ssl's
    accounting)."""
    import onnx

    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    dims = {t.name: list(t.dims) for t in m.graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.output)}
    total = 0
    for n in m.graph.node:
        w = dims.get(n.input[1]) if len(n.input) > 1 else None
        if n.op_type == "Conv":
            total += int(np.prod(w)) * int(np.prod(shapes[n.output[0]][2:]))
        elif n.op_type == "Gemm":
            total += int(np.prod(w))
    return total


@pytest.mark.training
@pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                    reason="needs torch-pruning (and torch), the [export] extra")
@pytest.mark.skipif(not MNIST.exists(), reason="needs the MNIST folder")
def test_compare_torch_pruning_resnet20_fast_variant(tmp_path):
    """ResNet-20 (BatchNorm, residual streams coupled across blocks) on 14x14 MNIST: the
    three methods each meet the 50% budget, counted apart from onnx-ssl's accounting."""
    r = subprocess.run(
        [sys.executable, "-W", "ignore", str(REPO / "scripts" / "compare_torch_pruning.py"),
         "--model", "resnet20", "--fast", "--data", str(MNIST), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    setup, rows = res["setup"], res["rows"]
    assert (setup["model"], setup["image_size"]) == ("resnet20", 14)
    assert [x["method"] for x in rows] == [
        "baseline", "TP GroupNormPruner reg 0.01", "TP MagnitudePruner", "onnx-ssl"]
    macs0 = setup["baseline_macs"]
    # the CIFAR ResNet-20 at 14x14 with 1 input channel, projections included
    assert rows[0]["stage_filters"] == [16, 96, 224, 448] and rows[0]["layers"] == 20
    assert macs0 == conv_fc_macs(tmp_path / "baseline.onnx")

    from onnxruntime import InferenceSession

    from onnx_ssl.training.data import load_idx_folder, resize_bilinear

    data = load_idx_folder(MNIST)
    _, val = data.subset(np.arange(400)).split(0.2, seed=0)
    images = resize_bilinear(val.x["x"], 14, 14)
    for x in rows:
        path = tmp_path / x["model"]
        assert x["macs"] == conv_fc_macs(path), x
        assert sum(x["stage_filters"]) == sum(x["filters"])
        sess = InferenceSession(str(path), providers=["CPUExecutionProvider"])
        pred = np.array([sess.run(None, {"x": img[None, None]})[0].argmax() for img in images])
        assert x["error"] == pytest.approx(float(np.mean(pred != val.y))), x
        if x["method"] != "baseline":
            assert x["macs"] <= 0.5 * macs0 and x["mac_fraction"] >= 0.25, x
