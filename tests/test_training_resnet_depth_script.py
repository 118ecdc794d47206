"""The fast variant of scripts/reproduce_resnet_depth.py (the paper's Figure 6, depth-wise
SSL on the CIFAR ResNet-20, run on MNIST)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.mark.skipif(not MNIST.exists(), reason="needs the MNIST folder")
def test_resnet_depth_script_fast_variant(tmp_path):
    pytest.importorskip("torch")
    import onnx

    sys.path.insert(0, str(REPO / "scripts"))
    from reproduce_resnet_depth import load_data

    from onnx_ssl.training.chain import evaluate_model

    fig = tmp_path / "fig"
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce_resnet_depth.py"), "--fast",
         "--data", str(MNIST), "--out-dir", str(tmp_path), "--figures", str(fig)],
        capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]

    b20 = json.loads((tmp_path / "baseline_resnet20.json").read_text())
    b32 = json.loads((tmp_path / "baseline_resnet32.json").read_text())
    # the paper's layer counts: main-path convs + FC; two 1x1 projections apart
    assert (b20["layers"], b32["layers"]) == (20, 32)
    assert (b20["conv_layers"], b32["conv_layers"]) == (21, 33)
    assert b20["macs"] < b32["macs"]
    assert (b20["train_samples"], b20["val_samples"]) == (480, 120)

    (path,) = [p for p in tmp_path.glob("ssl_*.json") if not p.name.endswith("_report.json")]
    row = json.loads(path.read_text())
    assert row["lambda_depth"] > 0 and 0 <= row["error"] <= 1
    # depth-wise SSL removed residual blocks, and the layer count is the pruned model's
    assert row["layers"] < 20 and sum(row["blocks_removed"]) > 0
    assert row["macs"] < row["macs_before"] == b20["macs"]
    model = onnx.load(row["model"])
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    main = [n for n in convs if "downsample" not in n.name]
    assert len(convs) == row["conv_layers"]
    assert len(main) + 1 == row["layers"] == 2 + 2 * sum(3 - k for k in row["blocks_removed"])
    # the reported error is the written model's on the same 120 held-out images
    _, val = load_data(str(MNIST), 600, 14).split(0.2, 0)
    assert evaluate_model(model, val)[1] == pytest.approx(row["error"])

    png = fig / "figure6.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (fig / "table.md").read_text() == (tmp_path / "table.md").read_text()
    table = (tmp_path / "table.md").read_text().splitlines()
    assert sum(ln.startswith("| ResNet-") for ln in table) == 2
    assert any(ln.startswith("| SSL ResNet-20 |") and f"| {row['layers']} |" in ln
               for ln in table)
