"""Progress of training runs for a person and for a program.

:class:`Progress` takes the trainer's :class:`~onnx_ssl.training.trainer.ProgressEvent`s.
On a terminal it draws one tqdm bar per phase (elapsed time and ETA over all the phase's
steps) whose postfix shows the batch loss and, after each epoch, the data loss, penalty,
held-out error and projected MACs; when a phase ends it prints a one-line summary. Elsewhere
(a pipe, a file, CI) it prints the per-epoch lines only. With ``log_path`` every epoch is
also appended to a JSON-lines file (one object per line: ``phase`` and the epoch's log row).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .trainer import EpochStats, ProgressEvent


def _pct(e: float | None) -> str:
    return "-" if e is None else f"{100 * e:.2f}%"


def _extra(s: EpochStats, key: str) -> float | None:
    return dict(s.extra).get(key)


def _has_size(stream: TextIO) -> bool:
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


def epoch_line(s: EpochStats, epochs: int, prefix: str = "") -> str:
    """The per-epoch line printed when the output is not a terminal."""
    zero = [f"{k}={v:.0%}" for k, v in s.zero_groups if v > 0]
    err = "" if s.val_error is None else f" val error {_pct(s.val_error)}"
    err += _fidelity(s)
    macs = _extra(s, "projected_macs")
    line = (
        f"{prefix}epoch {s.epoch}/{epochs}: loss {s.loss:.4f} (data {s.data_loss:.4f}, "
        f"penalty {s.penalty:.4f}){err}"
        + ("" if macs is None else f" projected MACs {macs:.1%}")
        + f" [{s.seconds:.1f}s]"
    )
    if zero:
        line += " zero groups: " + ", ".join(zero[:6]) + (", ..." if len(zero) > 6 else "")
    return line


def _fidelity(s: EpochStats) -> str:
    """`` fidelity logits top1 0.9850, hidden cosine 0.9973`` (distillation), or nothing."""
    if not s.fidelity:
        return ""
    parts = [f"{k.split(':', 2)[2]} {k.split(':', 2)[1]} {v:.4f}" for k, v in s.fidelity]
    return " fidelity " + ", ".join(parts)


class Progress:
    """Draws training progress on ``stream`` (stderr by default); see the module docstring."""

    def __init__(
        self,
        stream: TextIO | None = None,
        prefix: str = "",
        log_path: str | Path | None = None,
        tty: bool | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = (bool(getattr(self.stream, "isatty", lambda: False)())
                    if tty is None else tty)
        self.prefix = prefix
        self.log_path = Path(log_path) if log_path is not None else None
        if self.log_path is not None:
            self.log_path.write_text("", encoding="utf-8")
        self._bar: Any = None
        self._phase: str | None = None
        self._t0 = 0.0
        self._last: EpochStats | None = None
        self._epochs = 0
        self._post: dict[str, str] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        phase = ev.phase or "train"
        if ev.kind == "epoch_start" and phase != self._phase:
            self.close()
            self._start(phase, ev)
        if ev.kind == "batch" and self._bar is not None:
            self._bar.update(1)
            self._post["loss"] = f"{ev.loss:.4f}"
            if ev.batch == ev.batches or ev.batch % 5 == 0:
                self._bar.set_postfix(self._post, refresh=False)
        elif ev.kind == "epoch_end" and ev.stats is not None:
            self._epoch_end(phase, ev, ev.stats)

    def _start(self, phase: str, ev: ProgressEvent) -> None:
        self._phase = phase
        self._t0 = time.perf_counter()
        self._last = None
        self._epochs = ev.epochs
        self._post = {}
        if self.tty:
            try:
                from tqdm import tqdm
            except ImportError:  # the [train] extra brings it; lines will do without it
                self.tty = False
                return
            self._bar = tqdm(
                total=ev.epochs * ev.batches,
                initial=(ev.epoch - 1) * ev.batches,
                desc=f"{self.prefix}{phase}",
                unit="step",
                file=self.stream,
                # a terminal that reports no size (some pseudo-terminals) gets 140 columns
                dynamic_ncols=_has_size(self.stream),
                ncols=None if _has_size(self.stream) else 140,
                nrows=None if _has_size(self.stream) else 40,
                leave=True,
            )

    def _epoch_end(self, phase: str, ev: ProgressEvent, s: EpochStats) -> None:
        self._last = s
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"phase": phase, **s.row()}) + "\n")
        if self._bar is None:
            self.stream.write(epoch_line(s, ev.epochs, f"{self.prefix}{phase} ") + "\n")
            self.stream.flush()
        else:
            macs = _extra(s, "projected_macs")
            # the most telling first: a narrow terminal cuts the end
            fid = {"fid": f"{s.fidelity[0][1]:.4f}"} if s.fidelity else {}
            self._post = {"loss": f"{s.loss:.4f}", "err": _pct(s.val_error), **fid,
                          **({} if macs is None else {"MACs": f"{macs:.1%}"}),
                          "data": f"{s.data_loss:.4f}", "pen": f"{s.penalty:.4f}"}
            self._bar.set_postfix(self._post)
        if s.epoch >= ev.epochs:
            self.close()

    def close(self) -> None:
        """End the current phase's bar and print its summary."""
        if self._phase is None:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        s = self._last
        if s is not None:
            macs = _extra(s, "projected_macs")
            self.stream.write(
                f"{self.prefix}{self._phase}: {s.epoch}/{self._epochs} epochs, "
                f"{time.perf_counter() - self._t0:.1f}s; loss {s.loss:.4f} (data "
                f"{s.data_loss:.4f}, penalty {s.penalty:.4f}), held-out error "
                f"{_pct(s.val_error)}{_fidelity(s)}"
                + ("" if macs is None else f", projected MACs {macs:.1%}")
                + "\n"
            )
            self.stream.flush()
        self._phase = None
