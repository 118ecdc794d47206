"""The training loop over onnxruntime-training artifacts (Module, Optimizer, CheckpointState).

Each step feeds a batch and the penalty scale ``s`` to the training model, whose loss is
``E_D(W) + weight_decay/2 ||W||^2 + s * sum_g lambda_g R_g(W)`` (see
:mod:`onnx_ssl.training.artifacts`), runs the optimizer, copies the BatchNorm batch
statistics into the running statistics, and with ``prox`` applies the proximal operator of
the group Lasso to the parameters in place (through the checkpoint's live arrays)::

    w_G <- w_G * max(0, 1 - lr * lambda_G / ||w_G||_2)

In proximal mode ``s`` is 0: the optimizer follows the data loss (proximal gradient
descent), and the soft-thresholding makes groups exactly zero instead of only small. With
AdamW the threshold ``lr * lambda`` is small next to Adam's normalised steps; plain ``sgd``
is the textbook proximal gradient method.

After every epoch the state (parameters and optimizer moments) is written atomically to
``train_state.ckpt`` (a previous one is replaced only by a complete new file), the log to
CSV or JSON, and at the end the trained weights are exported into the inference model.

With ``dist`` (:mod:`onnx_ssl.training.distributed`), each worker trains on its share of
every global batch, the gradients are averaged over the workers before the optimizer step,
and only rank 0 writes files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnx_ssl.errors import InputError, OnnxSslError
from onnx_ssl.io import ModelProto, check_writable, save_model, write_text_atomic

from . import _ort
from .data import Dataset, fit_inputs, fit_targets
from .distill import DISTILL_SCALE, feed_scales
from .evaluate import data_loss_and_error
from .fidelity import Fidelity, fidelity, output_kind
from .forms import export_inference_model
from .native import native_stderr_captured, ort_error_line
from .penalty import term_tensors
from .spec import (
    ARTIFACT_FILES,
    FINGERPRINT_PROPERTY,
    OUT_DATA,
    OUT_LOSS,
    OUT_PENALTY,
    OUT_WD,
    PENALTY_SCALE,
    Artifacts,
    load_artifacts,
)

if TYPE_CHECKING:
    from .distributed import Distributed

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "step", "constant")
STATE = "train_state.ckpt"
LOG = "train_log.csv"
TRAINED = "trained_model.onnx"
EPOCH_PROPERTY = "onnx_ssl.epoch"


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run (the CLI's defaults)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    schedule: str = "cosine"
    prox: bool = False
    penalty: bool = True
    resume: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    zero_tol: float = 1e-6
    log_path: Path | None = None
    export_path: Path | None = None
    save_state: bool = True
    export: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise InputError(f"--epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:  # also refuses nan
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not (math.isfinite(self.zero_tol) and self.zero_tol >= 0):
            raise InputError(f"--zero-tol must be a finite number >= 0, got {self.zero_tol}")
        if self.schedule not in SCHEDULES:
            raise InputError(
                f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}"
            )

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate at ``step`` of ``total``: cosine decay to 0, or x0.1 at 50% and
        75% of the steps (``step``), or constant."""
        if total <= 0 or self.schedule == "constant":
            return self.lr
        frac = step / total
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * frac))
        return self.lr * (0.1 ** ((frac >= 0.5) + (frac >= 0.75)))


@dataclass(frozen=True)
class EpochStats:
    """One line of the training log (means over the epoch's batches).

    ``loss`` is the objective of equation (1), data loss + weight decay + group-Lasso
    penalty (without the penalty under ``--no-penalty``); ``penalty`` is
    ``sum_g lambda_g R_g(W)``; ``zero_groups`` the fraction of exactly-zero groups (RMS at
    most ``zero_tol``) of each structure and layer.
    """

    epoch: int
    lr: float
    loss: float
    data_loss: float
    penalty: float
    weight_decay: float
    train_error: float | None
    val_loss: float | None
    val_error: float | None
    seconds: float
    zero_groups: tuple[tuple[str, float], ...] = ()
    # Distillation: held-out fidelity to the teacher, one (fidelity:KIND:OUTPUT, value) per
    # output (onnx_ssl.training.fidelity).
    fidelity: tuple[tuple[str, float], ...] = ()
    # What an ``on_epoch`` hook added (the budget's projected MACs, the lambda multiplier).
    extra: tuple[tuple[str, float], ...] = ()

    def row(self) -> dict[str, Any]:
        r: dict[str, Any] = {
            "epoch": self.epoch,
            "lr": self.lr,
            "loss": self.loss,
            "data_loss": self.data_loss,
            "penalty": self.penalty,
            "weight_decay": self.weight_decay,
            "train_error": self.train_error,
            "val_loss": self.val_loss,
            "val_error": self.val_error,
            "seconds": round(self.seconds, 3),
        }
        for k, v in self.fidelity:
            r[k] = v
        for k, v in self.extra:
            r[k] = v
        for k, v in self.zero_groups:
            r[f"zero:{k}"] = v
        return r


