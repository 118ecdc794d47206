"""Speed per network against the MAC bound and against Torch-Pruning (issue 20).

For each network (timm, random weights, BatchNorm statistics randomised, exported with the
TorchScript exporter, BatchNorm folded, opset 17, at 1x3xSxS, S = 96 by default), zero a
seeded random half (``--fraction``) of every prunable channel space (the same positions in
every block of a space that grouped convolutions split, as ``bench_round_to.zero_half``),
prune it with onnx-ssl without rounding and with ``--round-to auto`` (timed at 1 thread,
batch 1, CPU), and prune the torch network with Torch-Pruning's ``MagnitudePruner`` (L2
magnitude, one ratio for every layer, the classifier ignored; for ViT, head dimensions)
at the ratio whose MACs match onnx-ssl's pruned MACs within 2% where it can (a search
on the MACs of the exported ONNX file, counted by onnx-ssl like the others), exported the
same way under ``torch.no_grad()``. The original, the two onnx-ssl
models and the Torch-Pruning model are timed with ONNX Runtime (CPU, 1 intra-op thread,
batch 1, all graph optimisations) in alternating runs in one process: each round runs
every model once, in a rotated order, for at least ``--repeat`` rounds and ``--seconds``;
the table gives the median of each run's CPU time on the calling thread (with one intra-op
thread ONNX Runtime runs every kernel there), which the preemptions of a shared machine do
not inflate (``--clock wall``: the 10th percentile of wall times instead).

Columns: MACs; ms per run; speed-up over the original; the MAC bound (MACs before / after,
the speed-up if time followed MACs); speed-up / bound. The summary adds the 16-block bound:
the same with every Conv's channel counts rounded up to multiples of 16, what ONNX Runtime's
NCHWc kernels compute with AVX-512 (:func:`macs_by_kind`).

``--profile FILE.md`` also profiles every model with ONNX Runtime's profiler
(``SessionOptions.enable_profiling``, the same session options, ``--profile-runs``
alternating runs after 3 warm-up runs; each node's fastest run, summed by op type of the
optimised graph, Conv split into dense, depthwise and grouped, so that NCHWc's reorders and
fusions show) and writes, per network and op type: the node count (how many in NCHWc
layout), ms per run, the shrink original / pruned, and the shrink of its work (MACs, or
output bytes for ops without MACs); and per model the MAC bound, the 16-block bound, the
work bound (every op type's time divided by its work shrink) and the profiled and timed
speed-ups. What does not shrink shows as a shrink below its work shrink. (The profiler
costs about as much per node as the session does, so the time outside the kernels cannot
be read from it: the kernel sums come out above the unprofiled run.)

The load average (``os.getloadavg``) is printed before and after: on a shared machine only
the ratios of one run mean anything.

    python benchmarks/bench_networks.py [--nets ghostnet mobilenetv2 ...] [--size 96]
        [--fraction 0.5] [--seconds 10] [--repeat 20] [--out FILE.md] [--profile FILE.md]

Needs torch, timm and torch-pruning; timm is imported with a stub ``torchvision`` when
torchvision is missing (only its data and feature-extraction helpers use it).
"""

from __future__ import annotations

import argparse
import copy
import importlib.abc
import importlib.machinery
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import types
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_round_to import zero_half  # noqa: E402
from common import CACHE, export_torch, single_thread_session, table  # noqa: E402

log = logging.getLogger(__name__)
BLOCK = 16  # ONNX Runtime's NCHWc channel block with AVX-512 (8 with AVX2)

# name -> (timm model, create_model kwargs)
NETS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_tiny": ("vit_tiny_patch16_224", {"img_size": 96}),
    "cspdarknet53": ("cspdarknet53", {}),
    "resnet50": ("resnet50", {}),
    "convnext_atto": ("convnext_atto", {}),
    "densenet121": ("densenet121", {}),
    "regnety_004": ("regnety_004", {}),
    "efficientnet_b0": ("efficientnet_b0", {}),
    "mobilenetv2": ("mobilenetv2_100", {}),
    "ghostnet": ("ghostnet_100", {}),
}


