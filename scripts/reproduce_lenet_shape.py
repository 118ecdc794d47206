"""Reproduce the LeNet rows of Table 2 of Wen et al. 2016 (shape-wise sparsity) on real MNIST.

    python scripts/reproduce_lenet_shape.py [--data ../shared/data/mnist] [--out-dir out/shape]
    python scripts/reproduce_lenet_shape.py --fast --out-dir /tmp/shape   # the test's variant

Data: the folder of MNIST IDX files (only the 10,000-image test split is available offline
here): a seeded shuffle puts 8,000 images in training and 2,000 in the held-out set every
error is measured on (``--limit N`` uses the first N images only). Steps:

1. LeNet (Caffe's, from ``onnx_ssl.models``, static batch 1) trained from scratch with
   onnx-ssl's trainer: the baseline (LeNet 1);
2. for each run of ``--run``: ``onnx-ssl ssl BASELINE --lambda-shape X [--lambda-filter Y
   --lambda-channel Y] --finetune-epochs 0`` (proximal SGD, threshold, prune with its numeric
   check). Fine-tuning is skipped: it trains every weight the pruned model still holds, so it
   would grow the zero fibers back (only whole filters and channels are removed by ``prune``);
   the error reported is the pruned model's;
3. ``onnx-ssl prune RUN.onnx --lower auto --batch 1 --threads 1`` lowers the convs whose
   weights keep zero fibers; the lowered model's outputs are compared with the pruned
   model's on held-out images (the project's tolerance ``1e-6 + 1e-5 max|ref|``);
4. per conv: filter size (the non-zero columns ``W[:, c, m, k]`` of the weight matrix, out of
   C*K*K before pruning: conv1 25, conv2 500) before and after, FLOP (MACs) as % of the
   baseline conv, and the speed-up on ONNX Runtime CPU (1 thread, batch 1) of the conv alone
   as in ``benchmarks/bench_lowering.py`` (the whole layer in a one-layer model, the three
   models timed in alternation, the minimum over ``--iters`` runs): ``removal`` is what
   ``prune`` gives without ``--lower``, ``lowered`` what ``--lower auto`` chose; and the whole
   model the same way. The paper's figures are printed beside ours.

Takes about 3 minutes on two cores (``--fast``: about 6 s); writes ``summary.json`` to
``--out-dir``; exits 1 if a lowered model's outputs differ from the pruned model's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# Table 2 of the paper (LeNet on MNIST, shape-wise): filter size conv1 - conv2, CPU speed-up.
PAPER = [
    ("LeNet 1 (baseline)", "25 - 500", "1.00x - 1.00x"),
    ("LeNet 4 (SSL)", "21 - 41", "2.33x - 6.93x"),
    ("LeNet 5 (SSL)", "7 - 14", "5.19x - 10.82x"),
]
# Each run: the ssl lambdas (shape-wise alone, and with filter- and channel-wise).
DEFAULT_RUNS = ["shape=0.02", "shape=0.03,filter=0.01,channel=0.01"]
TOL = (1e-6, 1e-5)  # max |new - ref| <= 1e-6 + 1e-5 max |ref| (prune's numeric check)


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def conv_specs(model: onnx.ModelProto) -> dict[str, object]:
    """Every Conv of ``model`` (constant weight, static shapes) as a ConvSpec, by node name."""
    from onnx_ssl.passes.lower_sparse_conv import ConvSpec

    m = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*m.graph.value_info, *m.graph.input]}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    out: dict[str, object] = {}
    for n in m.graph.node:
        if n.op_type != "Conv":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        w = inits[n.input[1]].astype(np.float32)
        b = inits[n.input[2]].astype(np.float32) if len(n.input) > 2 and n.input[2] else None
        pads = tuple(a.get("pads", (0, 0, 0, 0)))
        out[n.name] = ConvSpec(w, b, int(a.get("group", 1)), tuple(a.get("strides", (1, 1))),
                               pads, tuple(a.get("dilations", (1, 1))),
                               tuple(shapes[n.input[0]][1:]))
    return out


def filter_size(w: np.ndarray) -> int:
    """Non-zero columns W[:, c, m, k] of the lowered weight matrix."""
    return int(np.count_nonzero(np.abs(w).reshape(w.shape[0], -1).max(axis=0)))


def nonzero_rows(w: np.ndarray) -> int:
    return int(np.count_nonzero(np.abs(w).reshape(w.shape[0], -1).max(axis=1)))


def run_batch1(model: onnx.ModelProto, xs: np.ndarray) -> np.ndarray:
    from onnx_ssl.runtime import ort

    rt = ort("reproduce_lenet_shape")
    s = rt.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    return np.concatenate([s.run(None, {i.name: x.reshape(1, *i.shape[1:])})[0] for x in xs])


def parse_run(spec: str) -> dict[str, float]:
    d = {}
    for part in spec.split(","):
        k, v = part.split("=")
        if k not in ("shape", "filter", "channel"):
            raise SystemExit(f"--run: unknown lambda {k!r} (shape, filter, channel)")
        d[k] = float(v)
    if "shape" not in d:
        raise SystemExit(f"--run {spec!r}: needs shape=X")
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--out-dir", default=None, help="models, reports and summary.json")
    ap.add_argument("--run", action="append", default=None,
                    help="ssl lambdas of one run, e.g. shape=0.06,filter=0.02,channel=0.02 "
                    f"(repeatable; default {' and '.join(DEFAULT_RUNS)})")
    ap.add_argument("--baseline", default=None,
                    help="a trained baseline .onnx to start from (default: train one)")
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only")
    ap.add_argument("--baseline-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20, help="SSL epochs")
    ap.add_argument("--iters", type=int, default=200, help="timing runs (the minimum)")
    ap.add_argument("--check-images", type=int, default=500,
                    help="held-out images the lowered model is compared on")
    ap.add_argument("--fast", action="store_true",
                    help="the test's variant: 1,000 images, 2 + 4 epochs, one run "
                    "(shape 0.3), 30 timings")
    ap.add_argument("--lower", default="auto",
                    help="prune --lower strategy (default auto: timed, batch 1, 1 thread)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    runs = [parse_run(r) for r in (args.run or DEFAULT_RUNS)]
    if args.fast:
        args.limit, args.baseline_epochs, args.epochs = 1000, 2, 4
        args.iters, args.check_images = 30, 50
        runs = runs[:1] if args.run else [{"shape": 0.3}]

    from bench_lowering import time_models
    from common import table
    from ssl_budget_lenet_mnist import load_mnist

    from onnx_ssl import models
    from onnx_ssl.graphutil import export
    from onnx_ssl.io import load_model, save_model, to_graph
    from onnx_ssl.passes.lower_sparse_conv import LowerSparseConvPass, layer_model
    from onnx_ssl.training.artifacts import ArtifactOptions, build_artifacts
    from onnx_ssl.training.chain import evaluate_model
    from onnx_ssl.training.trainer import TrainConfig, Trainer

    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory() if args.out_dir is None else None
    out = Path(args.out_dir) if args.out_dir else Path(tmp.name)  # type: ignore[union-attr]
    out.mkdir(parents=True, exist_ok=True)
    data, spec = load_mnist(args.data, args.limit, out)

    # 1. the baseline (the same split as ssl's: val_fraction 0.2, seed 0)
    baseline = out / "lenet_baseline.onnx"
    if args.baseline:
        base_model = load_model(Path(args.baseline))
        train, val = data.split(0.2, args.seed)
        base_err = evaluate_model(base_model, val)[1]
    else:
        with tempfile.TemporaryDirectory() as t:
            art = build_artifacts(models.build("lenet"), Path(t) / "base", ArtifactOptions(),
                                  name="lenet")
            base = Trainer(art, TrainConfig(epochs=args.baseline_epochs, lr=1e-3,
                                            val_fraction=0.2, seed=args.seed,
                                            save_state=False)).fit(data)
        assert base.model is not None and base.val is not None
        base_model, train, val, base_err = base.model, base.train, base.val, base.val_error
    save_model(base_model, baseline)
    n_train, n_val = len(train), len(val)
    _say(f"baseline: {n_train} training, {n_val} held-out images; held-out error "
         f"{100 * (base_err or 0):.2f}% ({time.perf_counter() - t0:.0f}s)")
    base_specs = conv_specs(base_model)
    xs = next(iter(val.x.values()))[: args.check_images].astype(np.float32)

    header = ("model", "held-out error", "layer", "filter size before", "filter size after",
              "filters after", "FLOP", "choice", "speed-up removal", "speed-up lowered",
              "paper filter size", "paper speed-up")
    rows = [header]
    whole = [("model", "MACs", "speed-up removal", "speed-up lowered (prune --lower auto)",
              "lowered = pruned")]
    summary: dict[str, object] = {"train_samples": n_train, "val_samples": n_val,
                                  "baseline_error": base_err, "runs": []}
    for li, (name, sp) in enumerate(base_specs.items()):
        fs = filter_size(sp.w)  # type: ignore[attr-defined]
        rows.append(("baseline" if li == 0 else "",
                     f"{100 * (base_err or 0):.2f}%" if li == 0 else "", name, str(fs), str(fs),
                     str(sp.w.shape[0]), "100%", "dense", "1.00x", "1.00x",  # type: ignore
                     PAPER[0][1].split(" - ")[li], "1.00x"))
    for k, lam in enumerate(runs):
        tag = "_".join(f"{a}{v:g}" for a, v in lam.items())
        ssl_out, lowered_out = out / f"lenet_{tag}.onnx", out / f"lenet_{tag}_lowered.onnx"
        cmd = [sys.executable, "-m", "onnx_ssl", "ssl", str(baseline), "--data", spec,
               "-o", str(ssl_out), "--report", str(out / f"{tag}.json"),
               "--epochs", str(args.epochs), "--finetune-epochs", "0", "--seed", str(args.seed)]
        for a, v in lam.items():
            cmd += [f"--lambda-{a}", str(v)]
        _say("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rep = json.loads((out / f"{tag}.json").read_text())
        low_cmd = [sys.executable, "-m", "onnx_ssl", "prune", str(ssl_out), "-o", str(lowered_out),
                   "--lower", args.lower, "--batch", "1", "--threads", "1", "--lower-cache", "",
                   "--report", str(out / f"{tag}_lowered.json")]
        _say("$ " + " ".join(low_cmd))
        subprocess.run(low_cmd, check=True, stdout=subprocess.DEVNULL)
        pruned, lowered = load_model(ssl_out), load_model(lowered_out)
        err = rep["error"]["final"]
        err_low = evaluate_model(lowered, val)[1]
        ref, new = run_batch1(pruned, xs), run_batch1(lowered, xs)
        diff = float(np.abs(new - ref).max())
        ok = diff <= TOL[0] + TOL[1] * float(np.abs(ref).max())
        low_rep = json.loads((out / f"{tag}_lowered.json").read_text())

        label = f"SSL {k + 1}: " + ", ".join(f"{a} {v:g}" for a, v in lam.items())
        specs = conv_specs(pruned)
        run_rows = []
        for li, (name, b) in enumerate(base_specs.items()):
            s = specs[name]
            fs_b, fs_a = filter_size(b.w), filter_size(s.w)  # type: ignore[attr-defined]
            rows_b, rows_a = nonzero_rows(b.w), nonzero_rows(s.w)  # type: ignore[attr-defined]
            hw_b = np.prod(b.out_hw)  # type: ignore[attr-defined]
            flop = rows_a * fs_a * np.prod(s.out_hw) / (rows_b * fs_b * hw_b)  # type: ignore
            dense = layer_model(b, "dense", 1)
            removal = layer_model(s, "dense", 1)
            res = LowerSparseConvPass(args.lower, batch=1, threads=1, cache_dir=None)(
                to_graph(removal))
            choice = res.report.lowered[0].strategy if res.report.lowered else "dense"
            t = time_models({"dense": dense, "removal": removal, "lowered": export(res.graph)},
                            args.iters, 1)
            s_rem, s_low = t["dense"] / t["removal"], t["dense"] / t["lowered"]
            pf = PAPER[min(k + 1, 2)]
            rows.append((label if li == 0 else "", f"{100 * err:.2f}%" if li == 0 else "",
                         name, str(fs_b), str(fs_a), str(rows_a), f"{100 * flop:.1f}%", choice,
                         f"{s_rem:.2f}x", f"{s_low:.2f}x", pf[1].split(" - ")[li],
                         pf[2].split(" - ")[li]))
            run_rows.append({"layer": name, "filter_size_before": fs_b, "filter_size_after": fs_a,
                             "filters_before": rows_b, "filters_after": rows_a,
                             "flop_fraction": flop, "choice": choice, "ms": t,
                             "speedup_removal": s_rem, "speedup_lowered": s_low})
            _say(" | ".join(rows[-1]))
        t = time_models({"baseline": base_model, "removal": pruned, "lowered": lowered},
                        args.iters, 1)
        whole.append((label, f"{100 * rep['macs_after'] / rep['macs_before']:.1f}%",
                      f"{t['baseline'] / t['removal']:.2f}x",
                      f"{t['baseline'] / t['lowered']:.2f}x",
                      f"{'yes' if ok else 'NO'} (max diff {diff:.1e}, error "
                      f"{100 * (err_low or 0):.2f}%)"))
        summary["runs"].append({  # type: ignore[attr-defined]
            "lambdas": lam, "error": err, "error_ssl": rep["error"]["ssl"],
            "error_lowered": err_low, "max_diff": diff, "lowered_equal": ok,
            "lowering": [p for p in low_rep["passes"] if p["name"] == "lower-sparse-conv"],
            "layers": run_rows, "model_ms": t})
    text = (f"LeNet on MNIST, shape-wise SSL ({len(data)} images of the test split: {n_train} "
            f"for training, {n_val} held out; errors on the held-out images; ORT CPU, "
            f"1 thread, batch 1, minimum of {args.iters} runs)\n\n{table(rows)}\n\n"
            f"whole model:\n\n{table(whole)}\n")
    print(text)
    print(f"total time {time.perf_counter() - t0:.0f}s")
    summary["table"] = text
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(r["lowered_equal"] for r in summary["runs"]) else 1  # type: ignore


if __name__ == "__main__":
    sys.exit(main())
