"""prune counts the result's layers, params and MACs on the rewritten graph (which has its
shapes) instead of re-importing the exported model: the counts equal those of the model it
hands out, with a static batch and with a symbolic one (MACs per sample)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import zero_groups

from onnx_ssl import compiler
from onnx_ssl.analysis import analyze, bias_maps, model_layers
from onnx_ssl.io import to_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import chain  # noqa: E402


def _zeroed(side: str, symbolic: bool) -> onnx.ModelProto:
    m = chain(4)
    if symbolic:
        for v in (*m.graph.input, *m.graph.output):
            v.type.tensor_type.shape.dim[0].dim_param = "N"
    a = analyze(m)
    rng = np.random.default_rng(0)
    groups = [g for g in a.groups if g.kind == "channel" and g.prunable]
    picked = [groups[i] for i in rng.choice(len(groups), size=len(groups) // 2,
                                            replace=False)]
    return zero_groups(m, picked, side=side)


@pytest.mark.parametrize("side", ["both", "filter"])
@pytest.mark.parametrize("symbolic", [False, True])
def test_report_counts_the_layers_of_the_model_it_hands_out(monkeypatch, side, symbolic):
    seen: list[object] = []
    shaped_layers = compiler._shaped_layers

    def spy(graph):  # type: ignore[no-untyped-def]
        out = shaped_layers(graph)
        seen.append(out)
        return out

    monkeypatch.setattr(compiler, "_shaped_layers", spy)
    res = compiler.prune(_zeroed(side, symbolic), verify=1)
    assert res.report.removed
    assert len(seen) == 1 and seen[0] is not None  # counted on the rewrite, no re-import
    layers = model_layers(res.model)
    maps = bias_maps(to_graph(res.model))
    if side == "filter":
        assert maps  # constant channels were folded into bias maps
    r = res.report
    assert r.layers_after == len(layers)
    assert r.params_after == sum(la.params for la in layers) + sum(maps.values())
    assert r.macs_after == sum(la.macs for la in layers) > 0
    assert r.macs_after < r.macs_before
    assert {s.node: (s.params_after, s.macs_after) for s in r.layers if s.macs_after} == {
        la.node: (la.params + maps.get(la.node, 0), la.macs) for la in layers}


def test_a_bias_map_behind_an_activation_matmul_is_no_layer_param():
    """Attention adds a constant position-bias map to Q x K^T (Swin): that MatMul of two
    activations is no layer, so the map counts in no layer's params and not in the total
    (it added Swin-T's 223,293 bias-table values to the total but to no row)."""
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 8] x) => (float[1, 4, 4] y) <float[8, 8] w, float[4, 4] pos> {
            q = MatMul(x, w)
            kt = Transpose<perm = [0, 2, 1]>(q)
            s = MatMul(q, kt)
            y = Add(s, pos)
        }""")
    rng = np.random.default_rng(0)
    for t, shape in (("w", (8, 8)), ("pos", (4, 4))):
        m.graph.initializer.append(onnx.numpy_helper.from_array(
            rng.standard_normal(shape).astype(np.float32), t))
    rep = compiler.prune(m, verify=0).report
    assert rep.params_before == rep.params_after == 64 == analyze(m).params
    assert sum(s.params_before for s in rep.layers) == 64 and len(rep.layers) == 1


def test_macs_of_a_model_with_dynamic_spatial_dims_are_not_static():
    from onnx_ssl.analysis import format_table

    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, H, W] x) => (float[1, 3, H, W] y) <float[3, 2, 1, 1] w> {
            y = Conv(x, w)
        }""")
    m.graph.initializer.append(onnx.numpy_helper.from_array(
        np.ones((3, 2, 1, 1), np.float32), "w"))
    a = analyze(m)
    assert a.macs == 0 and len(a.layers) == 1
    assert "MACs not static" in format_table(a) and "MACs 0" not in format_table(a)
    text = compiler.prune(m, verify=0).report.to_text()
    assert "MACs not static" in text and "inf" not in text, text
