"""Peers on the transformer exports: what onnxsim 0.8.1 and Torch-Pruning 1.6.1 prune structurally.

The README compares onnx-ssl's coverage of transformer exports with two peers; this script
measures the peers on the models of ``bench_transformers.py`` (``vit``, ``deit``, ``bert``,
``minilm``, ``gpt2``, ``llama``, ``qwen2``).

* **onnxsim 0.8.1** works on the cached ONNX exports (``~/.cache/onnx-ssl-bench/transformers``,
  made by ``bench_transformers.py``; TorchScript and dynamo, static and dynamic batch). It has no
  CLI flag for pruning; its Python API does: ``onnxsim.pruning.apply_attention_head_pruning``
  (heads / KV groups), ``apply_structured_pruning`` (MatMul/Gemm -> MatMul/Gemm channels, i.e.
  MLP hidden units) and ``apply_transformer_block_pruning`` (drops pre-norm residual
  sub-blocks, ranked on random calibration data run in ONNX Runtime). Each runs at
  ``--sparsity`` (heads, channels) and with ``num_blocks_to_drop`` = every sub-block (it is
  capped at the blocks it matches), on the export as it is (``raw``), after
  ``onnxsim.simplify`` (``sim``), and after ``simplify`` with its attention/GQA/GELU fusion
  passes (``fused``: head pruning is documented for fused Attention nodes). Heads and MLP
  units kept are counted from the pruned graph's weight shapes: MLP units from the weights
  with an axis of the config's intermediate size (2 per layer, 3 for gated MLPs), heads from
  the elements removed from the other 2-D MatMul/Gemm weights (q, k, v, o); blocks dropped
  from ``analyze_pruning_sensitivity``'s dry-run report, with the MatMul/Gemm count after
  and before. Each pruned model is run in ONNX Runtime.
  onnxsim needs its own environment (``--onnxsim-python``): this script runs itself there as a
  worker (``--onnxsim-worker``), so its module level imports only the standard library.
* **Torch-Pruning 1.6.1** works on the torch modules (``SPECS[name].build()``): its documented
  way for HF transformers, ``MetaPruner`` with ``num_heads`` (q/k/v linears -> head count),
  ``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio`` and
  ``pruning_ratio`` = ``--sparsity``, ``MagnitudeImportance(p=2)``, the embeddings ignored. Heads
  are counted from q's output width over the head dim, MLP units from the first MLP linear's
  width, the hidden size from the first LayerNorm; the pruned module is run on its example
  inputs. Torch-Pruning has no block (depth) pruning.

Usage::

    .venv/bin/python benchmarks/bench_peers_transformers.py [--models vit,bert,...]
        [--exporters ts,ts_dyn,dynamo,dynamo_dyn] [--onnxsim-python /tmp/vsim/bin/python]
        [--sparsity 0.5] [--cache DIR] [--out out/peers/peers.md] [--skip-onnxsim] [--skip-tp]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODELS = ("vit", "deit", "bert", "minilm", "gpt2", "llama", "qwen2")
EXPORTERS = ("ts", "ts_dyn", "dynamo", "dynamo_dyn")
OPSET = 18
VARIANTS = ("raw", "sim", "fused")
FUSERS = ("fuse_attention", "fuse_gqa", "fuse_gelu")
CACHE = Path.home() / ".cache" / "onnx-ssl-bench" / "transformers"


@dataclass(frozen=True)
class Config:
    """What the counts are measured against (the configs of ``bench_transformers.py``)."""

    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    vocab: int
    gated: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


CONFIGS: dict[str, Config] = {
    "vit": Config(64, 4, 4, 128, 2, 0),
    "deit": Config(64, 4, 4, 128, 2, 0),
    "bert": Config(64, 4, 4, 128, 2, 100),
    "minilm": Config(384, 12, 12, 1536, 6, 1000),
    "gpt2": Config(64, 4, 4, 256, 2, 100),
    "llama": Config(64, 4, 2, 128, 2, 100, gated=True),
    "qwen2": Config(64, 4, 2, 128, 2, 100, gated=True),
}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# --- onnxsim worker (runs in onnxsim's own environment) -------------------------------------


def _weights(model: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the 2-D float constants read by MatMul/Gemm (initializers or Constant nodes)."""
    consts: dict[str, tuple[int, ...]] = {i.name: tuple(i.dims) for i in model.graph.initializer
                                          if i.data_type in (1, 10, 16)}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in (1, 10, 16):
                    consts[n.output[0]] = tuple(a.t.dims)
    out = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            for name in n.input[:2]:
                if name in consts and len(consts[name]) == 2:
                    out[name] = consts[name]
    return out


