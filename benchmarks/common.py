"""Shared pieces of the benchmark scripts: reference graphs and timing.

``resnet50()`` exports HuggingFace ``transformers``' ResNet-50 (default ``ResNetConfig``,
random init, no download) with the TorchScript exporter at 1x3x224x224 and caches it.
``chain(n_blocks)`` builds a residual CNN of any size with ``onnx.helper`` (about 9 nodes a
block) for the linear-growth measurements.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

CACHE = Path(os.environ.get("ONNX_SSL_BENCH_CACHE", Path.home() / ".cache" / "onnx-ssl-bench"))


def hf_resnet50_module(batch: int = 1) -> tuple[Any, Any]:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig()).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model, torch.randn(batch, 3, 224, 224)


def export_torch(module: Any, example: Any, path: Path, fold: bool = True) -> onnx.ModelProto:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            out = self.inner(x)
            return out.logits if hasattr(out, "logits") else out

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(Logits(module).eval(), (example,), str(path), dynamo=False,
                      opset_version=17, input_names=["pixel_values"], output_names=["logits"],
                      do_constant_folding=fold)
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 10)
    onnx.save_model(m, str(path))
    return m


def resnet50(batch: int = 1, fold: bool = True) -> onnx.ModelProto:
    """HF ResNet-50; ``fold=False`` keeps the BatchNormalization nodes (about 175 nodes)."""
    path = CACHE / f"hf_resnet50_b{batch}{'' if fold else '_nofold'}.onnx"
    if path.exists():
        return onnx.load(str(path))
    module, x = hf_resnet50_module(batch)
    return export_torch(module, x, path, fold)


def chain(n_blocks: int, channels: int = 8, size: int = 8, seed: int = 0) -> onnx.ModelProto:
    """stem conv, then n residual blocks (conv-bn-relu-conv-bn-add-relu), GAP, FC."""
    rng = np.random.default_rng(seed)
    c = channels
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def w(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * 0.3).astype(np.float32), name))
        return name

    def bn(x: str, name: str) -> str:
        args = [w(f"{name}.s", c), w(f"{name}.b", c), w(f"{name}.m", c)]
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32),
                                             f"{name}.v"))
        nodes.append(helper.make_node("BatchNormalization", [x, *args, f"{name}.v"],
                                      [f"{name}.y"], name=name))
        return f"{name}.y"

    nodes.append(helper.make_node("Conv", ["x", w("stem.w", c, 3, 3, 3)], ["h0"], name="stem",
                                  pads=[1, 1, 1, 1]))
    h = "h0"
    for i in range(n_blocks):
        p = f"b{i}"
        nodes.append(helper.make_node("Conv", [h, w(f"{p}.c1", c, c, 3, 3)], [f"{p}.a"],
                                      name=f"{p}.conv1", pads=[1, 1, 1, 1]))
        a = bn(f"{p}.a", f"{p}.bn1")
        nodes.append(helper.make_node("Relu", [a], [f"{p}.r"], name=f"{p}.relu1"))
        nodes.append(helper.make_node("Conv", [f"{p}.r", w(f"{p}.c2", c, c, 3, 3)], [f"{p}.c"],
                                      name=f"{p}.conv2", pads=[1, 1, 1, 1]))
        b = bn(f"{p}.c", f"{p}.bn2")
        nodes.append(helper.make_node("Add", [h, b], [f"{p}.sum"], name=f"{p}.add"))
        nodes.append(helper.make_node("Relu", [f"{p}.sum"], [f"{p}.out"], name=f"{p}.relu2"))
        h = f"{p}.out"
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["g"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["g"], ["f"], name="flat"))
    nodes.append(helper.make_node("Gemm", ["f", w("fc.w", 10, c), w("fc.b", 10)], ["logits"],
                                  name="fc", transB=1))
    graph = helper.make_graph(
        nodes, f"chain{n_blocks}",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
           for r in rows]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def single_thread_session(model: onnx.ModelProto, profile_prefix: str | None = None) -> Any:
    """An ONNX Runtime CPU session of ``model`` on 1 thread with every graph optimisation;
    with ``profile_prefix``, profiling on and the optimised model written beside it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
        so.optimized_model_filepath = profile_prefix + ".opt.onnx"
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
