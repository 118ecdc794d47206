"""Batch probing: which batch sizes a model runs with, and freeing the batch of a
static-batch export.

The group analysis needs static shapes, so the model is prepared at its own batch size
(:func:`static_batch`, 1 when it is free) and the training graph gets a symbolic ``batch``
dimension (:func:`set_batch`) when it computes, at other batch sizes, what the model computes
on each sample alone (:class:`BatchCheck`; running is not enough: a constant folded at one
batch size can broadcast to any and mix the samples); a static-batch export whose Reshape
targets hard-code the batch size is rewritten to take any batch (:func:`free_batch_literals`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_ssl.errors import one_line
from onnx_ssl.io import ModelMeta, from_graph, to_graph
from onnx_ssl.names import fresh_name

from .forms import ToInferenceFormPass
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


def free_batch_literals(model: onnx.ModelProto, b0: int, shapes: onnx.ModelProto | None = None
                        ) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` (its inputs' batch dim symbolic, see :func:`set_batch`) whose
    Reshape targets no longer hard-code the batch size ``b0``; returns it and the rewritten
    nodes.

    A static-batch export folds ``x.view(x.size(0), -1)`` into the literal target
    ``[b0, -1]`` (an initializer or a Constant node). Where the target's first entry is
    ``b0`` and the data's leading dim is the symbolic batch (shape inference), or is ``b0`` at
    batch ``b0`` (inferred on ``shapes``, a form of the model with static shapes there such
    as its prepared form, else on ``model``), that entry becomes 0: copy the input's dim,
    exact at batch ``b0`` and the batch at others (the caller checks the values,
    :class:`BatchCheck`). A node with ``allowzero=1``, as the dynamo exporter writes, gets
    ``allowzero=0`` when its target has no other 0. Runs to a fixpoint, as each rewrite
    frees the batch of later nodes.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    used = {t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output}
    consts = _constant_nodes(m)
    at_b0 = _leading_b0(shapes or m, b0)
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
            if node.op_type != "Reshape" or len(node.input) < 2 or not (
                    node.input[0] in lead or node.input[0] in at_b0):
                continue
            t = inits.get(node.input[1], consts.get(node.input[1]))
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
            name = fresh_name(used, f"{node.name or node.output[0]}.ssl_batch_free_shape")
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


def free_batch_indices(model: onnx.ModelProto, b0: int) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` (its inputs' batch dim symbolic, see :func:`set_batch`) in which
    the literal ``arange(b0)`` a static-batch export traced from ``torch.arange(batch)`` is
    computed from the batch size again; returns it and the constants replaced.

    BERT's attention mask gathers ``mask.flatten()[arange(batch)[:, None, None, None] * seq
    + arange(seq)]``; exported at batch ``b0`` the first term is the integer constant of
    shape ``[b0, 1, ..., 1]`` holding ``0 .. b0-1``. Such a constant (rank 2 or more, read only
    by Mul, Add or as a Gather's indices) becomes ``0 .. batch-1`` computed from the first
    batched input, in that shape. A guess (at ``b0 = 1`` it is a zero
    ``[[0]]``): the caller checks the result on values (:class:`BatchCheck`).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    first = next((vi.name for vi in graph_inputs(m) if vi.type.tensor_type.shape.dim
                  and vi.type.tensor_type.shape.dim[0].dim_param == BATCH_PARAM), None)
    if first is None:
        return m, []
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in m.graph.node:
        for k, i in enumerate(node.input):
            readers.setdefault(i, []).append((node, k))
    outputs = {o.name for o in m.graph.output}
    consts = {**_constant_nodes(m), **{t.name: t for t in m.graph.initializer}}
    found: list[tuple[str, onnx.TensorProto]] = []
    for name, t in consts.items():
        v = numpy_helper.to_array(t)
        if (v.ndim < 2 or v.dtype.kind not in "iu" or v.shape != (b0,) + (1,) * (v.ndim - 1)
                or not np.array_equal(v.reshape(-1), np.arange(b0)) or name in outputs
                or not readers.get(name)):
            continue
        if all(n.op_type in ("Mul", "Add") or n.op_type == "Gather" and k == 1
               for n, k in readers[name]):
            found.append((name, t))
    if not found:
        return m, []
    used = ({t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output}
            | {n.name for n in m.graph.node})

    def fresh(base: str) -> str:
        return fresh_name(used, base)

    # 0 .. batch-1 as a [batch, 1] column that shape inference sees the batch dim of (so
    # that the Reshapes after it are freed): the cumulative sum of a column of ones.
    flat, col, as_bool, negated, truth, ones, count, column = (
        fresh(f"ssl_batch_index_{k}") for k in ("flat", "col", "bool", "not", "truth", "ones",
                                                "count", "column"))
    zero, one, axis = fresh("ssl_zero"), fresh("ssl_one"), fresh("ssl_one_axis")
    made = [
        helper.make_node("Flatten", [first], [flat], name=flat, axis=1),
        helper.make_node("Slice", [flat, zero, one, one], [col], name=col),
        helper.make_node("Cast", [col], [as_bool], name=as_bool, to=onnx.TensorProto.BOOL),
        helper.make_node("Not", [as_bool], [negated], name=negated),
        helper.make_node("Or", [as_bool, negated], [truth], name=truth),
        helper.make_node("Cast", [truth], [ones], name=ones, to=onnx.TensorProto.INT64),
        helper.make_node("CumSum", [ones, axis], [count], name=count),
        helper.make_node("Sub", [count, one], [column], name=column),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), zero),
             numpy_helper.from_array(np.array([1], np.int64), one),
             numpy_helper.from_array(np.array(0, np.int64), axis)]
    for name, t in found:
        v = numpy_helper.to_array(t)
        out = column
        if v.ndim > 2:
            axes = fresh(f"{name}.batch_index_axes")
            inits.append(numpy_helper.from_array(np.arange(2, v.ndim, dtype=np.int64), axes))
            out = fresh(f"{name}_batch_index")
            made.append(helper.make_node("Unsqueeze", [column, axes], [out], name=out))
        if v.dtype != np.int64:
            cast = fresh(f"{name}_batch_index_cast")
            made.append(helper.make_node("Cast", [out], [cast], name=cast,
                                         to=helper.np_dtype_to_tensor_dtype(v.dtype)))
            out = cast
        for n, k in readers[name]:
            n.input[k] = out
    nodes = made + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    drop_unused_initializers(m)
    return m, [name for name, _ in found]


def _leading_b0(model: onnx.ModelProto, b0: int) -> set[str]:
    """The tensors whose leading dim is ``b0`` when ``model`` runs at batch ``b0`` (shape
    inference with data propagation; empty when it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(set_batch(model, b0), data_prop=True)
    except Exception as e:  # onnx raises its own error types
        log.debug("no static shapes at batch %d: %s", b0, one_line(e))
        return set()
    return {vi.name for vi in (*inferred.graph.input, *inferred.graph.value_info)
            if vi.type.tensor_type.shape.dim
            and vi.type.tensor_type.shape.dim[0].dim_value == b0}


def _constant_nodes(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Constant node output -> its tensor (the nodes with a ``value`` attribute)."""
    return {n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
            for a in n.attribute if a.name == "value"}


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


class BatchCheck:
    """Whether a form of ``reference`` computes, at some batch size, what ``reference`` computes
    on each sample alone.

    The samples are seeded and distinct: floats standard normal, bools 0/1, integers in
    ``[0, n)`` with ``n`` the smallest table a Gather looks that input up in (token ids,
    token types), else 0/1 (masks), or all 0 when the input model fails on those (an input
    of rank 0 is not batched: the same for all samples). A sample's expected outputs are
    ``reference``'s at its own batch size ``own_batch``, fed that sample ``own_batch`` times
    (row 0), by ONNX Runtime with graph optimisations off. A form that runs but mixes the
    samples (a batch index folded at batch 1 makes every sample read sample 0's attention
    mask) differs; all-zero inputs would not show it. Both run in inference form (BatchNorm
    on its running statistics, no Dropout), as the eval model does: in training form a batch
    statistic mixes the samples by design.
    """

    def __init__(self, reference: onnx.ModelProto, own_batch: int, seed: int = 0) -> None:
        self.reference = _inference_form(reference)
        self.own_batch = own_batch
        self.seed = seed
        self._inputs = graph_inputs(reference)
        self._bounds = _index_bounds(reference)
        self._samples: list[dict[str, np.ndarray]] = []
        self._expected: list[dict[str, np.ndarray]] = []
        self._session: Any = None
        self._zero_ints = False

    def mismatch(self, candidate: onnx.ModelProto, batch: int) -> str | None:
        """Why ``candidate`` fed ``batch`` distinct samples does not give each its expected
        outputs (one line); None when it does."""
        from onnx_ssl.runtime import session

        try:
            expected = self._expected_for(batch)
        except Exception as e:  # the reference itself does not run on the samples
            return f"the input model does not run on the probe samples: {one_line(e)}"
        feeds = {n: np.concatenate([self._samples[k][n] for k in range(batch)]) if np.ndim(v)
                 else v for n, v in self._samples[0].items()}
        try:
            with native_stderr_captured():
                sess = session(_inference_form(candidate))
                names = [o.name for o in sess.get_outputs()]
                got = dict(zip(names, sess.run(None, feeds), strict=True))
        except Exception as e:  # any failure means: not batch-free
            return f"it does not run at batch {batch}: {one_line(e)}"
        for name in expected[0]:
            if name not in got:
                continue
            want = np.concatenate([e[name] for e in expected])
            have = np.asarray(got[name])
            if have.shape != want.shape:
                return (f"at batch {batch} its output '{name}' has shape {list(have.shape)}, "
                        f"not {list(want.shape)}")
            if want.dtype.kind != "f":
                if not np.array_equal(have, want):
                    return f"at batch {batch} its output '{name}' differs per sample"
                continue
            scale = max(1.0, float(np.nanmax(np.abs(want), initial=0.0)))
            if not np.allclose(have, want, rtol=1e-3, atol=1e-4 * scale, equal_nan=True):
                err = np.abs(have.astype(np.float64) - want).reshape(batch, -1)
                k = int(np.nanargmax(np.nanmax(err, axis=1)))
                return (f"at batch {batch} sample {k} of its output '{name}' differs from the "
                        f"model's on that sample alone (max abs diff "
                        f"{float(np.nanmax(err[k])):.3g})")
        return None

    def _sample(self, k: int) -> dict[str, np.ndarray]:
        while len(self._samples) <= k:
            rng = np.random.default_rng([self.seed, len(self._samples)])
            feeds: dict[str, np.ndarray] = {}
            for vi in self._inputs:
                tt = vi.type.tensor_type
                shape = [1] + [d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                               else 1 for d in list(tt.shape.dim)[1:]]
                if not tt.shape.dim:
                    shape = []
                dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
                if np.issubdtype(dtype, np.floating):
                    feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
                else:
                    high = 1 if self._zero_ints else self._bounds.get(vi.name, 2)
                    feeds[vi.name] = rng.integers(0, high, shape).astype(dtype)
            self._samples.append(feeds)
        return self._samples[k]

    def _expected_for(self, batch: int) -> list[dict[str, np.ndarray]]:
        try:
            return [self._expected_of(k) for k in range(batch)]
        except Exception:  # (onnxruntime's own types) an integer input out of its range?
            if self._zero_ints:
                raise
            self._zero_ints = True
            self._samples.clear()
            self._expected.clear()
            return [self._expected_of(k) for k in range(batch)]

    def _expected_of(self, k: int) -> dict[str, np.ndarray]:
        from onnx_ssl.runtime import session

        while len(self._expected) <= k:
            sample = self._sample(len(self._expected))
            if self._session is None:
                with native_stderr_captured():
                    self._session = session(self.reference)
            feeds = {n: np.repeat(v, self.own_batch, axis=0) if np.ndim(v) else v
                     for n, v in sample.items()}
            names = [o.name for o in self._session.get_outputs()]
            outs = self._session.run(None, feeds)
            self._expected.append({n: np.asarray(o)[:1] for n, o in zip(names, outs, strict=True)
                                   if np.ndim(o) and np.shape(o)[0] == self.own_batch})
        return self._expected[k]


def _inference_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with BatchNorm on its running statistics and Dropout off (itself when it has
    neither in training form)."""
    if not any(n.op_type == "Dropout" and len(n.input) > 1 or n.op_type == "BatchNormalization"
               and (len(n.output) > 1 or any(a.name == "training_mode" and a.i
                                             for a in n.attribute)) for n in model.graph.node):
        return model
    graph = to_graph(model)
    if not ToInferenceFormPass()(graph).modified:
        return model
    return from_graph(graph, ModelMeta.of(model))


def _index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph input -> the size of the smallest constant table a Gather indexes with
    it (along the Gather's axis): the valid range of token ids and token types."""
    tables = {name: list(t.dims) for name, t in (*_constant_nodes(model).items(),
                                                  *((t.name, t) for t in model.graph.initializer))}
    inputs = {vi.name for vi in graph_inputs(model)}
    bounds: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type != "Gather" or len(n.input) < 2 or n.input[1] not in inputs:
            continue
        dims = tables.get(n.input[0])
        if not dims:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0) % len(dims)
        if dims[axis] > 0:
            bounds[n.input[1]] = min(bounds.get(n.input[1], dims[axis]), dims[axis])
    return bounds


def with_static_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with batch 1 where its batch is free (the prune pass needs static shapes)."""
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            return set_batch(model, 1)
    return model
