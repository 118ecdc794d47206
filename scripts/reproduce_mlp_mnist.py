"""Reproduce Table 3 and Figure 4 of Wen et al. 2016 (MLP, neuron-wise sparsity) on real MNIST.

    python scripts/reproduce_mlp_mnist.py [--data ../shared/data/mnist] [--out-dir out/mlp] \\
        [--figures docs/figures/mlp]
    python scripts/reproduce_mlp_mnist.py --fast --out-dir /tmp/mlp   # the test's variant

Data: the folder of MNIST IDX files (only the 10,000-image test split is available offline
here): a seeded shuffle puts 8,000 images in training and 2,000 in the held-out set every
error is measured on (``--limit N`` uses the first N images only). Steps:

1. the MLP 784-500-300-10 (``onnx_ssl.models`` ``mlp``: Gemm, Relu, Gemm, Relu, Gemm; static
   batch 1) trained from scratch with onnx-ssl's trainer (AdamW): the baseline;
2. for each ``--lambdas`` value, the SSL chain (:func:`onnx_ssl.training.chain.run_ssl`) with
   neuron-wise group Lasso only: one group per row and one per column of every FC weight, so
   the columns of fc1 are the 784 input pixels (the paper's "neurons of the input layer");
   proximal SGD, threshold, prune (verified), fine-tune;
3. the thresholded model is pruned again here (``onnx_ssl.prune``, the same deterministic
   pass) to get the pruned model before fine-tuning, and its outputs are compared with the
   thresholded model's on the held-out images (tolerance ``1e-6 + 1e-5 max|ref|``). Pixels
   that no kept fc1 weight reads are dropped by a Gather after the graph input: the input
   stays 784 wide, the Gather keeps the pixels still read, and fc1 shrinks to them;
4. the table: held-out error, neurons per layer (input pixels read - fc1 outputs - fc2
   outputs, from the pruned model's weight shapes and Gather), FLOP (MACs) per Gemm as a
   fraction of the baseline's, and measured ONNX Runtime CPU latency (1 thread) of the
   whole model at batch 1 and 64 (the minimum over ``--iters`` runs each, models alternated)
   and the speed-up of each Gemm alone at batch 64, beside the paper's neurons per layer;
5. Figure 4: for each SSL run, a 28x28 image of how many fc1 weights (connections) each
   input pixel keeps in the pruned model (``--figures``, default ``OUT_DIR/figures``).

Takes about 5 minutes on two cores (``--fast``: about 10 s); writes ``summary.json`` to
``--out-dir``; exits 1 if a pruned model's outputs differ from the thresholded model's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

SIDE = 28  # MNIST images are 28x28 = 784 pixels
# Table 3 of the paper (MLP on MNIST): neurons per layer, input - hidden 1 - hidden 2.
PAPER = [("baseline", "784 - 500 - 300"), ("SSL", "469 - 294 - 166")]
DEFAULT_LAMBDAS = "0.001,0.0015"
FAST_LAMBDA = "0.02"
TOL = (1e-6, 1e-5)  # max |new - ref| <= 1e-6 + 1e-5 max |ref| (prune's numeric check)


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fc_weights(model: onnx.ModelProto) -> list[tuple[str, np.ndarray]]:
    """Every Gemm/MatMul with a constant weight, in node order, as (node, W[out, in])."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Gemm", "MatMul") or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MatMul" or not attrs.get("transB", 0):
            w = w.T  # MatMul and Gemm without transB store W[in, out]
        out.append((n.name, w))
    return out


def kept_pixels(model: onnx.ModelProto) -> np.ndarray:
    """The input features the model reads: the indices of a Gather on axis 1 right after the
    graph input (what prune inserts when some input features are no longer read), else all."""
    inp = model.graph.input[0]
    width = inp.type.tensor_type.shape.dim[1].dim_value
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[0] == inp.name:
            axis = next((onnx.helper.get_attribute_value(a) for a in n.attribute
                         if a.name == "axis"), 0)
            if axis != 1 or n.input[1] not in inits:
                raise ValueError(f"unexpected Gather {n.name} on the graph input")
            return numpy_helper.to_array(inits[n.input[1]]).astype(np.int64)
    return np.arange(width)


