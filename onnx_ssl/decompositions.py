"""Exact compositions of the ops that onnxruntime-training 1.19.2 cannot differentiate.

(onnx-graphsurgeon nodes, like the compiler's passes; this core module imports nothing of
the project but its errors and graph helpers, so that the op table in :mod:`onnx_ssl.rules`
can name these entries without importing the training package.)

The gradient builder of ONNX Runtime 1.19.2 has no gradient for the ops below. Before the
training graph is built (:class:`onnx_ssl.training.lowering.LowerForTrainingPass`), each such
node is replaced by element-wise, reduction and Conv ops that it can differentiate and that
compute the same function (up to float32 rounding); the inference model keeps the original
op. Parameters keep their names, so a PRelu slope or an InstanceNormalization scale stays the
same trainable initializer.

Each :class:`Lowering` here is named by its op's entry in the op table
(``OpRule.training_lowering`` in :data:`onnx_ssl.rules.RULES`); ``clip01(y) = Clip(y, 0, 1)``,
``relu = Relu``::

    HardSigmoid(x; a, b)      = clip01(a*x + b)
    HardSwish(x)              = x * clip01(x/6 + 1/2)
    Elu(x; a)                 = relu(x) + a*(exp(min(x, 0)) - 1)
    Selu(x; a, g)             = g * (relu(x) + a*(exp(min(x, 0)) - 1))
    Softplus(x)               = relu(x) + log(1 + exp(-|x|))           (no overflow)
    PRelu(x, s)               = relu(x) - s * relu(-x)                 (s stays trainable)
    GlobalMaxPool(x)          = MaxPool(x, kernel = spatial size)      (no ReduceMax gradient)
    InstanceNormalization(x, s, b; eps)
                              = (x - m) / sqrt(v + eps) * s[c] + b[c],
                                m = mean(x), v = mean((x - m)^2) over the spatial axes
    LRN(x; size, a, b, k)     = x / (k + a/size * S)^b,  S = Conv1x1(x^2, band),
                                band[c, c'] = 1 if c - floor((size-1)/2) <= c'
                                              <= c + ceil((size-1)/2)

``min(x, 0)`` inside ``exp`` keeps the unselected branch finite, so its gradient is never
``0 * inf``. :func:`decompose` replaces, in place, every node of a graph whose op a table
maps to a :class:`Lowering`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UnsupportedModelError
from .names import fresh_name

_DEFAULT_DOMAINS = (None, "", "ai.onnx")


class Writer:
    """Emits the nodes replacing one node, with fresh names and constant tensors.

    ``inputs`` and ``output`` are the replaced node's tensors (it is detached from them);
    the last node emitted writes ``output``. Shapes are read from the input tensors.
    """

    def __init__(self, node: gs.Node, inputs: list[gs.Tensor], output: gs.Variable,
                 opset: int, taken: set[str]) -> None:
        self.node = node
        self.inputs = inputs
        self.output = output
        self.opset = opset
        self._taken = taken
        self.base = node.name or output.name
        self.nodes: list[gs.Node] = []

    def fresh(self, hint: str) -> str:
        return fresh_name(self._taken, f"{self.base}.ssl_{hint}")

    def const(self, value: float | np.ndarray, hint: str) -> gs.Constant:
        arr = np.asarray(value)
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        return gs.Constant(self.fresh(hint), arr)

    def op(self, op_type: str, inputs: list[gs.Tensor], hint: str,
           output: gs.Variable | None = None, **attrs: Any) -> gs.Variable:
        out = output if output is not None else gs.Variable(self.fresh(hint))
        self.nodes.append(gs.Node(op_type, self.fresh(f"{hint}_node"), attrs=attrs,
                                  inputs=inputs, outputs=[out]))
        return out

    def _unknown(self, tensor: gs.Tensor, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"node {self.node.name or '?'} ({self.node.op}): the {what} of its input "
            f"{tensor.name!r} is unknown, so it cannot be lowered for training"
        )

    @staticmethod
    def _dims(tensor: gs.Tensor) -> tuple[int | None, ...] | None:
        if tensor.shape is None:
            return None
        return tuple(int(d) if isinstance(d, (int, np.integer)) else None
                     for d in tensor.shape)

    def rank(self, tensor: gs.Tensor) -> int:
        dims = self._dims(tensor)
        if dims is None:
            raise self._unknown(tensor, "rank")
        return len(dims)

    def channels(self, tensor: gs.Tensor) -> int:
        c = (self._dims(tensor) or (None, None))[1:2]
        if not c or c[0] is None:
            raise self._unknown(tensor, "channel count")
        return c[0]

    def spatial(self, tensor: gs.Tensor) -> list[int]:
        dims = (self._dims(tensor) or (None, None, None))[2:]
        if not dims or any(d is None for d in dims):
            raise self._unknown(tensor, "spatial size")
        return [int(d) for d in dims if d is not None]

    def attr(self, name: str, default: float) -> float:
        return float(self.node.attrs.get(name, default))

    def clip(self, x: gs.Tensor, lo: float | None, hi: float | None, hint: str,
             output: gs.Variable | None = None) -> gs.Variable:
        if self.opset < 11:
            attrs: dict[str, float] = {}
            if lo is not None:
                attrs["min"] = lo
            if hi is not None:
                attrs["max"] = hi
            return self.op("Clip", [x], hint, output, **attrs)
        ins: list[gs.Tensor] = [
            x, gs.Variable.empty() if lo is None else self.const(lo, f"{hint}_lo")]
        if hi is not None:
            ins.append(self.const(hi, f"{hint}_hi"))
        return self.op("Clip", ins, hint, output)

    def reduce(self, op_type: str, x: gs.Tensor, axes: list[int], hint: str,
               output: gs.Variable | None = None) -> gs.Variable:
        if self.opset >= 18:  # axes became an input
            return self.op(op_type, [x, self.const(np.array(axes, np.int64), f"{hint}_axes")],
                           hint, output, keepdims=1)
        return self.op(op_type, [x], hint, output, axes=axes, keepdims=1)

    def relu_plus_exp_branch(self, x: gs.Tensor, alpha: float,
                             output: gs.Variable | None = None) -> gs.Variable:
        """relu(x) + alpha * (exp(min(x, 0)) - 1)."""
        neg = self.op("Exp", [self.clip(x, None, 0.0, "min0")], "exp")
        branch = self.op("Mul", [self.op("Sub", [neg, self.const(1.0, "one")], "expm1"),
                                 self.const(alpha, "alpha")], "neg_branch")
        return self.op("Add", [self.op("Relu", [x], "relu"), branch], "sum", output)


def _hard_sigmoid(w: Writer) -> None:
    x = w.inputs[0]
    lin = w.op("Add", [w.op("Mul", [x, w.const(w.attr("alpha", 0.2), "alpha")], "ax"),
                       w.const(w.attr("beta", 0.5), "beta")], "axb")
    w.clip(lin, 0.0, 1.0, "clip", w.output)


def _hard_swish(w: Writer) -> None:
    x = w.inputs[0]
    lin = w.op("Add", [w.op("Mul", [x, w.const(1.0 / 6.0, "sixth")], "x6"),
                       w.const(0.5, "half")], "lin")
    w.op("Mul", [x, w.clip(lin, 0.0, 1.0, "clip")], "mul", w.output)


def _elu(w: Writer) -> None:
    w.relu_plus_exp_branch(w.inputs[0], w.attr("alpha", 1.0), w.output)


def _selu(w: Writer) -> None:
    alpha = w.attr("alpha", 1.67326319217681884765625)
    gamma = w.attr("gamma", 1.05070102214813232421875)
    y = w.relu_plus_exp_branch(w.inputs[0], alpha)
    w.op("Mul", [y, w.const(gamma, "gamma")], "gamma", w.output)


def _softplus(w: Writer) -> None:
    x = w.inputs[0]
    e = w.op("Exp", [w.op("Neg", [w.op("Abs", [x], "abs")], "neg_abs")], "exp")
    log1p = w.op("Log", [w.op("Add", [e, w.const(1.0, "one")], "one_plus")], "log1p")
    w.op("Add", [w.op("Relu", [x], "relu"), log1p], "sum", w.output)


def _prelu(w: Writer) -> None:
    x, slope = w.inputs[0], w.inputs[1]
    neg = w.op("Mul", [slope, w.op("Relu", [w.op("Neg", [x], "neg")], "relu_neg")], "neg_part")
    w.op("Sub", [w.op("Relu", [x], "relu"), neg], "sub", w.output)


def _global_max_pool(w: Writer) -> None:
    x = w.inputs[0]
    w.op("MaxPool", [x], "max", w.output, kernel_shape=w.spatial(x))


def _instance_norm(w: Writer) -> None:
    x, scale, bias = w.inputs[0], w.inputs[1], w.inputs[2]
    r = w.rank(x)
    axes = list(range(2, r))
    mean = w.reduce("ReduceMean", x, axes, "mean")
    d = w.op("Sub", [x, mean], "centred")
    var = w.reduce("ReduceMean", w.op("Mul", [d, d], "sq"), axes, "var")
    std = w.op("Sqrt", [w.op("Add", [var, w.const(w.attr("epsilon", 1e-5), "eps")], "var_eps")],
               "std")
    shape = w.const(np.array([-1] + [1] * (r - 2), np.int64), "cshape")
    s = w.op("Reshape", [scale, shape], "scale")
    b = w.op("Reshape", [bias, shape], "bias")
    w.op("Add", [w.op("Mul", [w.op("Div", [d, std], "normed"), s], "scaled"), b], "add",
         w.output)


def _lrn(w: Writer) -> None:
    x = w.inputs[0]
    r, c = w.rank(x), w.channels(x)
    size = int(w.attr("size", 1))
    lo, hi = (size - 1) // 2, (size - 1) - (size - 1) // 2
    idx = np.arange(c)
    band = ((idx[None, :] >= idx[:, None] - lo) & (idx[None, :] <= idx[:, None] + hi))
    weight = w.const(band.astype(np.float32).reshape((c, c) + (1,) * (r - 2)), "band")
    s = w.op("Conv", [w.op("Mul", [x, x], "sq"), weight], "window_sum")
    base = w.op("Add", [w.op("Mul", [s, w.const(w.attr("alpha", 1e-4) / size, "alpha")],
                             "scaled"), w.const(w.attr("bias", 1.0), "bias")], "base")
    den = w.op("Pow", [base, w.const(w.attr("beta", 0.75), "beta")], "pow")
    w.op("Div", [x, den], "div", w.output)


@dataclass(frozen=True)
class Lowering:
    """How one op type is rewritten: ``emit`` writes the replacing nodes into the writer,
    the last of which produces the node's output; ``math`` is the identity used."""

    op_type: str
    math: str
    emit: Callable[[Writer], None]