def _stub_torchvision() -> None:
    """Make ``import torchvision[.x]`` give empty modules whose attributes are dummy classes,
    when torchvision is not installed: timm imports it at module level for data transforms
    and ``FrozenBatchNorm2d``, none of which the models built here use."""
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        pass

    class _Module(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            if name == "InterpolationMode":
                import enum
                return enum.Enum(name, "NEAREST BILINEAR BICUBIC BOX HAMMING LANCZOS")
            return type(name, (), {"__init__": lambda self, *a, **k: None})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec: Any) -> types.ModuleType:
            m = _Module(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module: types.ModuleType) -> None:
            pass

    sys.meta_path.insert(0, _Finder())


def build(name: str, size: int) -> tuple[Any, Any]:
    """The timm network ``name`` (seeded random init, eval mode) with random BatchNorm
    statistics and scales (timm's zero-initialised last BatchNorm of a residual block would
    make the whole branch zero, and onnx-ssl would remove it), and a 1x3x``size``x``size``
    input."""
    _stub_torchvision()
    import timm
    import torch

    arch, kwargs = NETS[name]
    torch.manual_seed(0)
    module = timm.create_model(arch, pretrained=False, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            assert m.running_var is not None
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:  # timm zero-inits the last BN of residual blocks
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module, torch.randn(1, 3, size, size, generator=g)


def export(name: str, size: int) -> onnx.ModelProto:
    path = CACHE / f"nets.{name}.{size}.onnx"
    if path.exists():
        return onnx.load(str(path))
    import torch

    module, x = build(name, size)
    with torch.no_grad():
        return export_torch(module, x, path)


def macs_of(model: onnx.ModelProto) -> int:
    """MACs by onnx-ssl's compiler accounting (what its reports say)."""
    from onnx_ssl.compiler import prune

    return prune(model, verify=0).report.macs_before


def _vit_heads(module: Any) -> dict[Any, int]:
    from timm.layers import Attention

    return {m.qkv: m.num_heads for m in module.modules() if isinstance(m, Attention)}


def _tp_prune(module: Any, x: Any, ratio: float) -> Any:
    import torch
    import torch_pruning as tp

    heads = _vit_heads(module)
    # Torch-Pruning 1.6.1 mis-indexes the importance of a group that a ``split`` cuts in two
    # (IndexError in MagnitudeImportance): CSPNet's ``conv_exp`` outputs stay whole.
    ignored = [module.get_classifier(),
               *(m.conv_exp for m in module.modules() if hasattr(m, "conv_exp"))]
    pruner = tp.pruner.MagnitudePruner(
        module, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=ignored, num_heads=heads)
    pruner.step()
    for qkv in heads:  # timm's Attention reshapes by its own head sizes
        width: int = qkv.out_features // 3
        for m in module.modules():
            if getattr(m, "qkv", None) is qkv:
                m.head_dim = width // m.num_heads
                m.attn_dim = m.num_heads * m.head_dim
    with torch.no_grad():
        module(x)
    return module


def torch_pruning(name: str, size: int, fraction: float, macs0: int, tag: str
                  ) -> tuple[onnx.ModelProto, float]:
    """Torch-Pruning's export of ``name`` at the ratio whose exported MACs (counted by
    onnx-ssl, as the others) are ``fraction`` of ``macs0``, the original's, and that ratio.
    (Torch-Pruning's own count of the torch module misses GhostNet's pruned channels: its
    export there had a third of the MACs it said.)"""
    path = CACHE / f"nets.{name}.{size}.tp.{tag}.onnx"
    ratio_path = path.with_suffix(".ratio")
    if path.exists() and ratio_path.exists():
        return onnx.load(str(path)), float(ratio_path.read_text())
    import torch

    module, x = build(name, size)

    def exported(r: float) -> tuple[onnx.ModelProto, float]:
        m = _tp_prune(copy.deepcopy(module), x, r)
        with tempfile.TemporaryDirectory() as d, torch.no_grad():
            model = export_torch(m, x, Path(d) / "tp.onnx")
        return model, macs_of(model) / macs0

    # A uniform ratio r leaves about (1 - r)^2 of a dense layer's MACs: start there, correct
    # r by that model from each measured fraction, bisect where the correction leaves the
    # bracket.
    r, lo, hi = 1 - fraction ** 0.5, 0.0, 0.95
    best: tuple[float, float, onnx.ModelProto] | None = None  # (|relative error|, r, model)
    for _ in range(8):
        model, f = exported(r)
        err = abs(f / fraction - 1)
        if best is None or err < best[0]:
            best = (err, r, model)
        if err < 0.02:
            break
        lo, hi = (r, hi) if f > fraction else (lo, r)
        r2 = 1 - (1 - r) * (fraction / f) ** 0.5
        r = r2 if lo < r2 < hi else (lo + hi) / 2
    assert best is not None
    if best[0] > 0.05:
        log.warning("%s: Torch-Pruning lands %.1f%% off the target MACs", name, 100 * best[0])
    onnx.save(best[2], str(path))
    ratio_path.write_text(f"{best[1]:.4f}")
    return best[2], best[1]


def sessions(models: dict[str, onnx.ModelProto], profile_dir: str | None = None
             ) -> dict[str, Any]:
    return {k: single_thread_session(m, None if profile_dir is None else os.path.join(
        profile_dir, k.replace(" ", "_").replace("+", "_"))) for k, m in models.items()}


def _input(sess: Any) -> dict[str, np.ndarray]:
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)
    return {inp.name: x}


