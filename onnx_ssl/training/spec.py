"""What an artifacts folder is: its file names, the loss graph's extra inputs and outputs,
the options it is built with, and ``ssl.json`` (:class:`ArtifactInfo`), read back by
:func:`load_artifacts`. :func:`onnx_ssl.training.artifacts.build_artifacts` writes it."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_ssl.errors import InputError

from .penalty import Lambdas, Penalty

FORMAT = 1
LOSSES = ("cross-entropy", "mse", "bce", "l1")
OPTIMIZERS = ("adamw", "sgd")
# The self-distillation losses (see onnx_ssl.training.distill, which builds them).
DISTILL_LOSSES = ("auto", "mse", "kl", "cosine")
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



def check_temperature(t: float) -> None:
    """The distillation temperature must be a finite number > 0 (InputError)."""
    if not (math.isfinite(t) and t > 0):
        raise InputError(f"--distill-temperature must be a finite number > 0, got {t}")

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
    # Self-distillation (see onnx_ssl.training.distill): the loss (auto, mse, kl, cosine)
    # fitting every model output to the teacher's, instead of ``loss`` on labels; None: labels.
    distill: str | None = None
    temperature: float = 1.0  # distill.DEFAULT_TEMPERATURE
    # --distill-weights as given (W1,W2,... or NAME=W,...); None: equal.
    distill_weights: str | None = None

    def __post_init__(self) -> None:
        if self.distill is not None:
            if self.distill not in DISTILL_LOSSES:
                raise InputError(f"unknown distillation loss {self.distill!r}; choose from "
                                 f"{', '.join(DISTILL_LOSSES)}")
            check_temperature(self.temperature)
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
    # Self-distillation: the loss, its terms (model output, teacher target input, the loss
    # that output is fitted with), the outputs' weights and the KL temperature.
    distill: str | None = None
    distill_terms: tuple[tuple[str, str, str], ...] = ()
    distill_weights: tuple[float, ...] = ()
    temperature: float = 2.0

    def distill_targets(self) -> tuple[TensorSpec, ...]:
        """The teacher target inputs of the loss graph (shaped like their outputs)."""
        outs = {o.name: o for o in self.outputs}
        return tuple(TensorSpec(t, outs[o].shape, "float32") for o, t, _ in self.distill_terms)

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
            "distill": self.distill,
            "distill_terms": [list(t) for t in self.distill_terms],
            "distill_weights": list(self.distill_weights),
            "temperature": self.temperature,
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
            distill=None if d.get("distill") is None else str(d["distill"]),
            distill_terms=tuple((str(a), str(b), str(c)) for a, b, c in
                                d.get("distill_terms", ())),
            distill_weights=tuple(float(w) for w in d.get("distill_weights", ())),
            temperature=float(d.get("temperature", 2.0)),
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

