"""Batch probing: which batch sizes a model runs with, and freeing the batch of a
static-batch export.

The group analysis needs static shapes, so the model is prepared at its own batch size
(:func:`static_batch`, 1 when it is free) and the training graph gets a symbolic ``batch``
dimension (:func:`set_batch`) when ONNX Runtime runs it at other batch sizes
(:func:`runs_with_batch`); a static-batch export whose Reshape targets hard-code the batch
size is rewritten to take any batch (:func:`free_batch_literals`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_ssl.errors import one_line

from .native import native_stderr_captured
from .proto import drop_unused_initializers, graph_inputs
from .spec import BATCH_PARAM

log = logging.getLogger(__name__)


def _dim0_keys(model: onnx.ModelProto) -> set[str]:
    keys = set()
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            d = dims[0]
            keys.add(d.dim_param if d.HasField("dim_param") else f"#{d.dim_value}")
    return keys


def set_batch(model: onnx.ModelProto, batch: int | str) -> onnx.ModelProto:
    """A copy whose inputs (and outputs with the same leading dimension) have ``batch`` as
    their first dimension; intermediate shapes are dropped."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keys = _dim0_keys(model)
    targets = list(graph_inputs(m))
    for o in m.graph.output:
        dims = o.type.tensor_type.shape.dim
        if dims:
            d = dims[0]
            key = d.dim_param if d.HasField("dim_param") else f"#{d.dim_value}"
            if key in keys or not (d.HasField("dim_param") or d.HasField("dim_value")):
                targets.append(o)
    for vi in targets:
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            continue
        if isinstance(batch, str):
            dims[0].dim_param = batch
        else:
            dims[0].dim_value = batch
    del m.graph.value_info[:]
    return m


def static_batch(model: onnx.ModelProto) -> int:
    """The first input's fixed batch size (1 when every input's batch is free)."""
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return 1


def free_batch_literals(model: onnx.ModelProto, b0: int) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` (its inputs' batch dim symbolic, see :func:`set_batch`) whose
    Reshape targets no longer hard-code the batch size ``b0``; returns it and the rewritten
    nodes.

    A static-batch export folds ``x.view(x.size(0), -1)`` into the literal target
    ``[b0, -1]``. Where shape inference says the data's leading dim is the symbolic batch and
    the target's first entry is ``b0``, that entry becomes 0 (copy the input's dim; a
    node with ``allowzero=1``, as the dynamo exporter writes, gets ``allowzero=0`` when its
    target has no other 0): the same shape at batch ``b0``, the batch at any other. Runs to a
    fixpoint, as each rewrite frees the batch of later nodes.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    used = {t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output}
    done: list[str] = []
    while True:
        inferred = onnx.shape_inference.infer_shapes(m)
        lead: dict[str, str] = {}
        for vi in (*inferred.graph.input, *inferred.graph.value_info):
            dims = vi.type.tensor_type.shape.dim
            if dims and dims[0].dim_param == BATCH_PARAM:
                lead[vi.name] = BATCH_PARAM
        changed = False
        for node in m.graph.node:
            if node.op_type != "Reshape" or len(node.input) < 2 or node.input[0] not in lead:
                continue
            t = inits.get(node.input[1])
            if t is None:
                continue
            target = numpy_helper.to_array(t).astype(np.int64).copy()
            if target.ndim != 1 or not len(target) or target[0] != b0:
                continue
            allowzero = [a for a in node.attribute if a.name == "allowzero" and a.i]
            if allowzero and 0 in target:
                continue  # a literal zero-sized dim: 0 cannot mean "copy" here
            for a in allowzero:  # (no 0 in the target: allowzero changes nothing else)
                a.i = 0
            target[0] = 0
            name, k = f"{node.name or node.output[0]}.ssl_batch_free_shape", 1
            while name in used:
                k += 1
                name = f"{node.name or node.output[0]}.ssl_batch_free_shape_{k}"
            used.add(name)
            new = numpy_helper.from_array(target, name)
            m.graph.initializer.append(new)
            inits[name] = new
            node.input[1] = name
            done.append(node.name or node.output[0])
            changed = True
        if not changed:
            break
    drop_unused_initializers(m)
    return m, done


def runs_with_batch(model: onnx.ModelProto, batch: int) -> bool:
    """Whether ONNX Runtime runs ``model`` with leading dimension ``batch`` on every input."""
    from onnx_ssl.runtime import session

    try:
        with native_stderr_captured():
            sess = session(model)
            feeds = {}
            for i in sess.get_inputs():
                shape = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in i.shape[1:]]
                dtype: Any = np.float32 if "float" in i.type else np.int64
                if i.type == "tensor(bool)":
                    dtype = np.bool_
                feeds[i.name] = np.zeros(shape, dtype=dtype)
            outs = sess.run(None, feeds)
    except Exception as e:  # any failure means: not batch-free
        log.debug("model does not run with batch %d: %s", batch, one_line(e))
        return False
    return all(np.ndim(o) == 0 or np.shape(o)[0] == batch for o in outs[:1])


def with_static_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with batch 1 where its batch is free (the prune pass needs static shapes)."""
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            return set_batch(model, 1)
    return model
