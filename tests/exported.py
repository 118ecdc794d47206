"""Real networks exported from PyTorch to ONNX, for the tests (a helper module, not a test file).

Every network is built from a small config with a seeded random init (nothing is downloaded):
HuggingFace ``transformers`` vision models (ResNet bottleneck and basic, MobileNetV2, RegNet,
ConvNeXt, EfficientNet, Swin, ViT), tiny BERT and GPT-2 (eager attention), and hand-written
``torch.nn`` networks (a ResNet, one with cat/chunk/split/grouped conv/flatten+Linear, a
DenseNet-style one with a data-dependent gate, a small U-Net, an embedding MLP). Each is
exported by some of the :data:`EXPORTERS`:

``ts``          TorchScript exporter (``dynamo=False``), eval mode, constant folding on (the
                BatchNormalizations are folded into the convolutions);
``ts_nofold``   the same without constant folding (BatchNormalization nodes stay);
``ts_train``    TorchScript in training mode (``TrainingMode.TRAINING``): BatchNormalization in
                training form (batch statistics, extra running-stat outputs) and Dropout nodes;
``ts_dynbatch`` TorchScript eval mode with a dynamic batch axis (the dynamic-shape cases are
                these two);
``dynamo``      the ``torch.export``-based exporter (``dynamo=True``, onnxscript);
``dynamo_dynbatch`` the same with a dynamic batch axis (``dynamic_shapes``).

All exports use opset :data:`OPSET` (:func:`load_at_opset` exports at others) and IR version
<= 10, which every supported runtime loads. Exports are cached on disk, keyed by network,
exporter, opset, the text of this module and the torch, transformers and onnxscript versions,
under ``$ONNX_SSL_TEST_CACHE`` or ``~/.cache/onnx-ssl-tests`` (all of them: about 15 MB, half a
minute to make on two cores).

``torch`` and ``transformers`` are imported only inside the builders: onnx-ssl itself never
imports torch. Where torch cannot be installed (Python 3.13 here: the only CPU build on these
machines is for 3.11), the tests read the exports that an environment with torch left in the
same cache (CI runs that one first); a test that needs an export skips when neither is there,
unless ``$ONNX_SSL_REQUIRE_EXPORTS`` is set, when it fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

OPSET = 18
MAX_IR = 10
# Part of the cache key (with the text of this file and the package versions).
CACHE_VERSION = "1"
EXPORTERS = ("ts", "ts_nofold", "ts_train", "ts_dynbatch", "dynamo", "dynamo_dynbatch")
# The exporters whose exports have a symbolic batch axis.
DYNAMIC_BATCH = ("ts_dynbatch", "dynamo_dynbatch")


Builder = Callable[..., tuple[Any, tuple[Any, ...], list[str]]]


@dataclass(frozen=True)
class Net:
    """A network to export: ``build(size=...)`` returns ``(module, example inputs, input
    names)``; ``size`` is the image side (sequence length for BERT and GPT-2)."""

    name: str
    build: Builder
    # Exporters this network is exported with.
    exporters: tuple[str, ...]
    # Output names given to the TorchScript exporter.
    outputs: tuple[str, ...] = ("logits",)
    # Input size for the training-mode export (None: the builder's default). Training-mode
    # BatchNormalization normalises with batch statistics; over a batch of 2 at 1x1 spatial
    # size that is +-1 whatever the input, and the network's output becomes so sensitive
    # to float rounding that no exact check is meaningful (at 32x32 ORT's own graph
    # optimisations change the HF CNNs' outputs by 1e-5..1e-4 x max|output|, at 96x96 by
    # about 1e-6, well inside the prune check's 1e-5).
    train_size: int | None = None
    # Exporters whose export is numerically ill-conditioned: ONNX Runtime's own graph
    # optimisations change its output by more than the prune check's tolerance, so the
    # exactness tests skip it (the analysis tests still run).
    ill_conditioned: tuple[str, ...] = ()


# --- networks -------------------------------------------------------------------------------


def _seed() -> Any:
    import torch

    torch.manual_seed(0)
    return torch


def _randomize_bn(module: Any) -> Any:
    """Give every BatchNorm non-trivial statistics and affine parameters (a fresh init has
    mean 0, var 1, gamma 1, beta 0, which would hide mistakes in how they are sliced)."""
    import torch

    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return module


def _image(batch: int = 1, size: int = 32) -> Any:
    torch = _seed()
    return torch.randn(batch, 3, size, size)


def hf_resnet(layer_type: str, size: int = 32) -> tuple[Any, tuple[Any, ...], list[str]]:
    _seed()
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                       layer_type=layer_type, num_labels=10)
    return _randomize_bn(ResNetForImageClassification(cfg)), (_image(2, size),), ["pixel_values"]


def hf_mobilenet_v2(size: int = 32) -> tuple[Any, tuple[Any, ...], list[str]]:
    _seed()
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(image_size=size, depth_multiplier=0.25, min_depth=8, num_labels=10,
                            classifier_dropout_prob=0.0)
    model = MobileNetV2ForImageClassification(cfg)
    return _randomize_bn(model), (_image(2, size),), ["pixel_values"]


def hf_regnet(size: int = 32) -> tuple[Any, tuple[Any, ...], list[str]]:
    _seed()
    from transformers import RegNetConfig, RegNetForImageClassification

    cfg = RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                       groups_width=8, layer_type="y", num_labels=10)
    return _randomize_bn(RegNetForImageClassification(cfg)), (_image(2, size),), ["pixel_values"]


def hf_convnext(size: int = 32) -> tuple[Any, tuple[Any, ...], list[str]]:
    _seed()
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=10,
                         image_size=size)
    return ConvNextForImageClassification(cfg), (_image(2, size),), ["pixel_values"]


def hf_efficientnet(size: int = 32) -> tuple[Any, tuple[Any, ...], list[str]]:
    _seed()
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    cfg = EfficientNetConfig(image_size=size, width_coefficient=0.25, depth_coefficient=0.1,
                             hidden_dim=320, num_labels=10, dropout_rate=0.0,
                             drop_connect_rate=0.0)
    model = EfficientNetForImageClassification(cfg)
    return _randomize_bn(model), (_image(2, size),), ["pixel_values"]


def hf_swin(size: int = 32) -> tuple[Any, tuple[Any, ...], list[str]]:
    # Window attention: Shape/Gather/Reshape arithmetic around every block, which the
    # preparation has to fold to its fixpoint in one call (issue 9).
    _seed()
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=size, patch_size=2, embed_dim=16, depths=[1, 1],
                     num_heads=[2, 2], window_size=4, num_labels=10)
    return SwinForImageClassification(cfg), (_image(2, size),), ["pixel_values"]


def hf_bert(size: int = 8) -> tuple[Any, tuple[Any, ...], list[str]]:
    torch = _seed()
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, size))

    class Wrapper(torch.nn.Module):
        """Calls BERT with keyword arguments and returns a plain tuple."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(cfg, add_pooling_layer=True)

        def forward(self, input_ids: Any) -> Any:
            out = self.bert(input_ids=input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    return Wrapper(), (ids,), ["input_ids"]


def hf_vit(size: int = 32) -> tuple[Any, tuple[Any, ...], list[str]]:
    """A tiny ViT: a patch-embedding Conv, a class token concatenated to the patches (an
    Expand to the batch), 2 layers of hidden size 64."""
    _seed()
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=size, patch_size=8, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTModel(cfg, add_pooling_layer=False), (_image(2, size),), ["pixel_values"]


def hf_gpt2(size: int = 16, batch: int = 2) -> tuple[Any, tuple[Any, ...], list[str]]:
    """A tiny GPT-2 (2 layers, 64 wide) with eager attention: the causal mask is a Where of
    two scalar constants, folded to a constant the residual branches hold."""
    torch = _seed()
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     attn_implementation="eager")
    ids = torch.randint(0, 64, (batch, size))

    class Wrapper(torch.nn.Module):
        """Calls GPT-2 with keyword arguments (transformers 5 reordered them) and an explicit
        all-ones attention mask (without one, the packed-sequence check exports aten::diff,
        which the TorchScript exporter has no symbolic for)."""

        def __init__(self) -> None:
            super().__init__()
            self.gpt2 = GPT2Model(cfg)

        def forward(self, input_ids: Any) -> Any:
            out = self.gpt2(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            use_cache=False, return_dict=True)
            return out.last_hidden_state

    return Wrapper(), (ids,), ["input_ids"]


