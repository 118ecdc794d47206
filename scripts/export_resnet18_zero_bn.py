"""A timm-style ResNet-18 with the last BatchNorm of each block zero-initialised, for the
honest-budget example of docs/training.md.

    python scripts/export_resnet18_zero_bn.py --out-dir out/resnet18
    onnx-ssl ssl out/resnet18/resnet18_train.onnx --target-macs 0.5 --epochs 2 \\
        --finetune-epochs 1 -o out/resnet18/train_out.onnx --report out/resnet18/train_r.json
    onnx-ssl ssl out/resnet18/resnet18_eval.onnx --target-macs 0.5 --epochs 2 \\
        --finetune-epochs 1 -o out/resnet18/eval_out.onnx --report out/resnet18/eval_r.json

ResNet-18's widths (64-512) on a 1x32x32 input (the digits, resized), random weights, and
``zero_init_last`` as timm does it (the last BatchNorm scale of each basic block is zero).
Exported with TorchScript in eval mode (BatchNorm folded into the convolutions) and in
training mode (BatchNorm kept, ``do_constant_folding=False``, as docs/training.md recommends
for training). Needs torch (the ``[export]`` extra).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import nn


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.b2.weight)  # timm: zero_init_last
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers: list[nn.Module] = []
        cin = 64
        for k, w in enumerate((64, 128, 256, 512)):
            layers += [Basic(cin, w, 1 if k == 0 else 2), Basic(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1)
        return self.fc(torch.flatten(y, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True, type=Path)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = ResNet18()
    x = torch.randn(8, 1, 32, 32)
    for mode in ("eval", "train"):
        kw: dict = ({} if mode == "eval" else
                    {"training": torch.onnx.TrainingMode.TRAINING, "do_constant_folding": False})
        net.eval() if mode == "eval" else net.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), str(args.out_dir / f"resnet18_{mode}.onnx"),
                              dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["logits"], **kw)
        print(f"wrote {args.out_dir / f'resnet18_{mode}.onnx'}")


if __name__ == "__main__":
    main()
