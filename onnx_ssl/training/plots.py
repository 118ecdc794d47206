"""Figures of an SSL run (``ssl --plots DIR``, ``demo --plots DIR``; needs matplotlib, the
``[plots]`` extra):

- ``conv1_filters.png``: the first convolution's filters before SSL and after it (the
  thresholded weights, before pruning, so a removed filter shows as a blank tile), as in
  Figures 3 and 5 of Wen et al. 2016; each tile is one filter summed over its input
  channels, on a grey scale symmetric about 0 and shared by the row;
- ``zero_groups.png``: the fraction of exactly-zero groups per layer and structure over
  the SSL epochs;
- ``error_vs_macs.png``: held-out error against the projected MACs after each SSL epoch,
  with the input model and the final (pruned, fine-tuned) model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_ssl import env
from onnx_ssl.errors import InputError

from .trainer import EpochStats

FILES = ("conv1_filters.png", "zero_groups.png", "error_vs_macs.png")


def require_matplotlib() -> Any:
    """matplotlib.pyplot with the Agg backend, or a one-line error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError(
            f"--plots needs matplotlib, in onnx-ssl's [plots] extra: {env.pip_install('plots')}"
        ) from e
    return plt


def first_conv_weight(model: onnx.ModelProto, blank_dead: bool = False) -> np.ndarray | None:
    """The weight of the model's first Conv node (in node order), or None. With
    ``blank_dead``, filters whose channel pruning removes (every slice of the channel's
    group on one side is zero, e.g. the next layer no longer reads it) are set to zero."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]]).copy()
            if blank_dead:
                for c in _dead_channels(model, n.input[1]):
                    w[c] = 0
            return w
    return None


def _dead_channels(model: onnx.ModelProto, weight: str) -> list[int]:
    from onnx_ssl.analysis import analyze

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dead = []
    for g in analyze(model, kinds=("channel",)).groups:
        if not g.prunable or g.index is None:
            continue
        if not any(m.tensor == weight and m.role == "out" for m in g.members):
            continue
        for role in ("out", "in"):
            ms = [m for m in g.members if m.role == role and m.tensor in arrays]
            if ms and all(not np.any(arrays[m.tensor][m.index(arrays[m.tensor].shape)])
                          for m in ms):
                dead.append(g.index)
                break
    return dead


# Exact zeros in the filter grids: a colour no grey level of the filters can take.
ZERO_COLOUR = "#ff9900"


def plot_filter_rows(plt: Any, rows: Sequence[tuple[str, np.ndarray]], title: str,
                     path: Path) -> None:
    """One row of tiles per ``(label, W)``: each filter of ``W`` [N, C, kh, kw] summed over
    its input channels, in grey on a symmetric scale, its exact zeros in ``ZERO_COLOUR``."""
    n = max(w.shape[0] for _, w in rows)
    cmap = plt.get_cmap("gray").with_extremes(bad=ZERO_COLOUR)
    fig, axes = plt.subplots(len(rows), n, figsize=(0.55 * n + 1.6, 0.62 * len(rows) + 0.5),
                             squeeze=False)
    for r, (label, w) in enumerate(rows):
        tiles = w.sum(axis=1)
        lim = float(np.abs(tiles).max()) or 1.0
        for k in range(n):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(tiles):
                ax.imshow(np.ma.masked_equal(tiles[k], 0.0), cmap=cmap, vmin=-lim, vmax=lim)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{title} (orange: exactly zero)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_conv1(plt: Any, before: onnx.ModelProto, after: onnx.ModelProto, path: Path) -> None:
    found = [("before SSL", first_conv_weight(before)),
             ("after SSL", first_conv_weight(after, blank_dead=True))]
    rows = []
    for title, w in found:
        if w is not None:
            kept = int(np.sum(np.any(w.reshape(w.shape[0], -1) != 0, axis=1)))
            rows.append((f"{title}\n{kept}/{len(w)} kept", w))
    if rows:
        plot_filter_rows(plt, rows, "conv1 filters", path)


def plot_zero_groups(plt: Any, history: Sequence[EpochStats], path: Path) -> None:
    keys: dict[str, None] = {}
    for h in history:
        keys.update(dict.fromkeys(k for k, _ in h.zero_groups))
    shown = [k for k in keys if any(dict(h.zero_groups).get(k, 0) > 0 for h in history)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = [h.epoch for h in history]
    for k in shown or list(keys)[:8]:
        ax.plot(epochs, [100 * dict(h.zero_groups).get(k, 0.0) for h in history],
                marker=".", label=k)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("SSL epoch")
    ax.set_ylabel("zero groups (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="structure:layer", title_fontsize=7)
    ax.set_title("fraction of zero groups per layer and kind", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_error_vs_macs(
    plt: Any,
    history: Sequence[EpochStats],
    path: Path,
    error_before: float | None,
    final: tuple[float, float | None] | None,
    target: float | None,
    fidelity_key: str | None = None,
) -> None:
    """Held-out error (or, with ``fidelity_key``, the log's ``fidelity:KIND:OUTPUT`` column:
    distillation without labels) against the projected MACs after each SSL epoch."""
    pts: list[tuple[float, float, int]] = []
    for h in history:
        m = dict(h.extra).get("projected_macs")
        e = h.val_error if fidelity_key is None else dict(h.fidelity).get(fidelity_key)
        if m is not None and e is not None:
            pts.append((m, e, h.epoch))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if pts:
        ax.plot([100 * m for m, _, _ in pts], [100 * e for _, e, _ in pts], "-o", ms=3,
                label="after each SSL epoch (projected)")
        for m, e, k in (pts[0], pts[-1]):
            ax.annotate(f"epoch {k}", (100 * m, 100 * e), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    if error_before is not None:
        ax.plot([100], [100 * error_before], "ks", label="input model")
    if final is not None and final[1] is not None:
        ax.plot([100 * final[0]], [100 * final[1]], "r*", ms=11, label="pruned + fine-tuned")
    if target is not None:
        ax.axvline(100 * target, color="gray", ls="--", lw=1, label="MAC target")
    ax.set_xlabel("MACs (% of the input model)")
    if fidelity_key is None:
        ax.set_ylabel("held-out error (%)")
    else:
        _, kind, output = fidelity_key.split(":", 2)
        ax.set_ylabel(f"held-out fidelity to the input model\n({kind} of {output}, x100)")
    ax.set_xlim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{'error' if fidelity_key is None else 'fidelity'} against MACs across "
                 f"the run", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_plots(
    folder: str | Path,
    before: onnx.ModelProto,
    result: Any,
) -> list[Path]:
    """Write the three figures of an :class:`~onnx_ssl.training.chain.SslResult` into
    ``folder`` (created); returns their paths."""
    plt = require_matplotlib()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rep = result.report
    paths = [out / f for f in FILES]
    plot_conv1(plt, before, result.thresholded or result.model, paths[0])
    plot_zero_groups(plt, rep.ssl_history, paths[1])
    mf = rep.macs_after / rep.macs_before if rep.macs_before else 1.0
    fid = dict(getattr(rep, "fidelity", ()))
    if rep.error_before is None and fid.get("final"):
        # Distillation without labels: the fidelity of the first output instead of the error.
        first = fid["final"][0]
        before_f = next((f.value for f in fid.get("before", ()) if f.output == first.output),
                        None)
        plot_error_vs_macs(plt, rep.ssl_history, paths[2], before_f, (mf, first.value),
                           rep.options.target_macs, fidelity_key=first.key)
    else:
        plot_error_vs_macs(plt, rep.ssl_history, paths[2], rep.error_before,
                           (mf, rep.error_final), rep.options.target_macs)
    return [p for p in paths if p.exists()]
