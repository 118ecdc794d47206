"""Shared test helpers: tiny graphs, zeroing groups, running models."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_ssl.analysis import analyze, prepare
from onnx_ssl.groups import Analysis, Group
from onnx_ssl.runtime import random_inputs, run, session


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], inits: dict[str, np.ndarray],
               opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs),
                              [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f"
                                                       else v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name: str, shape: Sequence[int | str], dtype: int = TensorProto.FLOAT
       ) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def embedding_tables(m: onnx.ModelProto) -> dict[str, int]:
    """Constant 2-D float tables read by a Gather (embeddings): name -> columns."""
    inits = {t.name: t for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        t = inits.get(n.input[0]) if n.op_type == "Gather" else None
        if t is not None and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT:
            out[t.name] = int(t.dims[1])
    return out


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Writable copies of the model's initializers, by name."""
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def with_arrays(model: onnx.ModelProto, arrs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers hold ``arrs``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrs[t.name], t.name))
    return m


def zero_groups(model: onnx.ModelProto, groups: Iterable[Group], side: str = "both"
                ) -> onnx.ModelProto:
    """A copy of ``model`` with the members of ``groups`` zeroed: ``both`` (every out and in
    member), ``in`` (the in members), or ``filter`` (only the producing weights: the filters
    of Conv/Gemm/MatMul layers, depthwise ones included, and embedding columns; biases and
    norm parameters stay, so the channel becomes a non-zero constant)."""
    m = model
    arrs = arrays(m)
    layer_weights = {n.input[1] for n in m.graph.node
                     if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")}
    layer_weights |= set(embedding_tables(m))
    for g in groups:
        for mem in g.members:
            if mem.role == "stat":
                continue
            if side == "in" and mem.role != "in":
                continue
            if side == "filter" and not (mem.role == "out" and mem.tensor in layer_weights):
                continue
            v = arrs[mem.tensor]
            v[mem.index(v.shape)] = 0
    return with_arrays(m, arrs)


def pick_groups(a: Analysis, k: int, seed: int) -> list[Group]:
    cands = [g for g in a.groups if g.kind == "channel" and g.prunable]
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(cands), size=min(k, len(cands)), replace=False)
    return [cands[i] for i in sorted(idx)]


def outputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    s = session(model)
    return run(s, random_inputs(s, seed))


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, seed: int = 0) -> None:
    ra, rb = outputs(a, seed), outputs(b, seed)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert ra[k].shape == rb[k].shape, k
        scale = float(np.max(np.abs(ra[k]))) if ra[k].size else 0.0
        np.testing.assert_allclose(rb[k], ra[k], rtol=0, atol=1e-6 + 1e-5 * scale, err_msg=k)


def out_channels(model: onnx.ModelProto) -> int:
    """Total output channels of Conv/Gemm/MatMul layers."""
    a = analyze(model)
    return sum(la.weight_shape[la.out_axis] for la in a.layers)


__all__ = ["analyze", "prepare"]
