"""The four onnxruntime-training artifacts, with the SSL group-Lasso term inside the loss.

:func:`build_artifacts` writes into a folder:

``training_model.onnx``   forward + loss + gradient graph (ONNX Runtime's GradientGraphBuilder)
``eval_model.onnx``       forward + loss, BatchNorm and Dropout in inference form
``optimizer_model.onnx``  AdamW or SGD over the trainable parameters
``checkpoint``            the parameters (trainable and frozen) and the artifacts' fingerprint
``inference_model.onnx``  the model the trained weights are exported into
``ssl.json``              what the trainer needs: inputs, targets, loss, the penalty's groups

The loss graph computes (equation (1) of Wen et al. 2016)::

    ssl_loss = E_D(W) + weight_decay/2 * sum_l ||W_l||^2 + s * sum_g lambda_g R_g(W)

where ``E_D`` is the data loss of the model output, ``R_g`` the group-Lasso sums of
:mod:`onnx_ssl.training.penalty` and ``s`` the scalar input ``ssl_penalty_scale`` (1 gives
equation (1); the trainer feeds 0 when it applies the penalty as a proximal step instead).
``ssl_data_loss``, ``ssl_group_lasso`` (the unscaled sum) and ``ssl_weight_decay`` are
extra outputs, followed by the model outputs and the BatchNorm batch statistics.

Traps of onnxruntime-training 1.19.2 handled here: onnx >= 1.17 stamps IR version 11+ which
the runtime refuses (every file is written with IR <= 10); BatchNormalization trains in
``training_mode=1`` with its running-statistics outputs, which are frozen parameters updated
by the trainer from those outputs, and the eval model must drop them; Dropout needs its
``training_mode`` input and mask output; LayerNormalization needs its Mean and InvStdDev
outputs for its gradient; ``Sum`` and ``ReduceSumSquare`` have no gradient (the penalty uses
Add chains and Mul + ReduceSum); some ops have no gradient at all (GlobalMaxPool,
InstanceNormalization, HardSwish, Elu, LRN, ...): :mod:`.lowering` rewrites them into exact
compositions for training, and any other op without a gradient is refused in one line naming
the op and the node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_ssl import analysis as _analysis
from onnx_ssl import env
from onnx_ssl.errors import InputError, OnnxSslError, UnsupportedModelError
from onnx_ssl.io import convert_opset, current_umask, default_opset, write_text_atomic

from . import _ort
from .lowering import lower_for_training
from .penalty import GraphWriter, Lambdas, Penalty, add_penalty_nodes, build_penalty

log = logging.getLogger(__name__)

FORMAT = 1
LOSSES = ("cross-entropy", "mse", "bce", "l1")
OPTIMIZERS = ("adamw", "sgd")
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
INFERENCE_MODEL = "inference_model.onnx"
INFO = "ssl.json"
ARTIFACT_FILES = (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT, INFERENCE_MODEL, INFO)

PENALTY_SCALE = "ssl_penalty_scale"
OUT_LOSS = "ssl_loss"
OUT_DATA = "ssl_data_loss"
OUT_PENALTY = "ssl_group_lasso"
OUT_WD = "ssl_weight_decay"
FINGERPRINT_PROPERTY = "onnx_ssl.fingerprint"
BATCH_PARAM = "batch"

# Parameter slots: (op, input index) pairs whose float initializer is a trainable weight.
_PARAM_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "PRelu": (1,),
    "Gather": (0,),
    "Einsum": tuple(range(8)),
}
# Element-wise ops: a float initializer with more than one element is a parameter
# (a bias or a per-channel scale); scalars are constants of the formula (GELU's 0.5, eps).
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div")
_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}
_NO_GRADIENT = re.compile(r"has not been registered: (\S+) for node ?(.*)")
_ORT_ERROR = re.compile(r"\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : (.*)", re.S)


@dataclass(frozen=True)
class ArtifactOptions:
    """How to build the artifacts (the CLI's defaults)."""

    loss: str = "cross-entropy"
    lambdas: Lambdas = field(default_factory=Lambdas)
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    scale_by_size: bool = False
    output: str | None = None
    fallback_batch: int = 64

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InputError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(
                f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"
            )
        if not (np.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.fallback_batch < 1:
            raise InputError(f"batch size must be >= 1, got {self.fallback_batch}")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: ``None`` in ``shape`` is a free (batch) dimension."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(
            str(d["name"]),
            tuple(None if s is None else int(s) for s in d["shape"]),
            str(d["dtype"]),
        )

    @staticmethod
    def of(vi: onnx.ValueInfoProto) -> TensorSpec:
        t = vi.type.tensor_type
        shape = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in t.shape.dim)
        return TensorSpec(vi.name, shape, _DTYPES.get(t.elem_type, f"onnx:{t.elem_type}"))


