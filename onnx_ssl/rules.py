"""What the project knows about each ONNX operator: one explicit table, one entry per op type.

Each entry of :data:`RULES` (at the end of this module) is an :class:`onnx_ssl.ops.OpRule`
with named fields: its *flow* (the handler below that moves channels from inputs to outputs),
which inputs are per-channel parameters sliced with a channel, how the op is rewritten when
channels go (``rewrite``), for a parameterised layer its weight and bias slots, axes and MACs
(``layer``), and which inputs training updates (``trained``). The analysis, the channel
removal, the layer statistics and training all read this table. An op missing from
:data:`RULES` blocks every channel it touches, and the reason names the node and its op type:
unknown ops are never assumed element-wise. Adding an op means adding an entry here (and, for
a new kind of flow, a handler below).

Flows (``flow_<name>``):
    conv / conv_transpose / gemm / matmul
               the layers: read input channels ("in" members of the weight), produce a new
               space ("out" members: filters, bias).
    unary      element-wise on one tensor; output has the input's layout.
    norm       per-channel normalisation on axis 1 (BatchNormalization, InstanceNorm).
    binary     broadcasting element-wise ops; tracked operands are united, constant operands
               are sliced with the channel.
    pool       spatial pooling on NCHW; channels pass through.
    pad        Pad; passes through when the channel axis is not padded.
    resize     Resize/Upsample; passes through when the channel axis is not scaled.
    reduce     Reduce*; passes through when the channel axis is not reduced.
    softmax    passes through unless normalising over the channel axis.
    layernorm  passes through unless the normalised axes include the channel axis.
    concat / split / slice / gather / transpose / squeeze / unsqueeze / reshape / flatten:
               move, offset or cut the channel axis. A Gather of rows of a constant 2-D table
               (an embedding) produces a new space over the table's columns.
    block      the op mixes channels in a way removal would change; blocks with ``note``.
               With ``passthrough`` (shape-preserving ops such as LRN) the output keeps the
               input's blocked layout, so that everything tied to it downstream is blocked
               for the same, stated reason rather than as "untracked".

A flow that blocks the channels of an op whose output has the input's shape along the channel
axis (a norm or softmax over the channel axis) still passes the blocked layout on, for the
same reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from . import decompositions, ops, permutation
from .channels import (
    Dim,
    Engine,
    Layout,
    Seg,
    const_value,
    dims,
    is_const,
    rank,
    static_shape,
)
from .groups import RefRole
from .ops import OpRule
from .permutation import match_shuffle
from .reasons import Reason, ReasonCode


def _why(node: gs.Node, text: str, code: ReasonCode = ReasonCode.OP_CONSTRAINT,
         tensor: gs.Tensor | None = None) -> Reason:
    return Reason(code, f"{node.name} ({node.op}): {text}", node=node.name,
                  tensor=None if tensor is None else tensor.name)


def _attr(node: gs.Node, name: str, default: object) -> object:
    return node.attrs.get(name, default)


def _norm_axis(axis: int, r: int) -> int:
    return axis + r if axis < 0 else axis


def _ints(v: np.ndarray | None) -> list[int] | None:
    return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]


def _untracked(t: gs.Tensor) -> str:
    """``t`` described as carrying untracked channels, naming the node that made it."""
    src = t.inputs[0] if t.inputs else None
    where = f" (made by {src.name} ({src.op}))" if src is not None else ""
    return f"{t.name}{where} carries channels that are not tracked"


def _check_aux_outputs(e: Engine, node: gs.Node, lay: Layout | None, graph_outputs: set[str]
                       ) -> None:
    for t in node.outputs[1:]:
        if t.name and (t.outputs or t.name in graph_outputs):
            e.block(lay, _why(node, f"auxiliary output {t.name} is used"))


def _layout_and_rank(e: Engine, node: gs.Node) -> tuple[Layout, int] | None:
    """The first input's layout and rank; blocks its channels when the rank is unknown."""
    lay = e.layout(node.inputs[0])
    r = rank(node.inputs[0])
    if lay is None or r is None:
        e.block(lay, _why(node, "input of unknown rank"))
        return None
    return lay, r


# --- handlers ----------------------------------------------------------------------------


def flow_block(e: Engine, node: gs.Node, rule: OpRule | None) -> None:
    why = (_why(node, rule.note) if rule and rule.note
           else _why(node, "no channel rule for this op", ReasonCode.UNKNOWN_OP))
    for t in node.inputs:
        e.block(e.layout(t), why)
    # Weights read by an op without a rule are not free to change either.
    for t in node.inputs:
        if is_const(t):
            e.weight_users.setdefault(t.name, set()).add(f"!{node.name}")
    if rule is not None and rule.passthrough and node.inputs and node.outputs:
        _pass_blocked(e, node, e.layout(node.inputs[0]))


def _pass_blocked(e: Engine, node: gs.Node, lay: Layout | None) -> None:
    """Give output 0 the (already blocked) input layout: the op keeps the shape, so whatever
    is tied to its output downstream is blocked for the reason given here."""
    if lay is not None and node.outputs and node.outputs[0].name:
        e.set_layout(node.outputs[0], lay, node)


def flow_unary(e: Engine, node: gs.Node, rule: OpRule) -> None:
    lay = e.layout(node.inputs[0]) if node.inputs else None
    if lay is None:
        return
    for t in node.inputs[1:]:
        if t.name and e.layout(t) is not None:
            e.block(lay, _why(node, f"extra input {t.name} carries channels"))
            e.block(e.layout(t), _why(node, "used as a parameter input"))
    e.touch(lay, node)
    if rule.aux_outputs_unused:
        _check_aux_outputs(e, node, lay, e.graph_output_names)  # type: ignore[attr-defined]
    e.set_layout(node.outputs[0], lay, node)


