"""The coupled-group analysis of an ONNX graph.

``prepare`` folds the shape arithmetic that static input shapes make constant (and Constant
nodes into initializers) and infers shapes; ``analyze`` propagates channel layouts through
the graph with the op rules of :mod:`onnx_ssl.rules` and returns an immutable
:class:`~onnx_ssl.groups.Analysis`: channel spaces (prunable or the reason why not), the
groups of each requested kind with their members, the parameterised layers with params and
MACs, and the residual branches.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .channels import Engine, Layout, RawRef, Seg, const_value, static_shape
from .errors import InputError, UnsupportedModelError
from .groups import (
    DEFAULT_KINDS,
    KINDS,
    Analysis,
    Branch,
    ChannelRef,
    Group,
    Layer,
    Member,
    Space,
)
from .io import (
    CONTROL_FLOW_OPS,
    ModelMeta,
    fold_trivial_constants,
    from_graph,
    infer_shapes,
    to_graph,
)
from .rules import apply_rule

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_TYPES = (np.float32, np.float64, np.float16)


def _foldable(model: onnx.ModelProto) -> bool:
    """Whether any node computes from constants alone (or reads only a shape)."""
    consts = {t.name for t in model.graph.initializer}
    consts.add("")
    for n in model.graph.node:
        if n.op_type in ("Constant", "Shape", "Size") or all(i in consts for i in n.input):
            return True
    return False


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constant shape arithmetic and Constant-node weights, give each reader of a merged
    constant its own copy (:func:`unshare_constants`); infer shapes.

    The result computes the same function for the model's static input shapes; its
    initializers are the tensors the groups name.
    """
    return _prepare(model)[0]


def _prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, gs.Graph]:
    meta = ModelMeta.of(model)
    m = infer_shapes(fold_trivial_constants(model), strict=False)
    graph = to_graph(m)
    if not _foldable(m):
        return _unshared(m, graph, meta)
    has_control_flow = any(n.op_type in CONTROL_FLOW_OPS for n in m.graph.node)
    for _ in range(4):
        before = len(graph.nodes)
        try:
            graph.fold_constants(fold_shapes=True, recurse_subgraphs=not has_control_flow,
                                 error_ok=False, flatten_subgraphs=False)
        except Exception as e:  # onnx-graphsurgeon raises plain exceptions
            raise UnsupportedModelError(f"constant folding failed: {str(e).splitlines()[0]}"
                                        ) from e
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        m = infer_shapes(from_graph(graph, meta), strict=False)
        graph = to_graph(m)
        # Shapes inferred anew may make more arithmetic constant; stop when nothing is left.
        if len(graph.nodes) == before or not _foldable(m):
            break
    return _unshared(m, graph, meta)


def _unshared(m: onnx.ModelProto, graph: gs.Graph, meta: ModelMeta
              ) -> tuple[onnx.ModelProto, gs.Graph]:
    if unshare_constants(graph):
        m = infer_shapes(from_graph(graph, meta), strict=False)
        graph = to_graph(m)
    return m, graph


def unshare_constants(graph: gs.Graph) -> int:
    """Give every reader of a shared float constant its own copy; returns the copies made.

    Exporters merge equal initializers (the dynamo exporter's optimiser makes the all-zero
    biases and all-one norm scales of unrelated layers one tensor). Left shared, the channels
    of either reader could not be pruned (slicing the tensor for one would change the
    others), although the readers have nothing in common. A copy per reader computes the same
    function. A constant that some reader uses as a layer weight (input 1 of Conv, Gemm,
    MatMul, ConvTranspose) is a tied weight and stays shared: the analysis blocks it.
    """
    names = set(graph.tensors().keys())
    outputs = {t.name for t in graph.outputs}
    copies = 0
    for t in list(graph.tensors().values()):
        if not isinstance(t, gs.Constant) or t.name in outputs:
            continue
        readers: list[gs.Node] = []
        for n in t.outputs:
            if not any(n is r for r in readers):
                readers.append(n)
        if len(readers) < 2:
            continue
        if any(n.op in LAYER_OPS and len(n.inputs) > 1 and n.inputs[1] is t for n in readers):
            continue
        values = np.asarray(t.values)
        if values.dtype.type not in FLOAT_TYPES or values.size <= 1:
            continue
        for n in readers[1:]:
            k = 1
            while f"{t.name}.{k}" in names:
                k += 1
            copy = gs.Constant(f"{t.name}.{k}", values.copy())
            names.add(copy.name)
            for i, x in enumerate(n.inputs):
                if x is t:
                    n.inputs[i] = copy
            copies += 1
    return copies


