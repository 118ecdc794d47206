"""Prune speed and peak memory, and the pruned ResNet-50's ONNX Runtime CPU latency against
its MACs and against the same network pruned by Torch-Pruning.

    python benchmarks/bench_prune.py              # needs torch, transformers, torch-pruning
    mkdir /tmp/before && git archive HEAD | tar -x -C /tmp/before   # the code before
    python benchmarks/bench_prune.py --skip-latency --before /tmp/before

1. Speed and memory: analyse + prune of HF ResNet-50 with half the channels of every
   prunable space zeroed, of residual chains of about 1k to 10k nodes (half zeroed; and with
   only the filters zeroed, what SSL training leaves: BatchNorm shifts stay, so every removed
   channel carries a constant through a padded conv and is folded into per-position bias
   maps; and with every residual branch's weights zeroed, what depth-wise SSL leaves: each
   branch collapses into a constant added to its shortcut), and of a wide chain with about
   200 MB of weights (with the default numeric check).
   Each prune runs in a child process of its own, once per code tree (``--before DIR``: the
   checkout of an earlier commit, put first on PYTHONPATH; and this one), alternating on the
   same machine in one run. The child imports onnx-ssl and ONNX Runtime, warms up on a tiny
   chain, reads its idle RSS, loads the model, resets its peak RSS (``/proc/self/clear_refs``)
   and prunes ``--repeat`` times: median wall time and CPU time, peak RSS (VmHWM, the loaded
   input model included) and (peak - idle) / weights. Then, as a reference for what the
   machine gives linear code at that graph size, the CPU time of a plain walk over the
   graph (:func:`_walk`) per 1000 nodes.
2. Latency: the same ResNet-50 (random weights, HF ``ResNetConfig()``), half the channels of
   every prunable space zeroed (``out`` and ``in`` members), pruned by onnx-ssl; ONNX
   Runtime CPU, all graph optimisations, 1 and 2 intra-op threads, batch 1 and 8; the
   original and the pruned models are timed in alternation in the same run (median).
   Target (issue 3): latency reduction >= 0.9 x MAC reduction at batch 1.
3. Torch-Pruning (``MagnitudePruner``, 50% per group, classifier ignored) on the same torch
   network, exported with the same exporter, timed in the same loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, chain, export_torch, hf_resnet50_module, resnet50, table  # noqa: E402

from onnx_ssl.analysis import analyze, prepare  # noqa: E402
from onnx_ssl.compiler import prune  # noqa: E402
from onnx_ssl.groups import Analysis  # noqa: E402
from onnx_ssl.runtime import session  # noqa: E402


def zero_half(model: onnx.ModelProto, seed: int = 0, side: str = "both"
              ) -> tuple[onnx.ModelProto, Analysis]:
    """Zero a random half of the channels of every prunable space: ``both`` zeroes the out and
    in members; ``filter`` only the layers' filters (what SSL training leaves: BatchNorm
    shifts and biases stay, so every zeroed channel carries a non-zero constant)."""
    m = prepare(model)
    a = analyze(m, prepared=True)
    rng = np.random.default_rng(seed)
    arrs = {t.name: onnx.numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    weights = {n.input[1] for n in m.graph.node
               if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1}
    for sp in a.spaces:
        if not sp.prunable:
            continue
        groups = [g for g in a.groups if g.kind == "channel" and g.space == sp.id]
        for i in rng.choice(len(groups), size=len(groups) // 2, replace=False):
            for mem in groups[i].members:
                if mem.role == "stat" or (side == "filter" and not (
                        mem.role == "out" and mem.tensor in weights)):
                    continue
                v = arrs[mem.tensor]
                v[mem.index(v.shape)] = 0
    for t in m.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(arrs[t.name], t.name))
    return m, a


def zero_branches(model: onnx.ModelProto) -> onnx.ModelProto:
    """Zero the layer weights of every prunable residual branch, what depth-wise SSL leaves:
    their BatchNorm shifts stay, so each branch's output is a non-zero constant that prune
    folds into its Add (one constant per branch)."""
    m = prepare(model)
    a = analyze(m, kinds=("depth",), prepared=True)
    weights = {n.input[1] for n in m.graph.node
               if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1}
    zero = {mem.tensor for g in a.groups if g.kind == "depth" and g.prunable
            for mem in g.members if mem.tensor in weights}
    for t in m.graph.initializer:
        if t.name in zero:
            v = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(v), t.name))
    return m


def macs(model: onnx.ModelProto) -> int:
    return analyze(model).macs


def latency(models: dict[str, onnx.ModelProto], batch: int, iters: int, threads: int
            ) -> dict[str, float]:
    sessions = {name: session(m, optimize=True, threads=threads) for name, m in models.items()}
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for s in sessions.values():
        for _ in range(2):
            s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(iters):
        for n, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: x})
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) * 1000 for n, v in times.items()}


def torch_pruning_model(batch: int) -> onnx.ModelProto | None:
    path = CACHE / f"hf_resnet50_tp50_b{batch}.onnx"
    if path.exists():
        return onnx.load(str(path))
    try:
        import torch
        import torch_pruning as tp
    except ImportError:
        print("torch-pruning is not installed; skipping the comparison", file=sys.stderr)
        return None
    module, x = hf_resnet50_module(batch)
    pruner = tp.pruner.MagnitudePruner(module, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[module.classifier])
    pruner.step()
    with torch.no_grad():
        module(x)
    return export_torch(module, x, path)


ROOT = Path(__file__).resolve().parents[1]
# The residual chain cases: how the chain is zeroed -> its name in the table.
CHAINS = {"both": "half zeroed", "filter": "filters zeroed, BN kept",
          "depth": "branches zeroed, BN kept"}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _weight_mb(model: onnx.ModelProto) -> float:
    """Initializer bytes from their dims (``ByteSize()`` would serialise the model)."""
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total / 2**20


def _walk(graph: gs.Graph) -> int:
    """A plain linear walk over ``graph``, like each of the many that a prune makes: every
    node's name, op and attributes, every tensor's name, shape and dtype."""
    seen: dict[str, object] = {}
    count = 0
    for n in graph.nodes:
        count += len(n.name) + len(n.op) + len(n.attrs)
        for t in (*n.inputs, *n.outputs):
            if t.name not in seen:
                seen[t.name] = (None if t.shape is None else tuple(t.shape), t.dtype)
    return count + len(seen)


def walk_seconds(model: onnx.ModelProto, repeat: int = 5) -> float:
    """Median CPU seconds of :func:`_walk` over ``model``'s graph: a reference for the time
    per node that the machine gives linear Python code on a graph of this size (a small
    graph stays in the CPU caches, a large one does not)."""
    graph = gs.import_onnx(model)
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        _walk(graph)
        times.append(time.process_time() - t0)
    return statistics.median(times)


def child(path: str, verify: int, repeat: int) -> dict[str, object]:
    """One prune measurement in this process (see the module docstring, item 1)."""
    import onnx_ssl
    from onnx_ssl.runtime import ort

    ort()
    warm, _ = zero_half(chain(2))
    prune(warm, verify=1)
    idle = _status_mb("VmRSS")
    model = onnx.load(path)
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on
        f.write("5")
    wall, cpu = [], []
    removed = 0
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        r = prune(model, verify=verify)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        removed = dict(r.report.passes)["remove-zero-channels"].to_json()["channels_removed"]
        del r
    peak = _status_mb("VmHWM")
    return {"code": str(Path(onnx_ssl.__file__).parent.parent), "wall": statistics.median(wall),
            "cpu": statistics.median(cpu), "idle_mb": idle, "peak_mb": peak,
            "weights_mb": _weight_mb(model), "nodes": len(model.graph.node),
            "removed": removed, "walk": walk_seconds(model)}


def _run_child(root: Path, path: Path, verify: int, repeat: int, timeout: float | None = None
               ) -> dict[str, object] | None:
    """The child's measurement, or None when it ran past ``timeout`` seconds."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--verify",
           str(verify), "--repeat", str(repeat)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if p.returncode != 0:
        raise RuntimeError(f"{root}: prune of {path.name} failed:\n{p.stderr[-2000:]}")
    out: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
    if Path(str(out["code"])).resolve() != root.resolve():
        raise RuntimeError(f"the child ran the code in {out['code']}, not {root}")
    return out


