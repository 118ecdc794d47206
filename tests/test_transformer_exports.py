"""Transformer constructs in exported graphs (issue 18): the defects found by
``benchmarks/bench_transformers.py``, each with a regression test.

* A class token concatenated to the patch embeddings along the sequence axis (ViT, DeiT):
  the Concat's constant input (``Expand`` of the token to the batch, folded) is a
  per-channel constant sliced with the channel, like a bias, not untracked channels. Tiny
  ``onnx.helper`` graphs (with a near miss: a graph input concatenated there stays blocked),
  and a torch module exported by both exporters, with a static and a dynamic batch.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import exported as X
import numpy as np
import onnx
import pytest
from helpers import make_model, rand, vi, zero_groups
from onnx import helper

from onnx_ssl.analysis import analyze
from onnx_ssl.compiler import prune
from onnx_ssl.groups import Analysis, Group
from onnx_ssl.runtime import run

pytest.importorskip("onnxruntime")


def _channel_groups(a: Analysis, space: str) -> list[Group]:
    return [g for g in a.groups if g.kind == "channel" and g.space == space]


def _assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    ra, rb = run(a, feeds), run(b, feeds)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert ra[k].shape == rb[k].shape, k
        scale = float(np.max(np.abs(ra[k])))
        np.testing.assert_allclose(rb[k], ra[k], rtol=0, atol=1e-6 + 1e-5 * scale, err_msg=k)


# --- the class-token Concat, in onnx.helper graphs ------------------------------------------


def _token_concat(token_is_input: bool, batch: int = 2) -> onnx.ModelProto:
    """``Conv1d(x[B,3,4]) -> [B,8,4]``, transposed to ``[B,4,8]``, a token ``[B,1,8]``
    concatenated before it along the sequence axis, Relu, ``@ W2 -> [B,5,5]``. The token is
    a constant, or (the near miss) computed from a graph input."""
    rng = np.random.default_rng(0)
    inits = {"W1": rand(rng, 8, 3, 1), "b1": rand(rng, 8), "W2": rand(rng, 8, 5)}
    inputs = [vi("x", [batch, 3, 4])]
    nodes = []
    if token_is_input:  # a per-sample scalar broadcast to the token's shape
        inputs.append(vi("s", [batch, 1, 1]))
        inits["token_shape"] = np.array([batch, 1, 8], np.int64)
        nodes.append(helper.make_node("Expand", ["s", "token_shape"], ["token"], name="ex"))
    else:
        inits["token"] = np.repeat(rand(rng, 1, 1, 8), batch, axis=0)
    nodes += [helper.make_node("Conv", ["x", "W1", "b1"], ["h"], name="conv"),
             helper.make_node("Transpose", ["h"], ["t"], name="tr", perm=[0, 2, 1]),
             helper.make_node("Concat", ["token", "t"], ["c"], name="cat", axis=1),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    return make_model(nodes, inputs, [vi("y", [batch, 5, 5])], inits)


def test_constant_concatenated_along_another_axis_is_sliced_with_the_channel() -> None:
    model = _token_concat(token_is_input=False)
    a = analyze(model)
    (space,) = [s for s in a.spaces if s.channels == 8]
    assert space.prunable, space.reason
    groups = _channel_groups(a, space.id)
    # Channel i of the space holds token[:, :, i] (an "out" member, like a bias).
    assert {m.slice for g in groups for m in g.members if m.tensor == "token"} == {
        (None, None, (i,)) for i in range(8)}
    assert all(m.role == "out" for g in groups for m in g.members if m.tensor == "token")
    zeroed = zero_groups(model, groups[1:6:2])
    result = prune(zeroed, verify=2)
    rng = np.random.default_rng(3)
    _assert_same(zeroed, result.model, {"x": rand(rng, 2, 3, 4)})
    kept = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert kept["W1"] == [5, 3, 1] and kept["W2"] == [5, 5], kept
    assert [5] in kept.values() and [2, 1, 5] in kept.values(), kept  # b1, token


def test_input_concatenated_along_another_axis_stays_untracked() -> None:
    """The near miss: a token computed from a graph input is not a constant to slice."""
    a = analyze(_token_concat(token_is_input=True))
    (space,) = [s for s in a.spaces if s.channels == 8]
    assert not space.prunable
    assert space.reason is not None
    assert space.reason.text == ("cat (Concat): input 0: token (made by ex (Expand)) carries "
                                 "channels that are not tracked")


# --- the class-token Concat, exported from torch ---------------------------------------------


def _token_net() -> tuple[Any, Any]:
    """A ViT embedding without LayerNorm (so that its space stays prunable): patch Conv,
    flatten, a class token expanded to the batch and concatenated before the patches, a
    position embedding added, GELU and a Linear."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 4, 4)
            self.cls = nn.Parameter(torch.randn(1, 1, 8))
            self.pos = nn.Parameter(torch.randn(1, 5, 8))
            self.fc = nn.Linear(8, 6)

        def forward(self, x: Any) -> Any:
            y = self.patch(x).flatten(2).transpose(1, 2)
            y = torch.cat([self.cls.expand(x.shape[0], -1, -1), y], dim=1) + self.pos
            return self.fc(nn.functional.gelu(y))

    return Net().eval(), torch.randn(2, 3, 8, 8)


def _export(exporter: str) -> onnx.ModelProto:
    import torch

    module, x = _token_net()
    dynamic = exporter.endswith("_dynbatch")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter.startswith("dynamo"):
            pytest.importorskip("onnxscript")
            kw: dict[str, Any] = ({"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
                                  if dynamic else {})
            prog = torch.onnx.export(module, (x,), dynamo=True, opset_version=X.OPSET,
                                     input_names=["x"], output_names=["y"], verbose=False,
                                     **kw)
            assert prog is not None
            model = prog.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=X.OPSET,
                              input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}} if dynamic else None)
            model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, X.MAX_IR)
    return model


@pytest.mark.skipif(not X.have_torch(), reason="needs torch to export the module")
@pytest.mark.parametrize("exporter", ["ts", "ts_dynbatch", "dynamo", "dynamo_dynbatch"])
def test_class_token_concat_prunes_exactly(exporter: str) -> None:
    """The patch Conv's space is prunable through the class-token Concat; zeroing channels
    (the token's slice among the members) and pruning is exact, at the export's batch and,
    with a dynamic batch, at another."""
    model = _export(exporter)
    a = analyze(model)
    (space,) = [s for s in a.spaces if s.channels == 8]
    assert space.prunable, space.reason
    groups = _channel_groups(a, space.id)
    # The token (or, where the exporter folded the Expand, its copy per sample) is a member.
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert all(any(dims.get(m.tensor, ())[1:] == (1, 8) for m in g.members)
               for g in groups), [m.tensor for m in groups[0].members]
    zeroed = zero_groups(model, groups[::3])
    result = prune(zeroed, verify=2)
    assert result.report.macs_after < result.report.macs_before
    rng = np.random.default_rng(1)
    for batch in (2, 3) if exporter.endswith("_dynbatch") else (2,):
        _assert_same(zeroed, result.model, {"x": rng.standard_normal(
            (batch, 3, 8, 8)).astype(np.float32)})