@dataclass(frozen=True)
class ArtifactInfo:
    """The contents of ``ssl.json``."""

    model_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    loss_output: str
    target: TensorSpec
    loss: str
    optimizer: str
    weight_decay: float
    penalty: Penalty
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    bn_stats: tuple[tuple[str, str], ...]
    fixed_batch: int | None
    fingerprint: str
    classes: int | None
    layers: tuple[dict[str, Any], ...] = ()
    # The model's own opset when the artifacts were built from a conversion down to the
    # newest opset the training runtime runs (None: no conversion).
    converted_from_opset: int | None = None
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "model_name": self.model_name,
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": [o.to_json() for o in self.outputs],
            "loss_output": self.loss_output,
            "target": self.target.to_json(),
            "loss": self.loss,
            "optimizer": self.optimizer,
            "weight_decay": self.weight_decay,
            "penalty": self.penalty.to_json(),
            "trainable": list(self.trainable),
            "frozen": list(self.frozen),
            "bn_stats": [list(p) for p in self.bn_stats],
            "fixed_batch": self.fixed_batch,
            "fingerprint": self.fingerprint,
            "classes": self.classes,
            "layers": list(self.layers),
            "converted_from_opset": self.converted_from_opset,
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> ArtifactInfo:
        return ArtifactInfo(
            model_name=str(d["model_name"]),
            inputs=tuple(TensorSpec.from_json(i) for i in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(o) for o in d["outputs"]),
            loss_output=str(d["loss_output"]),
            target=TensorSpec.from_json(d["target"]),
            loss=str(d["loss"]),
            optimizer=str(d["optimizer"]),
            weight_decay=float(d["weight_decay"]),
            penalty=Penalty.from_json(d["penalty"]),
            trainable=tuple(d["trainable"]),
            frozen=tuple(d["frozen"]),
            bn_stats=tuple((str(a), str(b)) for a, b in d["bn_stats"]),
            fixed_batch=None if d.get("fixed_batch") is None else int(d["fixed_batch"]),
            fingerprint=str(d["fingerprint"]),
            classes=None if d.get("classes") is None else int(d["classes"]),
            layers=tuple(d.get("layers", ())),
            converted_from_opset=(None if d.get("converted_from_opset") is None
                                  else int(d["converted_from_opset"])),
            format=int(d.get("format", FORMAT)),
        )


@dataclass(frozen=True)
class Artifacts:
    """An artifacts folder and its ``ssl.json``."""

    path: Path
    info: ArtifactInfo

    @property
    def training_model(self) -> Path:
        return self.path / TRAINING_MODEL

    @property
    def eval_model(self) -> Path:
        return self.path / EVAL_MODEL

    @property
    def optimizer_model(self) -> Path:
        return self.path / OPTIMIZER_MODEL

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def inference_model(self) -> Path:
        return self.path / INFERENCE_MODEL