def _count(before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]],
           cfg: Config) -> dict[str, Any]:
    """Heads and MLP units kept in ``after``, both counted against ``before``'s weights."""
    mlp_names = [k for k, s in before.items() if cfg.intermediate in s]
    per_mlp = 3 if cfg.gated else 2
    kept_units = 0
    for k in mlp_names:
        axis = before[k].index(cfg.intermediate)
        kept_units += after[k][axis] if k in after else 0
    attn_names = [k for k in before if k not in mlp_names]
    removed = sum(before[k][0] * before[k][1] - (after[k][0] * after[k][1] if k in after else 0)
                  for k in attn_names)
    hd = cfg.head_dim * cfg.hidden
    group = cfg.heads // cfg.kv_heads
    # One KV group holds `group` query heads: q and o lose group*hd elements each, k and v hd.
    heads_removed = round(removed * group / ((2 * group + 2) * hd)) if removed else 0
    total_heads = cfg.heads * cfg.layers
    return {"mlp_weights": len(mlp_names),
            "mlp_kept": kept_units // per_mlp, "mlp_total": cfg.intermediate * cfg.layers,
            "attn_elems_removed": removed,
            "heads_kept": total_heads - heads_removed, "heads_total": total_heads}


def _feeds(model: Any, cfg: Config, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        t = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in t.shape.dim]
        if t.elem_type == 7:  # int64
            if "mask" in i.name:
                feeds[i.name] = np.ones(shape, np.int64)
            elif "token_type" in i.name:
                feeds[i.name] = np.zeros(shape, np.int64)
            else:
                feeds[i.name] = rng.integers(0, max(cfg.vocab, 1), shape, dtype=np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _runs(model: Any, feeds: dict[str, Any]) -> str:
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        return "ok"
    except Exception as e:  # noqa: BLE001 - the peer's failure is the measurement
        return _one_line(e)


def _n_matmul(model: Any) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in model.graph.node)


def onnxsim_one(path: Path, cfg: Config, sparsity: float) -> dict[str, Any]:
    """onnxsim's head, channel and block pruning on one export, raw and simplified."""
    import onnx
    import onnxsim
    from onnxsim import pruning as P

    result: dict[str, Any] = {}
    raw = onnx.load(str(path))
    variants: dict[str, Any] = {"raw": raw}
    try:
        simp, ok = onnxsim.simplify(raw)
        variants["sim"] = simp
        result["simplify"] = "ok" if ok else "check failed"
    except Exception as e:  # noqa: BLE001
        result["simplify"] = _one_line(e)
    try:
        # Head pruning targets the Attention/GroupQueryAttention nodes these passes make.
        fused, ok = onnxsim.simplify(raw, extra_optimizers=list(FUSERS))
        variants["fused"] = fused
        result["fuse"] = "ok" if ok else "check failed"
        base = {n.op_type for n in variants.get("sim", raw).graph.node}
        result["fused_new_ops"] = sorted({n.op_type for n in fused.graph.node} - base)
    except Exception as e:  # noqa: BLE001
        result["fuse"] = _one_line(e)
    for tag, model in variants.items():
        feeds = _feeds(model, cfg)
        w0 = _weights(model)
        r: dict[str, Any] = {"runs_before": _runs(model, feeds)}
        for key, fn, kw in (
            ("heads", P.apply_attention_head_pruning, {"sparsity": sparsity}),
            ("mlp", P.apply_structured_pruning, {"sparsity": sparsity}),
            ("blocks", P.apply_transformer_block_pruning,
             {"calibration_data": [feeds], "num_blocks_to_drop": 2 * cfg.layers}),
        ):
            e: dict[str, Any] = {}
            t0 = time.perf_counter()
            try:
                rep = P.analyze_pruning_sensitivity(model, fn, **kw)
                e["report"] = [f"{x.family}:{x.label}:drop {x.would_drop}/{x.total}"
                               for x in rep.layers]
                if key == "blocks":
                    # One report entry lists the sub-blocks (attention, MLP) it drops.
                    e["blocks_dropped"] = sum(x.would_drop for x in rep.layers)
                    e["blocks_total"] = 2 * cfg.layers
                e["not_eligible"] = len(rep.not_eligible)
            except Exception as ex:  # noqa: BLE001
                e["report_error"] = _one_line(ex)
            try:
                pruned = fn(model, **kw)
                e["ran"] = True
                e.update(_count(w0, _weights(pruned), cfg))
                e["matmuls"] = f"{_n_matmul(pruned)}/{_n_matmul(model)}"
                e["runs_after"] = _runs(pruned, feeds)
            except Exception as ex:  # noqa: BLE001
                e["ran"] = False
                e["error"] = _one_line(ex)
                log.debug("onnxsim %s failed", key, exc_info=True)
            e["seconds"] = round(time.perf_counter() - t0, 2)
            r[key] = e
        result[tag] = r
    return result


