"""The fast variant of scripts/reproduce_lenet_shape.py (the paper's Table 2, shape-wise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.mark.skipif(not MNIST.exists(), reason="needs the MNIST folder")
def test_shape_script_fast_variant(tmp_path):
    # compact-gemm is applied wherever it saves MACs (auto would keep these tiny convs
    # dense), so the lowered model really differs from the pruned one.
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce_lenet_shape.py"), "--fast",
         "--data", str(MNIST), "--out-dir", str(tmp_path), "--lower", "compact-gemm"],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (s["train_samples"], s["val_samples"]) == (800, 200)
    (run,) = s["runs"]
    assert [x["layer"] for x in run["layers"]] == ["conv1", "conv2"]
    for x in run["layers"]:
        assert 0 < x["filter_size_after"] <= x["filter_size_before"]
        assert 0 < x["filters_after"] <= x["filters_before"]
        assert 0 < x["flop_fraction"] <= 1
        assert x["speedup_removal"] > 0 and x["speedup_lowered"] > 0
    assert (run["layers"][0]["filter_size_before"], run["layers"][1]["filter_size_before"]) \
        == (25, 500)
    assert run["layers"][1]["filter_size_after"] < 500  # shape-wise sparsity reached conv2
    assert run["layers"][1]["choice"] == "compact-gemm"
    # the lowered model computes the pruned one's outputs (prune's tolerance) and error
    assert run["lowered_equal"] and run["error_lowered"] == pytest.approx(run["error"])
    (lowering,) = run["lowering"]
    assert [x["node"] for x in lowering["lowered"]] == ["conv2"]
    # the printed table: a row per conv of the baseline and of the run, the paper beside them
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert any("baseline" in ln and "| conv1 |" in ln for ln in table)
    assert sum("| conv2 |" in ln for ln in table) == 2
    assert any("| 41 " in ln and "6.93x" in ln for ln in table)
