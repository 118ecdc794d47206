"""The fast variant of scripts/reproduce_mlp_mnist.py (the paper's Table 3 and Figure 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from onnx_ssl.runtime import session

    s = session(model)  # graph optimisations off
    return np.concatenate([s.run(None, {s.get_inputs()[0].name: r[None]})[0] for r in x])


@pytest.mark.skipif(not MNIST.exists(), reason="needs the MNIST folder")
def test_mlp_script_fast_variant(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce_mlp_mnist.py"), "--fast",
         "--data", str(MNIST), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (s["train_samples"], s["val_samples"]) == (480, 120)
    assert s["neurons_before"] == [784, 500, 300]
    (run,) = s["runs"]
    pix, h1, h2 = run["neurons_after"]
    # the fast run's lambda removes pixels and neurons in every layer (the Gather path)
    assert 0 < pix < 784 and 0 < h1 < 500 and 0 < h2 < 300
    assert run["pruned_equal"] and run["max_diff"] < 1e-4

    # the structure, read from the written model, not from the summary
    final = onnx.load(tmp_path / "mlp_ssl_0.02.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in final.graph.initializer}
    ops = [n.op_type for n in final.graph.node]
    assert ops == ["Gather", "Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    gather = final.graph.node[0]
    assert gather.input[0] == final.graph.input[0].name
    kept = inits[gather.input[1]]
    assert kept.tolist() == run["kept_pixels"] and len(kept) == pix
    assert [d.dim_value for d in final.graph.input[0].type.tensor_type.shape.dim] == [1, 784]
    shapes = [list(inits[n.input[1]].shape) for n in final.graph.node if n.op_type == "Gemm"]
    assert shapes == [[h1, pix], [h2, h1], [10, h2]]  # transB weights: [out, in]
    assert list(run["fc_shapes"].values()) == shapes
    # FLOP per layer follows from the neuron counts
    assert run["mac_fraction"] == pytest.approx(
        [pix * h1 / (784 * 500), h1 * h2 / (500 * 300), h2 / 300])

    # Figure 4's data: the pixels with a connection are exactly the ones the Gather keeps
    conn = np.asarray(run["connections"])
    assert conn.shape == (784,) and conn.max() <= h1
    assert np.flatnonzero(conn).tolist() == sorted(run["kept_pixels"])
    assert run["pixels_without_connection"] == 784 - pix

    # the pruned model (before fine-tuning) computes the thresholded one's outputs
    thr = onnx.load(tmp_path / "mlp_ssl_0.02_thresholded.onnx")
    pruned = onnx.load(tmp_path / "mlp_ssl_0.02_pruned.onnx")
    x = np.random.default_rng(0).random((8, 784), dtype=np.float32)
    ref, new = _outputs(thr, x), _outputs(pruned, x)
    assert np.abs(new - ref).max() <= 1e-6 + 1e-5 * np.abs(ref).max()
    # the thresholded fc1 columns of the pixels dropped are zero
    w1 = numpy_helper.to_array(next(t for t in thr.graph.initializer if t.name == "fc1.weight"))
    dropped = np.setdiff1d(np.arange(784), kept)
    assert not np.any(w1[:, dropped])

    # the printed table: the baseline and the run, with the paper's neurons beside them
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert any(ln.startswith("| baseline ") and "784 - 500 - 300" in ln for ln in table)
    (row,) = [ln for ln in table if "SSL, lambda 0.02" in ln]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{pix} - {h1} - {h2}" and cells[-1] == "469 - 294 - 166"
    assert cells[1] == f"{100 * run['error']:.2f}%"
    for c in (cells[6], cells[8]):
        assert c.endswith("x") and float(c[:-1]) > 0

    # Figure 4: one 28x28 panel with its colour bar
    import matplotlib.image

    png = tmp_path / "figures" / "input_connections.png"
    h, w = matplotlib.image.imread(png).shape[:2]
    assert 250 <= w <= 700 and 250 <= h <= 500, (w, h)