def onnxsim_worker(jobs_path: Path) -> int:
    """Run the jobs in ``jobs_path`` (JSON list) and print one JSON object per job."""
    import onnx
    import onnxruntime
    import onnxsim

    versions = {"onnxsim": onnxsim.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    print(json.dumps({"versions": versions}), flush=True)
    for job in json.loads(jobs_path.read_text()):
        cfg = Config(**job["config"])
        t0 = time.perf_counter()
        try:
            res = onnxsim_one(Path(job["path"]), cfg, job["sparsity"])
        except Exception as e:  # noqa: BLE001
            res = {"error": _one_line(e), "trace": traceback.format_exc()[-2000:]}
        res.update(model=job["model"], exporter=job["exporter"],
                   seconds=round(time.perf_counter() - t0, 1))
        print(json.dumps(res), flush=True)
    return 0


# --- Torch-Pruning (runs in the project's environment) --------------------------------------


@dataclass
class TPRow:
    model: str
    heads: str = ""
    mlp: str = ""
    hidden: str = ""
    blocks: str = "not supported (no depth pruning in Torch-Pruning)"
    forward: str = ""
    error: str = ""
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


def _attn_linears(inner: Any) -> list[tuple[str, Any, Any, Any]]:
    """(name, q, k, v) for each attention; GPT-2 has one fused ``c_attn`` (q is k is v)."""
    out = []
    for name, m in inner.named_modules():
        if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            out.append((name, m.q_proj, m.k_proj, m.v_proj))
        elif hasattr(m, "query") and hasattr(m, "key"):
            out.append((name, m.query, m.key, m.value))
        elif hasattr(m, "c_attn"):
            out.append((name, m.c_attn, m.c_attn, m.c_attn))
    return out


def _mlp_first(inner: Any) -> list[Any]:
    out = []
    for name, m in inner.named_modules():
        for attr in ("fc1", "c_fc", "gate_proj"):
            if hasattr(m, attr) and "attn" not in name:
                out.append(getattr(m, attr))
        if name.endswith("intermediate") and hasattr(m, "dense"):
            out.append(m.dense)
    return out


def _width(m: Any, out: bool = True) -> int:
    if hasattr(m, "out_features"):
        return int(m.out_features if out else m.in_features)
    return int(m.weight.shape[1] if out else m.weight.shape[0])  # transformers' Conv1D


def tp_one(name: str, sparsity: float) -> TPRow:
    import bench_transformers as bt
    import torch
    import torch_pruning as tp

    row = TPRow(name)
    cfg = CONFIGS[name]
    t0 = time.perf_counter()
    module, args, _ = bt.SPECS[name].build()
    module.eval()
    inner = module.inner
    attn = _attn_linears(inner)
    mlps = _mlp_first(inner)
    fused = any(q is k for _, q, k, _ in attn)
    q_out0 = sum(_width(q) for _, q, _, _ in attn) // (3 if fused else 1)
    mlp0 = sum(_width(m) for m in mlps)
    hidden0 = next(m.normalized_shape[0] if hasattr(m, "normalized_shape") else m.weight.shape[0]
                   for m in inner.modules() if "Norm" in type(m).__name__)
    num_heads: dict[Any, int] = {}
    for _, q, k, v in attn:
        num_heads[q] = cfg.heads
        if k is not q:
            num_heads[k] = cfg.kv_heads
            num_heads[v] = cfg.kv_heads
    ignored = [m for m in inner.modules() if isinstance(m, torch.nn.Embedding)]
    row.detail = {"attention_modules": len(attn), "mlp_modules": len(mlps), "fused_qkv": fused}
    try:
        pruner = tp.pruner.MetaPruner(
            module, args, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=sparsity, num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=sparsity, ignored_layers=ignored)
        pruner.step()
    except Exception as e:  # noqa: BLE001 - the peer's failure is the measurement
        row.error = _one_line(e)
        row.detail["trace"] = traceback.format_exc()[-1500:]
    q_out = sum(_width(q) for _, q, _, _ in attn) // (3 if fused else 1)
    mlp1 = sum(_width(m) for m in mlps)
    hidden1 = next(m.normalized_shape[0] if hasattr(m, "normalized_shape") else m.weight.shape[0]
                   for m in inner.modules() if "Norm" in type(m).__name__)
    total_heads = cfg.heads * cfg.layers
    row.heads = f"{q_out // cfg.head_dim}/{total_heads}" + (
        "" if q_out % cfg.head_dim == 0 else f" (q width {q_out}/{q_out0})")
    row.mlp = f"{mlp1}/{mlp0}"
    row.hidden = f"{hidden1}/{hidden0}"
    try:
        with torch.no_grad():
            out = module(*args)
        row.forward = f"ok {tuple(out.shape)}"
    except Exception as e:  # noqa: BLE001
        row.forward = _one_line(e)
    row.seconds = round(time.perf_counter() - t0, 1)
    return row


def tp_worker(name: str, sparsity: float, timeout: float) -> int:
    """One model's Torch-Pruning run; dumps the stacks to stderr and exits if it hangs."""
    import faulthandler

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    faulthandler.dump_traceback_later(max(timeout - 10, 5), exit=True)
    try:
        row = tp_one(name, sparsity)
    except Exception as e:  # noqa: BLE001
        row = TPRow(name, error=_one_line(e), detail={"trace": traceback.format_exc()[-1500:]})
    faulthandler.cancel_dump_traceback_later()
    print("TPROW " + json.dumps(asdict(row)), flush=True)
    return 0


def run_tp(name: str, sparsity: float, timeout: float) -> TPRow:
    """``tp_one`` in a subprocess: a hang becomes a row with the stack it hung in."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--tp-worker", name,
           "--sparsity", str(sparsity), "--tp-timeout", str(timeout)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30,
                              check=False)
    except subprocess.TimeoutExpired:
        return TPRow(name, error=f"killed after {timeout + 30:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("TPROW "):
            return TPRow(**json.loads(line[6:]))
    # faulthandler's dump: the innermost frames of the main thread say where it hung.
    frames = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("File ")]
    return TPRow(name, error=f"no result after {time.perf_counter() - t0:.0f} s "
                 f"(exit {proc.returncode}); hung in: " + " <- ".join(frames[:3]),
                 detail={"stderr_tail": proc.stderr[-3000:]})


# --- driver ---------------------------------------------------------------------------------


def run_onnxsim(python: str, models: list[str], exporters: list[str], cache: Path,
                sparsity: float, out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    jobs = []
    missing = []
    for m in models:
        for ex in exporters:
            path = cache / f"{m}.{ex}.opset{OPSET}.onnx"
            if not path.exists():
                missing.append({"model": m, "exporter": ex, "error": f"no export at {path}"})
                continue
            jobs.append({"model": m, "exporter": ex, "path": str(path), "sparsity": sparsity,
                         "config": asdict(CONFIGS[m])})
    jobs_path = out_dir / "onnxsim_jobs.json"
    jobs_path.write_text(json.dumps(jobs, indent=1))
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--onnxsim-worker",
                           str(jobs_path)], capture_output=True, text=True, check=False)
    (out_dir / "onnxsim_stderr.txt").write_text(proc.stderr)
    versions: dict[str, Any] = {}
    rows = list(missing)
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        if "versions" in obj:
            versions = obj["versions"]
        else:
            rows.append(obj)
    if proc.returncode != 0:
        versions["worker_exit"] = proc.returncode
        versions["worker_stderr_tail"] = proc.stderr[-1500:]
    return versions, rows


def _cell(r: dict[str, Any], key: str) -> str:
    """One onnxsim result as ``raw | sim``."""
    parts = []
    for tag in VARIANTS:
        e = r.get(tag, {}).get(key)
        if e is None:
            parts.append("-")
        elif not e["ran"]:
            parts.append("error")
        elif key == "heads":
            parts.append(f"{e['heads_kept']}/{e['heads_total']}")
        elif key == "mlp":
            parts.append(f"{e['mlp_kept']}/{e['mlp_total']}")
        else:
            parts.append(f"{e['blocks_dropped']}/{e['blocks_total']} (MatMul+Gemm "
                         f"{e['matmuls']})")
    return " \\| ".join(parts)


def _errors(r: dict[str, Any]) -> str:
    errs = []
    if "error" in r:
        errs.append(r["error"])
    for tag in VARIANTS:
        for key in ("heads", "mlp", "blocks"):
            e = r.get(tag, {}).get(key, {})
            if e.get("error"):
                errs.append(f"{tag} {key}: {e['error']}")
            if e.get("runs_after", "ok") != "ok":
                errs.append(f"{tag} {key} pruned model fails in ORT: {e['runs_after']}")
    for tag in ("simplify", "fuse"):
        if r.get(tag, "ok") != "ok":
            errs.append(f"{tag}: {r[tag]}")
    if r.get("fused_new_ops"):
        errs.append(f"fused ops: {', '.join(r['fused_new_ops'])}")
    return "; ".join(errs).replace("|", "\\|") or "-"


def markdown(sim_rows: list[dict[str, Any]], tp_rows: list[TPRow], meta: dict[str, Any],
             sparsity: float) -> str:
    lines = [f"# Peers on the transformer exports (sparsity {sparsity})", "",
             "Machine: " + meta["machine"], "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
             "## onnxsim (cells: export as is \\| after `onnxsim.simplify` \\| after `simplify` "
             f"with `extra_optimizers={list(FUSERS)}`)", "",
             "Heads and MLP units: kept/total over all layers; blocks: residual sub-blocks "
             "(attention, MLP; 2 per layer) dropped/total, and the MatMul/Gemm count "
             "after/before.", "",
             "| model | exporter | heads kept | MLP units kept | blocks dropped | errors, notes |",
             "|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(MODELS)}
    for r in sorted(sim_rows, key=lambda r: (order.get(r["model"], 99),
                                             EXPORTERS.index(r["exporter"]))):
        lines.append(f"| {r['model']} | {r['exporter']} | {_cell(r, 'heads')} | "
                     f"{_cell(r, 'mlp')} | {_cell(r, 'blocks')} | {_errors(r)} |")
    lines += ["", "## Torch-Pruning (torch modules)", "",
              "| model | heads kept | MLP units kept | hidden kept | blocks | forward after | "
              "error |", "|---|---|---|---|---|---|---|"]
    for t in tp_rows:
        lines.append(f"| {t.model} | {t.heads} | {t.mlp} | {t.hidden} | {t.blocks} | "
                     f"{t.forward.replace('|', '/')} | {t.error.replace('|', '/') or '-'} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.node()}, {os.cpu_count()} cores, load average "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--exporters", default=",".join(EXPORTERS))
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--out", type=Path, default=Path("out/peers/peers.md"))
    p.add_argument("--onnxsim-python", default="/tmp/vsim/bin/python")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--skip-onnxsim", action="store_true")
    p.add_argument("--skip-tp", action="store_true")
    p.add_argument("--tp-timeout", type=float, default=150.0,
                   help="seconds for one model's Torch-Pruning run (it can hang)")
    p.add_argument("--onnxsim-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tp-worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.onnxsim_worker:
        return onnxsim_worker(a.onnxsim_worker)
    if a.tp_worker:
        return tp_worker(a.tp_worker, a.sparsity, a.tp_timeout)
    models = [m for m in a.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    exporters = [e for e in a.exporters.split(",") if e]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"machine": machine(), "versions": {},
                            "command": " ".join([sys.executable, *sys.argv])}
    sim_rows: list[dict[str, Any]] = []
    if not a.skip_onnxsim:
        t0 = time.perf_counter()
        v, sim_rows = run_onnxsim(a.onnxsim_python, models, exporters, a.cache, a.sparsity,
                                  a.out.parent)
        meta["versions"].update({f"{k} (onnxsim env)": x for k, x in v.items()})
        log.info("onnxsim: %d exports in %.0f s", len(sim_rows), time.perf_counter() - t0)
    tp_rows: list[TPRow] = []
    if not a.skip_tp:
        from importlib.metadata import version

        import torch
        import torch_pruning
        import transformers

        meta["versions"].update({"torch": torch.__version__,
                                 "torch-pruning": f"{version('torch-pruning')} (its "
                                 f"__version__ says {torch_pruning.__version__})",
                                 "transformers": transformers.__version__})
        for m in models:
            log.info("Torch-Pruning: %s", m)
            tp_rows.append(run_tp(m, a.sparsity, a.tp_timeout))
    meta["machine_end_load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = markdown(sim_rows, tp_rows, meta, a.sparsity)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "onnxsim": sim_rows, "torch_pruning": [asdict(t) for t in tp_rows]},
        indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
