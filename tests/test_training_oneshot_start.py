"""`ssl --start oneshot`: the budget met by prune's one-shot selection instead of the SSL
phase, then fine-tuning (distilled without labels); its report and its refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_training_helpers import digits, pretrained_tiny

from onnx_ssl.cli import main
from onnx_ssl.errors import InputError
from onnx_ssl.training import evaluate as evaluate_mod
from onnx_ssl.training.chain import SslOptions
from onnx_ssl.training.data import load_data


def _run(tmp_path, *extra: str, finetune: int = 4) -> tuple[int, dict, str]:
    model = tmp_path / "cnn.onnx"
    onnx.save(pretrained_tiny(), str(model))
    np.savez(tmp_path / "x.npz", x=digits(600).x["x"])  # no labels: distillation
    args = ["ssl", str(model), "--data", str(tmp_path / "x.npz"), "-o",
            str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"), "--start",
            "oneshot", "--target-macs", "0.5", "--epochs", "0", "--finetune-epochs", str(finetune),
            "--finetune-lr", "3e-3", "--batch-size", "32", *extra]
    rc = main(args)
    return rc, json.loads((tmp_path / "r.json").read_text()), str(tmp_path / "out.onnx")


def test_oneshot_start_meets_the_budget_without_ssl_and_fine_tuning_recovers(tmp_path, capsys):
    rc, rep, out = _run(tmp_path)
    text = capsys.readouterr().out
    assert rc == 0
    assert rep["ssl_history"] == [] and rep["options"]["start"] == "oneshot"
    assert 0.48 <= rep["macs_after"] / rep["macs_before"] <= 0.5
    assert rep["error"]["ssl"] is None  # no SSL phase: nothing measured "after SSL"
    fid = {stage: v[0]["value"] for stage, v in rep["fidelity"].items() if v}
    # the cut changes the function; distilling the pruned model wins agreement back
    assert fid["before"] == 1.0 and fid["final"] > fid["pruned"]
    last = text.strip().splitlines()[-1]
    assert "one-shot selection of" in last and "budget met" in last
    # the reported fidelity is the written model's
    _, val = load_data(tmp_path / "x.npz").split(0.2, 0)
    got = evaluate_mod.run_model(onnx.load(out), val)[1]["logits"]
    want = evaluate_mod.run_model(pretrained_tiny(), val)[1]["logits"]
    assert fid["final"] == pytest.approx(float(np.mean(got.argmax(1) == want.argmax(1))))


def test_oneshot_start_over_max_drop_names_the_cut_and_the_way_out(tmp_path, capsys):
    # No fine-tuning and a zero allowance: the cut's loss of agreement is the final one.
    rc, rep, out = _run(tmp_path, "--max-drop", "0", finetune=0)
    assert rc == 3 and not rep["accepted"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("NOT ACCEPTED") and "by the one-shot selection" in last
    assert "--start ssl" in last
    assert not (tmp_path / "out.onnx").exists()
    assert (tmp_path / "out.over-max-drop.onnx").exists()


def test_oneshot_start_fine_tunes_for_the_ssl_epochs_too_and_is_the_label_free_default(
        tmp_path):
    # --start auto (the default) without labels and with a budget: the one-shot start, whose
    # fine-tuning gets the --epochs of the SSL phase it skips as well.
    model = tmp_path / "cnn.onnx"
    onnx.save(pretrained_tiny(), str(model))
    np.savez(tmp_path / "x.npz", x=digits(200).x["x"])
    assert main(["ssl", str(model), "--data", str(tmp_path / "x.npz"), "-o",
                 str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"),
                 "--target-macs", "0.6", "--epochs", "2", "--finetune-epochs", "1",
                 "--batch-size", "32"]) in (0, 3)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["options"]["start"] == "oneshot" and len(rep["finetune_history"]) == 3
    # with labels, auto is the group Lasso
    np.savez(tmp_path / "xy.npz", x=digits(200).x["x"], y=digits(200).y)
    assert main(["ssl", str(model), "--data", str(tmp_path / "xy.npz"), "-o",
                 str(tmp_path / "o2.onnx"), "--report", str(tmp_path / "r2.json"),
                 "--target-macs", "0.6", "--epochs", "1", "--finetune-epochs", "0",
                 "--batch-size", "32"]) in (0, 3)
    assert json.loads((tmp_path / "r2.json").read_text())["options"]["start"] == "ssl"


def test_oneshot_start_needs_a_budget():
    with pytest.raises(InputError, match="--start oneshot needs a budget"):
        SslOptions(start="oneshot")
    with pytest.raises(InputError, match="--start must be one of"):
        SslOptions(start="later", target_macs=0.5)
