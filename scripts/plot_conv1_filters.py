"""Figures 3 and 5 of Wen et al. 2016: the learned conv1 filters of LeNet, baseline and SSL.

    python scripts/plot_conv1_filters.py [--table1 out/lenet] [--table2 out/shape] \\
        [--out docs/figures/filters]

Reads the models that ``scripts/reproduce_lenet_mnist.py --out-dir out/lenet`` (Table 1,
filter-wise and channel-wise SSL, pruned and fine-tuned) and ``scripts/reproduce_lenet_shape.py
--out-dir out/shape`` (Table 2, shape-wise SSL, pruned, not fine-tuned) write: in each folder
``lenet_baseline.onnx`` and every other ``lenet_*.onnx`` but the lowered ones. Writes

- ``conv1_filter_channel.png`` (Figure 3) from ``--table1``;
- ``conv1_shape.png`` (Figure 5) from ``--table2``;

one row per model: its conv1 filters (each summed over its input channels, conv1 has one)
on a grey scale symmetric about 0 shared by the row, the weights that are exactly zero in
orange; the filters pruning removed are left out, so a row of the SSL models is shorter than
the baseline's, and a kernel whose border rows or columns are zero in every filter is shown
as prune stores it, without them (``ShrinkKernelsPass``: a 5x5 kernel may become 3x4); the row
label gives the filters and the kernel size. ``filters.json`` in ``--out`` lists, per figure
and row, the model, the filters kept, the kernel size and the non-zero weight positions (the
"filter size" of Table 2) per filter.
A folder that is missing is skipped with a message; exits 1 if neither is there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
FIGURES = {"table1": ("conv1_filter_channel.png", "Figure 3: filter-wise and channel-wise SSL"),
           "table2": ("conv1_shape.png", "Figure 5: shape-wise SSL")}


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def models_in(folder: Path) -> list[Path]:
    """``lenet_baseline.onnx`` first, then the other ``lenet_*.onnx`` (not lowered) by name."""
    others = sorted(p for p in folder.glob("lenet_*.onnx")
                    if p.name != "lenet_baseline.onnx" and not p.stem.endswith("_lowered")
                    and "last_good" not in p.name)
    base = folder / "lenet_baseline.onnx"
    return ([base] if base.exists() else []) + others


def conv1(model: onnx.ModelProto) -> np.ndarray:
    from onnx_ssl.training.plots import first_conv_weight

    w = first_conv_weight(model)
    if w is None:
        raise SystemExit(f"{model.graph.name}: no Conv with a constant weight")
    return w


def plot_rows(rows: list[tuple[str, np.ndarray]], title: str, path: Path) -> None:
    from onnx_ssl.training.plots import plot_filter_rows, require_matplotlib

    labelled = [(f"{label}\n{len(w)} filters {w.shape[2]}x{w.shape[3]}", w) for label, w in rows]
    plot_filter_rows(require_matplotlib(), labelled, f"LeNet conv1 on MNIST, {title}", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table1", default=str(REPO / "out" / "lenet"),
                    help="reproduce_lenet_mnist.py's --out-dir (Figure 3)")
    ap.add_argument("--table2", default=str(REPO / "out" / "shape"),
                    help="reproduce_lenet_shape.py's --out-dir (Figure 5)")
    ap.add_argument("--out", default=str(REPO / "docs" / "figures" / "filters"))
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for key, (name, title) in FIGURES.items():
        paths = models_in(Path(getattr(args, key)))
        if not paths:
            _say(f"--{key} {getattr(args, key)}: no lenet_*.onnx there; {name} skipped")
            continue
        rows = []
        for p in paths:
            w = conv1(onnx.load(p))
            rows.append((p.stem.removeprefix("lenet_"), w))
        plot_rows(rows, title, out / name)
        summary[key] = {"figure": name, "rows": [
            {"model": p.name, "label": label, "filters": int(w.shape[0]),
             "kernel": [int(d) for d in w.shape[2:]],
             "filter_sizes": [int(np.count_nonzero(f)) for f in w]}
            for p, (label, w) in zip(paths, rows, strict=True)]}
        _say(f"{out / name}: " + "; ".join(f"{lb} {w.shape[0]} filters" for lb, w in rows))
    if not summary:
        return 1
    (out / "filters.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