def hand_resnet(size: int = 16) -> tuple[Any, tuple[Any, ...], list[str]]:
    """A hand-written ResNet-like CNN: identity and 1x1-downsample shortcuts, GAP, Linear."""
    torch = _seed()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.short(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
            self.blocks = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1))
            self.fc = nn.Linear(16, 10)

        def forward(self, x: Any) -> Any:
            y = self.blocks(self.stem(x))
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))

    return _randomize_bn(Net()), (_image(2, size),), ["x"]


def hand_concat(size: int = 16) -> tuple[Any, tuple[Any, ...], list[str]]:
    """``torch.cat``, ``chunk``, ``split``, a grouped conv, max pooling, a Linear on a flatten of
    the whole feature map (each channel a block of 16 features), and Dropout."""
    torch = _seed()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 12, 3, 1, 1)
            self.bn0 = nn.BatchNorm2d(12)
            self.a = nn.Conv2d(6, 8, 3, 1, 1)
            self.b = nn.Conv2d(6, 8, 1)
            self.grouped = nn.Conv2d(16, 16, 3, 1, 1, groups=2, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.c = nn.Conv2d(10, 6, 3, 1, 1)
            self.d = nn.Conv2d(6, 6, 1)
            self.drop = nn.Dropout(0.0)
            self.fc = nn.Linear(12 * (size // 4) ** 2, 10)

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.bn0(self.stem(x)))
            p, q = torch.chunk(y, 2, dim=1)
            y = torch.cat([torch.relu(self.a(p)), torch.relu(self.b(q))], dim=1)
            y = torch.relu(self.bn1(self.grouped(y)))
            y = nn.functional.max_pool2d(y, 2)
            u, v = torch.split(y, [10, 6], dim=1)
            y = torch.cat([torch.relu(self.c(u)), self.d(v)], dim=1)
            y = nn.functional.max_pool2d(y, 2)
            return self.fc(self.drop(torch.flatten(y, 1)))

    return _randomize_bn(Net()), (_image(2, size),), ["x"]


def hand_dense(size: int = 16) -> tuple[Any, tuple[Any, ...], list[str]]:
    """DenseNet-style concatenation with the graph input, channel slices, a data-dependent
    scalar gate broadcast over the channels (so a channel whose filters are zero is *not*
    constant), a depthwise conv with channel multiplier 2, PReLU, Hardswish, and
    ``view(n, -1)``."""
    torch = _seed()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, 1, 1)
            self.c2 = nn.Conv2d(11, 8, 3, 1, 1)
            self.g = nn.Conv2d(3, 4, 3, 1, 1)
            self.bn2 = nn.BatchNorm2d(8)
            self.act = nn.PReLU(8)
            self.dw = nn.Conv2d(8, 16, 3, 2, 1, groups=8)
            self.bn3 = nn.BatchNorm2d(16)
            self.pw = nn.Conv2d(16, 12, 1)
            self.fc = nn.Linear(12 * (size // 2) ** 2, 10)

        def forward(self, x: Any) -> Any:
            y = torch.cat([x, torch.relu(self.c1(x))], dim=1)  # 3 + 8
            y = torch.cat([y, self.act(self.bn2(self.c2(y)))], dim=1)  # 11 + 8
            y = y[:, 3:11] + y[:, 11:19]  # slices of the two conv outputs, added
            y = y * torch.sigmoid(self.g(x).mean(dim=(1, 2, 3), keepdim=True))
            y = nn.functional.hardswish(self.bn3(self.dw(y)))
            y = torch.relu(self.pw(y))
            return self.fc(y.view(y.size(0), -1))

    return _randomize_bn(Net()), (_image(2, size),), ["x"]


def hand_unet(size: int = 16) -> tuple[Any, tuple[Any, ...], list[str]]:
    """A small U-Net: a strided encoder, ConvTranspose and nearest ``interpolate`` decoders,
    skip concatenations, GroupNorm (blocks its channels) and InstanceNorm; image output."""
    torch = _seed()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1 = nn.Conv2d(3, 8, 3, 1, 1)
            self.e2 = nn.Conv2d(8, 12, 3, 2, 1)
            self.gn = nn.GroupNorm(4, 12)
            self.e3 = nn.Conv2d(12, 16, 3, 2, 1)
            self.inorm = nn.InstanceNorm2d(16, affine=True)
            self.up1 = nn.ConvTranspose2d(16, 10, 2, 2)
            self.d1 = nn.Conv2d(22, 8, 3, 1, 1)
            self.d2 = nn.Conv2d(16, 6, 3, 1, 1)
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, x: Any) -> Any:
            a = torch.relu(self.e1(x))
            b = torch.relu(self.gn(self.e2(a)))
            c = torch.relu(self.inorm(self.e3(b)))
            u = torch.relu(self.up1(c))
            u = torch.relu(self.d1(torch.cat([u, b], dim=1)))
            u = nn.functional.interpolate(u, scale_factor=2.0, mode="nearest")
            u = torch.relu(self.d2(torch.cat([a, u], dim=1)))
            return self.head(u)

    return Net(), (_image(2, size),), ["x"]


def hand_embed(size: int = 8) -> tuple[Any, tuple[Any, ...], list[str]]:
    """An embedding lookup (a Gather of rows of a constant table), a mean over the sequence
    and an MLP: the embedding's columns are a prunable space."""
    torch = _seed()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.fc1 = nn.Linear(16, 24)
            self.fc2 = nn.Linear(24, 10)

        def forward(self, ids: Any) -> Any:
            return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(dim=1))))

    return Net(), (torch.randint(0, 50, (2, size)),), ["ids"]


