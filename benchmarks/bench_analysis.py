"""Analysis speed: a ResNet-50 export and residual chains up to 10,000 nodes.

    python benchmarks/bench_analysis.py            # needs torch + transformers for ResNet-50

Times ``onnx_ssl.analyze`` (prepare: shape inference and constant folding, then channel
propagation, groups, layers and residual branches), median of 5 runs after a warm-up.
Targets (issue 2): ResNet-50 well under 1 s; 10,000 nodes under 10 s, growing linearly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import chain, median_time, resnet50, table  # noqa: E402

from onnx_ssl.analysis import analyze  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-resnet50", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = [("graph", "nodes", "spaces", "groups", "analyze (s)", "s / 1000 nodes")]
    cases = []
    if not args.no_resnet50:
        cases.append(("HF ResNet-50, TorchScript, BN folded", resnet50()))
        cases.append(("HF ResNet-50, TorchScript, BN kept", resnet50(fold=False)))
    for blocks in (143, 357, 715, 1430):  # about 1k, 2.5k, 5k and 10k nodes
        cases.append((f"residual chain, {blocks} blocks", chain(blocks)))
    for name, model in cases:
        a = analyze(model)
        t = median_time(lambda m=model: analyze(m), repeat=args.repeat)
        n = len(model.graph.node)
        rows.append((name, str(n), str(len(a.spaces)), str(len(a.groups)), f"{t:.3f}",
                     f"{t / n * 1000:.3f}"))
        print(f"{name}: {t:.3f} s", file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
