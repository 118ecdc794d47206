"""Helpers on raw ONNX protobuf models shared by the training modules: the graph's data
inputs, dropping unused initializers, and the IR version stamp the training runtime loads
(the opset lookup is :func:`onnx_ssl.io.default_opset`)."""

from __future__ import annotations

import onnx

from onnx_ssl.io import clamp_ir, max_ir_version


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are not initializers (the data the model is fed)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def drop_unused_initializers(m: onnx.ModelProto) -> None:
    """Remove (in place) the initializers no node, graph input or graph output reads."""
    used = {i for n in m.graph.node for i in n.input}
    used |= {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    keep = [t for t in m.graph.initializer if t.name in used]
    if len(keep) != len(m.graph.initializer):
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)


def fix_ir(m: onnx.ModelProto) -> onnx.ModelProto:
    """Stamp the newest IR version the training runtime loads (onnx >= 1.17 stamps newer
    ones, also on the optimizer model that ``generate_artifacts`` builds): the rule of
    :func:`onnx_ssl.io.clamp_ir`, and that version also where none is set."""
    if m.ir_version == 0:
        m.ir_version = max_ir_version()
    return clamp_ir(m)


def keep_initializer_order(m: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """Put (in place) ``m``'s initializers in the order ``reference`` has them, new ones
    last. onnx-graphsurgeon exports them in the order its graph walk meets them; onnxblock
    orders the trainable parameters (the training model's inputs and gradient buffers) by
    this list, so the artifacts keep the source model's order."""
    rank = {t.name: k for k, t in enumerate(reference.graph.initializer)}
    inits = list(m.graph.initializer)
    ordered = sorted(range(len(inits)), key=lambda k: (rank.get(inits[k].name, len(rank)), k))
    if ordered != list(range(len(inits))):
        keep = [inits[k] for k in ordered]
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
    return m
