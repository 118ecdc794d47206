"""Layers point one way: the core (op table, analysis, compiler) never imports the training
package, which needs onnxruntime-training and builds on the core."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["onnx_ssl.rules", "onnx_ssl.analysis", "onnx_ssl.compiler",
                                    "onnx_ssl.decompositions"])
def test_core_does_not_import_training(module):
    code = (f"import json, sys, {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('onnx_ssl'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert module in loaded  # the probe saw the module it imported
    assert not [m for m in loaded if m.startswith("onnx_ssl.training")], loaded


def test_the_training_package_does_import_the_core_table():
    code = ("import json, sys, onnx_ssl.training.lowering; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('onnx_ssl'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert {"onnx_ssl.decompositions", "onnx_ssl.rules"} <= set(loaded)
