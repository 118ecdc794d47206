"""The fast variant of scripts/distill_lenet_mnist.py: labelled and label-free SSL of a LeNet
at the same MAC budget, measured on the same held-out images."""

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
def test_distill_lenet_script_fast_variant(tmp_path):
    pytest.importorskip("torch")
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "distill_lenet_mnist.py"), "--fast",
         "--data", str(MNIST), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (s["train_samples"], s["val_samples"]) == (480, 120)
    base, lab, dist, oneshot = s["rows"]
    assert [x["run"] for x in (lab, dist)] == ["SSL, labelled", "SSL, distilled (no labels)"]
    assert oneshot["run"].startswith("one-shot cut, then distilled")
    for row in (lab, dist, oneshot):
        assert row["mac_fraction"] <= 0.33 + 1e-9 and row["budget_met"]
        assert row["fidelity_kind"] == "top1" and 0 <= row["fidelity"] <= 1
    # the label-free run never saw a label: its report has no error, only fidelity
    rep = json.loads((tmp_path / "report_distilled.json").read_text())
    assert rep["error"]["before"] is None and rep["metric"]["name"] == "fidelity:top1:logits"
    assert rep["options"]["distill_loss"] == "kl"
    # the table's numbers are the written models': agreement with the baseline on held-out
    from onnx_ssl.io import load_model
    from onnx_ssl.training.data import load_idx_folder
    from onnx_ssl.training.evaluate import run_model

    _, val = load_idx_folder(MNIST).subset(np.arange(600)).split(0.2, seed=0)
    want = run_model(load_model(tmp_path / "lenet_baseline.onnx"), val)[1]["logits"]
    got = run_model(load_model(dist["model"]), val)[1]["logits"]
    assert dist["fidelity"] == pytest.approx(float(np.mean(got.argmax(1) == want.argmax(1))))
    assert dist["error"] == pytest.approx(float(np.mean(got.argmax(1) != val.y)))
    assert rep["fidelity"]["final"][0]["value"] == pytest.approx(dist["fidelity"])
    assert sum(ln.startswith("| SSL") for ln in r.stdout.splitlines()) == 2
    # --start oneshot: no SSL phase, all the epochs fine-tune the one-shot cut
    rep1 = json.loads((tmp_path / "report_distilled_oneshot.json").read_text())
    assert rep1["options"]["start"] == "oneshot" and rep1["ssl_history"] == []
    assert len(rep1["finetune_history"]) == 3 + 1  # --fast: 3 SSL + 1 fine-tuning epochs
