"""``onnx-ssl bench``: measured ONNX Runtime latency of models against their MAC bound.

Models are timed in alternation in one process (so machine noise hits all alike), with all
graph optimisations on; the report gives each model's median latency and its spread (the
interquartile range and the fastest and slowest run), its speed-up over the first model
(median over median), its MAC reduction (the "FLOP bound": the speed-up a perfectly
efficient kernel would get) and the ratio of the two. A speed-up whose timings spread too
wide (interquartile range over :data:`MAX_SPREAD` of the median, for the model or the
baseline) is marked and the report says why instead of letting it pass for a result; a
trustworthy speed-up above the MAC bound gets a note.

A model with a symbolic batch runs at ``batch`` (1 unless given; its MACs are counted at
that batch); a static batch is the model's own, and the report says which batch ran.

:func:`time_pair` times two (session, feeds) pairs in alternating rounds of calibrated
length; the SSL chain's measured speedups (:mod:`onnx_ssl.training.speedup`) use it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import env
from .analysis import analyze, bind_batch, symbolic_batch
from .errors import InputError
from .io import ModelProto
from .runtime import ort, random_inputs
from .text import format_table

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Interquartile range over median above which a model's timings are too noisy to trust.
MAX_SPREAD = 0.2
# A speed-up this much above the MAC bound is worth a word even when the timings are tight.
ABOVE_BOUND = 1.05


@dataclass(frozen=True)
class BenchRow:
    """One model's timings (milliseconds per run) and MACs at the batch that ran."""

    name: str
    macs: int
    latency_ms: float  # the median
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    speedup: float  # the first model's median over this one's
    mac_reduction: float  # the first model's MACs over this one's: the bound

    @property
    def efficiency(self) -> float:
        return self.speedup / self.mac_reduction if self.mac_reduction else 0.0

    @property
    def spread(self) -> float:
        """Interquartile range over the median."""
        return (self.q3_ms - self.q1_ms) / self.latency_ms if self.latency_ms else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > MAX_SPREAD


@dataclass(frozen=True)
class BenchReport:
    """What ``onnx-ssl bench`` measured, and under which settings."""

    rows: tuple[BenchRow, ...]
    provider: str
    batch: int  # the batch every model ran at
    batch_source: str  # where that batch came from, in words
    threads: int  # intra-op threads asked for; 0: ONNX Runtime's default
    iters: int
    warmup: int

    def untrusted(self, row: BenchRow) -> list[BenchRow]:
        """The rows (``row`` and the baseline) whose spread makes ``row``'s speed-up
        untrustworthy."""
        return [r for r in dict.fromkeys((self.rows[0], row)) if r.noisy]

    def warnings(self) -> list[str]:
        out = []
        for r in self.rows[1:]:
            bad = self.untrusted(r)
            if bad:
                why = " and ".join(f"{b.name} (interquartile range {b.spread:.0%} of the "
                                   f"median)" for b in bad)
                above = (f"; it reads {r.efficiency:.2f}x its MAC bound, which these timings "
                         f"cannot support" if r.efficiency > ABOVE_BOUND else "")
                out.append(f"warning: the speed-up of {r.name} is not to be trusted: the "
                           f"timings of {why} spread over {MAX_SPREAD:.0%}{above}; rerun with "
                           f"more --iters on a quieter machine")
            elif r.efficiency > ABOVE_BOUND:
                out.append(f"note: {r.name} runs {r.efficiency:.2f}x faster than its MAC bound "
                           f"allows with tight timings: MACs are not the only cost (memory "
                           f"traffic, caches, the kernels ONNX Runtime picks for each shape)")
        return out

    def to_text(self) -> str:
        head = ("model", "MACs", "median ms", "IQR ms", "min - max ms", "speed-up",
                "MAC reduction (bound)", "speed-up / bound")
        body = []
        for i, r in enumerate(self.rows):
            mark = " *" if i and self.untrusted(r) else ""
            body.append((r.name, f"{r.macs / 1e6:.1f} M", _ms(r.latency_ms),
                         f"{_ms(r.q1_ms)} - {_ms(r.q3_ms)}", f"{_ms(r.min_ms)} - {_ms(r.max_ms)}",
                         f"{r.speedup:.2f}x{mark}", f"{r.mac_reduction:.2f}x",
                         f"{r.efficiency:.2f}{mark}"))
        lines = format_table([head, *body])
        threads = (f"{self.threads} intra-op thread{'s' if self.threads > 1 else ''}"
                   if self.threads else
                   f"ONNX Runtime's default intra-op threads ({os.cpu_count()} CPUs here)")
        lines.append(f"(ONNX Runtime {PROVIDERS[self.provider]}, batch {self.batch} "
                     f"({self.batch_source}), {threads};")
        lines.append(f" {self.iters} timed runs per model in alternation after {self.warmup} "
                     f"warm-up runs; speed-up: median over median; MACs at batch {self.batch})")
        lines += self.warnings()
        return "\n".join(lines)


