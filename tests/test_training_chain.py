"""The SSL chain end to end, and the training commands of the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_training_helpers import digits, pretrained_tiny, tiny_cnn

from onnx_ssl.cli import main
from onnx_ssl.training.chain import SslOptions, evaluate_model, run_ssl, table1
from onnx_ssl.training.penalty import Lambdas


def test_tiny_ssl_chain_gives_a_smaller_verified_model(tmp_path):
    model = pretrained_tiny()
    opts = SslOptions(
        lambdas=Lambdas(filter=0.3, channel=0.3),
        epochs=3,
        lr=0.05,
        finetune_epochs=1,
        batch_size=32,
    )
    out = tmp_path / "small.onnx"
    res = run_ssl(model, digits(), opts, output=out, report_path=tmp_path / "r.json")
    rep = res.report
    assert rep.params_after < rep.params_before
    assert rep.macs_after < rep.macs_before
    assert any(r.filters_after < r.filters_before for r in rep.layers)
    assert "numeric check: passed" in rep.prune_text  # the prune pass verified the outputs
    assert rep.error_pruned == pytest.approx(rep.error_thresholded, abs=1e-9)
    assert rep.error_final is not None and rep.error_final < 0.3
    small = onnx.load(str(out))
    assert [i.name for i in small.graph.input] == ["input"]
    assert [o.name for o in small.graph.output] == ["logits"]
    _, err = evaluate_model(small, digits().split(0.2, 0)[1])
    assert err == pytest.approx(rep.error_final, abs=1e-9)
    assert "SSL" in table1(rep, rep.error_before)
    assert (tmp_path / "r.json").exists()


def test_cli_train_ssl_and_refusals(tmp_path, capsys):
    model_path = tmp_path / "tiny.onnx"
    onnx.save(pretrained_tiny(), str(model_path))
    d = digits(600)
    np.savez(tmp_path / "d.npz", x=d.x["x"], y=d.y)
    art = tmp_path / "art"
    assert (
        main(
            [
                "artifacts",
                str(model_path),
                "-o",
                str(art),
                "--lambda-filter",
                "0.3",
                "--optimizer",
                "sgd",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                str(art),
                "--data",
                str(tmp_path / "d.npz"),
                "--epochs",
                "1",
                "--prox",
                "--lr",
                "0.05",
            ]
        )
        == 0
    )
    assert (art / "trained_model.onnx").exists() and (art / "train_state.ckpt").exists()
    out = tmp_path / "small.onnx"
    assert (
        main(
            [
                "ssl",
                str(model_path),
                "--data",
                str(tmp_path / "d.npz"),
                "-o",
                str(out),
                "--epochs",
                "2",
                "--finetune-epochs",
                "1",
                "--lambda-filter",
                "0.3",
                "--lambda-channel",
                "0.3",
            ]
        )
        == 0
    )
    assert out.exists()
    capsys.readouterr()

    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 7, 7), np.float32), y=np.zeros(5, np.int64))
    state = (art / "train_state.ckpt").read_bytes()
    assert main(["train", str(art), "--data", str(tmp_path / "bad.npz"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnx-ssl: error: bad.npz: samples of shape (7, 7)")
    assert len(err.splitlines()) == 1
    assert (art / "train_state.ckpt").read_bytes() == state  # checkpoint untouched

    elu = tiny_cnn(bn=False, residual=False)
    for n in elu.graph.node:
        if n.op_type == "Relu":
            n.op_type = "Elu"
    onnx.save(elu, str(tmp_path / "elu.onnx"))
    assert main(["artifacts", str(tmp_path / "elu.onnx"), "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no gradient for Elu" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e").exists()

    assert main(["train", str(tmp_path / "nowhere")]) == 2
    assert "no such artifacts folder" in capsys.readouterr().err


def test_demo_runs_quickly_on_few_images():
    from onnx_ssl.training.chain import run_demo

    opts = SslOptions(lambdas=Lambdas(filter=0.1, channel=0.1), epochs=1, finetune_epochs=1)
    res = run_demo(data=digits(300), baseline_epochs=1, options=opts, timing_batch=4)
    lines = res.table.splitlines()
    assert lines[0].split()[:2] == ["error", "filters"]
    assert lines[2].startswith("baseline") and lines[3].startswith("SSL")
    assert res.ssl.report.speedup is not None and res.ssl.report.speedup > 0
    assert all(r.speedup is not None for r in res.ssl.report.layers)


def test_chain_on_a_batchnorm_residual_model_prunes_coupled_channels():
    # Coupled groups hold each channel's conv filter, bias, BatchNorm scale and shift and the
    # next layers' input slices: they go to zero together and the prune pass removes them.
    opts = SslOptions(
        lambdas=Lambdas(coupled=0.5), epochs=4, lr=0.05, finetune_epochs=0, batch_size=32
    )
    rep = run_ssl(tiny_cnn(bn=True), digits(), opts).report
    assert rep.params_after < rep.params_before
    assert "numeric check: passed" in rep.prune_text
    assert rep.error_pruned == pytest.approx(rep.error_thresholded, abs=1e-9)
