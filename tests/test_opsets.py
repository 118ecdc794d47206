"""The compiler on exports at opset 17, 20 (the dynamo exporter's default), 23 and 28 (the
newest torch 2.13 offers): the analysis needs only onnx; prune keeps the input's opset where
the installed runtime runs it, and otherwise says so and the convert command bridges it."""

from __future__ import annotations

import functools

import exported as X
import pytest
from helpers import zero_groups

from onnx_ssl import env
from onnx_ssl.analysis import analyze, prepare
from onnx_ssl.compiler import prune
from onnx_ssl.errors import UnsupportedModelError
from onnx_ssl.groups import Analysis
from onnx_ssl.io import convert_opset, default_opset, validate

pytestmark = pytest.mark.skipif(not env.has_ort(), reason="needs an ONNX Runtime")

# TorchScript exports opset 17 (dynamo's minimum is 18); dynamo the rest.
VARIANTS = [("ts", 17), ("dynamo", 20), ("dynamo", 23), ("dynamo", 28)]
NETS = ["hand_resnet", "hf_resnet_basic"]


@functools.cache
def _prepared(name: str, exporter: str, opset: int) -> tuple[object, Analysis]:
    m = X.load_at_opset(name, exporter, opset)
    p = prepare(m)
    return p, analyze(p, prepared=True)


def _prunable(a: Analysis) -> tuple[int, int]:
    spaces = [s for s in a.spaces if s.prunable]
    return len(spaces), sum(s.channels for s in spaces)


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("exporter, opset", VARIANTS, ids=[f"{e}{o}" for e, o in VARIANTS])
def test_compiler_at_opset(name: str, exporter: str, opset: int):
    raw = X.load_at_opset(name, exporter, opset)
    assert default_opset(raw) == opset
    if opset > env.onnx_limits().max_opset:  # an older onnx than the one that exported it
        with pytest.raises(UnsupportedModelError, match="pip install -U onnx"):
            validate(raw)
        return
    m, a = _prepared(name, exporter, opset)
    # The same channels are prunable whatever the opset and exporter.
    assert _prunable(a) == _prunable(_prepared(name, "ts", X.OPSET)[1])
    groups = [g for g in a.groups if g.kind == "channel" and g.prunable and g.index % 2 == 0]
    zeroed = zero_groups(m, groups)  # type: ignore[arg-type]
    top = env.runtime_limits().max_opset
    if opset > top:
        with pytest.raises(UnsupportedModelError, match=f"onnx-ssl convert MODEL.onnx --opset "
                                                        f"{top}"):
            prune(zeroed)
        zeroed = convert_opset(zeroed, top)
    res = prune(zeroed)  # numerically checked against its input
    assert default_opset(res.model) == min(opset, top)
    assert res.model.ir_version <= env.runtime_limits().max_ir
    assert res.report.macs_after < 0.4 * res.report.macs_before