def load_artifacts(path: str | os.PathLike[str]) -> Artifacts:
    """Open an artifacts folder written by :func:`build_artifacts`; one-line errors."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: no such artifacts folder (run `onnx-ssl artifacts` first)")
    info_path = p / INFO
    if not info_path.is_file():
        raise InputError(
            f"{p}: not an onnx-ssl artifacts folder (no {INFO}; run `onnx-ssl artifacts` first)"
        )
    try:
        info = ArtifactInfo.from_json(json.loads(info_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{info_path}: unreadable or malformed ({type(e).__name__}: {e})") from e
    if info.format != FORMAT:
        raise InputError(
            f"{info_path}: format {info.format} is not supported (expected "
            f"{FORMAT}); rebuild the artifacts"
        )
    missing = [f for f in ARTIFACT_FILES if not (p / f).exists()]
    if missing:
        raise InputError(f"{p}: incomplete artifacts folder, missing {', '.join(missing)}")
    return Artifacts(p, info)


# --- model preparation -------------------------------------------------------------------


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _dim0_keys(model: onnx.ModelProto) -> set[str]:
    keys = set()
    for vi in _graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            d = dims[0]
            keys.add(d.dim_param if d.HasField("dim_param") else f"#{d.dim_value}")
    return keys


def _set_batch(model: onnx.ModelProto, batch: int | str) -> onnx.ModelProto:
    """A copy whose inputs (and outputs with the same leading dimension) have ``batch`` as
    their first dimension; intermediate shapes are dropped."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keys = _dim0_keys(model)
    targets = list(_graph_inputs(m))
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


def _static_batch(model: onnx.ModelProto) -> int:
    for vi in _graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return 1


