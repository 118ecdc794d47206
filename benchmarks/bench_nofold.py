"""Prunable share of transformers' ConvNeXt exported with and without constant folding.

    python benchmarks/bench_nofold.py [--out-dir out/nofold]

``do_constant_folding=False`` (the export docs/training.md recommends for training, so that
BatchNorm stays trainable) writes ``nn.Linear`` as ``MatMul(x, Transpose(W))``. The analysis
maps such moved weights back to the initializer they were computed from; this measures the
share of prunable channels of ConvNeXt (``ConvNextConfig()``'s defaults, about 28M params,
10 classes, random weights, a 64x64 input, TorchScript) both ways, and with the mapping
switched off (the analysis before it existed). Needs torch and transformers (``[export]``).
"""

from __future__ import annotations

import argparse
import io
import time
import warnings
from pathlib import Path

import onnx

from onnx_ssl import analysis


def share(model: onnx.ModelProto) -> str:
    t0 = time.perf_counter()
    a = analysis.analyze(model)
    total = sum(s.channels for s in a.spaces)
    pr = sum(s.channels for s in a.spaces if s.prunable)
    return (f"{pr:,} / {total:,} = {pr / total:.1%} ({sum(s.prunable for s in a.spaces)} of "
            f"{len(a.spaces)} spaces), {time.perf_counter() - t0:.1f} s")


def main() -> None:
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path("out/nofold"))
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = ConvNextForImageClassification(ConvNextConfig(num_labels=10)).eval()
    models = {}
    for fold in (True, False):
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.randn(1, 3, 64, 64),), buf, dynamo=False,
                              opset_version=18, input_names=["pixel_values"],
                              output_names=["logits"], do_constant_folding=fold)
        models[fold] = onnx.load_from_string(buf.getvalue())
    print("folded (ts)        ", share(models[True]), flush=True)
    print("unfolded (ts_nofold)", share(models[False]), flush=True)
    analysis._trace_moves = lambda *a, **k: None  # type: ignore[attr-defined]  # as before
    print("unfolded, without mapping moved weights back:", share(models[False]), flush=True)


if __name__ == "__main__":
    main()