def _ms(x: float) -> str:
    """Milliseconds to about three significant digits, trailing zeros kept."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else (
        f"{x:.3f}")


def _batch_source(names: Sequence[str], symbolic: Sequence[bool], given: bool) -> str:
    if not any(symbolic):
        return "static in the models"
    static = [n for n, sym in zip(names, symbolic, strict=True) if not sym]
    if static:
        return (f"static in {', '.join(static)}; the others' symbolic batch bound to it")
    return ("the models' batch is symbolic, bound by --batch" if given else
            "the models' batch is symbolic, bound to 1 by default; set it with --batch")


def _static_batch(model: ModelProto) -> int | None:
    """The leading dim of the model's first graph input, when it is static."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and len(dims):
            return int(dims[0].dim_value) if dims[0].HasField("dim_value") else None
    return None


def _batch_of(sess: Any) -> int | None:
    """The leading dim of the session's first input (every input is static here)."""
    for i in sess.get_inputs():
        if i.shape and isinstance(i.shape[0], int):
            return int(i.shape[0])
    return None


def benchmark(models: Sequence[tuple[str, ModelProto]], provider: str = "cpu",
              iters: int = 20, warmup: int = 3, threads: int = 0, seed: int = 0,
              batch: int | None = None) -> BenchReport:
    """Time ``models`` (name, model) in alternation; the first is the baseline.

    ``batch`` binds a symbolic batch (default 1); a model whose batch is static must have
    that batch when one is given.
    """
    if iters < 1:
        raise InputError(f"iters must be >= 1, got {iters}")
    if batch is not None and batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    rt = ort("bench")
    ep = PROVIDERS[provider]
    if ep not in rt.get_available_providers():
        lim = env.runtime_limits()
        hint = (f"; install onnx-ssl's [gpu] extra (onnxruntime-gpu) in an environment of its "
                f"own on a machine with CUDA: {env.pip_install('gpu')}" if provider == "cuda"
                else "")
        raise InputError(f"{ep} is not available in {lim.name} {lim.version} (available: "
                         f"{', '.join(rt.get_available_providers())}){hint}")
    symbolic = [bool(symbolic_batch(m)) for _, m in models]
    # Without --batch, a symbolic batch takes a static model's batch (else 1), so that the
    # models compare on the same inputs.
    bound = batch or next((b for (_, m), sym in zip(models, symbolic, strict=True)
                           if not sym for b in [_static_batch(m)] if b), 1)
    timed = [bind_batch(m, bound) if sym else m for (_, m), sym in zip(models, symbolic,
                                                                      strict=True)]
    sessions = []
    feeds = None
    ran_at = None
    for (name, _), m, sym in zip(models, timed, symbolic, strict=True):
        so = rt.SessionOptions()
        so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        s = rt.InferenceSession(m.SerializeToString(), so, providers=[ep])
        own = _batch_of(s)
        if not sym and batch is not None and own is not None and own != batch:
            raise InputError(f"{name} has a static batch of {own}; --batch {batch} applies only "
                             f"to a model whose batch is symbolic")
        ran_at = ran_at if ran_at is not None else own
        f = random_inputs(s, seed)
        if feeds is not None and {k: v.shape for k, v in f.items()} != {
                k: v.shape for k, v in feeds.items()}:
            raise InputError(f"{name}: its inputs differ from the first model's; benchmark "
                             f"models with the same inputs")
        feeds = feeds or f
        sessions.append((name, s))
    assert feeds is not None
    times: list[list[float]] = [[] for _ in sessions]
    for _, s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    for _ in range(iters):
        for k, (_, s) in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    # MACs of the timed run: a symbolic batch is bound first (analyze alone would give MACs
    # per sample), so that static and dynamic models compare.
    macs = [analyze(m, kinds=()).macs for m in timed]
    stats = [np.percentile(np.array(t) * 1000, [0, 25, 50, 75, 100]) for t in times]
    base = float(stats[0][2])
    rows = []
    for (name, _), mm, st in zip(models, macs, stats, strict=True):
        lo, q1, med, q3, hi = (float(v) for v in st)
        rows.append(BenchRow(name, mm, med, q1, q3, lo, hi, base / med,
                             macs[0] / mm if mm else float("inf")))
    return BenchReport(tuple(rows), provider, ran_at if ran_at is not None else bound,
                       _batch_source([n for n, _ in models], symbolic, batch is not None),
                       threads, iters, warmup)


def time_pair(
    a: tuple[Any, Mapping[str, np.ndarray]],
    b: tuple[Any, Mapping[str, np.ndarray]],
    min_time: float = 0.4,
    rounds: int = 7,
) -> tuple[float, float]:
    """Median seconds per run of two (session, feeds) pairs, measured in alternating rounds
    so that load from other processes affects both alike."""
    inner = []
    for sess, feeds in (a, b):
        for _ in range(3):
            sess.run(None, dict(feeds))
        t = time.perf_counter()
        sess.run(None, dict(feeds))
        one = max(time.perf_counter() - t, 1e-6)
        inner.append(max(1, int(min_time / 2 / rounds / one)))
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for k, (sess, feeds) in enumerate((a, b)):
            t = time.perf_counter()
            for _ in range(inner[k]):
                sess.run(None, dict(feeds))
            times[k].append((time.perf_counter() - t) / inner[k])
    return float(np.median(times[0])), float(np.median(times[1]))
