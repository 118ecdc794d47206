"""The parsers generated from the options dataclasses: defaults, names and aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnx_ssl.cli import artifacts, build_parser, train
from onnx_ssl.cli._common import options_from
from onnx_ssl.cli._training import ssl_options
from onnx_ssl.training.chain import SslOptions
from onnx_ssl.training.demo import demo_options
from onnx_ssl.training.penalty import Lambdas
from onnx_ssl.training.spec import ArtifactOptions
from onnx_ssl.training.trainer import TrainConfig


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_no_option_given_is_the_dataclass_default():
    assert ssl_options(parse("ssl", "m.onnx", "-o", "o.onnx"),
                       {"filter": 0.03, "channel": 0.03}) == SslOptions()
    assert ssl_options(parse("demo"), {"filter": 0.1, "channel": 0.1}) == demo_options()
    assert options_from(TrainConfig, parse("train", "dir"), train._opts()) == TrainConfig()
    head, tail = artifacts._opts()
    assert options_from(ArtifactOptions, parse("artifacts", "m", "-o", "d"), (*head, *tail),
                        lambdas=Lambdas(), scale_by_size=False) == ArtifactOptions()


def test_every_option_reaches_its_field():
    args = parse("ssl", "m.onnx", "-o", "o.onnx", "--no-prox", "--rms-threshold", "0.01",
                 "--epochs", "3", "--lambda-depth", "0.5", "--target-macs", "0.5",
                 "--work-dir", "w", "--schedule", "step", "--scale-by-size", "--loss", "mse",
                 "--finetune-lr", "0.1", "--verify", "0")
    assert ssl_options(args, {}) == SslOptions(
        prox=False, threshold=0.01, epochs=3, lambdas=Lambdas(depth=0.5), target_macs=0.5,
        work_dir=Path("w"), schedule="step", scale_by_size=True, loss="mse", finetune_lr=0.1,
        verify=0)
    args = parse("train", "dir", "--no-penalty", "--prox", "--log", "l.csv", "-o", "o.onnx",
                 "--resume", "--zero-tol", "0.1", "--batch-size", "8")
    assert options_from(TrainConfig, args, train._opts()) == TrainConfig(
        penalty=False, prox=True, log_path=Path("l.csv"), export_path=Path("o.onnx"),
        resume=True, zero_tol=0.1, batch_size=8)
    head, tail = artifacts._opts()
    args = parse("artifacts", "m", "-o", "d", "--output-name", "y", "--batch-size", "8",
                 "--optimizer", "sgd", "--loss", "l1", "--weight-decay", "0.5")
    assert options_from(ArtifactOptions, args, (*head, *tail), lambdas=Lambdas(),
                        scale_by_size=False) == ArtifactOptions(
        output="y", fallback_batch=8, optimizer="sgd", loss="l1", weight_decay=0.5)


def test_the_two_thresholds_keep_their_old_names_and_say_which_norm(capsys):
    assert parse("prune", "m", "-o", "o", "--l2-threshold", "0.5").threshold == 0.5
    assert parse("prune", "m", "-o", "o", "--threshold", "0.5").threshold == 0.5
    assert parse("ssl", "m", "-o", "o", "--threshold", "0.5").threshold == 0.5
    for cmd, norm in (("prune", "L2 norm ||w||_2 is <= T"), ("ssl", "RMS ||w||/sqrt(size)")):
        with pytest.raises(SystemExit):
            parse(cmd, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert norm in text, text
    with pytest.raises(SystemExit):
        parse("ssl", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "not the coupled channel of `analyze`" in text


def test_a_choice_outside_the_library_list_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse("ssl", "m", "-o", "o", "--schedule", "linear")
    assert e.value.code == 2
    assert "invalid choice: 'linear'" in capsys.readouterr().err


def test_lambda_scale_options_reach_the_lambdas():
    from onnx_ssl.cli._training import lambdas
    from onnx_ssl.errors import InputError

    args = parse("ssl", "m.onnx", "-o", "o.onnx", "--lambda-scale", "filter:conv2=2",
                 "--lambda-scale", "channel:/a/b:c=0.5")
    assert ssl_options(args, {"filter": 0.03, "channel": 0.03}).lambdas == Lambdas(
        filter=0.03, channel=0.03, scales=(("filter:conv2", 2.0), ("channel:/a/b:c", 0.5)))
    args = parse("artifacts", "m", "-o", "d", "--lambda-filter", "0.1",
                 "--lambda-scale", "filter:c1=0")
    assert lambdas(args, {}) == Lambdas(filter=0.1, scales=(("filter:c1", 0.0),))
    for bad in ("filter:conv2", "filter:conv2=x", "=2"):
        with pytest.raises(InputError, match="STRUCTURE:LAYER=X"):
            lambdas(parse("ssl", "m", "-o", "o", "--lambda-scale", bad), {})