_ALL = ("ts", "ts_nofold", "ts_train", "dynamo")
_DYN = ("ts_dynbatch", "dynamo_dynbatch")
NETS: dict[str, Net] = {n.name: n for n in (
    Net("hf_resnet_bottleneck", lambda size=32: hf_resnet("bottleneck", size),
        _ALL + ("ts_dynbatch", "dynamo_dynbatch"), train_size=96),
    Net("hf_resnet_basic", lambda size=32: hf_resnet("basic", size), ("ts", "dynamo")),
    # Even at 96x96 the width-0.25 MobileNetV2 in training form changes its output by
    # about 1e-5 (relative) under ORT's own graph optimisations.
    Net("hf_mobilenet_v2", hf_mobilenet_v2, _ALL, ill_conditioned=("ts_train",)),
    Net("hf_regnet", hf_regnet, ("ts", "ts_train", "dynamo"), train_size=96),
    Net("hf_convnext", hf_convnext, ("ts", "ts_nofold", "dynamo")),
    Net("hf_efficientnet", hf_efficientnet, _ALL, train_size=96),
    # torch 2.13's dynamo exporter fails on transformers' Swin (torch.export), so TorchScript.
    Net("hf_swin", hf_swin, ("ts", "ts_dynbatch")),
    Net("hf_bert", hf_bert, ("ts", "dynamo") + _DYN,
        outputs=("last_hidden_state", "pooler_output")),
    Net("hf_vit", hf_vit, ("ts", "ts_nofold", "dynamo") + _DYN, outputs=("last_hidden_state",)),
    Net("hf_gpt2", hf_gpt2, ("ts", "ts_nofold", "dynamo") + _DYN,
        outputs=("last_hidden_state",)),
    Net("hand_resnet", hand_resnet, _ALL + ("ts_dynbatch", "dynamo_dynbatch")),
    Net("hand_concat", hand_concat, _ALL),
    Net("hand_dense", hand_dense, _ALL + ("ts_dynbatch", "dynamo_dynbatch")),
    Net("hand_unet", hand_unet, ("ts", "ts_nofold", "dynamo"), outputs=("image",)),
    Net("hand_embed", hand_embed, ("ts", "dynamo")),
)}


