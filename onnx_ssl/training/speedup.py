"""Measured ONNX Runtime CPU speedups of a pruned model: each layer alone on its input shape
and the whole model, before against after, timed in alternation by
:func:`onnx_ssl.bench.time_pair` on sessions from :func:`onnx_ssl.runtime.session` fed by
:func:`onnx_ssl.runtime.random_inputs`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_ssl.bench import time_pair
from onnx_ssl.compiler import LayerStat
from onnx_ssl.runtime import random_inputs, session

from .probe import set_batch


class _Timeable(Protocol):
    """What :func:`add_speedups` needs of a report (``chain.SslReport``): a dataclass with
    the ``layers`` of the prune report and a ``speedup`` field. This module does not import
    the chain; the chain imports it."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def layers(self) -> tuple[LayerStat, ...]: ...


R = TypeVar("R", bound=_Timeable)

__all__ = ["add_speedups", "layer_sessions"]

Timed = tuple[Any, dict[str, np.ndarray]]


def _timed(model: onnx.ModelProto, threads: int) -> Timed:
    """An optimised session of ``model`` (static shapes) and seeded inputs for it."""
    sess = session(model, optimize=True, threads=threads)
    return sess, random_inputs(sess)


def _model_session(model: onnx.ModelProto, batch: int, threads: int) -> Timed:
    return _timed(onnx.shape_inference.infer_shapes(set_batch(model, batch)), threads)


def _single_layer(node: gs.Node, in_shape: Sequence[int], opset: int) -> onnx.ModelProto:
    x = gs.Variable("x", dtype=np.float32, shape=list(in_shape))
    y = gs.Variable("y", dtype=np.float32)
    inputs: list[gs.Tensor] = [x]
    rng = np.random.default_rng(0)
    for i, t in enumerate(node.inputs[1:], start=1):
        if not t.name:
            inputs.append(gs.Variable.empty())
            continue
        shape = [int(d) for d in t.shape]
        inputs.append(gs.Constant(f"p{i}", rng.standard_normal(shape).astype(np.float32)))
    n = gs.Node(node.op, name=node.name, attrs=dict(node.attrs), inputs=inputs, outputs=[y])
    g = gs.Graph(nodes=[n], inputs=[x], outputs=[y], opset=opset)
    m = gs.export_onnx(g)
    m.ir_version = min(m.ir_version, 10)
    return m


def layer_sessions(
    model: onnx.ModelProto, batch: int, names: Sequence[str], threads: int = 1
) -> dict[str, Timed]:
    """A session running each named layer alone (its input shape at ``batch``)."""
    from onnx_ssl.analysis import prepare

    prepared = prepare(set_batch(model, batch))
    graph = gs.import_onnx(prepared)
    opset = next((o.version for o in prepared.opset_import if o.domain in ("", "ai.onnx")), 17)
    nodes = {n.name: n for n in graph.nodes}
    out: dict[str, Timed] = {}
    for name in names:
        node = nodes.get(name)
        if node is None or node.inputs[0].shape is None:
            continue
        m = _single_layer(node, [int(d) for d in node.inputs[0].shape], opset)
        out[name] = _timed(m, threads)
    return out


def add_speedups(
    report: R,
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    batch: int = 64,
    threads: int = 1,
) -> R:
    """Measured speedups per layer and for the whole model (ONNX Runtime CPU, ``threads``
    threads, ``batch`` images; each layer alone on its input shape)."""
    names = [r.node for r in report.layers]
    sb = layer_sessions(before, batch, names, threads)
    sa = layer_sessions(after, batch, names, threads)
    speed: dict[str, float] = {}
    for n in names:
        if n in sb and n in sa:
            tb, ta = time_pair(sb[n], sa[n])
            speed[n] = tb / ta
    rows = tuple(replace(r, speedup=speed.get(r.node)) for r in report.layers)
    tb, ta = time_pair(
        _model_session(before, batch, threads), _model_session(after, batch, threads)
    )
    whole = tb / ta
    return replace(report, layers=rows, speedup=whole)
