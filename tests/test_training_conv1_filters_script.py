"""scripts/plot_conv1_filters.py (Figures 3 and 5) on LeNets zeroed and pruned here (needs
matplotlib, the [plots] extra, so it runs in the training world)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_ssl import models, prune

REPO = Path(__file__).resolve().parents[1]


def _with_conv1(model: onnx.ModelProto, edit) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    name = next(n.input[1] for n in m.graph.node if n.op_type == "Conv")
    t = next(t for t in m.graph.initializer if t.name == name)
    w = numpy_helper.to_array(t).copy()
    edit(w)
    t.CopyFrom(numpy_helper.from_array(w, name))
    return m


def test_plot_conv1_filters(tmp_path):
    base = models.build("lenet")
    t1, t2, out = tmp_path / "lenet", tmp_path / "shape", tmp_path / "figs"
    t1.mkdir()
    t2.mkdir()
    for d in (t1, t2):
        onnx.save(base, d / "lenet_baseline.onnx")

    def filters(w: np.ndarray) -> None:  # keep conv1 filters 2, 5, 11
        w[[k for k in range(20) if k not in (2, 5, 11)]] = 0

    def fibers(w: np.ndarray) -> None:  # zero the kernel border of every filter
        w[:, :, [0, 4], :] = 0
        w[:, :, :, [0, 4]] = 0

    pruned = prune(_with_conv1(base, filters), verify=1).model
    onnx.save(pruned, t1 / "lenet_ssl_0.04.onnx")
    onnx.save(prune(_with_conv1(base, fibers), verify=1).model, t2 / "lenet_shape0.02.onnx")
    onnx.save(base, t2 / "lenet_shape0.02_lowered.onnx")  # skipped by the script
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_conv1_filters.py"), "--table1", str(t1),
         "--table2", str(t2), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "filters.json").read_text())
    rows1, rows2 = s["table1"]["rows"], s["table2"]["rows"]
    assert [x["label"] for x in rows1] == ["baseline", "ssl_0.04"]
    assert [x["filters"] for x in rows1] == [20, 3]  # the pruned model keeps 3 filters
    assert rows1[0]["filter_sizes"] == [25] * 20 and rows1[1]["filter_sizes"] == [25] * 3
    assert [x["kernel"] for x in rows1] == [[5, 5], [5, 5]]
    assert [x["label"] for x in rows2] == ["baseline", "shape0.02"]
    # prune drops the zero kernel border of every filter: 3x3 kernels, all non-zero
    assert rows2[1]["filters"] == 20 and rows2[1]["kernel"] == [3, 3]
    assert rows2[1]["filter_sizes"] == [9] * 20

    import matplotlib.image

    sizes = {}
    for key in ("table1", "table2"):
        png = out / s[key]["figure"]
        sizes[key] = matplotlib.image.imread(png).shape[:2]
    for h, w in sizes.values():  # two rows of up to 20 tiles, and their labels
        assert 900 <= w <= 1700 and 120 <= h <= 350, (w, h)


def test_plot_conv1_filters_missing_folders(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_conv1_filters.py"), "--table1",
         str(tmp_path / "a"), "--table2", str(tmp_path / "b"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no lenet_*.onnx there" in r.stderr
    assert not (tmp_path / "o" / "filters.json").exists()