@dataclass(frozen=True)
class ProgressEvent:
    """What the trainer reports while it works (the CLI draws a progress bar from it)."""

    kind: str  # "epoch_start" | "batch" | "epoch_end" | "eval"
    epoch: int
    epochs: int
    batch: int = 0
    batches: int = 0
    loss: float = float("nan")
    stats: EpochStats | None = None
    label: str = ""
    phase: str = ""  # set by the SSL chain: "ssl", "finetune", "baseline"


ProgressFn = Callable[[ProgressEvent], None]
# Called after each epoch's evaluation, before its checkpoint: returns values to log with the
# epoch, may change ``trainer.lambda_scale``, and may raise CollapseError (the trainer then
# puts back the previous epoch's weights and checkpoints them before re-raising).
EpochHook = Callable[["Trainer", EpochStats], Mapping[str, float]]
# Called after every training step (after the prox) with the 0-based epoch and step; may
# change ``trainer.lambda_scale`` and the live parameters (the MAC budget's mask).
StepHook = Callable[["Trainer", int, int], None]
SCALE_PROPERTY = "onnx_ssl.lambda_scale"


@dataclass(frozen=True)
class TrainResult:
    history: tuple[EpochStats, ...]
    params: Mapping[str, np.ndarray]
    model: ModelProto | None
    export_path: Path | None
    train: Dataset
    val: Dataset | None
    epochs_done: int = 0
    log_path: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def val_error(self) -> float | None:
        return self.history[-1].val_error if self.history else None


# --- metrics ----------------------------------------------------------------------------


# --- the trainer ------------------------------------------------------------------------