def neurons(model: onnx.ModelProto) -> list[int]:
    """Input pixels read, then the outputs of every FC layer but the last (the paper's
    "neurons per layer"), from the weight shapes; checks that they chain."""
    ws = fc_weights(model)
    pix = kept_pixels(model)
    if ws[0][1].shape[1] != len(pix):
        raise ValueError(f"fc1 reads {ws[0][1].shape[1]} features, the Gather keeps {len(pix)}")
    for (a, wa), (b, wb) in zip(ws, ws[1:], strict=False):
        if wa.shape[0] != wb.shape[1]:
            raise ValueError(f"{a} has {wa.shape[0]} outputs, {b} reads {wb.shape[1]}")
    return [len(pix), *(int(w.shape[0]) for _, w in ws[:-1])]


def connections(model: onnx.ModelProto) -> np.ndarray:
    """Per input pixel, the number of non-zero fc1 weights that read it (0 when pruned)."""
    counts = np.zeros(SIDE * SIDE, dtype=np.int64)
    counts[kept_pixels(model)] = np.count_nonzero(fc_weights(model)[0][1], axis=0)
    return counts


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy with ``batch`` as the first dim of the (2-D) input and output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in (*m.graph.input, *m.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    del m.graph.value_info[:]
    return m


def outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The model's outputs on ``x`` ([N, 784]), graph optimisations off."""
    from onnx_ssl.runtime import session

    s = session(with_batch(model, len(x)))
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def plot_connections(runs: list[dict[str, Any]], path: Path) -> None:
    """Figure 4: one 28x28 panel per SSL run, the connections each input pixel keeps."""
    from onnx_ssl.training.plots import require_matplotlib

    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.4 * len(runs), 3.6), squeeze=False)
    for ax, r in zip(axes[0], runs, strict=True):
        img = np.asarray(r["connections"]).reshape(SIDE, SIDE)
        im = ax.imshow(img, cmap="viridis", vmin=0, vmax=r["neurons_before"][1])
        ax.set_xticks([])
        ax.set_yticks([])
        gone = int(np.sum(img == 0))
        ax.set_title(f"lambda {r['lambda']:g}: {gone}/{img.size} pixels\n"
                     f"({100 * gone / img.size:.0f}%) have no connection", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fc1 weights kept")
    fig.suptitle("MLP on MNIST, neuron-wise SSL: connections of each input pixel", fontsize=10,
                 y=1.04)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--out-dir", default=None, help="models, reports and summary.json")
    ap.add_argument("--figures", default=None, help="Figure 4's folder (default OUT_DIR/figures)")
    ap.add_argument("--lambdas", default=None,
                    help=f"neuron lambda of each SSL run (default {DEFAULT_LAMBDAS})")
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only")
    ap.add_argument("--baseline-epochs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=40, help="SSL epochs")
    ap.add_argument("--lr", type=float, default=0.3, help="SSL learning rate (proximal SGD)")
    ap.add_argument("--batch-size", type=int, default=64, help="SSL and fine-tuning batch")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--iters", type=int, default=200, help="timing runs (the minimum)")
    ap.add_argument("--fast", action="store_true",
                    help="the test's variant: 600 images, 1 + 4 + 1 epochs, SSL batch 8, "
                    "lambda 0.02, 20 timings")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.fast:
        args.limit, args.baseline_epochs, args.epochs, args.finetune_epochs = 600, 1, 4, 1
        args.iters, args.batch_size = 20, 8
        args.lambdas = args.lambdas or FAST_LAMBDA
    lambdas = [float(v) for v in (args.lambdas or DEFAULT_LAMBDAS).split(",")]

    from bench_lowering import time_models
    from common import table

    from onnx_ssl import models, prune
    from onnx_ssl.io import save_model
    from onnx_ssl.training.artifacts import ArtifactOptions, build_artifacts
    from onnx_ssl.training.chain import SslOptions, add_speedups, evaluate_model, run_ssl
    from onnx_ssl.training.data import load_idx_folder
    from onnx_ssl.training.penalty import Lambdas
    from onnx_ssl.training.trainer import TrainConfig, Trainer

    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory() if args.out_dir is None else None
    out = Path(args.out_dir) if args.out_dir else Path(tmp.name)  # type: ignore[union-attr]
    out.mkdir(parents=True, exist_ok=True)
    figures = Path(args.figures) if args.figures else out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    data = load_idx_folder(Path(args.data))
    if args.limit:
        data = data.subset(np.arange(args.limit), f"{data.name}[:{args.limit}]")

    # 1. the baseline (the same split as run_ssl's: val_fraction 0.2, seed)
    with tempfile.TemporaryDirectory() as t:
        art = build_artifacts(models.build("mlp"), Path(t) / "base", ArtifactOptions(),
                              name="mlp")
        base = Trainer(art, TrainConfig(epochs=args.baseline_epochs, lr=1e-3, val_fraction=0.2,
                                        seed=args.seed, save_state=False)).fit(data)
    assert base.model is not None and base.val is not None
    baseline, val, base_err = base.model, base.val, base.val_error or 0.0
    save_model(baseline, out / "mlp_baseline.onnx")
    n_train, n_val = len(base.train), len(val)
    _say(f"baseline: {n_train} training, {n_val} held-out images; held-out error "
         f"{100 * base_err:.2f}% ({time.perf_counter() - t0:.0f}s)")
    xs = next(iter(val.x.values())).reshape(len(val), -1).astype(np.float32)
    base_neurons = neurons(baseline)
    base_fc = fc_weights(baseline)

    header = ("model", "held-out error", "neurons (input - fc1 - fc2)", "FLOP fc1 - fc2 - fc3",
              "Gemm speed-up, batch 64", "latency batch 1 (ms)", "speed-up batch 1",
              "latency batch 64 (ms)", "speed-up batch 64", "paper neurons")
    rows = [header]
    summary: dict[str, Any] = {"train_samples": n_train, "val_samples": n_val,
                               "baseline_error": base_err, "neurons_before": base_neurons,
                               "layers": [n for n, _ in base_fc], "runs": []}
    runs: list[dict[str, Any]] = []
    for k, lam in enumerate(lambdas):
        opts = SslOptions(lambdas=Lambdas(neuron=lam), epochs=args.epochs, lr=args.lr,
                          finetune_epochs=args.finetune_epochs, batch_size=args.batch_size,
                          val_fraction=0.2, seed=args.seed)
        _say(f"SSL run {k + 1}: lambda neuron {lam:g}, {args.epochs} epochs lr {args.lr:g} "
             f"batch {args.batch_size}, "
             f"{args.finetune_epochs} fine-tuning epochs")
        res = run_ssl(baseline, data, opts, name="mlp", notify=_say,
                      output=out / f"mlp_ssl_{lam:g}.onnx")
        assert res.thresholded is not None
        save_model(res.thresholded, out / f"mlp_ssl_{lam:g}_thresholded.onnx")
        # The pruned model before fine-tuning: the same prune run_ssl ran, on real images.
        pruned = prune(res.thresholded, verify=2, seed=args.seed, name="mlp").model
        save_model(pruned, out / f"mlp_ssl_{lam:g}_pruned.onnx")
        ref, new = outputs(res.thresholded, xs), outputs(pruned, xs)
        diff = float(np.abs(new - ref).max())
        ok = diff <= TOL[0] + TOL[1] * float(np.abs(ref).max())
        err_pruned = evaluate_model(pruned, val)[1]
        final = res.model
        nrn = neurons(pruned)
        if neurons(final) != nrn or not np.array_equal(kept_pixels(final), kept_pixels(pruned)):
            raise SystemExit(f"lambda {lam:g}: fine-tuning changed the structure")
        rep = add_speedups(res.report, baseline, final, batch=64, threads=1)
        stats = {r.node: r for r in rep.layers}
        ms1 = time_models({"base": baseline, "ssl": final}, args.iters, 1)
        ms64 = time_models({"base": with_batch(baseline, 64), "ssl": with_batch(final, 64)},
                           args.iters, 1)
        conn = connections(pruned)
        macs = [stats[n].mac_fraction for n, _ in base_fc]
        speed = [stats[n].speedup for n, _ in base_fc]
        run = {"lambda": lam, "error": rep.error_final, "error_ssl": rep.error_ssl,
               "error_pruned": err_pruned, "error_pruned_in_chain": rep.error_pruned,
               "max_diff": diff, "pruned_equal": ok, "neurons_before": base_neurons,
               "neurons_after": nrn, "kept_pixels": kept_pixels(pruned).tolist(),
               "fc_shapes": {n: list(w.shape) for n, w in fc_weights(final)},
               "macs_before": rep.macs_before, "macs_after": rep.macs_after,
               "mac_fraction": macs, "speedup_layers": speed, "speedup_model": rep.speedup,
               "ms_batch1": ms1, "ms_batch64": ms64, "connections": conn.tolist(),
               "pixels_without_connection": int(np.sum(conn == 0))}
        runs.append(run)
        _say(f"lambda {lam:g}: neurons {nrn}, error {100 * (rep.error_final or 0):.2f}%, "
             f"pruned = thresholded: {ok} (max diff {diff:.1e})")
        if k == 0:
            rows.append(("baseline", f"{100 * base_err:.2f}%",
                         " - ".join(map(str, base_neurons)), "100% - 100% - 100%",
                         "1.00x - 1.00x - 1.00x", f"{ms1['base']:.3f}", "1.00x",
                         f"{ms64['base']:.3f}", "1.00x", PAPER[0][1]))
        rows.append((f"SSL, lambda {lam:g}", f"{100 * (rep.error_final or 0):.2f}%",
                     " - ".join(map(str, nrn)), " - ".join(f"{100 * m:.1f}%" for m in macs),
                     " - ".join("-" if s is None else f"{s:.2f}x" for s in speed),
                     f"{ms1['ssl']:.3f}", f"{ms1['base'] / ms1['ssl']:.2f}x",
                     f"{ms64['ssl']:.3f}", f"{ms64['base'] / ms64['ssl']:.2f}x", PAPER[1][1]))
    fig = figures / "input_connections.png"
    plot_connections(runs, fig)
    text = (f"MLP 784-500-300-10 on MNIST, neuron-wise SSL ({len(data)} images of the test "
            f"split: {n_train} for training, {n_val} held out; errors on the held-out images "
            f"after fine-tuning; ORT CPU, 1 thread, the minimum of {args.iters} runs at batch 1 "
            f"and at batch 64)\n\n{table(rows)}\n")
    print(text)
    for r in runs:
        print(f"lambda {r['lambda']:g}: {r['pixels_without_connection']} of {SIDE * SIDE} "
              f"pixels have no connection; error before fine-tuning "
              f"{100 * (r['error_pruned'] or 0):.2f}%; pruned = thresholded "
              f"(max diff {r['max_diff']:.1e}): {'yes' if r['pruned_equal'] else 'NO'}")
    print(f"Figure 4: {fig}\ntotal time {time.perf_counter() - t0:.0f}s")
    summary.update(runs=runs, table=text, figure=str(fig))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(r["pruned_equal"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