def _space_ids(e: Engine) -> dict[int, str]:
    ids: dict[int, str] = {}
    used: set[str] = set()
    for i in range(len(e.spaces)):
        if e.find(i) != i:
            continue
        base = e.spaces[i].name
        sid, k = base, 1
        while sid in used:
            k += 1
            sid = f"{base}#{k}"
        used.add(sid)
        ids[i] = sid
    return ids


def _seed_inputs(e: Engine, graph: gs.Graph) -> None:
    for t in graph.inputs:
        shape = t.shape
        if t.dtype is None or np.dtype(t.dtype).type not in FLOAT_TYPES:
            continue
        if shape is None or len(shape) < 2 or not isinstance(shape[1], (int, np.integer)):
            continue
        c = int(shape[1])
        s = e.new_space(c, f"input:{t.name}", "input")
        e.spaces[s].reasons.append(f"graph input '{t.name}': its channels are fixed by the "
                                   f"caller")
        e.layouts[t.name] = Layout(1, 1, (Seg(s, 0, c),))
        e.refs.append(RawRef(t.name, 1, "act", s, 0, 0, c, 1, "", False))


def _subgraph_names(g: gs.Graph, bound: set[str], out: set[str]) -> None:
    local = bound | {t.name for t in g.inputs}
    for n in g.nodes:
        for t in n.inputs:
            if t.name and t.name not in local and not isinstance(t, gs.Constant):
                out.add(t.name)
        for v in n.attrs.values():
            for sub in v if isinstance(v, list) else [v]:
                if isinstance(sub, gs.Graph):
                    _subgraph_names(sub, local, out)
        local |= {t.name for t in n.outputs}


def _block_control_flow(e: Engine, graph: gs.Graph) -> list[str]:
    notes: list[str] = []
    tensors = graph.tensors()
    for node in graph.nodes:
        if node.op not in CONTROL_FLOW_OPS:
            continue
        names: set[str] = set()
        for v in node.attrs.values():
            for sub in v if isinstance(v, list) else [v]:
                if isinstance(sub, gs.Graph):
                    _subgraph_names(sub, set(), names)
        why = f"{node.name} ({node.op}): control flow; its subgraphs are not analysed"
        for n in names | {t.name for t in node.inputs}:
            if n in tensors:
                e.block(e.layout(tensors[n]), why)
        notes.append(why)
    return notes


def _check_weights(e: Engine, graph: gs.Graph) -> None:
    """Block spaces whose weights are shared with layers elsewhere or read by other ops."""
    tensors = graph.tensors()
    by_tensor: dict[tuple[str, int], list[RawRef]] = defaultdict(list)
    for r in e.refs:
        if r.is_weight:
            by_tensor[(r.tensor, r.axis)].append(r)
    for (name, axis), refs in by_tensor.items():
        roots = {e.find(r.space) for r in refs}
        users = e.weight_users.get(name, set())
        consumers = {n.name for n in tensors[name].outputs} if name in tensors else set()
        why = None
        # The same positions claimed by different channels: a weight shared across spaces.
        # Intervals sorted by start; an overlap with a different (space, offset) is sharing.
        spans = sorted((r.tensor_start, r.tensor_start + r.length,
                        (e.find(r.space), r.space_start - r.tensor_start)) for r in refs)
        reach, reach_key = -1, None  # the furthest end so far, and whose it is
        for start, end, key in spans:
            if start < reach and key != reach_key:
                why = (f"weight {name} (axis {axis}) is shared by layers in different "
                       f"spaces: " + ", ".join(sorted(u.lstrip("!") for u in users)))
                break
            if end > reach:
                reach, reach_key = end, key
        outside = sorted(c for c in consumers if c not in users)
        if any(u.startswith("!") for u in users):
            outside += sorted(u[1:] for u in users if u.startswith("!"))
        if outside:
            why = f"weight {name} is also read by {', '.join(outside)}"
        if name in e.graph_output_names:
            why = f"weight {name} is a graph output"
        if why:
            for s in roots:
                e.block_space(s, why)