class Trainer:
    """Runs training on an artifacts folder (see the module docstring)."""

    def __init__(
        self,
        artifacts: Artifacts | str | os.PathLike[str],
        config: TrainConfig | None = None,
        *,
        reads: Sequence[str | os.PathLike[str]] = (),
        dist: Distributed | None = None,
    ) -> None:
        self.art = artifacts if isinstance(artifacts, Artifacts) else load_artifacts(artifacts)
        self.config = config or TrainConfig()
        # Data-parallel workers (onnx_ssl.training.distributed): only rank 0 writes files.
        self.dist = dist
        if dist is not None and not dist.is_writer:
            self.config = replace(self.config, save_state=False, export_path=None)
        self.info = self.art.info
        self.start_epoch = 0
        # Multiplies every lambda (the budget controller's knob; 1 otherwise).
        self.lambda_scale = 1.0
        self._check_outputs(reads)
        self.api = _ort.load().api
        self._open()

    # --- state ----------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.art.path / STATE

    def _check_outputs(self, reads: Sequence[str | os.PathLike[str]]) -> None:
        """Refuse, before anything is written, a checkpoint, log or exported model path that
        is one of the artifacts, a file in ``reads`` (the data) or another of these outputs."""
        cfg = self.config
        outs: list[Path] = []
        if cfg.save_state:
            outs += [self.state_path, cfg.log_path or self.art.path / LOG]
        if cfg.export and (cfg.save_state or cfg.export_path is not None):
            outs.append(cfg.export_path or self.art.path / TRAINED)
        inputs = [*(self.art.path / f for f in ARTIFACT_FILES), *reads]
        for k, out in enumerate(outs):
            check_writable(out, *inputs, outputs=outs[:k] + outs[k + 1 :])

    def _load_state(self, path: Path) -> Any:
        try:
            with native_stderr_captured():
                state = self.api.CheckpointState.load_checkpoint(str(path))
        except Exception as e:  # onnxruntime's own exception types
            raise InputError(f"{path}: not a readable checkpoint ({ort_error_line(e)})") from e
        props = dict(state.properties)
        fp = props.get(FINGERPRINT_PROPERTY)
        if fp != self.info.fingerprint:
            raise InputError(
                f"{path}: checkpoint does not match the artifacts in "
                f"{self.art.path} (fingerprint {fp} != {self.info.fingerprint}); "
                f"rebuild the artifacts or start without --resume"
            )
        return state

    def _open(self) -> None:
        cfg = self.config
        path = self.art.checkpoint
        if cfg.resume:
            if self.state_path.exists():
                path = self.state_path
            else:
                log.warning(
                    "--resume: no %s in %s yet; starting from the initial checkpoint",
                    STATE,
                    self.art.path,
                )
        resumed = path == self.state_path
        if self.dist is not None:  # every worker starts from rank 0's checkpoint
            path, resumed = self.dist.share_checkpoint(path, resumed)
        self.state = self._load_state(path)
        if resumed:
            props = dict(self.state.properties)
            self.start_epoch = int(props.get(EPOCH_PROPERTY, 0))
            self.lambda_scale = float(props.get(SCALE_PROPERTY, 1.0))
            log.info("resuming after epoch %d from %s", self.start_epoch, path)
        so = _ort.load().ort.SessionOptions()
        so.log_severity_level = 3
        if self.dist is not None and self.dist.threads:
            so.intra_op_num_threads = self.dist.threads
        try:
            with native_stderr_captured():
                self.module = self.api.Module(
                    str(self.art.training_model),
                    self.state,
                    str(self.art.eval_model),
                    session_options=so,
                )
                self.optimizer = self.api.Optimizer(str(self.art.optimizer_model), self.module)
        except Exception as e:  # onnxruntime's own exception types
            raise InputError(
                f"{self.art.path}: ONNX Runtime cannot open the artifacts with "
                f"checkpoint {path.name}: {ort_error_line(e)}"
            ) from e
        self.module.train()
        self.train_inputs = list(self.module.input_names())
        self.train_outputs = list(self.module.output_names())
        self.module.eval()
        self.eval_inputs = list(self.module.input_names())
        self.eval_outputs = list(self.module.output_names())
        self.module.train()

    def params(self, names: Any = None) -> dict[str, np.ndarray]:
        """Copies of the parameters (trainable and frozen) by name."""
        names = names if names is not None else (*self.info.trainable, *self.info.frozen)
        return {n: np.array(self.state.parameters[n].data) for n in names}

    def live(self, names: Any) -> dict[str, np.ndarray]:
        """The checkpoint's live arrays: writing to them changes the parameters."""
        return {n: self.state.parameters[n].data for n in names}

    def set_params(self, values: Mapping[str, np.ndarray]) -> None:
        for n, v in values.items():
            self.state.parameters[n].data[...] = v

    def save_state(self, epoch: int) -> None:
        """Write parameters and optimizer state atomically to ``train_state.ckpt``."""
        self.state.properties[EPOCH_PROPERTY] = int(epoch)
        self.state.properties[SCALE_PROPERTY] = float(self.lambda_scale)
        tmp = self.state_path.with_name(f".{STATE}.tmp{os.getpid()}")
        try:
            with native_stderr_captured():
                self.api.CheckpointState.save_checkpoint(
                    self.state, str(tmp), include_optimizer_state=True
                )
            os.replace(tmp, self.state_path)
        except KeyboardInterrupt:  # Ctrl-C mid-write: the previous checkpoint stays whole
            tmp.unlink(missing_ok=True)
            raise
        except Exception as e:
            if tmp.exists():
                tmp.unlink()
            if isinstance(e, OnnxSslError):
                raise
            raise InputError(
                f"{self.state_path}: cannot save the checkpoint: {ort_error_line(e)}"
            ) from e

    # --- data -----------------------------------------------------------------------
    @property
    def distilling(self) -> bool:
        return self.info.distill is not None

    @property
    def fidelity_kinds(self) -> dict[str, str]:
        """Distillation: how each output's fidelity is measured (output -> kind)."""
        if self.info.distill is None:
            return {}
        shapes = {o.name: o.shape for o in self.info.outputs}
        return {o: output_kind(o, shapes[o], self.info.distill)
                for o, _, _ in self.info.distill_terms}

    def prepare_data(self, data: Dataset) -> Dataset:
        """Fit a dataset to the model's inputs and loss (one-line errors otherwise).

        Distilling, the data must hold the teacher's outputs
        (:func:`onnx_ssl.training.distill.teacher_targets`); labels, when there are some
        and the loss output is ``[batch, classes]``, are kept to measure the error."""
        inputs = [(s.name, s.shape, s.dtype) for s in self.info.inputs]
        d = fit_inputs(data, inputs)
        out = next(o for o in self.info.outputs if o.name == self.info.loss_output)
        if self.info.distill is None:
            if d.y is None:
                raise InputError(
                    f"{d.name}: no labels ('y'), and these artifacts train on labels (loss "
                    f"{self.info.loss}); build them with `onnx-ssl artifacts --distill-loss "
                    f"mse` to distil the model's own outputs instead")
            return fit_targets(d, self.info.loss, out.shape, self.info.classes)
        missing = [o for o, _, _ in self.info.distill_terms if o not in d.targets]
        if missing:
            raise InputError(f"{d.name}: no teacher outputs for {', '.join(missing)} "
                             f"(distillation needs the teacher's outputs on the data)")
        if d.y is not None:
            if self.info.classes is None:
                log.info("%s: labels ignored (output '%s' is not [batch, classes])", d.name,
                         out.name)
                return replace(d, y=None)
            return fit_targets(d, "cross-entropy", out.shape, self.info.classes)
        return d

    def _feeds(
        self,
        names: list[str],
        xb: Mapping[str, np.ndarray],
        yb: np.ndarray | None,
        scale: float,
        tb: Mapping[str, np.ndarray] | None = None,
        distill_scale: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        values: dict[str, np.ndarray] = dict(xb)
        if self.info.distill is not None:
            assert tb is not None and distill_scale is not None
            for out, target, _ in self.info.distill_terms:
                values[target] = tb[out]
            values[DISTILL_SCALE] = distill_scale
        elif yb is not None:
            values[self.info.target.name] = yb
        values[PENALTY_SCALE] = np.array([scale], dtype=np.float32)
        try:
            return [values[n] for n in names]
        except KeyError as e:
            raise InputError(
                f"the training model needs input {e.args[0]!r}, which the data does not provide"
            ) from e

    def _padded(
        self, data: Dataset, batch: int
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, np.ndarray], int]]:
        for idx in data.batch_indices(batch):
            n = len(idx)
            fixed = self.info.fixed_batch
            if fixed is not None and n < fixed:
                idx = np.concatenate([idx, np.full(fixed - n, idx[0], dtype=idx.dtype)])
            xb, yb, tb = data.take(idx)
            yield xb, yb, tb, n

    def _scales(self, data: Dataset) -> np.ndarray | None:
        if self.info.distill is None:
            return None
        return feed_scales(self.info.distill_terms, self.info.distill_weights, data)

    def outputs(
        self, data: Dataset, names: Sequence[str], batch_size: int | None = None
    ) -> tuple[float, dict[str, np.ndarray]]:
        """(mean data loss from the eval model, the eval model's outputs ``names`` over
        ``data``), BatchNorm and Dropout in inference form."""
        bs = self.info.fixed_batch or batch_size or self.config.batch_size
        self.module.eval()
        ks = {n: self.eval_outputs.index(n) for n in names}
        k_data = self.eval_outputs.index(OUT_DATA)
        outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
        total, seen = 0.0, 0
        scales = self._scales(data)
        try:
            for xb, yb, tb, n in self._padded(data, bs):
                res = self.module(*self._feeds(self.eval_inputs, xb, yb, 0.0, tb, scales))
                for name, k in ks.items():
                    outs[name].append(np.asarray(res[k])[:n])
                total += float(np.asarray(res[k_data]).reshape(-1)[0]) * n
                seen += n
        finally:
            self.module.train()
        return (total / seen if seen else float("nan"),
                {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outs.items()})

    def predict(self, data: Dataset, batch_size: int | None = None) -> np.ndarray:
        """The loss output of the eval model over ``data`` (BatchNorm and Dropout in
        inference form)."""
        return self.outputs(data, [self.info.loss_output], batch_size)[1][self.info.loss_output]

    def evaluate(self, data: Dataset) -> tuple[float, float | None]:
        """(mean data loss, error rate) of the current parameters on ``data``; distilling,
        the loss is the distillation loss and the error is measured on the labels, if any."""
        return self.evaluate_all(data)[:2]

    def evaluate_all(
        self, data: Dataset
    ) -> tuple[float, float | None, tuple[Fidelity, ...]]:
        """(mean data loss, error rate or None, fidelity to the teacher per output) in one
        pass over ``data`` (no fidelity without distillation)."""
        if len(data) == 0:
            return float("nan"), None, ()
        if self.info.distill is None:
            assert data.y is not None
            return (*data_loss_and_error(self.info.loss, self.predict(data), data.y), ())
        kinds = self.fidelity_kinds
        names = list(dict.fromkeys([*kinds, self.info.loss_output]))
        loss, outs = self.outputs(data, names)
        err = None
        if data.y is not None:
            err = data_loss_and_error("cross-entropy", outs[self.info.loss_output], data.y)[1]
        return loss, err, fidelity(outs, data.targets, kinds)

    # --- training -------------------------------------------------------------------
    def sparsity(self, tol: float | None = None) -> tuple[tuple[str, float], ...]:
        pen = self.info.penalty
        tensors = {n for t in pen.terms for n in term_tensors(t)}
        params = self.params(sorted(tensors))
        rows = pen.sparsity(params, self.config.zero_tol if tol is None else tol)
        return tuple((f"{r.structure}:{r.label}", round(r.fraction, 4)) for r in rows)

    def fit(
        self,
        data: Dataset,
        val: Dataset | None = None,
        progress: ProgressFn | None = None,
        on_epoch: EpochHook | None = None,
        on_step: StepHook | None = None,
    ) -> TrainResult:
        """Train for ``config.epochs`` epochs (from the resumed epoch on).

        ``data`` is split into train and held-out parts (``config.val_fraction``) unless
        ``val`` is given.
        """
        cfg = self.config
        held: Dataset | None
        data = self.prepare_data(data)
        if val is None and cfg.val_fraction > 0:
            train, held = data.split(cfg.val_fraction, cfg.seed)
        else:
            train, held = data, val
        held = self.prepare_data(held) if held is not None and len(held) else None
        bs = self.info.fixed_batch or cfg.batch_size
        if self.info.fixed_batch and cfg.batch_size != self.info.fixed_batch:
            log.warning(
                "these artifacts train at a fixed batch size of %d (the model's shapes "
                "depend on it); --batch-size %d ignored",
                self.info.fixed_batch,
                cfg.batch_size,
            )
        drop_last = self.info.fixed_batch is not None
        if drop_last and len(train) < bs:
            raise InputError(
                f"{train.name}: {len(train)} samples are fewer than the fixed batch size {bs}"
            )
        if self.dist is not None and self.info.fixed_batch:
            raise InputError("these artifacts train at a fixed batch size: more than one "
                             "worker needs a model whose batch dimension is free")
        steps = train.num_batches(bs, drop_last)
        total = steps * cfg.epochs
        scale = 1.0 if cfg.penalty and not cfg.prox else 0.0
        pen = self.info.penalty
        prox_tensors = pen.tensors() if cfg.prox else ()
        stat_idx = [(self.train_outputs.index(o), p) for o, p in self.info.bn_stats]
        idx = {n: self.train_outputs.index(n) for n in (OUT_LOSS, OUT_DATA, OUT_PENALTY, OUT_WD)}
        out_idx = self.train_outputs.index(self.info.loss_output)
        log_path = cfg.log_path or self.art.path / LOG
        rows = _read_log(log_path, self.start_epoch) if cfg.resume else []
        history: list[EpochStats] = []
        if cfg.prox and not pen.active_terms:
            log.warning("--prox: the artifacts have no group-Lasso terms (all lambdas are 0)")

        scales = self._scales(train)
        label_loss = "cross-entropy" if self.info.distill is not None else self.info.loss
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            good = self.params() if on_epoch is not None else None
            if progress:
                progress(ProgressEvent("epoch_start", epoch + 1, cfg.epochs, 0, steps))
            sums = np.zeros(4)
            wrong = 0
            seen = 0
            lr = cfg.lr
            for i, bidx in enumerate(
                train.batch_indices(bs, shuffle=True, seed=cfg.seed + epoch, drop_last=drop_last)
            ):
                if self.dist is not None:  # this worker's part of the global batch
                    bidx = self.dist.shard(bidx)
                xb, yb, tb = train.take(bidx)
                lr = cfg.lr_at(epoch * steps + i, total)
                self.optimizer.set_learning_rate(lr)
                self.module.lazy_reset_grad()
                res = self.module(
                    *self._feeds(self.train_inputs, xb, yb, scale * self.lambda_scale, tb,
                                 scales)
                )
                if self.dist is not None:  # gradients, statistics, losses: mean of the workers
                    self.dist.all_reduce(self, res, list(idx.values()))
                self.optimizer.step()
                for k, p in stat_idx:
                    self.state.parameters[p].data[...] = res[k]
                if prox_tensors:
                    pen.prox(self.live(prox_tensors), lr * self.lambda_scale)
                if on_step is not None:
                    on_step(self, epoch, i)
                n = len(bidx) if self.dist is None else self.dist.local_n
                vals = [
                    float(np.asarray(res[idx[key]]).reshape(-1)[0])
                    for key in (OUT_LOSS, OUT_DATA, OUT_PENALTY, OUT_WD)
                ]
                if cfg.prox:  # the objective of eq. (1): the penalty is applied by the prox
                    vals[0] = vals[1] + vals[2] + vals[3]
                if not math.isfinite(vals[0]):
                    raise InputError(
                        f"training diverged at epoch {epoch + 1}, step {i + 1} "
                        f"(loss {vals[0]}); lower --lr or the lambdas"
                    )
                sums += np.array(vals) * n
                seen += n
                if yb is not None:
                    _, err = data_loss_and_error(label_loss, np.asarray(res[out_idx]), yb)
                    if err is not None:
                        wrong += int(round(err * n))
                if progress:
                    progress(ProgressEvent("batch", epoch + 1, cfg.epochs, i + 1, steps, vals[0]))
            if self.dist is not None:
                sums, wrong, seen = self.dist.end_epoch(self, sums, wrong, seen)
            means = sums / max(seen, 1)
            if progress and held is not None:
                progress(ProgressEvent("eval", epoch + 1, cfg.epochs, label="evaluating"))
            fids: tuple[Fidelity, ...] = ()
            val_loss: float | None = None
            val_err: float | None = None
            if held is not None:
                val_loss, val_err, fids = self.evaluate_all(held)
            has_error = (label_loss in ("cross-entropy", "bce")
                         and (self.info.distill is None or train.y is not None))
            stats = EpochStats(
                epoch=epoch + 1,
                lr=lr,
                loss=float(means[0]),
                data_loss=float(means[1]),
                penalty=float(means[2]),
                weight_decay=float(means[3]),
                train_error=wrong / seen if seen and has_error else None,
                val_loss=val_loss,
                val_error=val_err,
                seconds=time.perf_counter() - t0,
                zero_groups=self.sparsity(),
                fidelity=tuple((f.key, round(f.value, 6)) for f in fids),
            )
            if on_epoch is not None:
                from .budget import CollapseError

                try:
                    extra = on_epoch(self, stats)
                except CollapseError:
                    assert good is not None
                    self.set_params(good)  # the last good epoch's weights
                    if cfg.save_state:
                        self.save_state(epoch)
                    raise
                stats = replace(stats, extra=tuple(extra.items()))
            history.append(stats)
            rows = [r for r in rows if int(r["epoch"]) < stats.epoch] + [stats.row()]
            if cfg.save_state:
                self.save_state(epoch + 1)
                _write_log(log_path, rows)
            log.info(
                "epoch %d/%d: loss %.4f (data %.4f, penalty %.4f), val error %s%s, %.1fs",
                stats.epoch,
                cfg.epochs,
                stats.loss,
                stats.data_loss,
                stats.penalty,
                "-" if val_err is None else f"{val_err:.4f}",
                f", fidelity {', '.join(f.text() for f in fids)}" if fids else "",
                stats.seconds,
            )
            if progress:
                progress(
                    ProgressEvent(
                        "epoch_end", epoch + 1, cfg.epochs, steps, steps, stats.loss, stats
                    )
                )

        params = self.params()
        model = None
        export_path = None
        if cfg.export:
            model = export_inference_model(self.art, params)
            if cfg.save_state or cfg.export_path is not None:
                export_path = cfg.export_path or self.art.path / TRAINED
                save_model(model, export_path)
        return TrainResult(
            tuple(history),
            params,
            model,
            export_path,
            train,
            held,
            max(cfg.epochs, self.start_epoch),
            log_path if cfg.save_state else None,
        )


def _read_log(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
        rows = (
            json.loads(text) if path.suffix == ".json" else list(csv.DictReader(io.StringIO(text)))
        )
    except (OSError, ValueError) as e:
        log.warning("%s: previous log unreadable (%s); starting a new one", path, e)
        return []
    return [r for r in rows if int(r.get("epoch", 0)) <= upto]


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    if path.suffix == ".json":
        write_text_atomic(path, json.dumps(rows, indent=1) + "\n")
        return
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(keys), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})
    write_text_atomic(path, buf.getvalue())


def train(
    artifacts: Artifacts | str | os.PathLike[str],
    data: Dataset,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
    val: Dataset | None = None,
) -> TrainResult:
    """Train the artifacts on ``data``; see :class:`Trainer`."""
    return Trainer(artifacts, config).fit(data, val, progress)