def flow_norm(e: Engine, node: gs.Node, rule: OpRule) -> None:
    lay = e.layout(node.inputs[0])
    if lay is None:
        return
    if lay.axis != 1:
        e.block(lay, _why(node, "normalises axis 1, which is not the channel axis here"))
        _pass_blocked(e, node, lay)
        return
    params: list[tuple[int, RefRole]] = ([(i, "out") for i in rule.out_params]
                                         + [(i, "stat") for i in rule.stat_params])
    for idx, role in params:
        if idx >= len(node.inputs) or not node.inputs[idx].name:
            continue
        p = node.inputs[idx]
        if not is_const(p):
            e.block(lay, _why(node, f"parameter {p.name} is not a constant"))
            e.block(e.layout(p), _why(node, f"{p.name} used as a parameter"))
            continue
        if static_shape(p) != (lay.size,):
            e.block(lay, _why(node, f"parameter {p.name} is not per-channel"))
            continue
        e.add_refs(p, 0, role, lay.with_axis(0), node, is_weight=True)
    if rule.aux_outputs_unused:
        _check_aux_outputs(e, node, lay, e.graph_output_names)  # type: ignore[attr-defined]
    e.set_layout(node.outputs[0], lay, node)


def flow_binary(e: Engine, node: gs.Node, rule: OpRule) -> None:
    ranks = [rank(t) for t in node.inputs]
    tracked = [(i, e.layout(t)) for i, t in enumerate(node.inputs) if e.layout(t) is not None]
    if not tracked:
        return
    if any(r is None for r in ranks):
        for _, lay in tracked:
            e.block(lay, _why(node, "operand of unknown rank"))
        return
    r_out = max(r for r in ranks if r is not None)
    aligned: list[tuple[int, Layout]] = []
    for i, lay in tracked:
        assert lay is not None
        ri = ranks[i]
        assert ri is not None
        aligned.append((i, lay.with_axis(lay.axis + r_out - ri)))
    axis = aligned[0][1].axis
    if any(lay.axis != axis for _, lay in aligned):
        for _, lay in aligned:
            e.block(lay, _why(node, "operands carry channels on different axes"))
        return
    base = aligned[0][1]
    ok = True
    for _, lay in aligned[1:]:
        ok = e.unite(base, lay, node) and ok
    if not ok:
        return
    tracked_idx = {i for i, _ in aligned}
    for i, t in enumerate(node.inputs):
        if i in tracked_idx or not t.name:
            continue
        ri = ranks[i]
        assert ri is not None
        a = axis - (r_out - ri)
        shape = dims(t)
        if a < 0:
            continue  # broadcast over the channel axis
        if shape is None or not isinstance(shape[a], int):
            e.block(base, _why(node, f"operand {t.name} has an unknown size on the channel "
                                     f"axis"))
            continue
        if shape[a] == 1:
            continue
        if shape[a] != base.size:
            e.block(base, _why(node, f"operand {t.name} does not match the channel axis"))
            continue
        if not is_const(t):
            e.block(base, _why(node, f"operand {_untracked(t)}"))
            continue
        # A constant sliced with the channel: a divisor or exponent is never zeroed.
        role: RefRole = "stat" if node.op in ("Div", "Pow") and i == 1 else "out"
        e.add_refs(t, a, role, base.with_axis(a), node, is_weight=True)
    e.touch(base, node)
    e.set_layout(node.outputs[0], base, node)


def flow_pool(e: Engine, node: gs.Node, rule: OpRule) -> None:
    lay = e.layout(node.inputs[0])
    if lay is None:
        return
    if lay.axis != 1:
        e.block(lay, _why(node, "pools over axes that include the channel axis"))
        return
    if rule.aux_outputs_unused:
        _check_aux_outputs(e, node, lay, e.graph_output_names)  # type: ignore[attr-defined]
    e.set_layout(node.outputs[0], lay, node)


def flow_pad(e: Engine, node: gs.Node, rule: OpRule) -> None:
    lay = e.layout(node.inputs[0])
    if lay is None:
        return
    pads: list[int] | None
    if len(node.inputs) > 1 and node.inputs[1].name:
        pads = _ints(const_value(node.inputs[1]))
    else:
        pads = [int(x) for x in node.attrs.get("pads", [])]
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = _ints(const_value(node.inputs[3]))
        if axes is None or pads is None:
            e.block(lay, _why(node, "pads or axes are not constant"))
            return
        r = rank(node.inputs[0]) or 0
        full = [0] * (2 * r)
        for k, a in enumerate(axes):
            a = _norm_axis(a, r)
            full[a], full[a + r] = pads[k], pads[k + len(axes)]
        pads = full
    if pads is None:
        e.block(lay, _why(node, "pads are not constant"))
        return
    r = len(pads) // 2
    if pads[lay.axis] or pads[lay.axis + r]:
        e.block(lay, _why(node, "pads the channel axis"))
        return
    e.set_layout(node.outputs[0], lay, node)


def flow_resize(e: Engine, node: gs.Node, rule: OpRule) -> None:
    lay = e.layout(node.inputs[0])
    if lay is None:
        return
    out_shape = dims(node.outputs[0])
    if out_shape is None or out_shape[lay.axis] != lay.size:
        e.block(lay, _why(node, "resizes the channel axis or its output size on the channel "
                                "axis is unknown"))
        return
    e.set_layout(node.outputs[0], lay, node)


