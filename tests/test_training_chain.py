"""The SSL chain end to end, and the training commands of the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_training_helpers import digits, pretrained_tiny, tiny_cnn

from onnx_ssl.analysis import analyze
from onnx_ssl.cli import main
from onnx_ssl.training.artifacts import build_artifacts, load_artifacts
from onnx_ssl.training.chain import SslOptions, run_ssl
from onnx_ssl.training.demo import table1
from onnx_ssl.training.evaluate import evaluate_model
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
    # The options reached the artifacts, and training moved the weights.
    info = load_artifacts(art).info
    assert info.optimizer == "sgd"
    assert info.penalty.lambdas == Lambdas(filter=0.3)
    start = _weights(art / "inference_model.onnx")
    trained = _weights(art / "trained_model.onnx")
    assert start.keys() == trained.keys()
    assert any(not np.array_equal(start[k], trained[k]) for k in start)
    assert "trained 1 epoch(s)" in capsys.readouterr().out
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
    # The options reached the chain (its pruning is tested above), and the model written
    # is the one the report describes.
    printed = capsys.readouterr().out
    assert "lambdas: filter=0.3, channel=0.3" in printed
    assert "(480 training, 120 held-out samples)" in printed  # 600 samples, --val-fraction 0.2
    assert f"wrote {out}" in printed
    params = re.search(r"params (\d+) -> (\d+)", printed)
    assert params, printed
    assert int(params[1]) == analyze(onnx.load(str(model_path))).params
    assert int(params[2]) == analyze(onnx.load(str(out))).params

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
            n.op_type = "ThresholdedRelu"  # neither differentiable nor lowered
    onnx.save(elu, str(tmp_path / "elu.onnx"))
    assert main(["artifacts", str(tmp_path / "elu.onnx"), "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no gradient for ThresholdedRelu" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e").exists()

    assert main(["train", str(tmp_path / "nowhere")]) == 2
    assert "no such artifacts folder" in capsys.readouterr().err


def _weights(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _refused(capsys: pytest.CaptureFixture[str], args: list[str], *words: str) -> None:
    assert main(args) == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnx-ssl: error:") and len(err.splitlines()) == 1, (args, err)
    for w in words:
        assert w in err, (args, err)


@pytest.fixture
def art_folder(tmp_path: Path) -> Path:
    build_artifacts(tiny_cnn(), tmp_path / "art")
    return tmp_path / "art"


def test_training_commands_never_write_over_their_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    art = tmp_path / "art"
    art.mkdir()
    onnx.save(pretrained_tiny(), str(art / "inference_model.onnx"))
    onnx.save(pretrained_tiny(), str(tmp_path / "m.onnx"))
    d = digits(100)
    np.savez(tmp_path / "d.npz", x=d.x["x"], y=d.y)
    (tmp_path / "w" / "ssl").mkdir(parents=True)
    onnx.save(pretrained_tiny(), str(tmp_path / "w" / "ssl" / "inference_model.onnx"))
    before = _snapshot(tmp_path)
    cases = [
        (["artifacts", "art/inference_model.onnx", "-o", "art"], "input"),
        (["ssl", "m.onnx", "--data", "d.npz", "-o", "m.onnx"], "input"),
        (["ssl", "m.onnx", "--data", "d.npz", "-o", "o.onnx", "--report", "./d.npz"], "input"),
        (["ssl", "m.onnx", "--data", "d.npz", "-o", "o.onnx", "--report", "o.onnx"], "output"),
        (["ssl", "w/ssl/inference_model.onnx", "--data", "d.npz", "-o", "o.onnx",
          "--work-dir", "w"], "input"),
        (["ssl", "m.onnx", "--data", "d.npz", "-o", "w/finetune/checkpoint", "--work-dir", "w"],
         "output"),
        (["demo", "--data", "d.npz", "-o", "x.onnx", "--report", "x.onnx.data"], "output"),
        (["demo", "--data", "d.npz", "-o", "w/../d.npz"], "input"),
    ]
    for args, word in cases:
        _refused(capsys, args, word)
        assert _snapshot(tmp_path) == before, args


def test_train_refuses_outputs_inside_its_artifacts(art_folder, tmp_path, capsys):
    d = digits(100)
    np.savez(tmp_path / "d.npz", x=d.x["x"], y=d.y)
    before = _snapshot(tmp_path)
    a = str(art_folder)
    for out in ("-o", "--log"):
        for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint",
                  "ssl.json", "inference_model.onnx", "train_state.ckpt"):
            _refused(capsys, ["train", a, "--data", str(tmp_path / "d.npz"), out,
                              str(art_folder / ".." / "art" / f)], f)
            assert _snapshot(tmp_path) == before, (out, f)
    _refused(capsys, ["train", a, "--data", str(tmp_path / "d.npz"), "-o", "t.csv", "--log",
                      "t.csv"], "other output")
    _refused(capsys, ["train", a, "--data", str(tmp_path / "d.npz"), "-o",
                      str(tmp_path / "d.npz")], "input")
    assert _snapshot(tmp_path) == before


def test_nonsense_numbers_are_refused(art_folder, tmp_path, capsys):
    onnx.save(pretrained_tiny(), str(tmp_path / "m.onnx"))
    m, a, o = str(tmp_path / "m.onnx"), str(art_folder), str(tmp_path / "o.onnx")
    before = _snapshot(tmp_path)
    bad = {
        "train": [["--lr", "nan"], ["--lr", "-1"], ["--val-fraction", "nan"],
                  ["--zero-tol", "-1"], ["--zero-tol", "inf"], ["--epochs", "-1"],
                  ["--batch-size", "0"]],
        "ssl": [["--lr", "nan"], ["--finetune-lr", "-1"], ["--threshold", "nan"],
                ["--threshold", "inf"], ["--lambda-filter", "nan"], ["--lambda-channel", "-1"],
                ["--weight-decay", "nan"], ["--batch-size", "0"], ["--epochs", "-1"],
                ["--val-fraction", "1"], ["--verify", "-1"]],
        "artifacts": [["--weight-decay", "inf"], ["--lambda-depth", "nan"],
                      ["--batch-size", "0"]],
        "demo": [["--baseline-epochs", "-1"], ["--threshold", "nan"], ["--lr", "inf"]],
    }
    lead = {"train": ["train", a], "ssl": ["ssl", m, "-o", o],
            "artifacts": ["artifacts", m, "-o", str(tmp_path / "a2")], "demo": ["demo"]}
    for cmd, options in bad.items():
        for opt in options:
            _refused(capsys, lead[cmd] + opt)
            assert _snapshot(tmp_path) == before, (cmd, opt)


def test_training_data_of_wrong_rank_or_type_is_refused(art_folder, tmp_path, capsys):
    # The tiny CNN reads [N, 1, 8, 8] floats and has 10 classes.
    x = digits(40).x["x"]
    y = np.arange(40) % 10
    bad = {
        "flat": (x.reshape(40, 64), y, "wrong rank"),
        "rank5": (x.reshape(40, 1, 2, 4, 8), y, "wrong rank"),
        "layout": (x.reshape(40, 8, 8, 1).repeat(2, axis=3)[:, :, :4], y, "other dimensions"),
        "uint8": ((x * 255).astype(np.uint8), y, "integers"),
        "int64": (x.astype(np.int64), y, "integers"),
        "nan": (np.where(x > 0.5, np.nan, x).astype(np.float32), y, "NaN"),
        "labels": (x, y + 5, "labels out of range"),
        "float labels": (x, y + 0.5, "integer class indices"),
    }
    state_before = _snapshot(art_folder)
    for name, (xs, ys, words) in bad.items():
        path = tmp_path / f"{name.replace(' ', '_')}.npz"
        np.savez(path, x=xs, y=ys)
        _refused(capsys, ["train", str(art_folder), "--data", str(path), "--epochs", "1"], words)
        assert _snapshot(art_folder) == state_before, name
    # Unit axes may differ ([N, 8, 8] for [N, 1, 8, 8]): that trains.
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    assert main(["train", str(art_folder), "--data", str(tmp_path / "ok.npz"), "--epochs",
                 "1"]) == 0


def test_demo_runs_quickly_on_few_images():
    from onnx_ssl.training.demo import run_demo

    opts = SslOptions(lambdas=Lambdas(filter=0.1, channel=0.1), epochs=1, finetune_epochs=1)
    res = run_demo(data=digits(300), baseline_epochs=1, options=opts, timing_batch=4)
    lines = res.table.splitlines()
    assert lines[0].split()[:2] == ["error", "filters"]
    assert lines[2].startswith("baseline") and lines[3].startswith("SSL")
    assert res.ssl.report.speedup is not None and res.ssl.report.speedup > 0
    assert all(r.speedup is not None for r in res.ssl.report.layers)
    # The table shows the report, and the report the models the demo returns.
    rep = res.ssl.report
    conv = [r for r in rep.layers if r.op == "Conv"]
    assert [r.node for r in conv] == ["conv1", "conv2"]
    assert " - ".join(str(r.filters_before) for r in conv) in lines[2]
    assert " - ".join(str(r.filters_after) for r in conv) in lines[3]
    assert f"{rep.speedup:.2f}x" in lines[3]
    assert res.baseline is not None
    assert analyze(res.baseline).params == rep.params_before
    assert analyze(res.ssl.model).params == rep.params_after


def test_chain_on_a_batchnorm_residual_model_prunes_coupled_channels():
    # Coupled groups hold each channel's conv filter, bias, BatchNorm scale and shift and the
    # next layers' input slices: they go to zero together and the prune pass removes them.
    opts = SslOptions(
        lambdas=Lambdas(coupled=0.5), epochs=4, lr=0.05, finetune_epochs=0, batch_size=32,
        stop_on_collapse=False,  # this strength cuts c3 of the untrained net: prune anyway
    )
    rep = run_ssl(tiny_cnn(bn=True), digits(), opts).report
    assert rep.params_after < rep.params_before
    assert "numeric check: passed" in rep.prune_text
    assert rep.error_pruned == pytest.approx(rep.error_thresholded, abs=1e-9)
