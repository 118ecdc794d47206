"""Channel coverage on four architectures with channel tricks, against Torch-Pruning 1.6.1.

The four networks are small hand-written PyTorch models (a few blocks each, 16 to 64
channels between blocks and up to 288 inside the expansions, 32x32 input) that use the
constructs the way their reference implementations do:

* ``cspdarknet``: CSPDarknet cross-stage blocks (timm's ``CrossStage``): a 1x1 expansion, a
  split into a bypass half and a processed half, Darknet residual blocks (adds) on the
  processed half, and a concat of the halves before the transition conv.
* ``ghostnet``: GhostNet bottlenecks: ghost modules (a primary 1x1 conv and a cheap
  depthwise conv of its output, concatenated and sliced to the output width), squeeze-and-
  excitation, and conv shortcuts where the width or stride changes.
* ``rexnet``: ReXNet linear bottlenecks with partial-channel residual adds
  (``cat([out[:, :C_in] + x, out[:, C_in:]])``, i.e. Slice + Add + Concat);
  ``rexnet_inplace`` writes them in place as timm does (``out[:, :C_in] += x``), which both
  exporters turn into a ScatterND.
* ``shufflenetv2``: ShuffleNetV2 units: chunk into halves, a branch on one half, concat,
  channel shuffle (Reshape [N, 2, C/2, H, W], Transpose, Reshape).

For each network and exporter, "ours" is the fraction of conv filters (output channels of
every Conv, depthwise ones included) in a space that ``onnx-ssl analyze`` marks prunable;
"Torch-Pruning" is the fraction of conv output channels in the groups that
``torch_pruning.DependencyGraph.get_all_groups`` yields (classifier ignored), the count a
Torch-Pruning user gets. "check" zeroes a random half of the prunable channel groups of every
space (out and in members, respecting the conv groups) on the TorchScript export, prunes with
the numeric check on, and gives the zeroed filters that were removed.

Usage: ``python benchmarks/bench_coverage.py`` (prints a markdown table).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

import onnx_ssl
from onnx_ssl.groups import Analysis

# --- the networks ----------------------------------------------------------------------------


def _nets() -> dict[str, Callable[[], Any]]:
    import torch
    from torch import nn

    def cbr(cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups,
                                             bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        return nn.Sequential(*layers)

    class Head(nn.Module):
        def __init__(self, cin: int, n: int = 10) -> None:
            super().__init__()
            self.fc = nn.Linear(cin, n)

        def forward(self, x: Any) -> Any:
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    # CSPDarknet ------------------------------------------------------------------------
    class DarkBlock(nn.Module):
        def __init__(self, c: int, mid: int) -> None:
            super().__init__()
            self.conv1 = cbr(c, mid, 1, act=nn.LeakyReLU)
            self.conv2 = cbr(mid, c, 3, act=nn.LeakyReLU)

        def forward(self, x: Any) -> Any:
            return x + self.conv2(self.conv1(x))

    class CrossStage(nn.Module):
        def __init__(self, cin: int, cout: int, depth: int) -> None:
            super().__init__()
            self.conv_down = cbr(cin, cout, 3, 2, act=nn.LeakyReLU)
            self.conv_exp = cbr(cout, cout, 1, act=nn.LeakyReLU)
            self.split_at = cout // 2
            self.blocks = nn.Sequential(*[DarkBlock(self.split_at, self.split_at)
                                          for _ in range(depth)])
            self.conv_transition_b = cbr(self.split_at, self.split_at, 1, act=nn.LeakyReLU)
            self.conv_transition = cbr(cout, cout, 1, act=nn.LeakyReLU)

        def forward(self, x: Any) -> Any:
            x = self.conv_exp(self.conv_down(x))
            xs, xb = x.split(self.split_at, dim=1)
            xb = self.conv_transition_b(self.blocks(xb))
            return self.conv_transition(torch.cat([xs, xb], dim=1))

    class CSPDarknet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = cbr(3, 16, 3, act=nn.LeakyReLU)
            self.stages = nn.Sequential(CrossStage(16, 32, 1), CrossStage(32, 64, 2))
            self.head = Head(64)

        def forward(self, x: Any) -> Any:
            return self.head(self.stages(self.stem(x)))

    # GhostNet --------------------------------------------------------------------------
    class GhostModule(nn.Module):
        def __init__(self, cin: int, cout: int, relu: bool) -> None:
            super().__init__()
            self.cout = cout
            init = math.ceil(cout / 2)
            act = nn.ReLU if relu else None
            self.primary_conv = cbr(cin, init, 1, act=act)
            self.cheap_operation = cbr(init, init, 3, groups=init, act=act)

        def forward(self, x: Any) -> Any:
            x1 = self.primary_conv(x)
            x2 = self.cheap_operation(x1)
            return torch.cat([x1, x2], dim=1)[:, :self.cout]

    class SqueezeExcite(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv_reduce = nn.Conv2d(c, c // 4, 1)
            self.conv_expand = nn.Conv2d(c // 4, c, 1)

        def forward(self, x: Any) -> Any:
            s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
            s = self.conv_expand(torch.relu(self.conv_reduce(s)))
            return x * torch.nn.functional.hardsigmoid(s)

    class GhostBottleneck(nn.Module):
        def __init__(self, cin: int, mid: int, cout: int, stride: int, se: bool) -> None:
            super().__init__()
            self.ghost1 = GhostModule(cin, mid, True)
            self.conv_dw = (cbr(mid, mid, 3, stride, groups=mid, act=None) if stride > 1
                            else nn.Identity())
            self.se = SqueezeExcite(mid) if se else nn.Identity()
            self.ghost2 = GhostModule(mid, cout, False)
            self.shortcut: nn.Module = (
                nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
                    cbr(cin, cin, 3, stride, groups=cin, act=None), cbr(cin, cout, 1, act=None)))

        def forward(self, x: Any) -> Any:
            y = self.ghost2(self.se(self.conv_dw(self.ghost1(x))))
            return y + self.shortcut(x)

    class GhostNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = cbr(3, 16, 3, 2)
            self.blocks = nn.Sequential(
                GhostBottleneck(16, 16, 16, 1, False), GhostBottleneck(16, 48, 24, 2, False),
                GhostBottleneck(24, 72, 24, 1, False), GhostBottleneck(24, 72, 40, 2, True),
                GhostBottleneck(40, 120, 40, 1, True))
            self.conv_head = cbr(40, 64, 1)
            self.head = Head(64)

        def forward(self, x: Any) -> Any:
            return self.head(self.conv_head(self.blocks(self.stem(x))))

    # ReXNet ----------------------------------------------------------------------------
    class LinearBottleneck(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, exp: int = 6,
                     inplace: bool = False) -> None:
            super().__init__()
            self.cin = cin
            self.inplace = inplace
            self.use_shortcut = stride == 1 and cin <= cout
            mid = cin * exp
            self.conv_exp = cbr(cin, mid, 1, act=nn.SiLU)
            self.conv_dw = cbr(mid, mid, 3, stride, groups=mid, act=nn.ReLU6)
            self.conv_pwl = cbr(mid, cout, 1, act=None)

        def forward(self, x: Any) -> Any:
            out = self.conv_pwl(self.conv_dw(self.conv_exp(x)))
            if self.use_shortcut and self.inplace:  # timm's form
                out[:, 0:self.cin] += x
            elif self.use_shortcut:
                out = torch.cat([out[:, :self.cin] + x, out[:, self.cin:]], dim=1)
            return out

    class ReXNet(nn.Module):
        def __init__(self, inplace: bool = False) -> None:
            super().__init__()
            self.stem = cbr(3, 16, 3, 2, act=nn.SiLU)
            self.blocks = nn.Sequential(*[
                LinearBottleneck(cin, cout, stride, inplace=inplace)
                for cin, cout, stride in [(16, 24, 2), (24, 30, 1), (30, 36, 1), (36, 48, 2),
                                          (48, 56, 1)]])
            self.conv_head = cbr(56, 64, 1, act=nn.SiLU)
            self.head = Head(64)

        def forward(self, x: Any) -> Any:
            return self.head(self.conv_head(self.blocks(self.stem(x))))

    # ShuffleNetV2 ----------------------------------------------------------------------
    def channel_shuffle(x: Any, groups: int) -> Any:  # torchvision's
        n, c, h, w = x.size()
        x = x.view(n, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(n, c, h, w)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.stride = stride
            bf = cout // 2
            if stride > 1:
                self.branch1 = nn.Sequential(cbr(cin, cin, 3, stride, groups=cin, act=None),
                                             cbr(cin, bf, 1))
            self.branch2 = nn.Sequential(cbr(cin if stride > 1 else bf, bf, 1),
                                         cbr(bf, bf, 3, stride, groups=bf, act=None),
                                         cbr(bf, bf, 1))

        def forward(self, x: Any) -> Any:
            if self.stride == 1:
                x1, x2 = x.chunk(2, dim=1)
                out = torch.cat((x1, self.branch2(x2)), dim=1)
            else:
                out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
            return channel_shuffle(out, 2)

    class ShuffleNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = cbr(3, 16, 3, 2)
            self.stages = nn.Sequential(
                InvertedResidual(16, 32, 2), InvertedResidual(32, 32, 1),
                InvertedResidual(32, 32, 1), InvertedResidual(32, 64, 2),
                InvertedResidual(64, 64, 1), InvertedResidual(64, 64, 1))
            self.conv5 = cbr(64, 64, 1)
            self.head = Head(64)

        def forward(self, x: Any) -> Any:
            return self.head(self.conv5(self.stages(self.stem(x))))

    return {"cspdarknet": CSPDarknet, "ghostnet": GhostNet, "rexnet": ReXNet,
            "rexnet_inplace": lambda: ReXNet(inplace=True), "shufflenetv2": ShuffleNetV2}


NOTES = {
    "cspdarknet": "split into bypass and processed halves, adds on the processed half",
    "ghostnet": "ghost modules (conv + depthwise of it, concat, slice), SE, conv shortcuts",
    "rexnet": "partial-channel residual adds (Slice + Add + Concat)",
    "rexnet_inplace": "the same adds written in place, as timm does (`out[:, :C_in] += x`): "
                      "ScatterND (after Expand + Reshape, or between Transposes)",
    "shufflenetv2": "chunk, concat, channel shuffle (Reshape-Transpose-Reshape)",
}


def build(name: str, seed: int = 0) -> tuple[Any, Any]:
    """The network ``name`` (eval mode, seeded, non-trivial BatchNorm statistics) and an input."""
    import torch

    torch.manual_seed(seed)
    net = _nets()[name]().eval()
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net, torch.randn(1, 3, 32, 32, generator=g)


def export(net: Any, x: Any, dynamo: bool) -> onnx.ModelProto:
    """The ONNX export of ``net``: TorchScript at opset 17, or torch.export (``dynamo``) at
    its own opset 18."""
    import contextlib

    import torch

    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
        path = Path(d) / "m.onnx"
        torch.onnx.export(net, (x,), str(path), dynamo=dynamo, opset_version=18 if dynamo else 17,
                          input_names=["x"], output_names=["logits"])
        m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 10)
    return m


# --- measuring ---------------------------------------------------------------------------------


def conv_filters(a: Analysis) -> tuple[int, int]:
    """(filters in a prunable space, all filters) over every Conv layer of the analysis."""
    convs = {la.node: la for la in a.layers if la.op_type == "Conv"}
    total = sum(la.weight_shape[0] for la in convs.values())
    prunable = 0
    for sp in a.spaces:
        if not sp.prunable:
            continue
        for r in sp.refs:
            la = convs.get(r.node)
            if r.role == "out" and r.is_weight and la is not None and r.tensor == la.weight:
                prunable += r.length * r.block
    return prunable, total


def torch_pruning_filters(net: Any, x: Any) -> tuple[int, int, int]:
    """(conv output channels in Torch-Pruning's prunable groups, all conv output channels,
    reshapes whose index mapping crashed Torch-Pruning).

    Torch-Pruning 1.6.1 crashes (ZeroDivisionError in ``update_reshape_index_mapping``) on a
    channel shuffle followed by ``chunk``; such a reshape is counted and given no index
    mapping, which is what Torch-Pruning does with reshapes it does not recognise (it then
    treats the shuffle as if it kept every channel in place)."""
    import torch
    import torch_pruning as tp
    from torch_pruning.dependency import index_mapping

    crashed: set[int] = set()
    original = index_mapping.update_reshape_index_mapping

    def tolerant(graph: Any, node: Any) -> None:
        try:
            original(graph, node)
        except ZeroDivisionError:
            crashed.add(id(node))

    ignored = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    seen: set[int] = set()
    index_mapping.update_reshape_index_mapping = tolerant
    try:
        dg = tp.DependencyGraph().build_dependency(net, example_inputs=x)
        for group in dg.get_all_groups(ignored_layers=ignored):
            for dep, _ in group:
                m = dep.target.module
                if isinstance(m, torch.nn.Conv2d) and dg.is_out_channel_pruning_fn(dep.handler):
                    seen.add(id(m))
    finally:
        index_mapping.update_reshape_index_mapping = original
    return (sum(m.out_channels for m in convs if id(m) in seen),
            sum(m.out_channels for m in convs), len(crashed))


def zero_half(m: onnx.ModelProto, a: Analysis, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """``m`` with a random half of the channels of every prunable space zeroed (out and in
    members; the same count from every conv group of a space), and the conv filters zeroed."""
    rng = np.random.default_rng(seed)
    arrs = {t.name: numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    groups = {(g.space, g.index): g for g in a.groups if g.kind == "channel" and g.prunable}
    convs = {la.node: la for la in a.layers if la.op_type == "Conv"}
    zeroed = 0
    for sp in a.spaces:
        if not sp.prunable or sp.channels < 2:
            continue
        blocks = math.lcm(*sp.partitions) if sp.partitions else 1
        size = sp.channels // blocks
        take: list[int] = ([int(c) for c in rng.permutation(size)[:max(1, size // 2)]]
                           if size > 1 else [])
        chans = [int(c) + b * size for c in take for b in range(blocks)]
        for c in chans:
            for mem in groups[(sp.id, c)].members:
                if mem.role != "stat":
                    v = arrs[mem.tensor]
                    v[mem.index(v.shape)] = 0
        for r in sp.refs:
            if r.role == "out" and r.is_weight and r.node in convs and (
                    r.tensor == convs[r.node].weight):
                zeroed += r.block * sum(r.space_start <= c < r.space_start + r.length
                                        for c in chans)
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrs[t.name], t.name))
    return out, zeroed


def conv_filter_count(m: onnx.ModelProto) -> int:
    a = onnx_ssl.analyze(m, kinds=())
    return sum(la.weight_shape[0] for la in a.layers if la.op_type == "Conv")


def measure(name: str, exporters: list[str]) -> list[tuple[str, ...]]:
    net, x = build(name)
    tp_n, tp_total, crashed = torch_pruning_filters(*build(name))
    tp_cell = f"{100 * tp_n / tp_total:.1f}% ({tp_n}/{tp_total})"
    if crashed:
        tp_cell += f", crashed on {crashed} reshape(s), skipped"
    rows: list[tuple[str, ...]] = []
    for exporter in exporters:
        try:
            m = export(net, x, exporter == "dynamo")
        except Exception as e:  # noqa: BLE001 - an exporter that fails is reported, not fatal
            rows.append((name, exporter, f"export failed: {type(e).__name__}", "", "", ""))
            continue
        a = onnx_ssl.analyze(m)
        ours, total = conv_filters(a)
        zm, zeroed = zero_half(m, a)
        result = onnx_ssl.prune(zm, verify=3)  # raises if the outputs differ
        removed = total - conv_filter_count(result.model)
        check = f"{removed} of {zeroed} zeroed filters removed, outputs equal"
        rows.append((name, exporter, f"{100 * ours / total:.1f}% ({ours}/{total})",
                     tp_cell, check, NOTES[name]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", nargs="+", default=list(NOTES), choices=list(NOTES))
    ap.add_argument("--exporters", nargs="+", default=["ts", "dynamo"], choices=["ts", "dynamo"])
    args = ap.parse_args(argv)
    rows: list[tuple[str, ...]] = [("architecture", "exporter", "ours: conv filters prunable",
             "Torch-Pruning 1.6.1", "check (half of each space zeroed, pruned)", "constructs")]
    for name in args.nets:
        rows += measure(name, args.exporters)
        print(f"{name} done", file=sys.stderr)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "|".join("---" for _ in rows[0]) + "|")
    for r in rows[1:]:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