def cases() -> list[tuple[str, str]]:
    """Every (network, exporter) pair the tests cover."""
    return [(n.name, ex) for n in NETS.values() for ex in n.exporters]


# Networks that only some tests load (not in :func:`cases`).
EXTRA: dict[str, Net] = {n.name: n for n in (
    # GPT-2 exported at batch 1: the raw material of an export whose batch is declared
    # dynamic but is baked into its shapes (the test declares the batch axis symbolic).
    Net("hf_gpt2_batch1", lambda size=16: hf_gpt2(size, batch=1), ("dynamo",),
        outputs=("last_hidden_state",)),
)}


# --- export and cache -----------------------------------------------------------------------


def cache_dir() -> Path:
    env = os.environ.get("ONNX_SSL_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "onnx-ssl-tests"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _key(name: str, exporter: str, opset: int = OPSET) -> str:
    """The cache file name ``NAME.EXPORTER.opsetN.SRC.VERSIONS.onnx``: the hash of this file's
    text (editing a builder invalidates its exports), then of the torch, transformers and
    onnxscript versions. Importing nothing."""
    versions = "|".join(_version(d) for d in ("torch", "transformers", "onnxscript"))
    src = hashlib.sha256(f"{CACHE_VERSION}|".encode() + Path(__file__).read_bytes())
    ver = hashlib.sha256(versions.encode())
    return f"{name}.{exporter}.opset{opset}.{src.hexdigest()[:12]}.{ver.hexdigest()[:8]}.onnx"


def have_torch() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _export(net: Net, exporter: str, opset: int = OPSET) -> onnx.ModelProto:
    import torch

    if exporter == "ts_train" and net.train_size is not None:
        module, args, input_names = net.build(size=net.train_size)
    else:
        module, args, input_names = net.build()
    # Under no_grad: TorchScript-exporting a transformer with autograd on can take
    # gigabytes (issue 18).
    with torch.no_grad() if exporter != "ts_train" else contextlib.nullcontext():
        return _export_module(net, exporter, opset, module, args, input_names)


def _export_module(net: Net, exporter: str, opset: int, module: Any, args: tuple[Any, ...],
                   input_names: list[str]) -> onnx.ModelProto:
    import torch

    if exporter in ("dynamo", "dynamo_dynbatch"):
        module.eval()
        dyn: dict[str, Any] = {}
        if exporter == "dynamo_dynbatch":  # the first input's batch axis, by position
            dyn["dynamic_shapes"] = ({0: torch.export.Dim("batch")},) + (None,) * (len(args) - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                     input_names=input_names, verbose=False,
                                     optimize=True, **dyn)
        assert prog is not None
        model = prog.model_proto
    else:
        kw: dict[str, Any] = {"do_constant_folding": exporter != "ts_nofold"}
        if exporter == "ts_train":
            module.train()
            kw = {"training": torch.onnx.TrainingMode.TRAINING, "do_constant_folding": False}
        else:
            module.eval()
        if exporter == "ts_dynbatch":
            kw["dynamic_axes"] = {input_names[0]: {0: "batch"}}
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=list(net.outputs), **kw)
        model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, MAX_IR)
    return model


