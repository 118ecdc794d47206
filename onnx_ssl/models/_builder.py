"""Small shape-tracking helper for writing reference networks as ONNX ``ModelProto``.

:class:`GraphBuilder` appends nodes in topological order, creates the parameters of each
layer with a deterministic random initialisation and keeps the static shape and element
type of every tensor it creates, so that layer methods know their input channel count and
the final model can be checked strictly.

Conventions
-----------
* The output tensor of a single-output node has the node's name (``"layer1.0.conv1"``);
  :meth:`GraphBuilder.build` renames the tensors that become graph outputs.
* Parameters are named ``"<layer>.<role>"`` (``"conv1.weight"``, ``"bn1.scale"`` ...).
* Initialisation (all from one ``numpy.random.default_rng(seed)``, in build order):
  He-normal conv / fully-connected weights, small nonzero N(0, 0.05) biases, and
  BatchNormalization statistics with scale ~ U(0.5, 1.5), bias ~ N(0, 0.1),
  mean ~ N(0, 0.1), var ~ U(0.5, 1.5), so that exact rewrites of the graph are tested
  against nonzero shifts.
* With ``weights_as_constants=True`` every parameter and constant is emitted as a
  ``Constant`` node instead of an initializer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

# onnx_ssl/models/ is a protobuf boundary module: it may build protos with onnx.helper.
from onnx import (
    helper,  # noqa: TID251
    numpy_helper,
)

OPSET = 17
IR_VERSION = 10
PRODUCER = "onnx-ssl.models"

Shape = tuple[int, ...]
Pads = int | Sequence[int]

FLOAT = onnx.TensorProto.FLOAT
INT64 = onnx.TensorProto.INT64


def _pads4(pads: Pads) -> tuple[int, int, int, int]:
    """Normalise ``pads`` to ONNX 2-D order ``[h_begin, w_begin, h_end, w_end]``."""
    if isinstance(pads, int):
        return (pads, pads, pads, pads)
    p = tuple(int(v) for v in pads)
    if len(p) == 2:
        return (p[0], p[1], p[0], p[1])
    if len(p) != 4:
        raise ValueError(f"expected 1, 2 or 4 pad values, got {p}")
    return (p[0], p[1], p[2], p[3])


def _pool_out(size: int, k: int, stride: int, begin: int, end: int) -> int:
    out = (size + begin + end - k) // stride + 1
    if out <= 0:
        raise ValueError(f"window {k} stride {stride} does not fit input size {size}")
    return out


def _fill_tensor(tensor: onnx.TensorProto, name: str, arr: npt.NDArray[Any]) -> None:
    """Write ``arr`` into ``tensor`` as little-endian ``raw_data`` (like ``from_array``)."""
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
    tensor.dims.extend(arr.shape)
    tensor.raw_data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


class GraphBuilder:
    """Builds one ONNX graph node by node while tracking static shapes."""

    def __init__(self, name: str, seed: int = 0, *, weights_as_constants: bool = False) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.weights_as_constants = weights_as_constants
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, npt.NDArray[Any]] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self._shapes: dict[str, Shape] = {}
        self._dtypes: dict[str, int] = {}
        self._node_names: set[str] = set()
        self._counters: dict[str, int] = {}
        self._built = False

    # ------------------------------------------------------------------ bookkeeping
    def shape(self, tensor: str) -> Shape:
        """Static shape of ``tensor``."""
        return self._shapes[tensor]

    def channels(self, tensor: str) -> int:
        """Size of axis 1 (channels / features) of ``tensor``."""
        return self._shapes[tensor][1]

    def _auto_name(self, op_type: str) -> str:
        base = op_type.lower()
        while True:
            self._counters[base] = self._counters.get(base, 0) + 1
            candidate = f"{base}{self._counters[base]}"
            if candidate not in self._node_names and candidate not in self._shapes:
                return candidate

    def _register(self, tensor: str, shape: Sequence[int], dtype: int = FLOAT) -> str:
        if tensor in self._shapes:
            raise ValueError(f"tensor name {tensor!r} is already used")
        self._shapes[tensor] = tuple(int(d) for d in shape)
        self._dtypes[tensor] = dtype
        return tensor

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        shape: Sequence[int],
        *,
        name: str | None = None,
        dtype: int = FLOAT,
        **attrs: Any,
    ) -> str:
        """Append a single-output node; its output tensor is named like the node."""
        return self.op_multi(op_type, inputs, [shape], name=name, dtype=dtype, **attrs)[0]

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[str],
        shapes: Sequence[Sequence[int]],
        *,
        name: str | None = None,
        dtype: int = FLOAT,
        **attrs: Any,
    ) -> list[str]:
        """Append a node with ``len(shapes)`` outputs named ``name`` or ``name.i``."""
        name = name if name is not None else self._auto_name(op_type)
        if name in self._node_names:
            raise ValueError(f"node name {name!r} is already used")
        for t in inputs:
            if t and t not in self._shapes:
                raise KeyError(f"node {name!r}: unknown input tensor {t!r}")
        self._node_names.add(name)
        if len(shapes) == 1:
            outputs = [name]
        else:
            outputs = [f"{name}.{i}" for i in range(len(shapes))]
        for out, shp in zip(outputs, shapes, strict=True):
            self._register(out, shp, dtype)
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))
        return outputs

    # ------------------------------------------------------------------ values
    def input(self, name: str, shape: Sequence[int]) -> str:
        """Declare a float32 graph input of static ``shape``."""
        self._register(name, shape)
        self.inputs.append(helper.make_tensor_value_info(name, FLOAT, list(shape)))
        return name

    def param(self, name: str, value: npt.ArrayLike, dtype: type = np.float32) -> str:
        """A named constant tensor: an initializer, or a ``Constant`` node."""
        arr: npt.NDArray[Any] = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        elem = helper.np_dtype_to_tensor_dtype(arr.dtype)
        if self.weights_as_constants:
            tensor = numpy_helper.from_array(arr, name)
            if name in self._node_names:
                raise ValueError(f"node name {name!r} is already used")
            self._node_names.add(name)
            self._register(name, arr.shape, elem)
            self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
        else:
            self._register(name, arr.shape, elem)
            self.initializers[name] = arr
        return name

    def const_i64(self, name: str, values: Sequence[int] | int) -> str:
        """An int64 constant (shape vectors, split sizes, slice bounds ...)."""
        return self.param(name, np.asarray(values, dtype=np.int64), dtype=np.int64)

    def he_normal(self, shape: Sequence[int], fan_in: int) -> npt.NDArray[np.float32]:
        """He-normal weights, N(0, 2 / fan_in), sampled directly in float32."""
        w = self.rng.standard_normal(size=tuple(shape), dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in))
        return w

    def small_bias(self, n: int) -> npt.NDArray[np.float32]:
        """Small biases, N(0, 0.05), with no exact zeros."""
        b = self.rng.normal(0.0, 0.05, size=(n,)).astype(np.float32)
        b[b == 0] = np.float32(0.01)
        return b

    # ------------------------------------------------------------------ layers
    def conv(
        self,
        x: str,
        out_ch: int,
        k: int | tuple[int, int],
        stride: int = 1,
        pad: Pads = 0,
        group: int = 1,
        bias: bool = True,
        *,
        name: str | None = None,
        weight: str | None = None,
    ) -> str:
        """2-D convolution; ``weight`` reuses an existing weight tensor instead of a new one."""
        name = name if name is not None else self._auto_name("Conv")
        n, c_in, h, w = self.shape(x)
        kh, kw = (k, k) if isinstance(k, int) else k
        if c_in % group or out_ch % group:
            raise ValueError(f"{name}: channels {c_in}->{out_ch} not divisible by group {group}")
        w_shape = (out_ch, c_in // group, kh, kw)
        if weight is None:
            weight = self.param(f"{name}.weight", self.he_normal(w_shape, w_shape[1] * kh * kw))
        elif self.shape(weight) != w_shape:
            raise ValueError(f"{name}: weight {weight!r} has shape {self.shape(weight)}")
        inputs = [x, weight]
        if bias:
            inputs.append(self.param(f"{name}.bias", self.small_bias(out_ch)))
        p = _pads4(pad)
        out_shape = (
            n,
            out_ch,
            _pool_out(h, kh, stride, p[0], p[2]),
            _pool_out(w, kw, stride, p[1], p[3]),
        )
        return self.op(
            "Conv",
            inputs,
            out_shape,
            name=name,
            kernel_shape=[kh, kw],
            strides=[stride, stride],
            pads=list(p),
            group=group,
        )

    def bn(self, x: str, *, name: str | None = None, epsilon: float = 1e-5) -> str:
        """Inference-form BatchNormalization with random nonzero statistics."""
        name = name if name is not None else self._auto_name("BatchNormalization")
        c = self.channels(x)
        rng = self.rng
        scale = self.param(f"{name}.scale", rng.uniform(0.5, 1.5, size=c))
        bias = self.param(f"{name}.bias", rng.normal(0.0, 0.1, size=c))
        mean = self.param(f"{name}.mean", rng.normal(0.0, 0.1, size=c))
        var = self.param(f"{name}.var", rng.uniform(0.5, 1.5, size=c))
        return self.op(
            "BatchNormalization",
            [x, scale, bias, mean, var],
            self.shape(x),
            name=name,
            epsilon=epsilon,
        )

    def gemm(self, x: str, out: int, *, name: str | None = None, bias: bool = True) -> str:
        """Fully-connected layer ``x @ W.T + b`` with ``W`` of shape ``[out, in]``."""
        name = name if name is not None else self._auto_name("Gemm")
        n, k = self.shape(x)
        weight = self.param(f"{name}.weight", self.he_normal((out, k), k))
        inputs = [x, weight]
        if bias:
            inputs.append(self.param(f"{name}.bias", self.small_bias(out)))
        return self.op("Gemm", inputs, (n, out), name=name, transB=1)

    def matmul_const(self, x: str, out: int, *, name: str, bias: bool = True) -> str:
        """``MatMul`` with a constant ``[K, M]`` weight (last axis), plus an ``Add`` bias."""
        shp = self.shape(x)
        k = shp[-1]
        weight = self.param(f"{name}.weight", self.he_normal((k, out), k))
        y = self.op("MatMul", [x, weight], (*shp[:-1], out), name=name)
        if bias:
            b = self.param(f"{name}.bias", self.small_bias(out))
            y = self.op("Add", [y, b], self.shape(y), name=f"{name}.add_bias")
        return y

    def _unary(self, op_type: str, x: str, name: str | None, **attrs: Any) -> str:
        return self.op(op_type, [x], self.shape(x), name=name, dtype=self._dtypes[x], **attrs)

    def relu(self, x: str, *, name: str | None = None) -> str:
        return self._unary("Relu", x, name)

    def sigmoid(self, x: str, *, name: str | None = None) -> str:
        return self._unary("Sigmoid", x, name)

    def dropout(self, x: str, *, name: str | None = None) -> str:
        """Dropout (ratio 0.5, identity at inference)."""
        return self._unary("Dropout", x, name)

    def lrn(
        self,
        x: str,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        bias: float = 1.0,
        *,
        name: str | None = None,
    ) -> str:
        return self._unary("LRN", x, name, size=size, alpha=alpha, beta=beta, bias=bias)

    def hardmax(self, x: str, axis: int = 1, *, name: str | None = None) -> str:
        return self._unary("Hardmax", x, name, axis=axis)

    def _pool(self, op_type: str, x: str, k: int, stride: int, pads: Pads, name: str | None) -> str:
        n, c, h, w = self.shape(x)
        p = _pads4(pads)
        out_shape = (n, c, _pool_out(h, k, stride, p[0], p[2]), _pool_out(w, k, stride, p[1], p[3]))
        return self.op(
            op_type,
            [x],
            out_shape,
            name=name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=list(p),
        )

    def maxpool(
        self, x: str, k: int, stride: int | None = None, pads: Pads = 0, *, name: str | None = None
    ) -> str:
        return self._pool("MaxPool", x, k, stride or k, pads, name)

    def avgpool(
        self, x: str, k: int, stride: int | None = None, pads: Pads = 0, *, name: str | None = None
    ) -> str:
        """AveragePool; padded positions are excluded from the mean (``count_include_pad=0``)."""
        return self._pool("AveragePool", x, k, stride or k, pads, name)

    def gap(self, x: str, *, name: str | None = None) -> str:
        n, c = self.shape(x)[:2]
        rank = len(self.shape(x))
        return self.op("GlobalAveragePool", [x], (n, c) + (1,) * (rank - 2), name=name)

    def flatten(self, x: str, *, name: str | None = None) -> str:
        shp = self.shape(x)
        return self.op("Flatten", [x], (shp[0], int(np.prod(shp[1:]))), name=name, axis=1)

    def _broadcast(self, op_type: str, a: str, b: str, name: str | None) -> str:
        shape = np.broadcast_shapes(self.shape(a), self.shape(b))
        return self.op(op_type, [a, b], shape, name=name, dtype=self._dtypes[a])

    def add(self, a: str, b: str, *, name: str | None = None) -> str:
        return self._broadcast("Add", a, b, name)

    def sub(self, a: str, b: str, *, name: str | None = None) -> str:
        return self._broadcast("Sub", a, b, name)

    def mul(self, a: str, b: str, *, name: str | None = None) -> str:
        return self._broadcast("Mul", a, b, name)

    def div(self, a: str, b: str, *, name: str | None = None) -> str:
        return self._broadcast("Div", a, b, name)

    def max(self, a: str, b: str, *, name: str | None = None) -> str:
        return self._broadcast("Max", a, b, name)

    def concat(self, xs: Sequence[str], axis: int = 1, *, name: str | None = None) -> str:
        shapes = [self.shape(x) for x in xs]
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        return self.op("Concat", list(xs), out, name=name, dtype=self._dtypes[xs[0]], axis=axis)

    def split(
        self, x: str, sizes: Sequence[int], axis: int = 1, *, name: str | None = None
    ) -> list[str]:
        """``Split`` with the sizes given as an int64 input tensor (opset >= 13)."""
        name = name if name is not None else self._auto_name("Split")
        shp = self.shape(x)
        if sum(sizes) != shp[axis]:
            raise ValueError(f"{name}: sizes {list(sizes)} do not add up to {shp[axis]}")
        split = self.const_i64(f"{name}.split", list(sizes))
        shapes = []
        for s in sizes:
            o = list(shp)
            o[axis] = s
            shapes.append(o)
        return self.op_multi("Split", [x, split], shapes, name=name, axis=axis)

    def slice(self, x: str, start: int, end: int, axis: int = 1, *, name: str) -> str:
        """``Slice`` of ``[start, end)`` on one axis, bounds given as constant inputs."""
        shp = list(self.shape(x))
        starts = self.const_i64(f"{name}.starts", [start])
        ends = self.const_i64(f"{name}.ends", [end])
        axes = self.const_i64(f"{name}.axes", [axis])
        shp[axis] = len(range(*slice(start, end).indices(shp[axis])))
        return self.op("Slice", [x, starts, ends, axes], shp, name=name)

    def transpose(self, x: str, perm: Sequence[int], *, name: str | None = None) -> str:
        shp = self.shape(x)
        return self.op("Transpose", [x], [shp[p] for p in perm], name=name, perm=list(perm))

    def reshape(self, x: str, shape: Sequence[int], *, name: str) -> str:
        """``Reshape`` to a constant target shape (``0`` copies, one ``-1`` is inferred)."""
        shp = self.shape(x)
        target = [shp[i] if d == 0 else d for i, d in enumerate(shape)]
        if -1 in target:
            known = int(np.prod([d for d in target if d != -1]))
            target[target.index(-1)] = int(np.prod(shp)) // known
        if int(np.prod(target)) != int(np.prod(shp)):
            raise ValueError(f"{name}: cannot reshape {shp} to {list(shape)}")
        const = self.const_i64(f"{name}.shape", list(shape))
        return self.op("Reshape", [x, const], target, name=name)

    def layernorm(
        self, x: str, axis: int = -1, epsilon: float = 1e-5, *, name: str | None = None
    ) -> str:
        """LayerNormalization over the axes from ``axis`` on, with random scale and bias."""
        name = name if name is not None else self._auto_name("LayerNormalization")
        shp = self.shape(x)
        norm_shape = shp[axis:]
        scale = self.param(f"{name}.scale", self.rng.uniform(0.5, 1.5, size=norm_shape))
        bias = self.param(f"{name}.bias", self.rng.normal(0.0, 0.1, size=norm_shape))
        return self.op(
            "LayerNormalization", [x, scale, bias], shp, name=name, axis=axis, epsilon=epsilon
        )

    def depth_to_space(self, x: str, blocksize: int, *, name: str | None = None) -> str:
        n, c, h, w = self.shape(x)
        b = blocksize
        return self.op(
            "DepthToSpace",
            [x],
            (n, c // (b * b), h * b, w * b),
            name=name,
            blocksize=b,
            mode="DCR",
        )

    def pad(self, x: str, pads: str, static_pads: Sequence[int], *, name: str | None = None) -> str:
        """Constant zero ``Pad`` with a pads tensor computed in the graph.

        ``static_pads`` are the values ``pads`` evaluates to (ONNX order, all axes), used
        to track the output shape.
        """
        shp = self.shape(x)
        rank = len(shp)
        if len(static_pads) != 2 * rank:
            raise ValueError(f"expected {2 * rank} pad values, got {list(static_pads)}")
        out = [d + static_pads[i] + static_pads[i + rank] for i, d in enumerate(shp)]
        return self.op("Pad", [x, pads], out, name=name, mode="constant")

    # ------------------------------------------------------------------ model
    def _value_info(self, tensor: str, name: str | None = None) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(
            name or tensor, self._dtypes[tensor], list(self._shapes[tensor])
        )

    def build(self, outputs: Mapping[str, str] | Sequence[str]) -> onnx.ModelProto:
        """Finish the graph and return a checked model.

        ``outputs`` maps graph-output names to tensors (a sequence keeps tensor names).
        Tensors are renamed to their graph-output names.  The model is checked with
        ``onnx.checker.check_model(full_check=True)`` while it still carries the tracked
        shapes of all intermediate tensors (so that strict shape inference verifies them);
        the intermediate ``value_info`` is dropped from the returned model.
        """
        if self._built:
            raise RuntimeError("build() may only be called once per GraphBuilder")
        self._built = True
        mapping = dict(outputs) if isinstance(outputs, Mapping) else {t: t for t in outputs}
        renames = {tensor: out for out, tensor in mapping.items() if out != tensor}
        for tensor, out in renames.items():
            if tensor not in self._shapes:
                raise KeyError(f"unknown output tensor {tensor!r}")
            if out in self._shapes:
                raise ValueError(f"output name {out!r} is already a tensor name")
            if not any(tensor in node.output for node in self.nodes):
                raise ValueError(f"output {tensor!r} is not produced by a node")
            self._shapes[out] = self._shapes.pop(tensor)
            self._dtypes[out] = self._dtypes.pop(tensor)
        for node in self.nodes:
            for seq in (node.input, node.output):
                for i, t in enumerate(seq):
                    if t in renames:
                        seq[i] = renames[t]
        graph_outputs = [self._value_info(out) for out in mapping]

        skip = {vi.name for vi in self.inputs} | set(self.initializers)
        skip |= set(mapping)
        value_info = [
            self._value_info(t)
            for node in self.nodes
            if node.op_type != "Constant"
            for t in node.output
            if t not in skip
        ]
        graph = helper.make_graph(
            self.nodes,
            self.name,
            self.inputs,
            graph_outputs,
            value_info=value_info,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
        )
        # Filled in place: large weights are not copied through make_graph / make_model.
        for name, arr in self.initializers.items():
            _fill_tensor(model.graph.initializer.add(), name, arr)
        onnx.checker.check_model(model, full_check=True)
        del model.graph.value_info[:]
        return model