def _reduce_axes(e: Engine, node: gs.Node, r: int) -> list[int] | None:
    if "axes" in node.attrs:
        return [_norm_axis(int(a), r) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = _ints(const_value(node.inputs[1]))
        return None if v is None else [_norm_axis(a, r) for a in v]
    if int(_attr(node, "noop_with_empty_axes", 0)):  # type: ignore[call-overload]
        return []
    return list(range(r))


def flow_reduce(e: Engine, node: gs.Node, rule: OpRule) -> None:
    got = _layout_and_rank(e, node)
    if got is None:
        return
    lay, r = got
    axes = _reduce_axes(e, node, r)
    if axes is None:
        e.block(lay, _why(node, "reduction axes are not constant"))
        return
    if lay.axis in axes:
        e.block(lay, _why(node, "reduces over the channel axis"))
        return
    keep = int(_attr(node, "keepdims", 1))  # type: ignore[call-overload]
    axis = lay.axis if keep else lay.axis - sum(1 for a in axes if a < lay.axis)
    e.set_layout(node.outputs[0], lay.with_axis(axis), node)


def flow_softmax(e: Engine, node: gs.Node, rule: OpRule) -> None:
    got = _layout_and_rank(e, node)
    if got is None:
        return
    lay, r = got
    opset = getattr(e, "opset", 17)
    axis = _norm_axis(int(_attr(node, "axis", -1 if opset >= 13 else 1)), r)  # type: ignore
    mixes = lay.axis == axis if opset >= 13 else lay.axis >= axis
    if mixes:
        e.block(lay, _why(node, "normalises over the channel axis"))
        _pass_blocked(e, node, lay)
        return
    e.set_layout(node.outputs[0], lay, node)


def flow_layernorm(e: Engine, node: gs.Node, rule: OpRule) -> None:
    got = _layout_and_rank(e, node)
    if got is None:
        return
    lay, r = got
    axis = _norm_axis(int(_attr(node, "axis", -1)), r)  # type: ignore[call-overload]
    if lay.axis >= axis:
        e.block(lay, _why(node, "normalises over the channel axis",
                          ReasonCode.LAYER_NORM_OVER_CHANNELS))
        _pass_blocked(e, node, lay)
        return
    _check_aux_outputs(e, node, lay, e.graph_output_names)  # type: ignore[attr-defined]
    e.set_layout(node.outputs[0], lay, node)


def flow_concat(e: Engine, node: gs.Node, rule: OpRule) -> None:
    tracked = [e.layout(t) for t in node.inputs]
    if all(t is None for t in tracked):
        return
    r = rank(node.outputs[0]) or rank(node.inputs[0])
    if r is None:
        for lay in tracked:
            e.block(lay, _why(node, "input of unknown rank"))
        return
    axis = _norm_axis(int(_attr(node, "axis", 1)), r)  # type: ignore[call-overload]
    ref = next(t for t in tracked if t is not None)
    if ref.axis != axis:
        # Concatenation along another axis: channel i of every input is channel i of the output.
        ok = True
        consts: list[gs.Tensor] = []
        for i, (t, lay) in enumerate(zip(node.inputs, tracked, strict=True)):
            if lay is None and is_const(t) and (d := dims(t)) is not None and len(d) == r \
                    and d[ref.axis] == ref.size:
                # A constant (a class token expanded to the batch, folded): per channel, and
                # sliced with it like a bias.
                consts.append(t)
            elif lay is None:
                e.block(ref, _why(node, f"input {i}: {_untracked(t)}"))
                ok = False
            elif lay is not ref:
                ok = e.unite(ref, lay, node) and ok
        if ok:
            for t in consts:
                e.add_refs(t, ref.axis, "out", ref, node, is_weight=True)
            e.set_layout(node.outputs[0], ref, node)
        return
    segs: list[Seg] = []
    block = ref.block
    for i, (t, lay) in enumerate(zip(node.inputs, tracked, strict=True)):
        if lay is None:
            shape = dims(t)
            n = shape[axis] if shape is not None else None
            if not isinstance(n, int):
                # No output layout: every tracked input must keep its channels.
                for other in tracked:
                    e.block(other, _why(node, f"input {i} has an unknown size"))
                return
            if n % block:
                for other in tracked:
                    e.block(other, _why(node, "concatenates inputs of different block sizes"))
                return
            opaque = e.opaque(n // block, node,
                              _why(node, f"input {_untracked(t)}"))
            lay = Layout(axis, block, opaque.segs)
        if lay.block != block or lay.axis != axis:
            for other in tracked:
                e.block(other, _why(node, "concatenates inputs of different layouts"))
            return
        segs.extend(lay.segs)
    out = Layout(axis, block, tuple(segs))
    e.touch(out, node)
    e.set_layout(node.outputs[0], out, node)


def flow_split(e: Engine, node: gs.Node, rule: OpRule) -> None:
    got = _layout_and_rank(e, node)
    if got is None:
        return
    lay, r = got
    axis = _norm_axis(int(_attr(node, "axis", 0)), r)  # type: ignore[call-overload]
    if axis != lay.axis:
        for t in node.outputs:
            e.set_layout(t, lay, node)
        return
    sizes: list[int] | None = None
    if len(node.inputs) > 1 and node.inputs[1].name:
        sizes = _ints(const_value(node.inputs[1]))
    elif "split" in node.attrs:
        sizes = [int(s) for s in node.attrs["split"]]
    else:
        n = len(node.outputs)
        if lay.size % n == 0:
            sizes = [lay.size // n] * n
    if sizes is None:
        e.block(lay, _why(node, "split sizes are not constant"))
        return
    lo = 0
    for t, s in zip(node.outputs, sizes, strict=False):
        sub = lay.sub(lo, lo + s)
        if sub is None:
            e.block(lay, _why(node, "splits inside a channel block"))
            return
        e.set_layout(t, sub, node)
        lo += s
    e.touch(lay, node)


def flow_slice(e: Engine, node: gs.Node, rule: OpRule) -> None:
    got = _layout_and_rank(e, node)
    if got is None:
        return
    lay, r = got
    vals = [_ints(const_value(t)) if t.name else None for t in node.inputs[1:]]
    starts, ends = vals[0], vals[1]
    axes = vals[2] if len(vals) > 2 and vals[2] is not None else (
        list(range(len(starts))) if starts is not None else None)
    steps = vals[3] if len(vals) > 3 and vals[3] is not None else None
    if starts is None or ends is None or axes is None:
        e.block(lay, _why(node, "slice bounds are not constant"))
        return
    axes = [_norm_axis(a, r) for a in axes]
    if lay.axis not in axes:
        e.set_layout(node.outputs[0], lay, node)
        return
    k = axes.index(lay.axis)
    if steps is not None and steps[k] != 1:
        e.block(lay, _why(node, "slices the channel axis with a step"))
        return
    size = lay.size
    lo, hi = starts[k], ends[k]
    lo = max(0, min(size, lo + size if lo < 0 else lo))
    hi = max(0, min(size, hi + size if hi < 0 else hi))
    sub = lay.sub(lo, hi)
    if sub is None or hi <= lo:
        e.block(lay, _why(node, "slices inside a channel block"))
        return
    e.touch(lay, node)
    e.set_layout(node.outputs[0], sub, node)


def _embedding(e: Engine, node: gs.Node) -> bool:
    """Gather of rows of a constant 2-D float table (an embedding lookup): the output's last
    axis is a new space whose channel ``j`` is column ``j`` of the table (an ``out`` member).
    Returns whether the node is one."""
    table = const_value(node.inputs[0])
    r_idx = rank(node.inputs[1])
    axis = int(node.attrs.get("axis", 0))
    if (table is None or table.ndim != 2 or table.dtype.kind != "f" or axis not in (0, -2)
            or r_idx is None or is_const(node.inputs[1])):
        return False
    out = _new_output(e, node, int(table.shape[1]), r_idx)
    e.add_refs(node.inputs[0], 1, "out", out.with_axis(1), node, is_weight=True)
    e.set_layout(node.outputs[0], out, node)
    return True


def flow_gather(e: Engine, node: gs.Node, rule: OpRule) -> None:
    lay = e.layout(node.inputs[0])
    r = rank(node.inputs[0])
    if e.layout(node.inputs[1]) is not None:
        e.block(e.layout(node.inputs[1]), _why(node, "channels used as indices"))
    if lay is None and _embedding(e, node):
        return
    if lay is None or r is None:
        e.block(lay, _why(node, "input of unknown rank"))
        return
    axis = _norm_axis(int(_attr(node, "axis", 0)), r)  # type: ignore[call-overload]
    idx = const_value(node.inputs[1])
    if (axis == lay.axis and idx is not None and idx.ndim == 1
            and node.inputs[0].name not in {t.name for t in e.graph.inputs}):
        # Constant indices on the channel axis: a permutation or selection of the channels.
        # (A Gather right after a graph input is how prune keeps the features still read.)
        sel = lay.select([int(i) + lay.size if i < 0 else int(i) for i in idx])
        if sel is not None:
            e.touch(lay, node)
            e.set_layout(node.outputs[0], sel, node)
            return
    if axis == lay.axis or idx is None:
        e.block(lay, _why(node, "gathers along the channel axis or with variable indices"))
        return
    new_axis = lay.axis if lay.axis < axis else lay.axis + idx.ndim - 1
    e.set_layout(node.outputs[0], lay.with_axis(new_axis), node)


def flow_expand(e: Engine, node: gs.Node, rule: OpRule) -> None:
    """Expand to the input's own shape (TorchScript writes one before an in-place slice add)
    passes the channels through; any other Expand blocks them (``rule.note``)."""
    lay = e.layout(node.inputs[0])
    s, t = dims(node.inputs[0]), dims(node.outputs[0])
    if lay is None or s is None or s != t or None in s:
        flow_block(e, node, rule)
        return
    e.set_layout(node.outputs[0], lay, node)


def flow_scatter_nd(e: Engine, node: gs.Node, rule: OpRule) -> None:
    """ScatterND with constant indices that writes whole channels (an in-place partial
    residual, ``out[:, :C] += x``): output channel ``p`` is data channel ``p``, or, where
    the indices write it, update channel ``j``. Each such pair is united (removed together),
    so the output keeps the data's layout."""
    data, upd = node.inputs[0], node.inputs[2]
    lay, lu = e.layout(data), e.layout(upd)
    if lay is None and lu is None:
        return
    idx = const_value(node.inputs[1])
    shape = dims(data)
    why = _why(node, "scatters with indices that are not constant or do not write whole "
                     "channels")
    if (lay is None or lu is None or idx is None or shape is None or idx.ndim < 1
            or node.attrs.get("reduction", "none") != "none" or lay.block != 1):
        e.block(lay, why)
        e.block(lu, why)
        return
    q, lead = int(idx.shape[-1]), tuple(int(d) for d in idx.shape[:-1])
    tuples = idx.reshape(-1, q)
    a = lay.axis
    if a >= q:  # whole rows of the leading axes: the updates carry every channel
        ok = lu.axis == len(lead) + a - q and e.unite(lay, lu, node)
    else:
        wide = [k for k, d in enumerate(lead) if d != 1]
        size = shape[a]
        others_fixed = all(shape[c] == 1 and len(set(tuples[:, c].tolist())) == 1
                           for c in range(q) if c != a)
        pos = [int(p) + size if p < 0 else int(p) for p in tuples[:, a]] if isinstance(
            size, int) else []
        sel = lay.select(pos) if pos and len(set(pos)) == len(pos) else None
        ok = (others_fixed and sel is not None and lu.size == len(pos) and len(wide) <= 1
              and lu.axis == (wide[0] if wide else lu.axis) and lu.axis < len(lead)
              and e.unite(sel, lu, node))
    if not ok:
        e.block(lay, why)
        e.block(lu, why)
        return
    e.touch(lay, node)
    e.set_layout(node.outputs[0], lay, node)


def flow_transpose(e: Engine, node: gs.Node, rule: OpRule) -> None:
    got = _layout_and_rank(e, node)
    if got is None:
        return
    lay, r = got
    perm = [int(p) for p in _attr(node, "perm", list(range(r))[::-1])]  # type: ignore
    e.set_layout(node.outputs[0], lay.with_axis(perm.index(lay.axis)), node)


def _axes_input(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        return _ints(const_value(node.inputs[1]))
    return None


def flow_squeeze(e: Engine, node: gs.Node, rule: OpRule) -> None:
    got = _layout_and_rank(e, node)
    if got is None:
        return
    lay, r = got
    axes = _axes_input(node)
    if axes is None:
        shape = dims(node.inputs[0])
        if shape is None or not all(isinstance(d, int) for d in shape):
            e.block(lay, _why(node, "squeezes unknown axes"))
            return
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = [_norm_axis(a, r) for a in axes]
    if lay.axis in axes:
        e.block(lay, _why(node, "squeezes the channel axis"))
        return
    e.set_layout(node.outputs[0], lay.with_axis(lay.axis - sum(a < lay.axis for a in axes)), node)


def flow_unsqueeze(e: Engine, node: gs.Node, rule: OpRule) -> None:
    lay = e.layout(node.inputs[0])
    r = rank(node.inputs[0])
    axes = _axes_input(node)
    if lay is None or r is None or axes is None:
        e.block(lay, _why(node, "unknown rank or axes"))
        return
    r_out = r + len(axes)
    axes = sorted(_norm_axis(a, r_out) for a in axes)
    axis = lay.axis
    for a in axes:
        if a <= axis:
            axis += 1
    e.set_layout(node.outputs[0], lay.with_axis(axis), node)


_Prod = tuple[int, tuple[str, ...]]


def _prod(ds: Sequence[Dim]) -> _Prod | None:
    """The product of dims as (static factor, sorted named dims); None if a dim is unknown."""
    n, names = 1, []
    for d in ds:
        if d is None:
            return None
        if isinstance(d, str):
            names.append(d)
        else:
            n *= d
    return n, tuple(sorted(names))


def _reshape_target(node: gs.Node, s: tuple[Dim, ...]) -> tuple[Dim, ...] | None:
    """The output dims of a Reshape with a constant target: 0 copies an input dim (unless
    ``allowzero``), -1 is what is left of the input's product (a named dim if that is all)."""
    target = _ints(const_value(node.inputs[1])) if len(node.inputs) > 1 else None
    if target is None:
        return None
    allowzero = int(node.attrs.get("allowzero", 0))
    out: list[Dim] = [s[i] if v == 0 and not allowzero and i < len(s) else v
                      for i, v in enumerate(target)]
    if -1 in out:
        known = _prod([d for d in out if d != -1])
        total = _prod(s)
        if known is None or total is None or known[0] == 0 or total[0] % known[0]:
            return None
        left = list(total[1])
        for name in known[1]:
            if name not in left:
                return None
            left.remove(name)
        n = total[0] // known[0]
        fill: Dim = n if not left else (left[0] if len(left) == 1 and n == 1 else None)
        out = [fill if d == -1 else d for d in out]
    return tuple(out)


def _reshape_layout(e: Engine, node: gs.Node, lay: Layout, s: tuple[Dim, ...],
                    t: tuple[Dim, ...]) -> None:
    """Map the channel axis through a reshape of shape ``s`` -> ``t``.

    The channel axis survives when the dims before it keep their product and the channel
    axis lands on one output axis, possibly merged with the dims after it (a flatten): then
    every channel owns a contiguous block of ``block * k`` positions. Dims before the channel
    axis may be named (a dynamic batch): they must reappear as such; the channel axis and the
    dims after it must be static.
    """
    a = lay.axis
    c = s[a]
    outer = _prod(s[:a])
    inner = _prod(s[a + 1:])
    if isinstance(c, int) and outer is not None and inner is not None and not inner[1]:
        for b, d in enumerate(t):
            if _prod(t[:b]) != outer or not isinstance(d, int) or d < c or d % c:
                continue
            k = d // c
            rest = _prod(t[b + 1:])
            if rest is not None and inner[0] % k == 0 and rest == (inner[0] // k, ()):
                e.set_layout(node.outputs[0], Layout(b, lay.block * k, lay.segs), node)
                return
    e.block(lay, _why(node, f"reshape {list(s)} -> {list(t)} splits or mixes the channel axis "
                            f"(or the dims involved are not static)"))


def flow_reshape(e: Engine, node: gs.Node, rule: OpRule) -> None:
    lay = e.layout(node.inputs[0])
    if lay is None:
        return
    shuffle = match_shuffle(node, lay.axis, e.graph_output_names)
    sel = None if shuffle is None else lay.select(shuffle.perm)
    if shuffle is not None and sel is not None:
        # A channel shuffle (Reshape, Transpose, Reshape): a fixed permutation of the channels,
        # given to the last Reshape's output (see onnx_ssl.permutation).
        for n in (node, shuffle.transpose, shuffle.last):
            e.touch(lay, n)
        e.set_layout(shuffle.last.outputs[0], sel, shuffle.last)
        return
    if len(node.inputs) > 1 and not is_const(node.inputs[1]):
        e.block(lay, _why(node, "target shape is computed at run time",
                               ReasonCode.RUNTIME_SHAPE, node.inputs[1]))
        return
    s, t = dims(node.inputs[0]), dims(node.outputs[0])
    if s is not None and (t is None or None in t):
        t = _reshape_target(node, s)
    if s is None or t is None:
        e.block(lay, _why(node, "input or output shape unknown: the reshape's channel mapping "
                                "is unknown", ReasonCode.RUNTIME_SHAPE))
        return
    _reshape_layout(e, node, lay, s, t)


def flow_flatten(e: Engine, node: gs.Node, rule: OpRule) -> None:
    """Flatten(axis=k) to 2-D: channel axis ``a >= k`` lands on output axis 1, ``a < k`` on
    axis 0, each channel a contiguous block, when the dims on the way are static and the dims
    between the flatten axis and the channel axis are 1."""
    lay = e.layout(node.inputs[0])
    if lay is None:
        return
    s = dims(node.inputs[0])
    if s is None:
        e.block(lay, _why(node, "input of unknown rank"))
        return
    k = _norm_axis(int(node.attrs.get("axis", 1)), len(s))
    a = lay.axis
    before, after = (s[k:a], s[a + 1:]) if a >= k else (s[:a], s[a + 1:k])
    between, block = _prod(before), _prod(after)
    if between != (1, ()) or block is None or block[1]:
        e.block(lay, _why(node, f"flatten of {list(s)} at axis {k} spreads or mixes the "
                                f"channel axis (or the dims involved are not static)"))
        return
    e.set_layout(node.outputs[0], Layout(1 if a >= k else 0, lay.block * block[0], lay.segs),
                 node)


# --- layers -------------------------------------------------------------------------------


def _new_output(e: Engine, node: gs.Node, n: int, axis: int) -> Layout:
    s = e.new_space(n, node.name)
    e.spaces[s].nodes.append(node.name)
    lay = Layout(axis, 1, (Seg(s, 0, n),))
    return lay


def _bias_ref(e: Engine, node: gs.Node, idx: int, out: Layout) -> None:
    if len(node.inputs) <= idx or not node.inputs[idx].name:
        return
    b = node.inputs[idx]
    shape = static_shape(b)
    if not is_const(b) or shape is None:
        e.block(out, _why(node, f"bias {b.name} is not a constant"))
        e.block(e.layout(b), _why(node, f"{b.name} used as a bias"))
        return
    n = out.size
    if shape == (n,):
        e.add_refs(b, 0, "out", out.with_axis(0), node, is_weight=True)
    elif len(shape) == 2 and shape[1] == n:
        e.add_refs(b, 1, "out", out.with_axis(1), node, is_weight=True)
    elif int(np.prod(shape)) != 1:
        e.block(out, _why(node, f"bias {b.name} of shape {list(shape)} is not per-channel"))


def flow_conv(e: Engine, node: gs.Node, rule: OpRule | None = None) -> None:
    x, w = node.inputs[0], node.inputs[1]
    lay = e.layout(x)
    wv = const_value(w)
    if wv is None:
        e.block(lay, _why(node, f"weight {w.name} is not a constant"))
        return
    group = int(node.attrs.get("group", 1))
    c_out, c_in_g = int(wv.shape[0]), int(wv.shape[1])
    c_in = c_in_g * group
    if lay is not None and lay.axis != 1:
        e.block(lay, _why(node, "input channel axis is not axis 1"))
        lay = None
    if group > 1 and c_in_g == 1:
        # Depthwise: output channel j reads input channel j // mult only.
        mult = c_out // c_in
        if lay is None:
            out = _new_output(e, node, c_out, 1)
            e.block(out, _why(node, f"depthwise convolution of {_untracked(x)}"))
        else:
            out = lay.with_block(lay.block * mult)
            e.touch(lay, node)
        e.add_refs(w, 0, "out", out.with_axis(0), node, is_weight=True)
        _bias_ref(e, node, 2, out)
        e.set_layout(node.outputs[0], out, node)
        return
    if lay is not None:
        if group > 1:
            if len(lay.segs) != 1 or lay.block != 1 or lay.segs[0].start != 0 or (
                    lay.segs[0].length != e.spaces[e.find(lay.segs[0].space)].length):
                e.block(lay, _why(node, "grouped convolution of a concatenated or sliced input"))
            else:
                e.spaces[e.find(lay.segs[0].space)].partitions.append(group)
        e.add_refs(w, 1, "in", lay.with_axis(1), node, is_weight=True, conv_groups=group)
    out = _new_output(e, node, c_out, 1)
    if group > 1:
        e.spaces[out.segs[0].space].partitions.append(group)
    e.add_refs(w, 0, "out", out.with_axis(0), node, is_weight=True)
    _bias_ref(e, node, 2, out)
    e.set_layout(node.outputs[0], out, node)


def flow_conv_transpose(e: Engine, node: gs.Node, rule: OpRule | None = None) -> None:
    x, w = node.inputs[0], node.inputs[1]
    lay = e.layout(x)
    wv = const_value(w)
    group = int(node.attrs.get("group", 1))
    if wv is None or group != 1:
        e.block(lay, _why(node, "non-constant weight or grouped transposed convolution"))
        if wv is not None:
            out = _new_output(e, node, int(wv.shape[1]) * group, 1)
            e.block(out, _why(node, "grouped transposed convolution"))
            e.set_layout(node.outputs[0], out, node)
        return
    if lay is not None and lay.axis != 1:
        e.block(lay, _why(node, "input channel axis is not axis 1"))
        lay = None
    if lay is not None:
        e.add_refs(w, 0, "in", lay.with_axis(0), node, is_weight=True)
    out = _new_output(e, node, int(wv.shape[1]), 1)
    e.add_refs(w, 1, "out", out.with_axis(1), node, is_weight=True)
    _bias_ref(e, node, 2, out)
    e.set_layout(node.outputs[0], out, node)


def flow_gemm(e: Engine, node: gs.Node, rule: OpRule | None = None) -> None:
    a, b = node.inputs[0], node.inputs[1]
    lay = e.layout(a)
    bv = const_value(b)
    if int(node.attrs.get("transA", 0)):
        e.block(lay, _why(node, "transA=1"))
        lay = None
    if lay is not None and lay.axis != 1:
        e.block(lay, _why(node, "channel axis is not the contraction axis"))
        lay = None
    if bv is None:
        e.block(lay, _why(node, f"weight {b.name} is not a constant"))
        e.block(e.layout(b), _why(node, "activation used as a weight"))
        return
    out_axis, in_axis = ops.GEMM.axes(node)  # the weight's axes, written once in ops
    if lay is not None:
        e.add_refs(b, in_axis, "in", lay.with_axis(in_axis), node, is_weight=True)
    out = _new_output(e, node, int(bv.shape[out_axis]), 1)
    e.add_refs(b, out_axis, "out", out.with_axis(out_axis), node, is_weight=True)
    _bias_ref(e, node, 2, out)
    e.set_layout(node.outputs[0], out, node)


def flow_matmul(e: Engine, node: gs.Node, rule: OpRule | None = None) -> None:
    a, b = node.inputs[0], node.inputs[1]
    la, lb = e.layout(a), e.layout(b)
    bv = const_value(b)
    ra = rank(a)
    if bv is None or bv.ndim != 2 or ra is None:
        why = "MatMul of two activations (or a batched weight) mixes channels"
        e.block(la, _why(node, why))
        e.block(lb, _why(node, why))
        return
    r_out = max(ra, 2)
    if la is not None and la.axis != ra - 1:
        # Channels on a row or batch axis pass through a contraction of the last axis.
        e.set_layout(node.outputs[0], la.with_axis(la.axis + r_out - ra), node)
        return
    if la is not None:
        e.add_refs(b, 0, "in", la.with_axis(0), node, is_weight=True)
    out = _new_output(e, node, int(bv.shape[1]), r_out - 1)
    e.add_refs(b, 1, "out", out.with_axis(1), node, is_weight=True)
    e.set_layout(node.outputs[0], out, node)


# --- the table -----------------------------------------------------------------------------

_UNARY = (
    "Relu LeakyRelu PRelu Clip Sigmoid HardSigmoid HardSwish Tanh Gelu Erf Exp Sqrt Abs Neg Log "
    "Softplus Softsign Elu Selu Celu Mish ThresholdedRelu Reciprocal Floor Ceil Round Sign Sin "
    "Cos Identity Cast Dropout Swish"
).split()

RULES: dict[str, OpRule] = {
    **{op: OpRule(flow_unary) for op in _UNARY},
    "PRelu": OpRule(flow_binary, note="slope sliced with the channel", trained=(1,),
                    training_lowering=decompositions.PRELU),
    "HardSigmoid": OpRule(flow_unary, training_lowering=decompositions.HARD_SIGMOID),
    "HardSwish": OpRule(flow_unary, training_lowering=decompositions.HARD_SWISH),
    "Elu": OpRule(flow_unary, training_lowering=decompositions.ELU),
    "Selu": OpRule(flow_unary, training_lowering=decompositions.SELU),
    "Softplus": OpRule(flow_unary, training_lowering=decompositions.SOFTPLUS),
    "Dropout": OpRule(flow_unary, aux_outputs_unused=True),
    "Conv": OpRule(flow_conv, layer=ops.CONV, rewrite=ops.rewrite_conv, trained=(1, 2),
                   creates_from=1),
    "ConvTranspose": OpRule(flow_conv_transpose, layer=ops.CONV_TRANSPOSE, trained=(1, 2),
                            creates_from=1),
    "Gemm": OpRule(flow_gemm, layer=ops.GEMM, trained=(0, 1, 2), creates_from=1),
    "MatMul": OpRule(flow_matmul, layer=ops.MATMUL, trained=(0, 1), creates_from=1),
    "BatchNormalization": OpRule(flow_norm, out_params=(1, 2), stat_params=(3, 4),
                                 aux_outputs_unused=True, trained=(1, 2)),
    "InstanceNormalization": OpRule(flow_norm, out_params=(1, 2), trained=(1, 2),
                                    training_lowering=decompositions.INSTANCE_NORM),
    **{op: OpRule(flow_binary, trained_operands=op in ("Add", "Sub", "Mul", "Div"))
       for op in "Add Sub Mul Div Pow Max Min Sum Mean".split()},
    **{op: OpRule(flow_pool, aux_outputs_unused=op == "MaxPool")
       for op in "MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split()},
    "GlobalMaxPool": OpRule(flow_pool, training_lowering=decompositions.GLOBAL_MAX_POOL),
    "Pad": OpRule(flow_pad),
    "Resize": OpRule(flow_resize, rewrite=ops.rewrite_resize),
    "Upsample": OpRule(flow_resize, rewrite=ops.rewrite_resize),
    **{op: OpRule(flow_reduce) for op in (
        "ReduceMean ReduceMax ReduceMin ReduceSum ReduceL1 ReduceL2 ReduceLogSumExp ReduceProd "
        "ReduceSumSquare").split()},
    "Softmax": OpRule(flow_softmax),
    "LogSoftmax": OpRule(flow_softmax),
    "Hardmax": OpRule(flow_softmax),
    "LayerNormalization": OpRule(flow_layernorm, trained=(1, 2)),
    "Concat": OpRule(flow_concat),
    "Split": OpRule(flow_split, rewrite=ops.rewrite_split),
    "Slice": OpRule(flow_slice, rewrite=ops.rewrite_slice),
    "Gather": OpRule(flow_gather, trained=(0,), creates_from=0,
                     rewrite=permutation.rewrite_gather),
    "Transpose": OpRule(flow_transpose),
    "Squeeze": OpRule(flow_squeeze),
    "Unsqueeze": OpRule(flow_unsqueeze),
    "Reshape": OpRule(flow_reshape, rewrite=permutation.rewrite_reshape),
    "Flatten": OpRule(flow_flatten),
    "LRN": OpRule(flow_block, note="LRN normalises each channel by its neighbours, so removing "
                                   "a channel changes the others", passthrough=True,
                  training_lowering=decompositions.LRN),
    "GroupNormalization": OpRule(flow_block, note="GroupNormalization mixes the channels of a "
                                                  "group", passthrough=True, trained=(1, 2)),
    "Shape": OpRule(flow_block, note="reads the tensor's shape (a dynamic shape that pruning "
                                     "would change)"),
    "Size": OpRule(flow_block, note="reads the tensor's size (a dynamic shape)"),
    "DepthToSpace": OpRule(flow_block, note="rearranges channels into space"),
    "SpaceToDepth": OpRule(flow_block, note="rearranges space into channels"),
    "Einsum": OpRule(flow_block, note="contraction over unknown axes", trained=tuple(range(8))),
    "Expand": OpRule(flow_expand, note="broadcast to a shape computed elsewhere",
                     rewrite=permutation.rewrite_expand),
    "ScatterND": OpRule(flow_scatter_nd, rewrite=permutation.rewrite_scatter_nd),
    "Tile": OpRule(flow_block, note="repeats the channel axis"),
    "Where": OpRule(flow_block, note="select between tensors"),
    "TopK": OpRule(flow_block, note="selects along an axis"),
    "ArgMax": OpRule(flow_block, note="reduces to indices"),
    "ArgMin": OpRule(flow_block, note="reduces to indices"),
}


# ONNX Runtime's contrib ops (domain com.microsoft) as its transformers optimizer writes them
# around fused attention: element-wise GELUs with a bias sliced with the channel, and the
# LayerNorm of a residual sum (which normalises over the channels, as LayerNormalization).
MS_RULES: dict[str, OpRule] = {
    "Gelu": OpRule(flow_unary),
    "QuickGelu": OpRule(flow_unary),
    "BiasGelu": OpRule(flow_binary, note="bias sliced with the channel"),
    "FastGelu": OpRule(flow_binary, note="bias sliced with the channel"),
    "SkipLayerNormalization": OpRule(
        flow_block, note="normalises the residual sum over the channel axis (LayerNorm)",
        passthrough=True),
    "SkipSimplifiedLayerNormalization": OpRule(
        flow_block, note="normalises the residual sum over the channel axis (RMSNorm)",
        passthrough=True),
}


def rule_of(node: gs.Node) -> OpRule | None:
    """The rule of ``node``'s op in its domain (None: not in the tables)."""
    if node.domain in (None, "", "ai.onnx"):
        return RULES.get(node.op)
    return MS_RULES.get(node.op) if node.domain == "com.microsoft" else None


def apply_rule(e: Engine, node: gs.Node) -> None:
    rule = rule_of(node)
    if rule is None:
        flow_block(e, node, rule)
        return
    rule.flow(e, node, rule)


def layer_weight(node: gs.Node) -> tuple[ops.LayerSlots, np.ndarray] | None:
    """The layer slots of ``node`` and its constant weight, or None when the node is no
    parameterised layer (an op without layer slots, or one whose weight is an activation, as
    the Q x K^T MatMul of attention)."""
    rule = RULES.get(node.op)
    slots = rule.layer if rule is not None else None
    if slots is None or len(node.inputs) <= slots.weight:
        return None
    wv = const_value(node.inputs[slots.weight])
    if wv is None or (slots.weight_ndim is not None and wv.ndim != slots.weight_ndim):
        return None
    return slots, wv
