"""The pruned ResNet-50 on several ONNX Runtime builds side by side, in one run.

    python benchmarks/bench_runtimes.py --python .venv/bin/python --python .venv-core/bin/python
    python benchmarks/bench_runtimes.py --provider cuda --batches 1 8 32 --threads 0 \\
        --python .venv-gpu/bin/python          # in an `onnx-ssl[gpu]` environment

The parent process (an environment with torch and transformers, or with the exports already
in the bench cache) builds HF ResNet-50 (``ResNetConfig()``, random weights), zeroes a random
half of the channels of every prunable space, and prunes it with onnx-ssl (numerically
checked), as ``bench_prune.py`` does. Each ``--python`` interpreter (an environment with
onnx-ssl and one ONNX Runtime) runs a worker process that opens both models with all graph
optimisations. The workers are timed in alternation: every round runs each model once in each
worker, one after the other, so machine noise falls on all runtimes alike (the workers' thread
pools do not spin while they wait, or an idle worker would take the cores of the one that
runs; single-process timings with spinning are in ``bench_prune.py``). The table gives,
per runtime, batch and thread count: the median latency, the speed-up of the pruned model,
its MAC reduction (the bound a perfectly efficient kernel would reach) and their ratio, and
each runtime's latency relative to the first one's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# --- worker (runs in each runtime's environment) ---------------------------------------------


def worker() -> int:
    """Answer JSON commands on stdin, one per line: open, time, quit."""
    from onnx_ssl import env
    from onnx_ssl.runtime import ort

    rt = ort("the benchmark")
    sessions: dict[str, Any] = {}
    feeds: dict[str, Any] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "open":
            sessions.clear()
            so = rt.SessionOptions()
            so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
            if cmd["threads"]:
                so.intra_op_num_threads = cmd["threads"]
            so.inter_op_num_threads = 1
            # An idle worker's spinning pool threads would steal the cores of the one that
            # runs: no spinning, in every worker alike.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.log_severity_level = 3
            providers = [cmd["provider"]]
            if cmd["provider"] not in rt.get_available_providers():
                reply = {"error": f"{cmd['provider']} is not available in "
                                  f"{env.runtime_limits().describe()}"}
                print(json.dumps(reply), flush=True)
                continue
            x = np.random.default_rng(0).standard_normal(cmd["shape"]).astype(np.float32)
            for name, path in cmd["models"].items():
                s = rt.InferenceSession(path, so, providers=providers)
                sessions[name] = s
                feeds[name] = {s.get_inputs()[0].name: x}
                for _ in range(cmd["warmup"]):
                    s.run(None, feeds[name])
            lim = env.runtime_limits()
            print(json.dumps({"runtime": f"{lim.name} {lim.version}",
                              "python": sys.version.split()[0]}), flush=True)
        elif cmd["op"] == "time":
            out = {}
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds[name])
                out[name] = time.perf_counter() - t
            print(json.dumps(out), flush=True)
        elif cmd["op"] == "quit":
            break
    return 0


# --- parent -----------------------------------------------------------------------------------


class Worker:
    def __init__(self, python: str) -> None:
        self.python = python
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker in {self.python} stopped")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.python}: {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.ask_nowait({"op": "quit"})
        finally:
            self.proc.wait(timeout=30)

    def ask_nowait(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.close()


def models_for(batch: int) -> tuple[dict[str, Path], dict[str, int]]:
    """original and pruned ResNet-50 at ``batch``, written to the bench cache; their MACs."""
    import onnx
    from bench_prune import zero_half
    from common import CACHE, resnet50

    from onnx_ssl.analysis import analyze
    from onnx_ssl.compiler import prune

    original_path = CACHE / f"hf_resnet50_b{batch}.onnx"
    pruned_path = CACHE / f"hf_resnet50_b{batch}_half_pruned.onnx"
    original = resnet50(batch)  # cached there
    if not pruned_path.exists():
        zeroed, _ = zero_half(original)
        pruned = prune(zeroed, verify=1).model
        onnx.save_model(pruned, str(pruned_path))
    pruned = onnx.load(str(pruned_path))
    macs = {"original": analyze(original).macs, "onnx-ssl pruned": analyze(pruned).macs}
    return {"original": original_path, "onnx-ssl pruned": pruned_path}, macs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--python", action="append", default=[],
                    help="interpreter of an environment with onnx-ssl and one ONNX Runtime "
                         "(repeat; default: this one)")
    ap.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="intra-op threads (0: the runtime's default)")
    ap.add_argument("--iters", type=int, default=20, help="rounds at batch 1 (fewer above)")
    args = ap.parse_args()
    if args.worker:
        return worker()
    from common import table

    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[args.provider]
    pythons = args.python or [sys.executable]
    workers = [Worker(p) for p in pythons]
    rows = [("runtime", "batch", "threads", "model", "MACs", "MAC reduction", "latency (ms)",
             "speed-up", "speed-up / MAC reduction", "latency vs first runtime")]
    try:
        for batch in args.batches:
            paths, macs = models_for(batch)
            iters = max(5, args.iters // max(1, batch // 2)) if args.provider == "cpu" \
                else args.iters
            for threads in args.threads:
                cmd = {"op": "open", "models": {k: str(v) for k, v in paths.items()},
                       "threads": threads, "provider": provider, "warmup": 2,
                       "shape": [batch, 3, 224, 224]}
                names = [w.ask(cmd)["runtime"] for w in workers]
                times: list[dict[str, list[float]]] = [{m: [] for m in paths} for _ in workers]
                for _ in range(iters):
                    for w, acc in zip(workers, times, strict=True):
                        for m, t in w.ask({"op": "time"}).items():
                            acc[m].append(t)
                first: dict[str, float] = {}
                for name, acc in zip(names, times, strict=True):
                    med = {m: statistics.median(v) * 1000 for m, v in acc.items()}
                    for m in paths:
                        red = macs["original"] / macs[m]
                        sp = med["original"] / med[m]
                        first.setdefault(m, med[m])
                        rows.append((name, str(batch), str(threads or "default"), m,
                                     f"{macs[m] / 1e9:.3f} G", f"{red:.2f}x", f"{med[m]:.1f}",
                                     f"{sp:.2f}x", f"{sp / red:.2f}",
                                     f"{med[m] / first[m]:.2f}x"))
                print(f"batch {batch}, threads {threads}: {iters} rounds done", file=sys.stderr)
    finally:
        for w in workers:
            w.close()
    print(f"ONNX Runtime {provider}, all graph optimisations, median of rounds in alternation")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
