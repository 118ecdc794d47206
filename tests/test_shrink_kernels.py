"""ShrinkKernelsPass: zero kernel borders are cut off, pads adjusted, inputs cropped."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_same_outputs, make_model, rand, vi
from onnx import helper, numpy_helper

from onnx_ssl.compiler import prune


def conv_model(rng, w: np.ndarray, pads, strides, dilations, group=1, size=(11, 9)):
    n = w.shape[0]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=pads,
                              strides=strides, dilations=dilations, group=group)]
    c = w.shape[1] * group
    h, wd = size
    out_h = (h + pads[0] + pads[2] - dilations[0] * (w.shape[2] - 1) - 1) // strides[0] + 1
    out_w = (wd + pads[1] + pads[3] - dilations[1] * (w.shape[3] - 1) - 1) // strides[1] + 1
    return make_model(nodes, [vi("x", [2, c, h, wd])], [vi("y", [2, n, out_h, out_w])],
                      {"w": w, "b": rand(rng, n)})


@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [1, 1, 1, 1], [2, 0, 1, 2]])
@pytest.mark.parametrize("strides", [[1, 1], [2, 3]])
@pytest.mark.parametrize("dilations", [[1, 1], [2, 1]])
@pytest.mark.parametrize("cut", [(1, 0, 0, 0), (0, 1, 0, 2), (1, 1, 1, 1), (2, 0, 0, 0)])
def test_zero_borders_are_cut_exactly(rng, pads, strides, dilations, cut):
    w = rand(rng, 4, 3, 5, 5)
    top, bottom, left, right = cut
    w[:, :, :top] = 0
    w[:, :, 5 - bottom:] = 0
    w[:, :, :, :left] = 0
    w[:, :, :, 5 - right:] = 0
    model = conv_model(rng, w, pads, strides, dilations)
    result = prune(model, verify=2)
    assert_same_outputs(model, result.model, seed=4)
    new_w = next(numpy_helper.to_array(t) for t in result.model.graph.initializer
                 if t.name.startswith("w"))
    assert new_w.shape[2:] == (5 - top - bottom, 5 - left - right)
    rep = dict(result.report.passes)["shrink-kernels"]
    assert rep.kernels_shrunk == ("conv",)
    assert result.report.macs_after < result.report.macs_before


def test_grouped_and_near_miss(rng):
    w = rand(rng, 4, 2, 3, 3)
    w[:, :, 0] = 0
    w[1, 0, 0, 2] = 1e-4  # one element survives in the border row: nothing to cut
    model = conv_model(rng, w, [1, 1, 1, 1], [1, 1], [1, 1], group=2)
    result = prune(model, verify=1)
    assert not result.report.modified
    w[1, 0, 0, 2] = 0
    model = conv_model(rng, w, [1, 1, 1, 1], [1, 1], [1, 1], group=2)
    result = prune(model, verify=2)
    assert dict(result.report.passes)["shrink-kernels"].positions_removed == 4 * 2 * 3