def speed_cases(args: argparse.Namespace) -> list[tuple[str, Path, int]]:
    """(name, model file, verify) of every case, written once to the cache."""
    folder = CACHE / "bench_prune"
    folder.mkdir(parents=True, exist_ok=True)
    out: list[tuple[str, Path, int]] = []

    def case(name: str, key: str, verify: int, make: Callable[[], onnx.ModelProto]) -> None:
        path = folder / f"{key}.onnx"
        if not path.exists():
            onnx.save_model(make(), str(path))
        out.append((name, path, verify))

    if not args.skip_resnet:
        case("HF ResNet-50, half zeroed", "resnet50_half", 0, lambda: zero_half(resnet50())[0])
    def zeroed_chain(blocks: int, side: str) -> Callable[[], onnx.ModelProto]:
        if side == "depth":
            return lambda: zero_branches(chain(blocks))
        return lambda: zero_half(chain(blocks), side=side)[0]

    for side, what in CHAINS.items():
        if side not in args.chains:
            continue
        for blocks in args.blocks:
            case(f"residual chain {blocks} blocks, {what}", f"chain{blocks}_{side}", 0,
                 zeroed_chain(blocks, side))
    if not args.skip_wide:
        case("wide chain (200 MB weights), half zeroed, numeric check", "wide42x256_both", 3,
             lambda: zero_half(chain(42, channels=256))[0])
    return out


