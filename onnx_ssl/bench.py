"""``onnx-ssl bench``: measured ONNX Runtime latency of models against their MAC bound.

Models are timed in alternation in one process (so machine noise hits all alike), with all
graph optimisations on; the report gives each model's median latency, its speed-up over the
first model, its MAC reduction (the "FLOP bound": the speed-up a perfectly efficient kernel
would get) and the ratio of the two.

:func:`time_pair` times two (session, feeds) pairs in alternating rounds of calibrated
length; the SSL chain's measured speedups (:mod:`onnx_ssl.training.speedup`) use it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from . import env
from .analysis import analyze, bind_batch
from .errors import InputError
from .runtime import DYNAMIC_BATCH, ort, random_inputs
from .text import format_table

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class BenchRow:
    name: str
    macs: int
    latency_ms: float
    speedup: float
    mac_reduction: float

    @property
    def efficiency(self) -> float:
        return self.speedup / self.mac_reduction if self.mac_reduction else 0.0


def benchmark(models: Sequence[tuple[str, onnx.ModelProto]], provider: str = "cpu",
              iters: int = 20, warmup: int = 3, threads: int = 0, seed: int = 0
              ) -> list[BenchRow]:
    rt = ort("bench")
    ep = PROVIDERS[provider]
    if ep not in rt.get_available_providers():
        lim = env.runtime_limits()
        hint = ("; install onnx-ssl[gpu] (onnxruntime-gpu) in an environment of its own on a "
                "machine with CUDA" if provider == "cuda" else "")
        raise InputError(f"{ep} is not available in {lim.name} {lim.version} (available: "
                         f"{', '.join(rt.get_available_providers())}){hint}")
    sessions = []
    feeds = None
    for name, m in models:
        so = rt.SessionOptions()
        so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        s = rt.InferenceSession(m.SerializeToString(), so, providers=[ep])
        f = random_inputs(s, seed)
        if feeds is not None and {k: v.shape for k, v in f.items()} != {
                k: v.shape for k, v in feeds.items()}:
            raise InputError(f"{name}: its inputs differ from the first model's; benchmark "
                             f"models with the same inputs")
        feeds = feeds or f
        sessions.append((name, s))
    assert feeds is not None
    times: dict[str, list[float]] = {n: [] for n, _ in sessions}
    for _, s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    for _ in range(iters):
        for n, s in sessions:
            t = time.perf_counter()
            s.run(None, feeds)
            times[n].append(time.perf_counter() - t)
    # MACs of the timed run: a symbolic batch ran at DYNAMIC_BATCH (analyze alone gives
    # MACs per sample), so that static and dynamic models compare.
    macs = [analyze(bind_batch(m, DYNAMIC_BATCH), kinds=()).macs for _, m in models]
    base_lat = statistics.median(times[sessions[0][0]])
    rows = []
    for (name, _), mm in zip(models, macs, strict=True):
        lat = statistics.median(times[name])
        rows.append(BenchRow(name, mm, lat * 1000, base_lat / lat,
                             macs[0] / mm if mm else float("inf")))
    return rows


def format_rows(rows: Sequence[BenchRow], provider: str) -> str:
    head = ("model", "MACs", "latency (ms)", "speed-up", "MAC reduction (bound)",
            "speed-up / bound")
    body = [(r.name, f"{r.macs / 1e6:.1f} M", f"{r.latency_ms:.2f}", f"{r.speedup:.2f}x",
             f"{r.mac_reduction:.2f}x", f"{r.efficiency:.2f}") for r in rows]
    lines = format_table([head, *body])
    lines.append(f"(ONNX Runtime {PROVIDERS[provider]}, median of timed runs in alternation)")
    return "\n".join(lines)


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