def time_models(models: dict[str, onnx.ModelProto], seconds: float, repeat: int,
                clock: str = "cpu") -> dict[str, float]:
    """ms per run of each model, in alternating runs (1 thread, batch 1): the median of the
    calling thread's CPU time (``clock="cpu"``; with one intra-op thread ONNX Runtime runs
    every kernel on the caller's thread), or the 10th percentile of wall time (``"wall"``,
    :func:`low`)."""
    sess = sessions(models)
    feed = _input(next(iter(sess.values())))
    names = list(sess)
    for s in sess.values():
        for _ in range(3):
            s.run(None, feed)
    tick = time.thread_time if clock == "cpu" else time.perf_counter
    samples: dict[str, list[float]] = {k: [] for k in names}
    end = time.perf_counter() + seconds
    r = 0
    while time.perf_counter() < end or r < repeat:
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t = tick()
            sess[k].run(None, feed)
            samples[k].append(tick() - t)
        r += 1
    stat = statistics.median if clock == "cpu" else low
    return {k: 1e3 * stat(v) for k, v in samples.items()}


def low(samples: list[float]) -> float:
    """The 10th percentile: on a loaded machine a run that the scheduler preempts takes a
    whole time slice longer, and once more than half of a model's runs are preempted (a run
    of a few ms, a load of 5 on 2 CPUs) the median of wall times measures the load, not the
    model."""
    return float(np.percentile(samples, 10))


@dataclass
class Profile:
    """Kernel time per run (ms), node count, NCHWc node count, MACs and output bytes by op
    type, and the MACs with channels rounded up to NCHWc blocks."""

    ms: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    nchwc: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    block_macs: int = 0
    out_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def kernel_ms(self) -> float:
        return sum(self.ms.values())


def _kinds(opt_path: str, nchwc: set[str]) -> dict[str, str]:
    """Node name -> op type of the optimised graph, Conv split by its weight into ``(dw)``
    (one input channel per group, more than one group) and ``(grouped)``; the names of the
    nodes that run in NCHWc layout are added to ``nchwc``."""
    m = onnx.load(opt_path)
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        kind = "Conv" if n.op_type == "FusedConv" else n.op_type
        kind = {"FusedGemm": "Gemm", "FusedMatMul": "MatMul"}.get(kind, kind)
        if kind == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            w = shapes.get(n.input[1]) if len(n.input) > 1 else None
            if group > 1:
                kind += "(dw)" if w is not None and w[1] == 1 else "(grouped)"
        out[n.name] = kind
        if n.domain == "com.microsoft.nchwc":
            nchwc.add(n.name)
    return out