HARD_SIGMOID = Lowering("HardSigmoid", "clip(alpha*x + beta, 0, 1)", _hard_sigmoid)
HARD_SWISH = Lowering("HardSwish", "x * clip(x/6 + 1/2, 0, 1)", _hard_swish)
ELU = Lowering("Elu", "relu(x) + alpha*(exp(min(x,0)) - 1)", _elu)
SELU = Lowering("Selu", "gamma*(relu(x) + alpha*(exp(min(x,0)) - 1))", _selu)
SOFTPLUS = Lowering("Softplus", "relu(x) + log(1 + exp(-|x|))", _softplus)
PRELU = Lowering("PRelu", "relu(x) - slope*relu(-x)", _prelu)
GLOBAL_MAX_POOL = Lowering("GlobalMaxPool", "MaxPool(x, kernel = spatial size)",
                           _global_max_pool)
INSTANCE_NORM = Lowering("InstanceNormalization", "(x - mean)/sqrt(var + eps)*scale + bias",
                         _instance_norm)
LRN = Lowering("LRN", "x / (bias + alpha/size * band_conv(x^2))^beta", _lrn)


def decompose(graph: gs.Graph, table: Mapping[str, Lowering]) -> list[tuple[str, str]]:
    """Replace (in place) every node of ``graph`` in the default domain whose op ``table``
    maps to a :class:`Lowering` by its composition, at the node's place in the node list.

    The ops that read their input's rank, channel count or spatial size need the graph's
    shapes (:func:`onnx_ssl.io.shaped_graph`). Returns the (node name, op type) pairs
    replaced; a graph without such nodes is left as it is.
    """
    if not any(n.op in table and n.domain in _DEFAULT_DOMAINS for n in graph.nodes):
        return []
    taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    nodes: list[gs.Node] = []
    done: list[tuple[str, str]] = []
    for node in graph.nodes:
        entry = table.get(node.op) if node.domain in _DEFAULT_DOMAINS else None
        if entry is None:
            nodes.append(node)
            continue
        inputs, output = list(node.inputs), node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        w = Writer(node, inputs, output, int(graph.opset), taken)
        entry.emit(w)
        nodes.extend(w.nodes)
        done.append((node.name, node.op))
    graph.nodes = nodes
    return done