def _propagate(graph: gs.Graph) -> tuple[Engine, list[str]]:
    e = Engine(graph)
    _seed_inputs(e, graph)
    for node in graph.nodes:
        if node.op in CONTROL_FLOW_OPS:
            continue
        apply_rule(e, node)
    # After propagation, so that the layouts of what the subgraphs read are known.
    notes = _block_control_flow(e, graph)
    for t in graph.outputs:
        e.block(e.layout(t), f"reaches graph output '{t.name}'")
    _check_weights(e, graph)
    return e, notes


def _build_spaces(e: Engine, ids: dict[int, str]) -> tuple[Space, ...]:
    refs_by_root: dict[int, list[ChannelRef]] = defaultdict(list)
    for r in e.refs:
        root = e.find(r.space)
        refs_by_root[root].append(ChannelRef(
            tensor=r.tensor, axis=r.axis, role=r.role,  # type: ignore[arg-type]
            space=ids[root], space_start=r.space_start, tensor_start=r.tensor_start,
            length=r.length, block=r.block, node=r.node, is_weight=r.is_weight,
            conv_groups=r.conv_groups))
    spaces = []
    for root, sid in ids.items():
        rs = e.spaces[root]
        reasons = tuple(dict.fromkeys(rs.reasons))
        spaces.append(Space(
            id=sid, channels=rs.length, prunable=not reasons,
            reason=reasons[0] if reasons else None,
            nodes=tuple(dict.fromkeys(n for n in rs.nodes if n)),
            origin="input" if rs.origin == "input" else "producer",
            partitions=tuple(sorted(set(rs.partitions))),
            refs=tuple(refs_by_root[root]),
            all_reasons=reasons,
        ))
    return tuple(spaces)


def member_slice(ref: ChannelRef, channel: int, shape: Sequence[int]
                 ) -> tuple[tuple[int, ...] | None, ...]:
    """The slice of ``ref.tensor`` (of ``shape``) that holds ``channel`` of the space."""
    pos = ref.positions(channel)
    sl: list[tuple[int, ...] | None] = [None] * len(shape)
    if ref.conv_groups > 1 and ref.role == "in" and ref.axis == 1:
        ig = shape[1]
        og = shape[0] // ref.conv_groups
        g = pos[0] // ig
        sl[0] = tuple(range(g * og, (g + 1) * og))
        sl[1] = tuple(p % ig for p in pos)
    else:
        sl[ref.axis] = pos
    return tuple(sl)


def _channel_groups(spaces: Sequence[Space], shapes: dict[str, tuple[int, ...]]
                    ) -> list[Group]:
    groups: list[Group] = []
    for sp in spaces:
        per_channel: list[list[Member]] = [[] for _ in range(sp.channels)]
        for r in sp.refs:
            if not r.is_weight:
                continue
            shape = shapes[r.tensor]
            role: Any = r.role
            if r.conv_groups > 1 and r.role == "in" and r.axis == 1:
                for j in range(r.length):
                    c = r.space_start + j
                    per_channel[c].append(Member(r.tensor, role, member_slice(r, c, shape)))
                continue
            pre: tuple[None, ...] = (None,) * r.axis
            post: tuple[None, ...] = (None,) * (len(shape) - r.axis - 1)
            for j in range(r.length):
                first = (r.tensor_start + j) * r.block
                pos = tuple(range(first, first + r.block))
                per_channel[r.space_start + j].append(Member(r.tensor, role, (*pre, pos, *post)))
        for c, members in enumerate(per_channel):
            groups.append(Group(f"{sp.id}/{c}", "channel", sp.id, c, sp.prunable, sp.reason,
                                tuple(members)))
    return groups