def _free_batch_literals(model: onnx.ModelProto, b0: int) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` (its inputs' batch dim symbolic, see :func:`_set_batch`) whose
    Reshape targets no longer hard-code the batch size ``b0``; returns it and the rewritten
    nodes.

    A static-batch export folds ``x.view(x.size(0), -1)`` into the literal target
    ``[b0, -1]``. Where shape inference says the data's leading dim is the symbolic batch and
    the target's first entry is ``b0``, that entry becomes 0 (copy the input's dim; a
    node with ``allowzero=1``, as the dynamo exporter writes, gets ``allowzero=0`` when its
    target has no other 0): the same shape at batch ``b0``, the batch at any other. Runs to a
    fixpoint, as each rewrite frees the batch of later nodes.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    used = {t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output}
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
            if node.op_type != "Reshape" or len(node.input) < 2 or node.input[0] not in lead:
                continue
            t = inits.get(node.input[1])
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
            name, k = f"{node.name or node.output[0]}.ssl_batch_free_shape", 1
            while name in used:
                k += 1
                name = f"{node.name or node.output[0]}.ssl_batch_free_shape_{k}"
            used.add(name)
            new = numpy_helper.from_array(target, name)
            m.graph.initializer.append(new)
            inits[name] = new
            node.input[1] = name
            done.append(node.name or node.output[0])
            changed = True
        if not changed:
            break
    _drop_unused_initializers(m)
    return m, done


def _runs_with_batch(model: onnx.ModelProto, batch: int) -> bool:
    """Whether ONNX Runtime runs ``model`` with leading dimension ``batch`` on every input."""
    from onnx_ssl.runtime import session

    try:
        with _native_stderr_captured():
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
        log.debug("model does not run with batch %d: %s", batch, str(e).splitlines()[0])
        return False
    return all(np.ndim(o) == 0 or np.shape(o)[0] == batch for o in outs[:1])


def _is_float32(t: onnx.TensorProto) -> bool:
    return t.data_type == onnx.TensorProto.FLOAT


def _ancestors(model: onnx.ModelProto, output: str) -> set[str]:
    """Names of the tensors ``output`` depends on."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: set[str] = set()
    stack = [output]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        n = producer.get(t)
        if n is not None:
            stack.extend(i for i in n.input if i)
    return seen


def classify_parameters(
    model: onnx.ModelProto, output: str | None = None
) -> tuple[list[str], list[str]]:
    """Split the float32 initializers into trainable weights and frozen BatchNorm statistics
    (only those ``output`` depends on, when given).

    A weight is an initializer read in a parameter slot (the weight and bias of Conv, Gemm,
    MatMul, the scale and shift of normalisations, element-wise Add/Sub/Mul/Div operands with
    more than one element, ...). BatchNorm running statistics are frozen parameters (updated
    from the batch statistics, not by gradients). Other initializers stay constants.
    """
    inits = {t.name: t for t in model.graph.initializer}
    trainable: dict[str, None] = {}
    frozen: dict[str, None] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            t = inits.get(name)
            if t is None or not _is_float32(t):
                continue
            numel = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
            if node.op_type == "BatchNormalization" and i in (3, 4):
                frozen[name] = None
            elif i in _PARAM_SLOTS.get(node.op_type, ()) or (
                node.op_type in _ELEMENTWISE and numel > 1
            ):
                trainable[name] = None
    frozen_list = [n for n in frozen if n not in trainable]
    train_list = list(trainable)
    if output is not None:
        # Gradients exist only for what the loss reads (other outputs' heads stay constant).
        reach = _ancestors(model, output)
        unused = [n for n in train_list if n not in reach]
        if unused:
            log.info(
                "%d parameters do not affect output %s and are not trained: %s",
                len(unused),
                output,
                ", ".join(unused[:5]),
            )
        train_list = [n for n in train_list if n in reach]
        frozen_list = [n for n in frozen_list if n in reach]
    return train_list, frozen_list


def to_training_form(
    model: onnx.ModelProto, frozen: Sequence[str]
) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """BatchNorm in training mode with its running-statistics outputs, Dropout with its
    training-mode input and mask, LayerNormalization with Mean and InvStdDev outputs.

    Returns the model and the (running-statistic output, parameter) pairs.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    frozen_set = set(frozen)
    stats: list[tuple[str, str]] = []
    opset = _opset(m)
    used = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
    used |= {t.name for t in m.graph.initializer}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    train_flag = None
    for node in m.graph.node:
        if node.op_type == "BatchNormalization":
            if opset < 14:
                raise UnsupportedModelError(
                    f"node {node.name or '?'} (BatchNormalization): opset {opset} < 14 has no "
                    f"training mode; convert the model to opset >= 14"
                )
            attr = next((a for a in node.attribute if a.name == "training_mode"), None)
            if attr is None:
                attr = node.attribute.add()
                attr.name = "training_mode"
                attr.type = onnx.AttributeProto.INT
            attr.i = 1
            while len(node.output) < 3:
                node.output.append(
                    fresh(
                        f"{node.name or node.output[0]}.ssl_running_"
                        f"{'mean' if len(node.output) == 1 else 'var'}"
                    )
                )
            for k in (1, 2):
                if node.output[k] == "":
                    node.output[k] = fresh(f"{node.name or node.output[0]}.ssl_running_{k}")
                if node.input[k + 2] in frozen_set:
                    stats.append((node.output[k], node.input[k + 2]))
        elif node.op_type == "Dropout" and opset >= 12:
            if train_flag is None:
                train_flag = fresh("ssl_dropout_training")
                m.graph.initializer.append(numpy_helper.from_array(np.array(True), train_flag))
            while len(node.input) < 2:
                node.input.append("")
            if len(node.input) < 3:
                node.input.append(train_flag)
            else:
                node.input[2] = train_flag
            if len(node.output) < 2:
                node.output.append(fresh(f"{node.output[0]}.ssl_mask"))
        elif node.op_type == "LayerNormalization":
            while len(node.output) < 3:
                node.output.append(fresh(f"{node.output[0]}.ssl_ln_{len(node.output)}"))
    return m, stats


def to_inference_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """BatchNorm with ``training_mode=0`` and one output; Dropout without its training input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consumed = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    for node in m.graph.node:
        if node.op_type == "BatchNormalization":
            for a in node.attribute:
                if a.name == "training_mode":
                    a.i = 0
            if not any(o in consumed for o in node.output[1:]):
                del node.output[1:]
        elif node.op_type == "Dropout" and len(node.input) > 2:
            del node.input[2:]
            while node.input and node.input[-1] == "":
                del node.input[-1]
    _drop_unused_initializers(m)
    return m


def _drop_unused_initializers(m: onnx.ModelProto) -> None:
    used = {i for n in m.graph.node for i in n.input}
    used |= {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    keep = [t for t in m.graph.initializer if t.name in used]
    if len(keep) != len(m.graph.initializer):
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)


def _fix_eval_model(m: onnx.ModelProto, stat_outputs: set[str]) -> None:
    """Inference-form BatchNorm (one output) and no running-statistics graph outputs."""
    for node in m.graph.node:
        if node.op_type == "BatchNormalization" and any(o in stat_outputs for o in node.output):
            del node.output[1:]
        elif node.op_type == "Dropout":
            while len(node.input) > 1 and node.input[-1] == "":
                del node.input[-1]
    keep = [o for o in m.graph.output if o.name not in stat_outputs]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    _drop_unused_initializers(m)


def _fix_ir(m: onnx.ModelProto) -> onnx.ModelProto:
    """Stamp the newest IR version the training runtime loads (onnx >= 1.17 stamps newer
    ones, also on the optimizer model that ``generate_artifacts`` builds)."""
    top = env.runtime_limits().max_ir
    if m.ir_version > top or m.ir_version == 0:
        m.ir_version = top
    return m


def to_training_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int | None]:
    """The model at an opset the training runtime runs: converted down with
    onnx.version_converter when it is newer (returns the opset it was converted from), or
    refused in one line naming the op that cannot be converted."""
    top = env.runtime_limits()
    source = default_opset(model)
    if source <= top.max_opset:
        return model, None
    converted = convert_opset(model, top.max_opset)
    log.warning("converted the model from opset %d to %d, the newest %s %s trains",
                source, top.max_opset, top.name, top.version)
    return _fix_ir(converted), source


def _fingerprint(
    inputs: Sequence[TensorSpec],
    params: Mapping[str, Sequence[int]],
    frozen: Sequence[str],
    extra: str,
) -> str:
    h = hashlib.sha256()
    for s in inputs:
        h.update(repr((s.name, s.shape, s.dtype)).encode())
    for name in sorted(params):
        h.update(repr((name, tuple(params[name]), name in frozen)).encode())
    h.update(extra.encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[list[str]]:
    """Capture what the native library writes to file descriptor 2 (the gradient builder
    logs every graph transformer at INFO whatever the severity set)."""
    lines: list[str] = []
    try:
        fd = os.dup(2)
    except OSError:
        yield lines
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(fd, 2)
            os.close(fd)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            lines.extend(line for line in text.splitlines() if line.strip())
            for line in lines:
                if "[I:" not in line:
                    log.debug("onnxruntime: %s", line)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    m = _NO_GRADIENT.search(text)
    if m:
        node = m.group(2).strip()
        return (
            f"ONNX Runtime has no gradient for {m.group(1)}"
            f"{f' (node {node})' if node else ''}; this model cannot be trained with "
            f"onnxruntime-training 1.19.2 (replace the op or prune without training)"
        )
    m = _ORT_ERROR.search(text)
    if m:
        return m.group(1).strip().splitlines()[0][:300]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


# --- the loss block -------------------------------------------------------------------------


@dataclass
class _LossSpec:
    loss: str
    output: str
    target: str
    model_outputs: list[str]
    stat_outputs: list[str]
    penalty: Penalty
    weight_decay: float
    decay_tensors: list[str]
    opset: int


def _make_training_block(ob: Any, spec: _LossSpec) -> Any:
    """The onnxblock TrainingBlock: data loss + weight decay + scale * group Lasso."""

    class SslLoss(ob.Block):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            if spec.loss == "cross-entropy":
                self._data = ob.loss.CrossEntropyLoss()
            elif spec.loss == "mse":
                self._data = ob.loss.MSELoss()
            elif spec.loss == "bce":
                self._data = ob.loss.BCEWithLogitsLoss()
            else:
                self._data = ob.loss.L1Loss()

        def build(self, *outputs: str) -> tuple[str, ...]:
            graph = self.base.graph
            w = GraphWriter(graph, spec.opset, prefix="ssl")
            data = w.to_vector(self._data(spec.output, spec.target))
            penalty = add_penalty_nodes(spec.penalty, w)
            scale = onnx.ValueInfoProto(name=PENALTY_SCALE)
            scale.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            scale.type.tensor_type.shape.dim.add().dim_value = 1
            graph.input.append(scale)
            if spec.weight_decay > 0 and spec.decay_tensors:
                sums = [
                    w.reduce_sum(w.node("Mul", [t, t], "wd_sq"), None, hint="wd_sum")
                    for t in spec.decay_tensors
                ]
                wd = w.node(
                    "Mul",
                    [w.add_all(sums, "wd"), w.const(spec.weight_decay / 2, hint="wd_half")],
                    "wd",
                )
            else:
                wd = w.const(0.0, hint="zero")
            w.node("Identity", [data], output=OUT_DATA)
            w.node("Identity", [penalty], output=OUT_PENALTY)
            w.node("Identity", [wd], output=OUT_WD)
            scaled = w.node("Mul", [penalty, PENALTY_SCALE], "scaled_penalty")
            total = w.node("Add", [w.node("Add", [data, wd], "data_wd"), scaled], "total")
            w.node("Identity", [total], output=OUT_LOSS)
            return (
                OUT_LOSS,
                OUT_DATA,
                OUT_PENALTY,
                OUT_WD,
                *spec.model_outputs,
                *spec.stat_outputs,
            )

    class SslTraining(ob.TrainingBlock):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self._loss = SslLoss()

        def build(self, *outputs: str) -> tuple[str, ...]:
            return self._loss(*outputs)  # type: ignore[no-any-return]

    return SslTraining()


# --- building -------------------------------------------------------------------------------


def _target_spec(loss: str, out: TensorSpec, taken: set[str]) -> TensorSpec:
    base = "labels" if loss == "cross-entropy" else "target"
    name = base if base not in taken else f"ssl_{base}"
    if loss == "cross-entropy":
        if len(out.shape) != 2:
            raise UnsupportedModelError(
                f"cross-entropy needs a model output of shape [batch, classes]; output "
                f"'{out.name}' has shape {list(out.shape)} (use --loss mse/bce/l1?)"
            )
        return TensorSpec(name, out.shape[:-1], "int64")
    return TensorSpec(name, out.shape, out.dtype)


def build_artifacts(
    model: onnx.ModelProto,
    out_dir: str | os.PathLike[str],
    options: ArtifactOptions | None = None,
    *,
    name: str = "",
) -> Artifacts:
    """Write the training artifacts of ``model`` into ``out_dir`` (created or updated).

    Everything is built in a temporary folder beside ``out_dir`` and moved in file by file
    at the end, so a failure leaves ``out_dir`` as it was.
    """
    opts = options or ArtifactOptions()
    ob = _ort.load().onnxblock
    model, converted_from = to_training_opset(model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError(f"{out}: not writable")

    inputs0 = _graph_inputs(model)
    if not inputs0:
        raise UnsupportedModelError("the model has no graph inputs to feed data into")
    outputs0 = [TensorSpec.of(o) for o in model.graph.output]
    loss_output = opts.output or outputs0[0].name
    if loss_output not in {o.name for o in outputs0}:
        raise InputError(
            f"--output {loss_output!r} is not a model output (outputs: "
            f"{', '.join(o.name for o in outputs0)})"
        )
    opset = _opset(model)

    # The analysis needs static shapes: prepare at the model's own batch size (1 if free).
    b0 = _static_batch(model)
    prepared = _analysis.prepare(_set_batch(model, b0))
    dynamic = _set_batch(prepared, BATCH_PARAM)
    fixed_batch: int | None = None
    freed: list[str] = []
    if not (_runs_with_batch(dynamic, b0 + 1) and _runs_with_batch(dynamic, b0 + 2)):
        # A static-batch export: free the batch literals its shape targets hard-code.
        candidate, freed = _free_batch_literals(dynamic, b0)
        if freed:
            dynamic = candidate
    if _runs_with_batch(dynamic, b0 + 1) and _runs_with_batch(dynamic, b0 + 2):
        base = onnx.shape_inference.infer_shapes(dynamic)
        analysed = prepared
        if freed:
            log.info("the training graph takes any batch size (batch-free shape targets of "
                     "%s); the inference model keeps the input's shapes", ", ".join(freed[:5]))
    else:
        # Shapes computed from the batch size fold to constants: prepare at the training
        # batch size; if the model holds literal batch-sized constants, only its own works.
        analysed = base = prepared
        fixed_batch = b0
        if opts.fallback_batch != b0:
            candidate = _analysis.prepare(_set_batch(model, opts.fallback_batch))
            if _runs_with_batch(candidate, opts.fallback_batch):
                analysed = base = candidate
                fixed_batch = opts.fallback_batch
        log.warning(
            "the model's shapes depend on its batch size (re-export it with a dynamic batch "
            "axis to avoid this); training at a fixed batch size of %d",
            fixed_batch,
        )
    an = _analysis.analyze(analysed, kinds=("depth",), name=name or model.graph.name, prepared=True)

    trainable, frozen = classify_parameters(base, loss_output)
    if not trainable:
        raise UnsupportedModelError(
            "the model has no trainable parameters (no float32 "
            "weights in Conv, Gemm, MatMul, normalisation or bias "
            "slots)"
        )
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in base.graph.initializer}
    penalty = build_penalty(
        an, opts.lambdas, {n: shapes[n] for n in trainable}, scale_by_size=opts.scale_by_size
    )
    for line in (f"{t.structure} {t.label}: {t.groups} groups" for t in penalty.active_terms):
        log.debug("penalty term %s", line)
    train_base, stats = to_training_form(base, frozen)
    # Ops without a gradient in the training runtime train as exact compositions; the
    # inference model (built from ``prepared``) keeps the original ops.
    train_base, lowered = lower_for_training(train_base)
    for node_name, op_type in lowered:
        log.info("node %s (%s) is lowered for training", node_name, op_type)
    train_base = _fix_ir(onnx.shape_inference.infer_shapes(train_base))

    in_specs = tuple(TensorSpec.of(i) for i in _graph_inputs(base))
    out_specs = tuple(TensorSpec.of(o) for o in base.graph.output)
    loss_spec_out = next(o for o in out_specs if o.name == loss_output)
    taken = {i.name for i in base.graph.input} | {o.name for o in base.graph.output}
    taken |= {t.name for t in base.graph.initializer}
    target = _target_spec(opts.loss, loss_spec_out, taken)
    classes = loss_spec_out.shape[-1] if opts.loss == "cross-entropy" else None
    decay = [la.weight for la in an.layers if la.weight in set(trainable)]
    spec = _LossSpec(
        opts.loss,
        loss_output,
        target.name,
        [o.name for o in out_specs],
        [s for s, _ in stats],
        penalty,
        opts.weight_decay,
        decay,
        opset,
    )

    block = _make_training_block(ob, spec)
    for p in trainable:
        block.requires_grad(p, True)
    for p in frozen:
        block.requires_grad(p, False)
    try:
        with _native_stderr_captured(), ob.base(train_base):
            block(*[o.name for o in train_base.graph.output])
            training_model, eval_model = block.to_model_proto()
            params = block.parameters()
        opt_block = (
            ob.optim.AdamW(weight_decay=0.0) if opts.optimizer == "adamw" else ob.optim.SGD()
        )
        with _native_stderr_captured(), ob.empty_base(opset_version=opset):
            opt_block(params)
            optimizer_model = opt_block.to_model_proto()
    except OnnxSslError:
        raise
    except Exception as e:  # onnxruntime raises RuntimeError/Fail/ValidationError
        raise UnsupportedModelError(f"cannot build the training graph: {_one_line(e)}") from e

    _fix_eval_model(eval_model, {s for s, _ in stats})
    for m in (training_model, eval_model, optimizer_model):
        _fix_ir(m)

    template = _export_template(model, prepared, dynamic_ok=fixed_batch is None)
    fingerprint = _fingerprint(
        in_specs,
        {n: shapes[n] for n in (*trainable, *frozen)},
        frozen,
        json.dumps(
            [opts.loss, opts.optimizer, target.to_json(), penalty.to_json()], sort_keys=True
        ),
    )
    layers = tuple(
        {
            "node": la.node,
            "op_type": la.op_type,
            "weight": la.weight,
            "bias": la.bias,
            "out_axis": la.out_axis,
            "in_axis": la.in_axis,
            "weight_shape": list(la.weight_shape),
            "params": la.params,
            "macs": la.macs,
        }
        for la in an.layers
    )
    info = ArtifactInfo(
        model_name=name or model.graph.name or "model",
        inputs=in_specs,
        outputs=tuple(TensorSpec.of(o) for o in template.graph.output),
        loss_output=loss_output,
        target=target,
        loss=opts.loss,
        optimizer=opts.optimizer,
        weight_decay=opts.weight_decay,
        penalty=penalty,
        trainable=tuple(trainable),
        frozen=tuple(frozen),
        bn_stats=tuple(stats),
        fixed_batch=fixed_batch,
        fingerprint=fingerprint,
        classes=classes,
        layers=layers,
        converted_from_opset=converted_from,
    )

    created = not out.exists()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.artifacts.", dir=parent if created else out))
    try:
        _save_proto(training_model, tmp / TRAINING_MODEL)
        _save_proto(eval_model, tmp / EVAL_MODEL)
        _save_proto(optimizer_model, tmp / OPTIMIZER_MODEL)
        _save_proto(_fix_ir(template), tmp / INFERENCE_MODEL)
        with _native_stderr_captured():
            ob.save_checkpoint(params, tmp / CHECKPOINT)
        api = _ort.load().api
        state = api.CheckpointState.load_checkpoint(str(tmp / CHECKPOINT))
        state.properties[FINGERPRINT_PROPERTY] = fingerprint
        api.CheckpointState.save_checkpoint(state, str(tmp / CHECKPOINT))
        write_text_atomic(tmp / INFO, json.dumps(info.to_json(), indent=1) + "\n")
        _check_loadable(tmp)
        if created:
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0o700
            os.rename(tmp, out)
        else:
            # ssl.json goes last: a folder with a new ssl.json has all the new files.
            for f in (*ARTIFACT_FILES[:-1], INFO):
                os.replace(tmp / f, out / f)
    except OnnxSslError:
        raise
    except OSError as e:
        raise InputError(f"{out}: cannot write the artifacts: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "wrote training artifacts to %s (%d trainable, %d frozen parameters; penalty: %s)",
        out,
        len(trainable),
        len(frozen),
        opts.lambdas.describe(),
    )
    return Artifacts(out, info)


def _save_proto(m: onnx.ModelProto, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def _check_loadable(folder: Path) -> None:
    """Open the four artifacts with ONNX Runtime, as the trainer will."""
    api = _ort.load().api
    try:
        with _native_stderr_captured():
            state = api.CheckpointState.load_checkpoint(str(folder / CHECKPOINT))
            module = api.Module(str(folder / TRAINING_MODEL), state, str(folder / EVAL_MODEL))
            api.Optimizer(str(folder / OPTIMIZER_MODEL), module)
    except Exception as e:  # onnxruntime's own exception types
        raise UnsupportedModelError(
            f"ONNX Runtime cannot load the generated artifacts: {_one_line(e)}"
        ) from e


def _export_template(
    original: onnx.ModelProto, prepared: onnx.ModelProto, *, dynamic_ok: bool
) -> onnx.ModelProto:
    """The model trained weights are written into: the prepared model in inference form,
    with the original's input and output declarations when its batch is free."""
    t = to_inference_form(prepared)
    if dynamic_ok:
        decl = {vi.name: vi for vi in (*original.graph.input, *original.graph.output)}
        for vi in (*t.graph.input, *t.graph.output):
            if vi.name in decl:
                vi.type.CopyFrom(decl[vi.name].type)
    del t.graph.value_info[:]
    return t


def export_inference_model(art: Artifacts, params: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The inference model with ``params`` (name -> array) as its initializers."""
    m = onnx.load(str(art.inference_model))
    names = {t.name for t in m.graph.initializer}
    missing = [n for n in params if n not in names]
    if missing:
        raise InputError(
            f"{art.path}: the inference model lacks parameters "
            f"{', '.join(missing[:3])}; rebuild the artifacts"
        )
    for t in m.graph.initializer:
        if t.name in params:
            arr = np.asarray(params[t.name])
            if tuple(arr.shape) != tuple(t.dims):
                raise InputError(
                    f"parameter {t.name}: shape {arr.shape} does not match the "
                    f"model's {tuple(t.dims)}"
                )
            t.CopyFrom(numpy_helper.from_array(arr.astype(np.float32, copy=False), t.name))
    return _fix_ir(m)
