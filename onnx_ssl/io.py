"""The door to protobuf: loading, validating, converting and writing ONNX models.

Everything else in onnx-ssl works on onnx-graphsurgeon graphs; this module (with
:mod:`onnx_ssl.runtime`) is where ``onnx.ModelProto`` objects are read, checked and written.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, Message

from . import env
from .errors import InputError, UnsupportedModelError, one_line

log = logging.getLogger(__name__)

# Above this size a model is written with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
# In-memory mark on a model loaded with external data, so that outputs keep it external.
EXTERNAL_MARK = "onnx_ssl.external_data"
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
# The model type other modules name in their signatures, from the door: ruff bans `import
# onnx` outside the door modules (pyproject.toml, [tool.ruff.lint.per-file-ignores]).
ModelProto = onnx.ModelProto


@dataclass(frozen=True)
class ModelMeta:
    """What a model carries beside its graph, restored when the graph is exported again."""

    ir_version: int
    opset_imports: tuple[tuple[str, int], ...]
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: tuple[tuple[str, str], ...] = ()
    external_data: bool = False
    functions: tuple[onnx.FunctionProto, ...] = field(default=())

    @staticmethod
    def of(model: onnx.ModelProto, external_data: bool = False) -> ModelMeta:
        return ModelMeta(
            ir_version=model.ir_version,
            opset_imports=tuple((o.domain, o.version) for o in model.opset_import),
            producer_name=model.producer_name,
            producer_version=model.producer_version,
            domain=model.domain,
            model_version=model.model_version,
            doc_string=model.doc_string,
            metadata_props=tuple((p.key, p.value) for p in model.metadata_props),
            external_data=external_data,
            functions=tuple(model.functions),
        )

    def opset(self, domain: str = "") -> int:
        for d, v in self.opset_imports:
            if d in ("", "ai.onnx") and domain in ("", "ai.onnx"):
                return v
            if d == domain:
                return v
        return 0


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )


def _external_files(model: onnx.ModelProto, path: Path) -> list[Path]:
    """The external data files the initializers of the model file ``path`` point to."""
    files: dict[str, None] = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if loc:
                files[loc] = None
    return [path.parent / loc for loc in files]


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files a command reads for the model file ``path``: the file itself and its
    external data files (a missing or unreadable model is left to :func:`load_model`)."""
    p = Path(path)
    try:
        raw = p.read_bytes() if p.is_file() else b""
    except OSError:
        return [p]
    if b"location" not in raw:  # no external data entry: no need to parse it
        return [p]
    model = onnx.ModelProto()
    try:
        model.ParseFromString(raw)
    except (DecodeError, RuntimeWarning, ValueError):
        return [p]
    return [p, *_external_files(model, p)]


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load and validate a model file, with one clear error for each way it can be unusable."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an ONNX model file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror}") from e
    if not raw:
        raise InputError(f"{p}: empty file, not an ONNX model")
    try:
        model = onnx.ModelProto()
        model.ParseFromString(raw)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise InputError(f"{p}: not an ONNX model or truncated (protobuf parse failed: {e})") from e
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0:
        raise InputError(f"{p}: not an ONNX model (no IR version or empty graph)")
    external = _has_external_data(model)
    if external:
        for data_file in _external_files(model, p):
            if not data_file.is_file():
                what = "is missing" if not data_file.exists() else "is not a regular file"
                raise InputError(f"{p}: its external data file {data_file} {what}")
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as e:
            first = one_line(e)
            raise InputError(f"{p}: external data cannot be read: {first}") from e
    validate(model, name=str(p), path=p)
    if external:
        # Remember it so that the output is written with external data too.
        model.metadata_props.add(key=EXTERNAL_MARK, value="1")
    return model


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default (``ai.onnx``) domain; 0 if it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def validate(model: onnx.ModelProto, name: str = "model", path: Path | None = None) -> None:
    """Check what the installed onnx reads and the ONNX checker; raise a one-line error.

    The limit is the installed ``onnx``, not a constant: a model newer than it reads is
    refused with both versions and the upgrade. (What the installed ONNX Runtime runs is
    checked where a session is made, :func:`onnx_ssl.runtime.check_runs`.)
    """
    lim = env.onnx_limits()
    if model.ir_version > lim.max_ir:
        raise UnsupportedModelError(
            f"{name}: IR version {model.ir_version} is newer than the installed onnx "
            f"{lim.version} reads (IR <= {lim.max_ir}); upgrade it: pip install -U onnx")
    opset = default_opset(model)
    if opset > lim.max_opset:
        raise UnsupportedModelError(
            f"{name}: opset {opset} is newer than the installed onnx {lim.version} reads "
            f"(opset <= {lim.max_opset}); upgrade it: pip install -U onnx")
    try:
        if path is not None and model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = one_line(e)
        raise InputError(f"{name}: invalid ONNX model: {first}") from e


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` converted to default-domain ``opset`` with onnx.version_converter.

    A conversion that fails raises UnsupportedModelError naming the op (and node) that has no
    adapter between the two opsets, found by converting one-node models of each op type.
    """
    from onnx import version_converter

    source = default_opset(model)
    if source == opset:
        return model
    try:
        converted = version_converter.convert_version(model, opset)
        onnx.checker.check_model(converted)
    except Exception as e:  # onnx raises RuntimeError/ValidationError/IndexError
        first = one_line(e)
        culprit = _unconvertible_node(model, opset, first)
        where = (f" at node '{culprit.name}' ({culprit.op_type})" if culprit is not None
                 else "")
        raise UnsupportedModelError(
            f"cannot convert the model from opset {source} to {opset}{where}: {first}") from e
    converted.ir_version = min(converted.ir_version, model.ir_version or converted.ir_version)
    return converted


def _unconvertible_node(model: onnx.ModelProto, opset: int, error: str
                        ) -> onnx.NodeProto | None:
    """The node the converter failed on: the first whose op type the error names, else the
    first whose op alone cannot be converted (None if each can)."""
    from onnx import version_converter

    nodes = [n for n in model.graph.node if n.domain in ("", "ai.onnx")]
    named = [n for n in nodes if re.search(rf"\b{re.escape(n.op_type)}\b", error)]
    if named:
        return named[0]
    source = default_opset(model)

    def converts(node: onnx.NodeProto) -> bool:
        inputs = [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, None)
                  for i in node.input if i]
        single = onnx.helper.make_model(
            onnx.helper.make_graph([node], "probe", inputs, []),
            opset_imports=[onnx.helper.make_opsetid("", source)])
        try:
            version_converter.convert_version(single, opset)
        except Exception:  # the converter's own error for a missing adapter
            return False
        return True

    if not converts(onnx.helper.make_node("Identity", ["x"], ["y"])):
        return None  # the conversion fails as a whole (opsets it does not know), no node
    seen: set[str] = set()
    for node in nodes:
        if node.op_type not in seen:
            seen.add(node.op_type)
            if not converts(node):
                return node
    return None


# --- graph wrapper ---------------------------------------------------------------------


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """``graph.tensors()``: every named tensor of ``graph`` (its inputs, then each node's
    inputs and outputs, then its outputs), in that order, at about 60% of the cost (the
    passes and the analysis look tensors up many times per prune). A graph with two
    distinct tensors of one name gets onnx-graphsurgeon's own map, and its warning."""
    out: dict[str, gs.Tensor] = {}
    put = out.setdefault
    for t in graph.inputs:
        if t.name and put(t.name, t) is not t:
            return dict(graph.tensors())
    for n in graph.nodes:
        for t in n.inputs:
            if t.name and put(t.name, t) is not t:
                return dict(graph.tensors())
        for t in n.outputs:
            if t.name and put(t.name, t) is not t:
                return dict(graph.tensors())
    for t in graph.outputs:
        if t.name and put(t.name, t) is not t:
            return dict(graph.tensors())
    return out


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """The graph wrapper, stamped with an IR version the installed runtime loads (the
    subgraphs onnx-graphsurgeon's constant folding hands to ONNX Runtime carry it)."""
    graph = gs.import_onnx(model)
    if graph.ir_version is None or graph.ir_version > max_ir_version():
        graph.ir_version = max_ir_version()
    return graph


# onnx-graphsurgeon's dtype_to_onnx rebuilds a table of ml_dtypes on every call (about a
# third of an export of a 10k-node graph): the conversion is memoised here, per dtype.
_ONNX_TYPES: dict[Any, int] = {}


def _onnx_type(dtype: Any) -> int:
    v = _ONNX_TYPES.get(dtype)
    if v is None:
        from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx as convert

        v = _ONNX_TYPES[dtype] = int(convert(dtype))
    return v


def _tensor_proto(t: gs.Constant) -> onnx.TensorProto:
    """``OnnxExporter.export_tensor_proto(t)``, with the dtype conversion memoised."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if isinstance(t._values, LazyValues):
        return OnnxExporter.export_tensor_proto(t)
    dt = _onnx_type(t.dtype)
    if _onnx_type(t.export_dtype) != dt:  # a conversion on export: onnx-graphsurgeon's own
        return OnnxExporter.export_tensor_proto(t)
    proto = onnx.helper.make_tensor(name=t.name, data_type=dt, dims=t.shape,
                                    vals=t.values.tobytes(), raw=True)
    if t.data_location is not None:
        proto.data_location = t.data_location
    return proto


def _value_info(t: gs.Tensor) -> onnx.ValueInfoProto:
    """``OnnxExporter.export_value_info_proto(t, do_type_check=True)``, with the dtype
    conversion memoised."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    if t.dtype is not None and (isinstance(t, gs.Constant) or t.type == "tensor_type"):
        return onnx.helper.make_tensor_value_info(t.name, _onnx_type(t.dtype), t.shape)
    return OnnxExporter.export_value_info_proto(t, True)


def export_graph(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx(graph, do_type_check=True)``, the same model at about 60% of the
    cost (:func:`tensor_map`, and the dtype conversions memoised)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import (
        OnnxExporter,
        check_duplicate_node_names,
        update_import_domains,
    )
    from onnx_graphsurgeon.ir.tensor import SparseValues

    check_duplicate_node_names(graph.nodes)
    nodes = [OnnxExporter.export_node(n) for n in graph.nodes]
    inputs = [_value_info(t) for t in graph.inputs]
    outputs = [_value_info(t) for t in graph.outputs]
    tensors = tensor_map(graph)
    inits = [_tensor_proto(t) for t in tensors.values()
             if isinstance(t, gs.Constant) and not isinstance(t._values, SparseValues)]
    sparse = [OnnxExporter.export_sparse_tensor_proto(t) for t in tensors.values()
              if isinstance(t, gs.Constant) and isinstance(t._values, SparseValues)]
    for t in (*graph.inputs, *graph.outputs):
        tensors.pop(t.name, None)
    value_info = [_value_info(t) for t in tensors.values()
                  if isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None)]
    g = onnx.helper.make_graph(nodes=nodes, name=graph.name, inputs=inputs, outputs=outputs,
                               initializer=inits, sparse_initializer=sparse,
                               doc_string=graph.doc_string, value_info=value_info)
    model = onnx.helper.make_model(
        g, functions=[OnnxExporter.export_function(f) for f in graph.functions],
        opset_imports=update_import_domains(graph))
    model.producer_name = graph.producer_name
    model.producer_version = graph.producer_version
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return model


def from_graph(graph: gs.Graph, meta: ModelMeta) -> onnx.ModelProto:
    """Export a graph and restore the model-level fields of the model it came from."""
    model = export_graph(graph)
    opsets = {d: v for d, v in meta.opset_imports}
    for o in model.opset_import:
        opsets.setdefault(o.domain, o.version)
    del model.opset_import[:]
    for d, v in sorted(opsets.items()):
        model.opset_import.add(domain=d, version=v)
    model.ir_version = min(meta.ir_version or max_ir_version(), max_ir_version())
    model.producer_name = meta.producer_name or "onnx-ssl"
    model.producer_version = meta.producer_version
    model.domain = meta.domain
    model.model_version = meta.model_version
    model.doc_string = meta.doc_string
    del model.metadata_props[:]
    for key, value in meta.metadata_props:
        model.metadata_props.add(key=key, value=value)
    del model.functions[:]
    model.functions.extend(meta.functions)
    return model


def max_ir_version() -> int:
    """The newest IR version written models get: what the installed ONNX Runtime loads (what
    the installed onnx writes when there is no runtime)."""
    return (env.runtime_limits() if env.has_ort() else env.onnx_limits()).max_ir


def clamp_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """Stamp an IR version the installed runtime loads (onnx >= 1.17 stamps newer ones)."""
    top = max_ir_version()
    if model.ir_version > top:
        model.ir_version = top
    return model


_SKELETON_MIN_ELEMENTS = 4096


def infer_shapes(model: onnx.ModelProto, strict: bool = True, copy: bool = True
                 ) -> onnx.ModelProto:
    """ONNX shape inference with data propagation; a failure raises with its cause.

    It runs on a skeleton whose large weights are typed graph inputs, so no weight bytes are
    serialised; the inferred value_info and outputs are copied back. ``strict`` also checks
    types and fails on ops inference does not know (the end of every pipeline); the analysis
    runs it leniently, since an unknown op only blocks the channels it touches. Without
    ``copy``, ``model`` itself gets the shapes (for a model no one else holds).
    """
    inferred = _inferred(model, strict)
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    outs = {o.name: o for o in inferred.graph.output}
    for o in out.graph.output:
        if o.name in outs:
            o.CopyFrom(outs[o.name])
    return out


def onnx_to_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def dtype_to_onnx(dtype: Any) -> int:
    """The ONNX element type of a numpy dtype (onnx-graphsurgeon's mapping)."""
    return _onnx_type(np.dtype(dtype))


def export_skeleton(graph: gs.Graph) -> onnx.ModelProto:
    """``export(graph)`` for shape inference: float constants of 4096 elements or more are
    typed graph inputs instead of initializers (what :func:`infer_shapes` makes of them),
    so that no weight is copied (a full export writes every one into the proto)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains
    from onnx_graphsurgeon.ir.tensor import SparseValues

    tensors = tensor_map(graph)
    if any(isinstance(t, gs.Constant) and isinstance(t._values, SparseValues)
           for t in tensors.values()):
        return clamp_ir(export_graph(graph))
    nodes = [OnnxExporter.export_node(n) for n in graph.nodes]
    inputs = [_value_info(t) for t in graph.inputs]
    outputs = [_value_info(t) for t in graph.outputs]
    io_names = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    inits: list[onnx.TensorProto] = []
    value_info: list[onnx.ValueInfoProto] = []
    for name, t in tensors.items():
        if isinstance(t, gs.Constant):
            shape = [int(d) for d in t.shape]
            if math.prod(shape) >= 4096 and np.dtype(t.dtype) != np.int64:
                inputs.append(onnx.helper.make_tensor_value_info(
                    name, _onnx_type(t.dtype), shape))
            else:
                inits.append(_tensor_proto(t))
        elif name not in io_names and (t.dtype is not None or t.shape is not None):
            value_info.append(_value_info(t))
    g = onnx.helper.make_graph(nodes, graph.name, inputs, outputs, inits,
                               value_info=value_info)
    model = onnx.helper.make_model(
        g, functions=[OnnxExporter.export_function(f) for f in graph.functions],
        opset_imports=update_import_domains(graph))
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return clamp_ir(model)


def shaped_graph(model: onnx.ModelProto, strict: bool = False) -> gs.Graph:
    """``to_graph(infer_shapes(model, strict))`` without the copy of ``model`` (and of every
    weight) that :func:`infer_shapes` makes: the graph's constants read ``model``'s."""
    inferred = _inferred(model, strict)
    graph = to_graph(model)
    tensors = tensor_map(graph)
    io_names = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for name, t in tensors.items():  # what the model's own value_info said goes
        if isinstance(t, gs.Variable) and name not in io_names:
            t.dtype, t.shape, t.type = None, None, "tensor"
    write_shapes(graph, inferred)
    return graph


def write_shapes(graph: gs.Graph, inferred: onnx.ModelProto, inputs: bool = False) -> None:
    """Give ``graph``'s variables the types and shapes of ``inferred`` (shape inference on a
    model of the same graph): inner tensors and outputs, and with ``inputs`` the inputs."""
    from onnx_graphsurgeon.importers.onnx_importer import (
        get_onnx_tensor_dtype,
        get_onnx_tensor_shape,
        get_onnx_tensor_type,
    )

    tensors = tensor_map(graph)
    outputs = {t.name for t in graph.outputs}
    ins = {t.name for t in graph.inputs}
    # A tensor type's dtype depends on its element type alone; onnx-graphsurgeon's lookup
    # is slow (it lists every ONNX dtype on each call).
    dtypes: dict[int, Any] = {}
    for vi in (*inferred.graph.value_info,
               *(o for o in inferred.graph.output if o.name in outputs),
               *(i for i in inferred.graph.input if inputs and i.name in ins)):
        t = tensors.get(vi.name)
        if isinstance(t, gs.Variable) and vi.type.ByteSize() > 0:
            if vi.type.HasField("tensor_type"):
                elem = vi.type.tensor_type.elem_type
                if elem not in dtypes:
                    dtypes[elem] = get_onnx_tensor_dtype(vi)
                t.dtype = dtypes[elem]
            else:
                t.dtype = get_onnx_tensor_dtype(vi)
            t.shape = get_onnx_tensor_shape(vi)
            t.type = get_onnx_tensor_type(vi)


def _inferred(model: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    """Shape inference on the skeleton of ``model`` (see :func:`infer_shapes`)."""
    skeleton = onnx.ModelProto()
    graph = model.graph
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    sg = skeleton.graph
    sg.name = graph.name
    sg.node.extend(graph.node)
    sg.input.extend(graph.input)
    sg.output.extend(graph.output)
    input_names = {i.name for i in graph.input}
    for t in graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n >= _SKELETON_MIN_ELEMENTS and t.data_type != onnx.TensorProto.INT64:
            if t.name not in input_names:
                sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type,
                                                                   list(t.dims)))
        else:
            sg.initializer.append(t)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=strict,
                                                     strict_mode=strict, data_prop=True)
        # ONNX's inference does not know ONNX Runtime's contrib ops: those that keep their
        # input's shape pass it on, and inference goes on from there.
        for _ in range(len(sg.node)):
            added = _contrib_shapes(sg, inferred.graph)
            if not added:
                break
            sg.value_info.extend(added)
            inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=strict,
                                                         strict_mode=strict, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        first = one_line(e)
        raise InputError(f"shape inference failed: {first}") from e
    return inferred


# com.microsoft ops whose listed outputs have the shape and type of their first input.
_SAME_SHAPE_CONTRIB = {"Gelu": (0,), "QuickGelu": (0,), "BiasGelu": (0,), "FastGelu": (0,),
                       "BiasAdd": (0,), "SkipLayerNormalization": (0, 3),
                       "SkipSimplifiedLayerNormalization": (0, 3)}


def _contrib_shapes(graph: onnx.GraphProto, inferred: onnx.GraphProto
                    ) -> list[onnx.ValueInfoProto]:
    """Value infos for the outputs of shape-preserving contrib ops that inference left
    without a shape (empty when there are none)."""
    if not any(n.domain == "com.microsoft" for n in graph.node):
        return []
    known = {vi.name: vi for vi in (*inferred.value_info, *inferred.input, *inferred.output)
             if vi.type.tensor_type.HasField("shape")}
    out: list[onnx.ValueInfoProto] = []
    dims = {t.name: list(t.dims) for t in graph.initializer}
    dims.update({i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                 for i in graph.input})
    for n in graph.node:
        # Attention: the input's shape with the last dim the V size of the packed weight.
        if (n.domain == "com.microsoft" and n.op_type == "Attention" and len(n.input) > 1
                and n.input[0] in known and n.output[0] not in known
                and len(dims.get(n.input[1], [])) == 2):
            sizes = next((list(a.ints) for a in n.attribute if a.name == "qkv_hidden_sizes"),
                         None) or [dims[n.input[1]][1] // 3] * 3
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(known[n.input[0]])
            vi.name = n.output[0]
            vi.type.tensor_type.shape.dim[-1].Clear()
            vi.type.tensor_type.shape.dim[-1].dim_value = sizes[2]
            out.append(vi)
            known[vi.name] = vi
            continue
        # MultiHeadAttention with separate 3-D Q, K, V: the query's shape, V's hidden size.
        if (n.domain == "com.microsoft" and n.op_type == "MultiHeadAttention"
                and len(n.input) > 2 and n.input[0] in known and n.input[2] in known
                and n.output[0] not in known
                and len(known[n.input[2]].type.tensor_type.shape.dim) == 3):
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(known[n.input[0]])
            vi.name = n.output[0]
            vi.type.tensor_type.shape.dim[-1].CopyFrom(
                known[n.input[2]].type.tensor_type.shape.dim[-1])
            out.append(vi)
            known[vi.name] = vi
            continue
        slots = _SAME_SHAPE_CONTRIB.get(n.op_type) if n.domain == "com.microsoft" else None
        src = known.get(n.input[0]) if slots and n.input else None
        if src is None:
            continue
        for k in slots or ():
            if k < len(n.output) and n.output[k] and n.output[k] not in known:
                vi = onnx.ValueInfoProto()
                vi.CopyFrom(src)
                vi.name = n.output[k]
                out.append(vi)
                known[vi.name] = vi
    return out


def fold_trivial_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes holding a tensor become initializers, and Identity of an initializer
    is bypassed, directly on the proto (cheap; exporters emit one per weight)."""
    outputs = {o.name for o in model.graph.output}
    inits = {t.name for t in model.graph.initializer}
    trivial = [n for n in model.graph.node
               if (n.op_type == "Constant" and len(n.attribute) == 1
                   and n.attribute[0].name == "value" and n.output[0] not in outputs)
               or (n.op_type == "Identity" and n.output[0] not in outputs)]
    if not trivial:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rename: dict[str, str] = {}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value" \
                and n.output[0] not in outputs:
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
            inits.add(t.name)
            continue
        src = rename.get(n.input[0], n.input[0]) if n.input else ""
        if n.op_type == "Identity" and n.output[0] not in outputs and src in inits:
            rename[n.output[0]] = src
            continue
        keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


# --- writing ---------------------------------------------------------------------------


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same file through any spelling (relative, ``..``,
    symlinks, hard links); a path that does not exist yet is compared resolved."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    try:
        return pa.resolve() == pb.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return os.path.abspath(pa) == os.path.abspath(pb)


def _sidecar(path: Path) -> Path:
    """Where :func:`save_model` puts the external data of a model written to ``path``."""
    return path.with_name(path.name + ".data")


def check_writable(out: str | os.PathLike[str], *inputs: str | os.PathLike[str],
                   outputs: Sequence[str | os.PathLike[str]] = (),
                   create_folders: bool = False) -> Path:
    """Refuse, in one line and before anything is computed or written, an output path that
    would destroy something.

    ``inputs`` are the files the command reads (a model with its external data files, see
    :func:`model_files`; data files; the artifacts it trains), ``outputs`` its other
    outputs. Neither the output nor the ``<out>.data`` file a model written there may get is
    one of them, through any spelling (relative path, ``..``, symlink, hard link). The output
    must not be a directory or another non-regular file (a device such as /dev/null, a FIFO):
    outputs are written to a temporary file that is renamed into place, which would replace
    it. Its folder must exist and be writable; with ``create_folders`` the caller creates the
    missing folders, and the nearest existing one must be writable.
    """
    o = Path(out)
    side = _sidecar(o)
    for i in inputs:
        if same_file(o, i):
            raise InputError(f"{o}: is the input {i}; refusing to write over it (choose "
                             f"another output path)")
        if same_file(side, i):
            raise InputError(f"{o}: a model written there keeps its external data in {side}, "
                             f"which is the input {i}; refusing (choose another output path)")
    for q in map(Path, outputs):
        if same_file(o, q):
            raise InputError(f"{o}: is also the path of the other output {q}; choose "
                             f"different output paths")
        if same_file(o, _sidecar(q)) or same_file(side, q):
            raise InputError(f"{o}: collides with the other output {q} (a model keeps its "
                             f"external data in <model path>.data); choose other paths")
    if o.is_dir():
        raise InputError(f"{o}: is a directory")
    if o.exists() and not o.is_file():
        raise InputError(f"{o}: not a regular file (a device, FIFO or socket); refusing to "
                         f"write there, since onnx-ssl writes to a temporary file and renames "
                         f"it into place, which would replace it: write to a regular file")
    parent = o.parent
    while create_folders and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.exists():
        raise InputError(f"{o}: output folder {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"{o}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{o}: output folder {parent} is not writable")
    return o


def current_umask() -> int:
    """The process umask (new files get 0o666 and new folders 0o777 less it)."""
    try:  # Linux: read it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` leaves: an existing file keeps its mode, a new
    one gets 0o666 less the umask (tempfile's files are 0o600, so they are chmod-ed to it)."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~current_umask()


def _copy_fields(dst: Message, src: Message, skip: str = "") -> None:
    """Copy every set field of ``src`` but ``skip`` into ``dst`` (of the same type)."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def tensor_bytes(t: onnx.TensorProto) -> int:
    """The bytes of ``t``'s data, from its dims (``ByteSize()`` would serialise it)."""
    n = 1
    for d in t.dims:
        n *= d
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return n
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def weight_bytes(model: onnx.ModelProto) -> int:
    """The bytes of ``model``'s initializers (without serialising the model, which
    ``ModelProto.ByteSize()`` does, holding a second copy of every weight meanwhile)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer)


def initializer_elements(model: onnx.ModelProto) -> int:
    """The elements of every initializer of ``model``'s main graph (every parameter it
    stores, embeddings and norms included; Constant nodes are not counted)."""
    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n
    return total


def write_external(model: onnx.ModelProto, path: str | os.PathLike[str], location: str,
                   threshold: int = 1024) -> None:
    """Write ``model`` to ``path`` with the data of every initializer of at least
    ``threshold`` bytes in the file ``location`` beside it (4 KiB aligned, so that ONNX
    Runtime maps it rather than copying it).

    Neither changes nor copies ``model`` (``onnx.save_model`` with external data converts
    the model it is given): the weights pass one tensor at a time. A model whose tensors
    already live in external files is refused (ValueError): its data is not in memory.
    """
    out = Path(path)
    sk = onnx.ModelProto()
    _copy_fields(sk, model, skip="graph")
    _copy_fields(sk.graph, model.graph, skip="initializer")
    with open(out.parent / location, "wb") as data:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {t.name} is stored outside the model")
            if tensor_bytes(t) < threshold or t.data_type == onnx.TensorProto.STRING:
                sk.graph.initializer.append(t)
                continue
            raw = t.raw_data if t.HasField("raw_data") else (
                onnx.numpy_helper.to_array(t).astype(
                    onnx.helper.tensor_dtype_to_np_dtype(t.data_type).newbyteorder("<"),
                    copy=False).tobytes())
            offset = data.seek(0, os.SEEK_END)
            pad = -offset % 4096
            data.write(b"\0" * pad)
            data.write(raw)
            del raw
            e = sk.graph.initializer.add()
            e.name = t.name
            e.dims.extend(t.dims)
            e.data_type = t.data_type
            if t.doc_string:
                e.doc_string = t.doc_string
            e.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset + pad)),
                               ("length", str(data.tell() - offset - pad))):
                e.external_data.add(key=key, value=value)
    out.write_bytes(sk.SerializeToString())


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str],
               external_data: bool | None = None) -> Path:
    """Write a model atomically (temp file + rename in the same folder).

    External data is used when asked, when the model came with it, or when it is too large
    for one protobuf; the data file sits beside the model as ``<name>.data``. The files get
    the mode a plain ``open()`` would give them (see :func:`_file_mode`).
    """
    out = check_writable(path)
    model = clamp_ir(model)
    keep_ext = any(p.key == EXTERNAL_MARK for p in model.metadata_props)
    if keep_ext:
        # The mark only travels in memory: the written model does not carry it.
        clean = onnx.ModelProto()
        clean.CopyFrom(model)
        props = [(p.key, p.value) for p in clean.metadata_props if p.key != EXTERNAL_MARK]
        del clean.metadata_props[:]
        for k, v in props:
            clean.metadata_props.add(key=k, value=v)
        model = clean
    if external_data is None:
        external_data = keep_ext or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_out = _sidecar(out)
    if external_data:
        check_writable(data_out)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp_model = tmpdir / out.name
        if external_data:
            m = onnx.ModelProto()
            m.CopyFrom(model)
            onnx.save_model(m, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_out.name,
                            size_threshold=1024)
            # onnx writes the data file only when a tensor reaches the threshold: a model
            # whose tensors are all small is one self-contained file.
            if (tmpdir / data_out.name).exists():
                with open(tmpdir / data_out.name, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(tmpdir / data_out.name, _file_mode(data_out))
                os.replace(tmpdir / data_out.name, data_out)
            else:
                with open(tmp_model, "rb+") as f:
                    os.fsync(f.fileno())
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp_model, _file_mode(out))
        os.replace(tmp_model, out)
    except OSError as e:
        raise InputError(f"{out}: cannot write: {e.strerror or e}") from e
    finally:
        for leftover in tmpdir.iterdir() if tmpdir.exists() else ():
            leftover.unlink()
        if tmpdir.exists():
            tmpdir.rmdir()
    log.info("wrote %s", out)
    return out


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write a report or JSON file atomically, with the mode a plain ``open()`` gives."""
    out = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        os.fchmod(fd, _file_mode(out))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out