def layers_of(graph: gs.Graph) -> tuple[Layer, ...]:
    """The parameterised layers with params and MACs, without the channel analysis."""
    return _layers(graph, None, {})


def _layers(graph: gs.Graph, e: Engine | None, ids: dict[int, str]) -> tuple[Layer, ...]:
    layers = []
    for node in graph.nodes:
        if node.op not in LAYER_OPS or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        wv = const_value(w)
        if wv is None or (node.op == "MatMul" and wv.ndim != 2):
            continue
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        bv = const_value(bias) if bias is not None else None
        out_shape = static_shape(node.outputs[0])
        in_shape = static_shape(node.inputs[0])
        group = int(node.attrs.get("group", 1))
        if node.op == "Conv":
            out_axis, in_axis = 0, 1
            macs = int(np.prod(out_shape)) * int(np.prod(wv.shape[1:])) if out_shape else 0
        elif node.op == "ConvTranspose":
            out_axis, in_axis = 1, 0
            macs = int(np.prod(in_shape)) * int(np.prod(wv.shape[1:])) if in_shape else 0
        elif node.op == "Gemm":
            out_axis, in_axis = (0, 1) if int(node.attrs.get("transB", 0)) else (1, 0)
            k = int(wv.shape[in_axis])
            macs = int(np.prod(out_shape)) * k if out_shape else 0
        else:
            out_axis, in_axis = 1, 0
            macs = int(np.prod(out_shape)) * int(wv.shape[0]) if out_shape else 0

        def sid(t: gs.Tensor) -> str | None:
            if e is None:
                return None
            lay = e.layout(t)
            if lay is None or len(lay.segs) != 1:
                return None
            return ids[e.find(lay.segs[0].space)]

        layers.append(Layer(
            node=node.name, op_type=node.op, weight=w.name,
            bias=bias.name if bv is not None and bias is not None else None,
            out_axis=out_axis, in_axis=in_axis, conv_groups=group,
            weight_shape=tuple(int(d) for d in wv.shape),
            params=int(wv.size) + (int(bv.size) if bv is not None else 0),
            macs=macs, in_space=sid(node.inputs[0]), out_space=sid(node.outputs[0])))
    return tuple(layers)