def load(name: str, exporter: str) -> onnx.ModelProto:
    """The network ``name`` exported by ``exporter`` (from the cache when it is there)."""
    return load_at_opset(name, exporter, OPSET)


def load_at_opset(name: str, exporter: str, opset: int) -> onnx.ModelProto:
    """The network ``name`` exported by ``exporter`` at ``opset`` (cached).

    Without torch, an export of the same builders made by another environment is used (the
    versions part of the key is ignored); with neither, the test skips (or fails when
    ``$ONNX_SSL_REQUIRE_EXPORTS`` is set).
    """
    import pytest

    net = NETS[name] if name in NETS else EXTRA[name]
    if exporter not in net.exporters:
        raise KeyError(f"{name} is not exported with {exporter}")
    d = cache_dir()
    key = _key(name, exporter, opset)
    path = d / key
    if path.exists():
        return onnx.load_model(str(path))
    if not have_torch():
        stem = key.rsplit(".", 2)[0]  # without the versions part
        found = sorted(d.glob(f"{stem}.*.onnx"), key=lambda p: p.stat().st_mtime)
        if found:
            return onnx.load_model(str(found[-1]))
        msg = (f"{name}/{exporter} at opset {opset}: torch is not installed and {d} holds no "
               f"export of it")
        if os.environ.get("ONNX_SSL_REQUIRE_EXPORTS"):
            pytest.fail(msg)
        pytest.skip(msg)
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    model = _export(net, exporter, opset)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=d)
    with os.fdopen(fd, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, path)
    src_part = key.rsplit(".", 3)[1]
    for stale in d.glob(f"{name}.{exporter}.opset{opset}.*.onnx"):  # older builders
        if stale != path and stale.name.rsplit(".", 3)[1] != src_part:
            stale.unlink(missing_ok=True)
    return model