def speed(args: argparse.Namespace) -> list[tuple[str, ...]]:
    roots = [("before", Path(args.before))] if args.before else []
    roots.append(("after", ROOT))
    rows: list[tuple[str, ...]] = [("graph", "nodes", "weights MiB", "verify",
                                    "channels removed",
             *(f"{n} s (cpu s)" for n, _ in roots), *(f"{n} s / 1k nodes" for n, _ in roots),
             *(["speed-up"] if args.before else []),
             *(f"{n} peak RSS MiB (x weights)" for n, _ in roots),
             "linear walk ms / 1k nodes")]
    limit = args.before_timeout
    for name, path, verify in speed_cases(args):
        res = {n: _run_child(root, path, verify, args.repeat, limit if n == "before" else None)
               for n, root in roots}
        for n, r in res.items():
            print(f"{name} [{n}]: " + (f"over {limit:.0f} s, stopped" if r is None else
                  f"{r['wall']:.2f} s, cpu {r['cpu']:.2f} s, peak {r['peak_mb']:.0f} MiB "
                  f"(idle {r['idle_mb']:.0f})"), file=sys.stderr)
        r0 = res["after"]
        assert r0 is not None
        nodes = int(str(r0["nodes"]))
        w = float(str(r0["weights_mb"]))

        def f(r: dict[str, object], k: str) -> float:
            return float(str(r[k]))

        def cells(r: dict[str, object] | None, nodes: int = nodes, w: float = w
                  ) -> tuple[str, str, str]:
            if r is None:  # stopped: its time is a lower bound, its memory unknown
                return f"> {limit:.0f} (stopped)", f"> {limit / nodes * 1000:.2f}", "-"
            rss = f"{f(r, 'peak_mb'):.0f}" + (
                f" ({(f(r, 'peak_mb') - f(r, 'idle_mb')) / w:.1f}x)" if w >= 10 else "")
            return (f"{f(r, 'wall'):.2f} ({f(r, 'cpu'):.2f})",
                    f"{f(r, 'wall') / nodes * 1000:.2f}", rss)

        c = [cells(r) for r in res.values()]
        before = res.get("before")
        speedup = ([] if not args.before else
                   [f"> {limit / f(r0, 'wall'):.1f}x"] if before is None else
                   [f"{f(before, 'wall') / f(r0, 'wall'):.2f}x"])
        rows.append((name, str(nodes), f"{w:.1f}", str(verify), str(r0["removed"]),
                     *(x[0] for x in c), *(x[1] for x in c), *speedup, *(x[2] for x in c),
                     f"{f(r0, 'walk') / nodes * 1e6:.2f}"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=1, help="timed prunes per case and code")
    ap.add_argument("--before", help="checkout of the code to compare with (git archive COMMIT "
                                     "| tar -x -C DIR); its prune runs with DIR first on "
                                     "PYTHONPATH")
    ap.add_argument("--before-timeout", type=float, default=300.0,
                    help="seconds after which a prune of the code before is stopped (its "
                         "time is then reported as a lower bound)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[143, 357, 715, 1430],
                    help="residual chain sizes (about 7 nodes a block)")
    ap.add_argument("--chains", nargs="+", choices=list(CHAINS), default=list(CHAINS),
                    help="residual chain cases: half the channels zeroed (both), only their "
                         "filters (filter), or every residual branch's weights (depth)")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-wide", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--verify", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=20, help="timed runs per model at batch 1")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="intra-op thread counts to time (default 1 2)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.verify, args.repeat)))
        return 0
    if not args.skip_speed:
        print(table(speed(args)))
        print()
    if args.skip_latency:
        return 0
    rows: list[tuple[str, ...]] = [
        ("batch", "threads", "model", "MACs", "MAC reduction", "latency (ms)", "speed-up",
         "speed-up / MAC reduction")]
    for batch, iters in ((1, args.iters), (8, max(3, args.iters // 4))):
        original = resnet50(batch)
        zeroed, _ = zero_half(original)
        t0 = time.perf_counter()
        pruned = prune(zeroed, verify=1).model
        print(f"batch {batch}: pruned and verified in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        models = {"original": original, "onnx-ssl (half zeroed, pruned)": pruned}
        tp_model = torch_pruning_model(batch)
        if tp_model is not None:
            models["Torch-Pruning 50% per group"] = tp_model
        base_macs = macs(original)
        for threads in args.threads:
            lat = latency(models, batch, iters, threads)
            for name, m in models.items():
                mm = macs(m)
                red = base_macs / mm
                sp = lat["original"] / lat[name]
                rows.append((str(batch), str(threads), name, f"{mm / 1e9:.3f} G", f"{red:.2f}x",
                             f"{lat[name]:.1f}", f"{sp:.2f}x", f"{sp / red:.2f}"))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
