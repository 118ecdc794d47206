"""Lower ops that onnxruntime-training 1.19.2 cannot differentiate into exact compositions.

The compositions and their math are in :mod:`onnx_ssl.training.lowerings`; which op has one
is said by its entry in the op table (``OpRule.training_lowering`` in
:data:`onnx_ssl.rules.RULES`). An op without one that has no gradient is refused by the
gradient builder, in one line naming the op and the node.
"""

from __future__ import annotations

import logging

import onnx

from onnx_ssl.rules import RULES

from .lowerings import Lowering, Writer

log = logging.getLogger(__name__)

# The ops lowered for training, from the op table.
LOWERINGS: dict[str, Lowering] = {
    op: rule.training_lowering for op, rule in RULES.items()
    if rule.training_lowering is not None
}


def _opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def lower_for_training(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """A copy of ``model`` with every node in :data:`LOWERINGS` replaced by its composition.

    Returns the model and the (node name, op type) pairs lowered. Shapes are inferred first
    for the ops that need their input's rank or channel count.
    """
    targets = [n for n in model.graph.node if n.domain in ("", "ai.onnx")
               and n.op_type in LOWERINGS]
    if not targets:
        return model, []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    opset = _opset(m)
    inferred = onnx.shape_inference.infer_shapes(m)
    shapes: dict[str, tuple[int | None, ...]] = {}
    g = inferred.graph
    for vi in (*g.input, *g.value_info, *g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(
                int(d.dim_value) if d.HasField("dim_value") else None for d in t.shape.dim
            )
    used = {o for n in m.graph.node for o in (*n.output, n.name)}
    used |= {i.name for i in m.graph.input} | {t.name for t in m.graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    lowered: list[tuple[str, str]] = []
    for node in m.graph.node:
        entry = LOWERINGS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if entry is None:
            new_nodes.append(node)
            continue
        w = Writer(node, opset, used, shapes)
        entry.emit(w)
        new_nodes.extend(w.nodes)
        m.graph.initializer.extend(w.inits)
        lowered.append((node.name, node.op_type))
        log.debug("lowered %s (%s) for training: %s", node.name, node.op_type, entry.math)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    return m, lowered
