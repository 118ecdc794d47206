"""The door to protobuf: loading, validating, converting and writing ONNX models.

Everything else in onnx-ssl works on onnx-graphsurgeon graphs; this module (with
:mod:`onnx_ssl.runtime`) is where ``onnx.ModelProto`` objects are read, checked and written.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import InputError, UnsupportedModelError

log = logging.getLogger(__name__)

# Limits of the bundled runtime, onnxruntime 1.19.2.
MAX_IR_VERSION = 10
MAX_OPSET = 21
# Above this size a model is written with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
# In-memory mark on a model loaded with external data, so that outputs keep it external.
EXTERNAL_MARK = "onnx_ssl.external_data"
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


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
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as e:
            raise InputError(f"{p}: external data cannot be read: {e}") from e
    validate(model, name=str(p), path=p)
    if external:
        # Remember it so that the output is written with external data too.
        model.metadata_props.add(key=EXTERNAL_MARK, value="1")
    return model


def validate(model: onnx.ModelProto, name: str = "model", path: Path | None = None) -> None:
    """Check runtime limits and the ONNX checker; raise a one-line error naming the problem."""
    if model.ir_version > MAX_IR_VERSION:
        raise UnsupportedModelError(
            f"{name}: IR version {model.ir_version} is newer than the bundled ONNX Runtime "
            f"1.19.2 accepts (<= {MAX_IR_VERSION})"
        )
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > MAX_OPSET:
            raise UnsupportedModelError(
                f"{name}: opset {o.version} is newer than the bundled ONNX Runtime 1.19.2 "
                f"accepts (<= {MAX_OPSET})"
            )
    try:
        if path is not None and model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{name}: invalid ONNX model: {first}") from e


# --- graph wrapper ---------------------------------------------------------------------


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def from_graph(graph: gs.Graph, meta: ModelMeta) -> onnx.ModelProto:
    """Export a graph and restore the model-level fields of the model it came from."""
    model = gs.export_onnx(graph, do_type_check=True)
    opsets = {d: v for d, v in meta.opset_imports}
    for o in model.opset_import:
        opsets.setdefault(o.domain, o.version)
    del model.opset_import[:]
    for d, v in sorted(opsets.items()):
        model.opset_import.add(domain=d, version=v)
    model.ir_version = min(meta.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
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


def clamp_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """Stamp an IR version the bundled runtime loads (onnx >= 1.17 stamps newer ones)."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


_SKELETON_MIN_ELEMENTS = 4096


def infer_shapes(model: onnx.ModelProto, strict: bool = True) -> onnx.ModelProto:
    """ONNX shape inference with data propagation; a failure raises with its cause.

    It runs on a skeleton whose large weights are typed graph inputs, so no weight bytes are
    serialised; the inferred value_info and outputs are copied back. ``strict`` also checks
    types and fails on ops inference does not know (the end of every pipeline); the analysis
    runs it leniently, since an unknown op only blocks the channels it touches.
    """
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
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"shape inference failed: {first}") from e
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    outs = {o.name: o for o in inferred.graph.output}
    for o in out.graph.output:
        if o.name in outs:
            o.CopyFrom(outs[o.name])
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
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def check_writable(out: str | os.PathLike[str], *inputs: str | os.PathLike[str]) -> Path:
    """Refuse to write over an input or into a folder that does not exist or is read-only."""
    o = Path(out)
    for i in inputs:
        if same_file(o, i):
            raise InputError(f"{o}: refusing to write over the input model; choose another -o")
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{o}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{o}: output folder {parent} is not writable")
    if o.is_dir():
        raise InputError(f"{o}: is a directory")
    return o


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str],
               external_data: bool | None = None) -> Path:
    """Write a model atomically (temp file + rename in the same folder).

    External data is used when asked, when the model came with it, or when it is too large
    for one protobuf; the data file sits beside the model as ``<name>.data``.
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
        external_data = keep_ext or model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp_model = tmpdir / out.name
        if external_data:
            data_name = out.name + ".data"
            m = onnx.ModelProto()
            m.CopyFrom(model)
            onnx.save_model(m, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name,
                            size_threshold=1024)
            with open(tmpdir / data_name, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmpdir / data_name, out.parent / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
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
    """Write a report or JSON file atomically."""
    out = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
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
