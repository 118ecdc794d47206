"""torchvision-like networks exported from PyTorch for the training tests (a helper module).

torchvision cannot be imported here (its wheel links CUDA), so these are small hand-written
copies of the architectures, at 64x64 input and a few channels per layer:

``mobilenet_v3_small``  inverted residuals with squeeze-excitation, HardSwish and HardSigmoid
                        (the ops onnxruntime-training 1.19.2 has no gradient for);
``efficientnet_b0``     MBConv blocks with SiLU and squeeze-excitation (Sigmoid gates);
``resnet18``            basic blocks, 7x7 stem and max-pool, ``x.view(x.size(0), -1)`` head
                        (a Reshape whose batch a static export folds to a literal).

Each is exported at a static batch of :data:`BATCH` in one of :data:`MODES`: with the
TorchScript exporter in ``eval`` (its default: BatchNorm folded into the convolutions) or
``train`` (``training=TrainingMode.TRAINING, do_constant_folding=False``: BatchNorm stays and
fine-tunes), or with the ``dynamo`` exporter (its default; Reshape with ``allowzero=1``).
Exports are cached beside :mod:`exported`'s, keyed by this file's text and the torch
version; without torch the tests skip.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import onnx
from exported import MAX_IR, OPSET, cache_dir, have_torch

BATCH = 8
SIZE = 64
CLASSES = 10
MODES = ("eval", "train", "dynamo")


def _mobilenet_v3_small() -> Any:
    import torch

    nn = torch.nn

    class SE(nn.Module):
        def __init__(self, c: int, squeeze: int) -> None:
            super().__init__()
            self.fc1 = nn.Conv2d(c, squeeze, 1)
            self.fc2 = nn.Conv2d(squeeze, c, 1)

        def forward(self, x: Any) -> Any:
            s = nn.functional.adaptive_avg_pool2d(x, 1)
            s = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))
            return x * s

    def cba(cin: int, cout: int, k: int, s: int, groups: int, act: Any) -> list[Any]:
        return [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), act()]

    class Block(nn.Module):
        def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool,
                     stride: int) -> None:
            super().__init__()
            act = nn.Hardswish if hs else nn.ReLU
            layers: list[Any] = []
            if exp != cin:
                layers += cba(cin, exp, 1, 1, 1, act)
            layers += cba(exp, exp, k, stride, exp, act)
            if se:
                layers.append(SE(exp, max(8, exp // 4)))
            layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            y = self.block(x)
            return x + y if self.residual else y

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                *cba(3, 8, 3, 2, 1, nn.Hardswish),
                Block(8, 3, 8, 8, True, False, 2),
                Block(8, 3, 24, 12, False, False, 2),
                Block(12, 5, 32, 16, True, True, 2),
                Block(16, 5, 48, 16, True, True, 1),
                *cba(16, 48, 1, 1, 1, nn.Hardswish),
            )
            self.classifier = nn.Sequential(nn.Linear(48, 32), nn.Hardswish(),
                                            nn.Dropout(0.2), nn.Linear(32, CLASSES))

        def forward(self, x: Any) -> Any:
            y = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(y, 1))

    return Net()


def _efficientnet_b0() -> Any:
    import torch

    nn = torch.nn

    class MBConv(nn.Module):
        def __init__(self, ratio: int, k: int, stride: int, cin: int, cout: int) -> None:
            super().__init__()
            exp = cin * ratio
            layers: list[Any] = []
            if exp != cin:
                layers += [nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), nn.SiLU()]
            layers += [nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp, bias=False),
                       nn.BatchNorm2d(exp), nn.SiLU()]
            self.pre = nn.Sequential(*layers)
            sq = max(1, cin // 4)
            self.se1 = nn.Conv2d(exp, sq, 1)
            self.se2 = nn.Conv2d(sq, exp, 1)
            self.project = nn.Sequential(nn.Conv2d(exp, cout, 1, bias=False),
                                         nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            y = self.pre(x)
            s = nn.functional.adaptive_avg_pool2d(y, 1)
            y = y * torch.sigmoid(self.se2(nn.functional.silu(self.se1(s))))
            y = self.project(y)
            return x + y if self.residual else y

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                MBConv(1, 3, 1, 8, 8),
                MBConv(4, 3, 2, 8, 12),
                MBConv(4, 5, 2, 12, 16),
                MBConv(4, 3, 1, 16, 16),
                nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64), nn.SiLU(),
            )
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, CLASSES))

        def forward(self, x: Any) -> Any:
            y = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(y, 1))

    return Net()


def _resnet18() -> Any:
    import torch

    nn = torch.nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else None)

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
            widths = (8, 12, 16, 24)
            layers: list[Any] = []
            cin = 8
            for k, w in enumerate(widths):
                layers += [Basic(cin, w, 1 if k == 0 else 2), Basic(w, w, 1)]
                cin = w
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(24, CLASSES)

        def forward(self, x: Any) -> Any:
            y = nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1)
            return self.fc(y.view(y.size(0), -1))

    return Net()


NETS: dict[str, Callable[[], Any]] = {
    "mobilenet_v3_small": _mobilenet_v3_small,
    "efficientnet_b0": _efficientnet_b0,
    "resnet18": _resnet18,
}


def _export(name: str, mode: str) -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    module = NETS[name]()
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    if mode == "train":
        module.train()
        kw: dict[str, Any] = {"training": torch.onnx.TrainingMode.TRAINING,
                              "do_constant_folding": False}
    else:
        module.eval()
        kw = {}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "dynamo":
            prog = torch.onnx.export(module, (x,), dynamo=True, opset_version=OPSET,
                                     input_names=["x"], output_names=["logits"], verbose=False)
            assert prog is not None
            model = prog.model_proto
        else:
            torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=OPSET,
                              input_names=["x"], output_names=["logits"], **kw)
            model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, MAX_IR)
    return model


def load(name: str, mode: str = "eval") -> onnx.ModelProto:
    """``name`` exported at the static batch :data:`BATCH` in ``mode`` (cached)."""
    import pytest

    src = hashlib.sha256(open(__file__, "rb").read()).hexdigest()[:12]
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = "-"
    d = cache_dir()
    stem = f"train_{name}.{mode}.opset{OPSET}.{src}"
    path = d / f"{stem}.{hashlib.sha256(version.encode()).hexdigest()[:8]}.onnx"
    if path.exists():
        return onnx.load_model(str(path))
    if not have_torch():
        found = sorted(d.glob(f"{stem}.*.onnx"), key=lambda p: p.stat().st_mtime)
        if found:
            return onnx.load_model(str(found[-1]))
        pytest.skip(f"{name}: torch is not installed and {d} holds no export of it")
    model = _export(name, mode)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=d)
    with os.fdopen(fd, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, path)
    return model