def _branches(graph: gs.Graph, e: Engine) -> tuple[Branch, ...]:
    """Residual branches: for each Add of two activations, the nodes between its immediate
    dominator (the fork) and the Add on the side that holds more layers."""
    g = nx.DiGraph()
    src = "\0source"
    g.add_node(src)
    producer: dict[str, gs.Node] = {}
    for node in graph.nodes:
        g.add_node(node.name)
        for t in node.outputs:
            producer[t.name] = node
    for node in graph.nodes:
        has_var = False
        for t in node.inputs:
            p = producer.get(t.name)
            if p is not None:
                g.add_edge(p.name, node.name)
                has_var = True
        if not has_var:
            g.add_edge(src, node.name)
    idom = nx.immediate_dominators(g, src)
    by_name = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    outputs = {t.name for t in graph.outputs}
    result: list[Branch] = []
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2:
            continue
        if any(t.name not in producer for t in node.inputs):
            continue
        fork = idom.get(node.name)
        if fork is None or fork == src:
            continue
        sides: list[tuple[gs.Tensor, list[str]]] = []
        for t in node.inputs:
            seen: dict[str, None] = {}  # ordered set
            stack = [producer[t.name].name]
            ok = True
            while stack:
                n = stack.pop()
                if n == fork or n in seen:
                    continue
                if n == src or idom.get(n) is None:
                    ok = False
                    break
                seen[n] = None
                stack.extend(p for p in g.predecessors(n))
            if not ok:
                sides = []
                break
            sides.append((t, list(seen)))
        if len(sides) != 2:
            continue
        layer_counts = [sum(1 for n in s if by_name[n].op in LAYER_OPS) for _, s in sides]
        if max(layer_counts) == 0:
            continue
        k = 0 if layer_counts[0] > layer_counts[1] else 1
        if layer_counts[0] == layer_counts[1]:
            # Same number of layers: the branch is the longer path.
            k = 0 if len(sides[0][1]) > len(sides[1][1]) else 1
        t, nodes = sides[k]
        members = set(nodes)
        reason = None
        for n in nodes:
            bn = by_name[n]
            for out in bn.outputs:
                if out.name in outputs:
                    reason = f"{n} ({bn.op}): output {out.name} is a graph output"
                for c in out.outputs:
                    if c.name not in members and c.name != node.name:
                        reason = f"{n} ({bn.op}): output {out.name} is also read by {c.name}"
        ordered = sorted(members, key=order.__getitem__)
        result.append(Branch(
            add=node.name, fork=fork, branch_output=t.name, nodes=tuple(ordered),
            layers=tuple(n for n in ordered if by_name[n].op in LAYER_OPS),
            prunable=reason is None, reason=reason))
    return tuple(result)


def _depth_groups(branches: Sequence[Branch], graph: gs.Graph) -> list[Group]:
    by_name = {n.name: n for n in graph.nodes}
    groups = []
    for b in branches:
        members: list[Member] = []
        seen: set[str] = set()
        for n in b.nodes:
            node = by_name[n]
            for i, t in enumerate(node.inputs):
                v = const_value(t)
                if v is None or t.name in seen or v.dtype.type not in FLOAT_TYPES:
                    continue
                if v.size <= 1:
                    continue
                seen.add(t.name)
                role = "stat" if node.op == "BatchNormalization" and i >= 3 else "out"
                members.append(Member(t.name, role, (None,) * v.ndim))  # type: ignore[arg-type]
        groups.append(Group(f"{b.add}/depth", "depth", None, None, b.prunable, b.reason,
                            tuple(members)))
    return groups


def _weight_groups(layers: Sequence[Layer], kinds: Iterable[str],
                   shared: dict[str, str]) -> list[Group]:
    groups: list[Group] = []
    kinds = set(kinds)
    for la in layers:
        reason = shared.get(la.weight)
        ok = reason is None
        shape = la.weight_shape
        if la.op_type == "Conv" and len(shape) == 4:
            n, c, kh, kw = shape
            if "shape" in kinds:
                for ci in range(c):
                    for m in range(kh):
                        for k in range(kw):
                            groups.append(Group(
                                f"{la.node}/shape/{ci},{m},{k}", "shape", None, None, ok,
                                reason, (Member(la.weight, "out", (None, (ci,), (m,), (k,))),)))
            if "filter2d" in kinds:
                for ni in range(n):
                    for ci in range(c):
                        groups.append(Group(
                            f"{la.node}/filter2d/{ni},{ci}", "filter2d", None, None, ok, reason,
                            (Member(la.weight, "out", ((ni,), (ci,), None, None)),)))
        if la.op_type in ("Gemm", "MatMul") and "neuron" in kinds:
            for role, axis in (("out", la.out_axis), ("in", la.in_axis)):
                for j in range(shape[axis]):
                    sl: list[tuple[int, ...] | None] = [None, None]
                    sl[axis] = (j,)
                    groups.append(Group(
                        f"{la.node}/neuron/{role}/{j}", "neuron", None, j, ok, reason,
                        (Member(la.weight, role, tuple(sl)),)))  # type: ignore[arg-type]
    return groups


