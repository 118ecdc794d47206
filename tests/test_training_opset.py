"""Artifacts from a model newer than the training runtime runs: converted down, and said so."""

from __future__ import annotations

import onnx

from onnx_ssl import env, models
from onnx_ssl.io import convert_opset, default_opset
from onnx_ssl.training.artifacts import ArtifactOptions, build_artifacts, load_artifacts
from onnx_ssl.training.penalty import Lambdas


def test_newer_opset_is_converted_down_and_reported(tmp_path):
    top = env.runtime_limits()
    newer = min(env.onnx_limits().max_opset, top.max_opset + 2)
    assert newer > top.max_opset, "the installed onnx reads no opset newer than the runtime"
    model = convert_opset(models.build("lenet"), newer)
    assert default_opset(model) == newer
    art = build_artifacts(model, tmp_path / "a", ArtifactOptions(lambdas=Lambdas(filter=0.01)))
    info = load_artifacts(tmp_path / "a").info
    assert art.info.converted_from_opset == newer == info.converted_from_opset
    for f in ("training_model.onnx", "eval_model.onnx", "inference_model.onnx"):
        m = onnx.load(str(tmp_path / "a" / f))
        assert default_opset(m) == top.max_opset, f
        assert m.ir_version <= top.max_ir, f


def test_opset_the_runtime_runs_is_not_converted(tmp_path):
    art = build_artifacts(models.build("lenet"), tmp_path / "a",
                          ArtifactOptions(lambdas=Lambdas(filter=0.01)))
    assert art.info.converted_from_opset is None
