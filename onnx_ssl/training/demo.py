"""The demo: the tool's main job on built-in data.

:func:`run_demo` trains LeNet from ``onnx_ssl.models`` as a baseline on scikit-learn's
digits (resized to 28x28), runs the SSL chain (:func:`onnx_ssl.training.chain.run_ssl`)
with filter-wise and channel-wise sparsity, and writes a table in the form of the paper's
Table 1 (:func:`table1`) with measured ONNX Runtime CPU speedups
(:func:`onnx_ssl.training.speedup.add_speedups`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from onnx_ssl.compiler import LayerStat
from onnx_ssl.io import ModelProto
from onnx_ssl.text import format_table as _table

from .artifacts import build_artifacts
from .chain import Notify, SslOptions, SslReport, SslResult, _in_phase, _pct, run_ssl
from .data import Dataset
from .penalty import CONV_OPS, Lambdas
from .spec import ArtifactOptions
from .speedup import add_speedups
from .trainer import ProgressEvent, TrainConfig, Trainer

log = logging.getLogger(__name__)

# The demo's digits give 23 steps per epoch: the proximal step needs a larger lambda to
# reach zero in 20 epochs (0.1 keeps the baseline error with about 9-33 filters).
DEMO_LAMBDA = 0.1


def demo_options(**kw: Any) -> SslOptions:
    """The chain's options for the demo (a larger lambda than for MNIST-size data)."""
    kw.setdefault("lambdas", Lambdas(filter=DEMO_LAMBDA, channel=DEMO_LAMBDA))
    return SslOptions(**kw)


@dataclass(frozen=True)
class DemoResult:
    baseline_error: float | None
    ssl: SslResult
    table: str
    seconds: float
    baseline: ModelProto | None = None


def table1(report: SslReport, baseline_error: float | None, conv_only: bool = True) -> str:
    """The paper's Table 1 layout: one row for the baseline, one for SSL; per conv layer the
    filters, channels, FLOP (as % of the baseline) and measured speedup."""
    rows_l = [r for r in report.layers if not conv_only or r.op in CONV_OPS]
    names = [r.node for r in rows_l]

    def per(f: Callable[[LayerStat], str]) -> str:
        return " - ".join(f(r) for r in rows_l)

    header = (
        "",
        "error",
        f"filters ({', '.join(names)})",
        "channels",
        "FLOP",
        "speedup (measured)",
        "model speedup",
    )
    base = (
        "baseline",
        _pct(baseline_error),
        per(lambda r: str(r.filters_before)),
        per(lambda r: str(r.channels_before)),
        per(lambda r: "100%"),
        per(lambda r: "1.00x"),
        "1.00x",
    )
    ssl = (
        "SSL",
        _pct(report.error_final),
        per(lambda r: str(r.filters_after)),
        per(lambda r: str(r.channels_after)),
        per(lambda r: f"{r.mac_fraction:.1%}"),
        per(lambda r: "-" if r.speedup is None else f"{r.speedup:.2f}x"),
        "-" if report.speedup is None else f"{report.speedup:.2f}x",
    )
    lines = _table([header, base, ssl])
    return "\n".join(lines)


def run_demo(
    *,
    data: Dataset | None = None,
    baseline_epochs: int = 10,
    options: SslOptions | None = None,
    output: str | Path | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    notify: Notify | None = None,
    timing_batch: int = 64,
    seed: int = 0,
) -> DemoResult:
    """LeNet on the digits: baseline, SSL chain with filter and channel sparsity, Table 1."""
    from onnx_ssl import models

    from .data import load_digits

    say = notify or (lambda msg: log.info("%s", msg))
    t0 = time.perf_counter()
    ds = data if data is not None else load_digits()
    opts = options or demo_options(seed=seed)
    lenet = models.build("lenet")
    train, val = ds.split(opts.val_fraction, opts.seed)
    with tempfile.TemporaryDirectory(prefix="onnx-ssl-demo-") as tmp:
        say(
            f"training a LeNet baseline on {ds.name} ({len(train)} training, {len(val)} "
            f"held-out samples, {baseline_epochs} epochs)"
        )
        art = build_artifacts(lenet, Path(tmp) / "baseline", ArtifactOptions(), name="lenet")
        base = Trainer(
            art,
            TrainConfig(
                epochs=baseline_epochs, lr=1e-3, val_fraction=0.0, seed=opts.seed, save_state=False
            ),
        ).fit(train, val, _in_phase(progress, "baseline"))
        assert base.model is not None
        baseline = base.model
    say(f"baseline held-out error {_pct(base.val_error)}")
    res = run_ssl(baseline, ds, opts, output=output, name="lenet", progress=progress, notify=notify)
    say("measuring ONNX Runtime CPU speedups")
    report = add_speedups(res.report, baseline, res.model, batch=timing_batch)
    res = replace(res, report=report)
    text = table1(report, base.val_error)
    return DemoResult(base.val_error, res, text, time.perf_counter() - t0, baseline)