def _up(c: int, block: int) -> int:
    return -(-c // block) * block


def macs_by_kind(model: onnx.ModelProto, block: int = 0) -> dict[str, int]:
    """MACs of the Conv (dense, ``(dw)``, ``(grouped)``), Gemm and MatMul nodes of ``model``
    from its inferred shapes, keyed like :func:`_kinds`; with ``block``, the Convs' channel
    counts rounded up to multiples of ``block`` (what ONNX Runtime's NCHWc kernels compute:
    their channel blocks are 16 wide with AVX-512, 8 with AVX2), the 3 channels of an
    image input left as they are."""
    from onnx_ssl.io import infer_shapes

    m = infer_shapes(model, strict=False)  # with data propagation: Reshapes get their shapes
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    for v in (*m.graph.value_info, *m.graph.output, *m.graph.input):
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    out: dict[str, int] = defaultdict(int)
    for n in m.graph.node:
        y = shapes.get(n.output[0])
        w = shapes.get(n.input[1]) if len(n.input) > 1 else None
        if not y or not w:
            continue
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            kind = "Conv" if group == 1 else "Conv(dw)" if w[1] == 1 else "Conv(grouped)"
            if block and len(y) == 4:
                cout = _up(y[1], block)
                cin = w[1] if w[1] * group <= 4 else _up(w[1] * group, block) // group
                if kind == "Conv(dw)":
                    cin = 1
                out[kind] += y[0] * cout * y[2] * y[3] * cin * int(np.prod(w[2:]))
            else:
                out[kind] += int(np.prod(y)) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            out["Gemm"] += int(np.prod(y)) * int(np.prod(shapes.get(n.input[0], [0])[1:]))
        elif n.op_type == "MatMul":
            a = shapes.get(n.input[0])
            if a:
                out["MatMul"] += int(np.prod(y)) * a[-1]
    return dict(out)


def profile_models(models: dict[str, onnx.ModelProto], runs: int) -> dict[str, Profile]:
    """Profile every model in alternating runs (3 warm-up runs, then ``runs`` rounds, each
    running every model once in a rotated order); per op type, the sum of its nodes'
    fastest kernel times (robust to the runs that the scheduler preempted)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-networks-prof-") as d:
        sess = sessions(models, d)
        feed = _input(next(iter(sess.values())))
        names = list(sess)
        for s in sess.values():
            for _ in range(3):
                s.run(None, feed)
        for r in range(runs):
            for k in names[r % len(names):] + names[:r % len(names)]:
                sess[k].run(None, feed)
        for k, s in sess.items():
            trace = json.loads(Path(s.end_profiling()).read_text())
            nchwc: set[str] = set()
            kinds = _kinds(os.path.join(d, k.replace(" ", "_").replace("+", "_") + ".opt.onnx"),
                           nchwc)
            model_runs = sorted((e for e in trace if e.get("name") == "model_run"),
                                key=lambda e: e["ts"])[3:]
            first = model_runs[0]["ts"] if model_runs else 0
            node_ms: dict[str, list[float]] = defaultdict(list)
            size: dict[str, int] = defaultdict(int)
            seen: dict[str, set[str]] = defaultdict(set)
            for e in trace:
                if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                    continue
                node = e["name"][:-len("_kernel_time")]
                kind = kinds.get(node, e.get("args", {}).get("op_name", "?"))
                if node not in seen[kind]:
                    size[kind] += int(e.get("args", {}).get("output_size", 0))
                seen[kind].add(node)
                if e["ts"] >= first:
                    node_ms[node].append(e["dur"] / 1e3)
            # Each node's fastest run: a kernel of 10 to 300 us escapes preemption in some
            # run, a whole run of a few ms on a loaded machine rarely does.
            p = Profile()
            p.ms = {kind: sum(min(node_ms[n]) for n in nodes if node_ms[n])
                    for kind, nodes in seen.items()}
            p.nodes = {k2: len(v) for k2, v in seen.items()}
            p.nchwc = {k2: len(v & nchwc) for k2, v in seen.items()}
            p.macs = macs_by_kind(models[k])
            p.block_macs = sum(macs_by_kind(models[k], BLOCK).values())
            p.out_bytes = dict(size)
            out[k] = p
    return out


def _work_shrink(base: Profile, p: Profile, kind: str) -> tuple[float | None, str]:
    """How much the work of ``kind`` shrinks: its MACs where it has some, else its output
    bytes (marked ``o``); None where the original has none."""
    m0 = base.macs.get(kind)
    if m0:
        m1 = p.macs.get(kind, 0)
        return (m0 / m1 if m1 else None), ""
    b0 = base.out_bytes.get(kind, 0)
    b1 = p.out_bytes.get(kind, 0)
    return (b0 / b1 if b0 and b1 else None), "o"


def work_bound(base: Profile, p: Profile) -> float:
    """The speed-up of the kernels if every op type's kernel time shrank by its own work
    (MACs, or output bytes for ops without MACs)."""
    predicted = 0.0
    for kind, ms in base.ms.items():
        f, _ = _work_shrink(base, p, kind)
        predicted += ms / f if f else (0.0 if p.ms.get(kind) is None else ms)
    return base.kernel_ms / predicted


def _count(p: Profile, kind: str) -> str:
    """Node count, and how many of them run in NCHWc layout."""
    n, c = p.nodes.get(kind, 0), p.nchwc.get(kind, 0)
    return f"{n} ({c} nchwc)" if c else str(n)


def profile_table(name: str, profiles: dict[str, Profile], bounds: dict[str, float],
                  timed: dict[str, float]) -> str:
    """Per op type: nodes (those in NCHWc layout) and ms per run of each model, original ms /
    model ms ("shrink"),
    and how much its work shrank ("work shrink": MACs, or output bytes marked ``o``)."""
    base = profiles["original"]
    kinds = sorted({k for p in profiles.values() for k in p.ms},
                   key=lambda k: -base.ms.get(k, 0.0))
    others = [k for k in profiles if k != "original"]
    head: tuple[str, ...] = ("op type", "original nodes", "original ms", "original MACs")
    for k in others:
        head += (f"{k} nodes", f"{k} ms", f"{k} shrink", f"{k} work shrink")
    rows: list[tuple[str, ...]] = [head]

    def shrink(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else ("-" if a == 0 else "gone")

    for kind in kinds:
        m0 = base.macs.get(kind)
        r: tuple[str, ...] = (kind, _count(base, kind), f"{base.ms.get(kind, 0):.3f}",
                              f"{m0 / 1e6:.1f}M" if m0 else "")
        for k in others:
            p = profiles[k]
            f, mark = _work_shrink(base, p, kind)
            r += (_count(p, kind), f"{p.ms.get(kind, 0):.3f}",
                  shrink(base.ms.get(kind, 0), p.ms.get(kind, 0)),
                  f"{f:.2f}x{mark}" if f else "")
        rows.append(r)
    for label, get in (("all kernels", lambda k: profiles[k].kernel_ms),
                       ("timed run (no profiler)", lambda k: timed[k])):
        r = (label, str(sum(base.nodes.values())) if label == "all kernels" else "",
             f"{get('original'):.3f}", "")
        for k in others:
            r += (str(sum(profiles[k].nodes.values())) if label == "all kernels" else "",
                  f"{get(k):.3f}", shrink(get("original"), get(k)), "")
        rows.append(r)
    lines = []
    for k in others:
        kb = work_bound(base, profiles[k])
        lines.append(f"- {k}: MAC bound {bounds[k]:.2f}x; {BLOCK}-channel block MAC bound "
                     f"{base.block_macs / profiles[k].block_macs:.2f}x; work bound {kb:.2f}x "
                     f"(every op type's profiled time divided by its work shrink); profiled "
                     f"kernels "
                     f"{base.kernel_ms / profiles[k].kernel_ms:.2f}x; timed "
                     f"{timed['original'] / timed[k]:.2f}x")
    return f"### {name}\n\n" + "\n".join(lines) + f"\n\n{table(rows)}\n"


def _trio(cells: dict[str, tuple[float, float]], k: str | None) -> tuple[str, str, str]:
    """MAC bound, speed-up and their ratio of model ``k``."""
    if k is None or k not in cells:
        return ("-", "-", "-")
    s, b = cells[k]
    return (f"{b:.2f}x", f"{s:.2f}x", f"{s / b:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--size", type=int, default=96, help="image side (default 96)")
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="timing per network, all its models together (default 10)")
    ap.add_argument("--repeat", type=int, default=20,
                    help="at least this many alternating rounds (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="fraction of every space zeroed (default 0.5)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu (default): median thread CPU time per run, which a shared "
                         "machine's preemptions do not inflate; wall: 10th percentile of "
                         "wall time")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--no-round", action="store_true", help="skip --round-to auto")
    ap.add_argument("--out", default=None, help="also write the tables (markdown) here")
    ap.add_argument("--profile", default=None, metavar="FILE.md",
                    help="write ORT profiler time by op type, original against pruned")
    ap.add_argument("--profile-runs", type=int, default=40)
    args = ap.parse_args()

    import onnxruntime as ort

    from onnx_ssl.compiler import prune

    load0 = os.getloadavg()
    rows: list[tuple[str, ...]] = [
        ("network", "model", "MACs", "ms", "speed-up", "MAC bound", "speed-up/bound",
         "prune s")]
    summary: list[tuple[str, ...]] = [
        ("network", "MAC bound", "speed-up", "ratio", f"{BLOCK}-block bound", "ratio to it",
         "auto bound", "auto speed-up", "auto ratio", "TP bound", "TP speed-up", "TP ratio",
         "pruned / TP ms")]
    prof_text = []
    cache = tempfile.mkdtemp(prefix="bench-networks-cache-")
    for name in args.nets:
        t0 = time.perf_counter()
        model = export(name, args.size)
        zeroed = zero_half(model, args.seed, args.fraction)
        variants: dict[str, tuple[onnx.ModelProto, int, float]] = {}
        macs0 = 0
        for label, rt in (("pruned", None), ("pruned+auto", "auto")):
            if rt is not None and args.no_round:
                continue
            t = time.perf_counter()
            res = prune(zeroed, round_to=rt, verify=2, threads=1, batch=1, lower_cache=cache)
            macs0 = res.report.macs_before
            variants[label] = (res.model, res.report.macs_after, time.perf_counter() - t)
        if not args.no_tp:
            try:
                t = time.perf_counter()
                frac = variants["pruned"][1] / macs0
                tag = f"s{args.seed}f{args.fraction:g}m{frac:.4f}"
                tpm, ratio = torch_pruning(name, args.size, frac, macs0, tag)
                variants[f"TP {ratio:.3f}"] = (tpm, macs_of(tpm), time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - a network Torch-Pruning cannot prune
                print(f"{name}: Torch-Pruning failed: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
        models = {"original": model, **{k: v[0] for k, v in variants.items()}}
        ms = time_models(models, args.seconds, args.repeat, args.clock)
        cells: dict[str, tuple[float, float]] = {}
        for k in models:
            macs = macs0 if k == "original" else variants[k][1]
            speed = ms["original"] / ms[k]
            bound = macs0 / macs if macs else float("inf")
            cells[k] = (speed, bound)
            rows.append((name, k, f"{macs / 1e6:.1f}M", f"{ms[k]:.3f}", f"{speed:.2f}x",
                         f"{bound:.2f}x", f"{speed / bound:.2f}",
                         f"{variants[k][2]:.1f}" if k != "original" else "-"))
        tp = next((k for k in models if k.startswith("TP")), None)
        blocked = (sum(macs_by_kind(model, BLOCK).values())
                   / sum(macs_by_kind(variants["pruned"][0], BLOCK).values()))
        summary.append((name, *_trio(cells, "pruned"), f"{blocked:.2f}x",
                        f"{cells['pruned'][0] / blocked:.2f}", *_trio(cells, "pruned+auto"),
                        *_trio(cells, tp),
                        f"{ms['pruned'] / ms[tp]:.2f}" if tp else "-"))
        if args.profile:
            profiles = profile_models(models, args.profile_runs)
            bounds = {k: b for k, (_, b) in cells.items() if k != "original"}
            prof_text.append(profile_table(name, profiles, bounds, ms))
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s; load {os.getloadavg()[0]:.2f}; "
              + "; ".join(f"{k} {ms[k]:.3f} ms {s:.2f}x of {b:.2f}x"
                          for k, (s, b) in cells.items()), file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    text = "\n".join([
        f"bench_networks: timm, {args.size}x{args.size}, batch 1, 1 thread, ONNX Runtime "
        f"{ort.__version__} CPU; {args.fraction:g} of every prunable space zeroed (seed "
        f"{args.seed}); alternating runs, >= {args.repeat} rounds and "
        f"{args.seconds:g} s per network, "
        + ("median thread CPU time" if args.clock == "cpu" else
           "10th percentile of wall time") + " per run",
        f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after "
        f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} CPUs)", "",
        table(summary), "", table(rows)])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.profile:
        Path(args.profile).write_text(
            "ONNX Runtime profiler, ms per run by op type of the optimised graph: each "
            f"node's fastest of {args.profile_runs} alternating runs (after 3 warm-up "
            "runs); 'shrink' = original ms / model ms, to compare with the 'work shrink' "
            "(MACs, or output bytes: 'o')\n\n" + "\n".join(prof_text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