def analyze(model: onnx.ModelProto, kinds: Iterable[str] = DEFAULT_KINDS, name: str = "",
            prepared: bool = False) -> Analysis:
    """Analyse ``model`` (prepared first unless ``prepared``) and list groups of ``kinds``."""
    kinds_t = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds_t if k not in KINDS]
    if bad:
        raise InputError(f"unknown group kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    m, graph = (model, to_graph(model)) if prepared else _prepare(model)
    return analyze_graph(graph, kinds_t, name or m.graph.name)


def analyze_graph(graph: gs.Graph, kinds: Sequence[str] = DEFAULT_KINDS, name: str = ""
                  ) -> Analysis:
    """Analyse a prepared graph (static shapes inferred, constants folded)."""
    e, notes = _propagate(graph)
    ids = _space_ids(e)
    spaces = _build_spaces(e, ids)
    shapes = {n: tuple(int(d) for d in t.shape) for n, t in graph.tensors().items()
              if isinstance(t, gs.Constant)}
    layers = _layers(graph, e, ids)
    branches = _branches(graph, e)
    groups: list[Group] = []
    if "channel" in kinds:
        groups += _channel_groups(spaces, shapes)
    if "depth" in kinds:
        groups += _depth_groups(branches, graph)
    shared: dict[str, str] = {}
    tensors = graph.tensors()
    for la in layers:
        users = tensors[la.weight].outputs
        if len(users) > 1:
            names = ", ".join(u.name for u in users)
            shared[la.weight] = f"weight {la.weight} is shared by {names}"
    groups += _weight_groups(layers, kinds, shared)
    return Analysis(model=name or graph.name, spaces=spaces, groups=tuple(groups), layers=layers,
                    branches=branches, kinds=tuple(kinds), notes=tuple(notes))  # type: ignore


# --- text report ---------------------------------------------------------------------------


def _fmt_int(n: int) -> str:
    for unit, div in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_table(a: Analysis) -> str:
    spaces = {s.id: s for s in a.spaces}

    def desc(sid: str | None) -> str:
        if sid is None:
            return "-"
        s = spaces[sid]
        return f"{sid} ({s.channels}) {'prunable' if s.prunable else 'blocked'}"

    rows = [("layer", "op", "weight", "out space", "in space", "params", "MACs")]
    for la in a.layers:
        rows.append((la.node, la.op_type, "x".join(map(str, la.weight_shape)),
                     desc(la.out_space), desc(la.in_space), _fmt_int(la.params),
                     _fmt_int(la.macs)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_prunable = sum(s.prunable for s in a.spaces)
    ch_total = sum(s.channels for s in a.spaces)
    ch_prunable = sum(s.channels for s in a.spaces if s.prunable)
    lines += [
        "",
        f"model {a.model}: {len(a.layers)} layers, params {_fmt_int(a.params)} "
        f"({a.params}), MACs {_fmt_int(a.macs)} ({a.macs})",
        f"channel spaces: {len(a.spaces)} ({n_prunable} prunable), channels {ch_total} "
        f"({ch_prunable} prunable)",
    ]
    blocked = [s for s in a.spaces if not s.prunable]
    if blocked:
        lines.append("blocked spaces:")
        for s in blocked:
            lines.append(f"  {s.id} ({s.channels} ch): {s.reason}")
    if a.branches:
        ok = sum(b.prunable for b in a.branches)
        lines.append(f"residual branches: {len(a.branches)} ({ok} prunable as depth groups)")
        for b in a.branches:
            if not b.prunable:
                lines.append(f"  {b.add}: {b.reason}")
    counts: dict[str, int] = defaultdict(int)
    for g in a.groups:
        counts[g.kind] += 1
    lines.append("groups: " + ", ".join(f"{k} {counts[k]}" for k in a.kinds))
    for n in a.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)
