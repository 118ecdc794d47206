"""Tests of the reference-network builders in ``onnx_ssl.models``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_ssl.models as models
from onnx_ssl import runtime

NAMES = models.names()
HEAVY = {"alexnet", "caffenet"}  # ~61M parameters: batch 1, at most two builds each

LOGITS10: dict[str, tuple[int, ...]] = {"logits": (10,)}
IMG_OUT4: dict[str, tuple[int, ...]] = {"output": (4, 16, 16)}
EXPECTED_OUTPUTS: dict[str, dict[str, tuple[int, ...]]] = {
    "lenet": LOGITS10,
    "mlp": LOGITS10,
    "cifar_convnet": LOGITS10,
    "resnet20": LOGITS10,
    "resnet32": LOGITS10,
    "resnet56": LOGITS10,
    "alexnet": {"logits": (1000,)},
    "caffenet": {"logits": (1000,)},
    "syn_concat": IMG_OUT4,
    "syn_split": IMG_OUT4,
    "syn_slice": IMG_OUT4,
    "syn_depthwise": {"output": (8, 16, 16)},
    "syn_depthwise_mult": {"output": (8, 16, 16)},
    "syn_grouped": IMG_OUT4,
    "syn_se": IMG_OUT4,
    "syn_flatten_fc": LOGITS10,
    "syn_reshape_fc": LOGITS10,
    "syn_transpose": IMG_OUT4,
    "syn_residual": LOGITS10,
    "syn_constant_nodes": LOGITS10,
    "syn_same_pad": {"output": (8, 8, 8)},
    "syn_padded_const": IMG_OUT4,
    "syn_block_output": {"output": (4, 16, 16), "features": (8, 16, 16)},
    "syn_block_layernorm": IMG_OUT4,
    "syn_block_reshape_split": IMG_OUT4,
    "syn_block_shared_weight": IMG_OUT4,
    "syn_block_unknown_op": {"output": (4, 32, 32)},
    "syn_mlp_input_gather": LOGITS10,
}


@dataclass
class Built:
    name: str
    batch: int
    model: onnx.ModelProto


@pytest.fixture(scope="module", params=NAMES)
def built(request: pytest.FixtureRequest) -> Iterator[Built]:
    """One build per model (seed 0), shared by all tests of that model."""
    name: str = request.param
    batch = 1 if name in HEAVY else 2
    model = models.build(name, batch=batch, seed=0)
    _WEIGHTS_CACHE[id(model)] = (model, _weights(model))
    yield Built(name, batch, model)
    _WEIGHTS_CACHE.clear()


# ---------------------------------------------------------------------------- helpers
# Weights of the fixture model (which the entry keeps alive, so its id stays unique).
_WEIGHTS_CACHE: dict[int, tuple[onnx.ModelProto, dict[str, np.ndarray]]] = {}


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node values by name."""
    cached = _WEIGHTS_CACHE.get(id(model))
    if cached is not None and cached[0] is model:
        return cached[1]
    return _weights(model)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    (found,) = [n for n in model.graph.node if n.name == name]
    return found


def attr(n: onnx.NodeProto, key: str) -> object:
    for a in n.attribute:
        if a.name == key:
            return onnx.helper.get_attribute_value(a)  # noqa: TID251
    raise KeyError(key)


def out_channels(model: onnx.ModelProto, n: onnx.NodeProto) -> int:
    """Output channels of a Conv / Gemm (transB=1) / MatMul node from its weight."""
    w = weights(model)[n.input[1]]
    return int(w.shape[1] if n.op_type == "MatMul" else w.shape[0])


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ---------------------------------------------------------------------------- registry
def test_registry_names() -> None:
    assert NAMES == list(models.MODELS)
    assert len(NAMES) == len(set(NAMES))
    assert set(NAMES) == set(EXPECTED_OUTPUTS)
    paper = {"lenet", "mlp", "cifar_convnet", "resnet20", "resnet32", "resnet56"}
    paper |= {"alexnet", "caffenet"}
    assert paper <= set(NAMES)
    assert all(n in paper or n.startswith("syn_") for n in NAMES)


def test_build_unknown_name_lists_known_names() -> None:
    with pytest.raises(KeyError) as info:
        models.build("no_such_net")
    assert "lenet" in str(info.value) and "syn_concat" in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_builder_signature(name: str) -> None:
    params = inspect.signature(models.MODELS[name]).parameters
    assert params["batch"].default == 1
    assert params["seed"].default == 0


def test_build_passes_kwargs() -> None:
    model = models.build("mlp", batch=3, seed=5)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 784]


# ---------------------------------------------------------------------------- per model
def test_checker_and_versions(built: Built) -> None:
    model = built.model
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10
    assert model.producer_name == "onnx-ssl.models"
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets == {"": 17}
    assert max(opsets.values()) <= 21


def test_names_and_static_shapes(built: Built) -> None:
    graph = built.model.graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == list(EXPECTED_OUTPUTS[built.name])
    for vi in [*graph.input, *graph.output]:
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = vi.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") and d.dim_value > 0 for d in dims)
        assert dims[0].dim_value == built.batch
    node_names = [n.name for n in graph.node]
    assert all(node_names) and len(node_names) == len(set(node_names))
    init_names = [t.name for t in graph.initializer]
    assert len(init_names) == len(set(init_names))
    tensors = [t for n in graph.node for t in n.output]
    assert len(tensors) == len(set(tensors))


def test_parameter_names_and_init(built: Built) -> None:
    model = built.model
    w = weights(model)
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "BatchNormalization"):
            assert n.input[1].startswith(n.name + ".") or n.name.startswith("shared")
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2:
            bias = w[n.input[2]]
            assert bias.shape == (out_channels(model, n),)
            assert np.all(bias != 0), f"{n.name}: zero bias"
        if n.op_type == "BatchNormalization":
            scale, shift, mean, var = (w[t] for t in n.input[1:])
            assert np.all((scale >= 0.5) & (scale <= 1.5))
            assert np.all((var >= 0.5) & (var <= 1.5))
            assert np.all(shift != 0) and np.all(mean != 0)
            assert [t.rsplit(".", 1)[1] for t in n.input[1:]] == ["scale", "bias", "mean", "var"]
    for n in nodes(model, "Conv"):
        weight = w[n.input[1]]
        fan_in = int(np.prod(weight.shape[1:]))
        if weight.size >= 1000:  # He-normal std sqrt(2 / fan_in)
            assert weight.std() == pytest.approx(np.sqrt(2 / fan_in), rel=0.1)
    for t in w.values():
        assert np.all(np.isfinite(t))


def test_runs_in_onnxruntime(built: Built) -> None:
    session = runtime.session(built.model, optimize=True)
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.shape[0] == built.batch
    x = np.random.default_rng(1234).standard_normal(inp.shape).astype(np.float32)
    expected = EXPECTED_OUTPUTS[built.name]
    results = session.run(list(expected), {"input": x})
    for (out_name, shape), value in zip(expected.items(), results, strict=True):
        assert value.shape == (built.batch, *shape), out_name
        assert value.dtype == np.float32
        assert np.all(np.isfinite(value)), out_name
        assert np.any(value != 0), out_name
    if built.batch == 2:  # the two samples are processed independently
        assert not np.allclose(results[0][0], results[0][1])


def test_seed_determinism(built: Built) -> None:
    first = weights(built.model)
    float_names = [k for k, v in first.items() if v.dtype == np.float32 and v.size > 1]
    assert float_names
    if built.name not in HEAVY:  # heavy models: not rebuilt a third time
        same = weights(models.build(built.name, batch=built.batch, seed=0))
        assert same.keys() == first.keys()
        for k, v in first.items():
            np.testing.assert_array_equal(same[k], v, err_msg=k)
    other = weights(models.build(built.name, batch=built.batch, seed=1))
    assert other.keys() == first.keys()
    for k in float_names:
        assert not np.array_equal(other[k], first[k]), k
    for k, v in first.items():
        if v.dtype == np.int64:  # shapes, split sizes ...: structure does not depend on seed
            np.testing.assert_array_equal(other[k], v, err_msg=k)


# ---------------------------------------------------------------------------- structure
def _check_lenet(m: onnx.ModelProto) -> None:
    layers = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [n.name for n in layers] == ["conv1", "conv2", "ip1", "ip2"]
    assert [out_channels(m, n) for n in layers] == [20, 50, 500, 10]
    assert ops(m) == ["Conv", "MaxPool", "Conv", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm"]
    assert weights(m)["ip1.weight"].shape == (500, 800)


def _check_mlp(m: onnx.ModelProto) -> None:
    gemms = nodes(m, "Gemm")
    assert [out_channels(m, n) for n in gemms] == [500, 300, 10]
    assert all(attr(n, "transB") == 1 for n in gemms)


def _check_cifar_convnet(m: onnx.ModelProto) -> None:
    convs = nodes(m, "Conv")
    assert [out_channels(m, n) for n in convs] == [32, 32, 64]
    assert "LRN" not in ops(m)
    assert [n.op_type for n in m.graph.node if n.op_type.endswith("Pool")] == [
        "MaxPool",
        "AveragePool",
        "AveragePool",
    ]
    assert weights(m)["ip1.weight"].shape == (10, 64 * 4 * 4)


def _check_resnet(n_blocks: int) -> Callable[[onnx.ModelProto], None]:
    def check(m: onnx.ModelProto) -> None:
        convs = nodes(m, "Conv")
        assert len(convs) == 1 + 6 * n_blocks + 2
        assert len(nodes(m, "Gemm")) == 1
        assert len(nodes(m, "BatchNormalization")) == len(convs)
        assert len(nodes(m, "Add")) == 3 * n_blocks
        assert all(len(c.input) == 2 for c in convs)  # no conv bias
        for stage, width in ((2, 32), (3, 64)):
            down = node(m, f"layer{stage}.0.downsample.conv")
            assert attr(down, "kernel_shape") == [1, 1] and attr(down, "strides") == [2, 2]
            assert out_channels(m, down) == width
            assert attr(node(m, f"layer{stage}.0.conv1"), "strides") == [2, 2]
            node(m, f"layer{stage}.0.downsample.bn")
        assert sum("downsample.conv" in c.name for c in convs) == 2
        assert [out_channels(m, node(m, f"layer{s}.{n_blocks - 1}.conv2")) for s in (1, 2, 3)] == [
            16,
            32,
            64,
        ]

    return check


def _check_alexnet(pool_before_lrn: bool) -> Callable[[onnx.ModelProto], None]:
    def check(m: onnx.ModelProto) -> None:
        convs = {c.name: c for c in nodes(m, "Conv")}
        assert list(convs) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
        groups = {k: attr(c, "group") for k, c in convs.items()}
        assert groups == {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}
        assert [out_channels(m, c) for c in convs.values()] == [96, 256, 384, 384, 256]
        assert [out_channels(m, g) for g in nodes(m, "Gemm")] == [4096, 4096, 1000]
        assert len(nodes(m, "Dropout")) == 2 and len(nodes(m, "MaxPool")) == 3
        for lrn in nodes(m, "LRN"):
            assert attr(lrn, "size") == 5
            assert attr(lrn, "alpha") == pytest.approx(1e-4)
            assert attr(lrn, "beta") == pytest.approx(0.75)
        seq = [o for o in ops(m) if o in ("LRN", "MaxPool")]
        first = ["MaxPool", "LRN"] if pool_before_lrn else ["LRN", "MaxPool"]
        assert seq == first * 2 + ["MaxPool"]
        n_params = sum(t.size for t in weights(m).values())
        assert 60_000_000 < n_params < 62_000_000

    return check


def _check_concat(m: onnx.ModelProto) -> None:
    (concat,) = nodes(m, "Concat")
    assert attr(concat, "axis") == 1
    assert [node(m, n).input[0] for n in ("branch_a", "branch_b")] == ["input", "input"]
    assert weights(m)["conv_out.weight"].shape[1] == 4 + 6


def _check_split(m: onnx.ModelProto) -> None:
    (split,) = nodes(m, "Split")
    assert len(split.input) == 2 and len(split.output) == 2
    assert weights(m)[split.input[1]].tolist() == [3, 5]


def _check_slice(m: onnx.ModelProto) -> None:
    slices = nodes(m, "Slice")
    w = weights(m)
    assert [(w[s.input[1]].tolist(), w[s.input[2]].tolist()) for s in slices] == [
        ([0], [3]),
        ([3], [8]),
    ]
    assert all(w[s.input[3]].tolist() == [1] for s in slices)


def _check_depthwise(multiplier: int) -> Callable[[onnx.ModelProto], None]:
    def check(m: onnx.ModelProto) -> None:
        dw = node(m, "conv_dw")
        assert attr(dw, "group") == 8
        assert weights(m)["conv_dw.weight"].shape == (8 * multiplier, 1, 3, 3)

    return check


def _check_grouped(m: onnx.ModelProto) -> None:
    assert [attr(c, "group") for c in nodes(m, "Conv")] == [1, 2, 4, 1]


def _check_se(m: onnx.ModelProto) -> None:
    (mul,) = nodes(m, "Mul")
    assert set(mul.input) == {"relu1", "se.gate"}
    assert [out_channels(m, node(m, n)) for n in ("se.reduce", "se.expand")] == [2, 8]


def _check_flatten_fc(m: onnx.ModelProto) -> None:
    assert "Flatten" in ops(m)
    assert weights(m)["fc1.weight"].shape == (16, 4 * 8 * 8)


def _check_reshape_fc(m: onnx.ModelProto) -> None:
    (reshape,) = nodes(m, "Reshape")
    w = weights(m)
    assert w[reshape.input[1]].tolist()[1:] == [-1]
    assert w["fc1.weight"].shape == (256, 16) and w["fc1.bias"].shape == (16,)
    assert len(nodes(m, "MatMul")) == 2 and len(nodes(m, "Add")) == 2
    assert "Gemm" not in ops(m) and "Flatten" not in ops(m)


def _check_transpose(m: onnx.ModelProto) -> None:
    perms = [attr(t, "perm") for t in nodes(m, "Transpose")]
    assert perms == [[0, 2, 3, 1], [0, 3, 1, 2]]
    assert weights(m)["proj.weight"].shape == (8, 12)


def _check_residual(m: onnx.ModelProto) -> None:
    assert len(nodes(m, "Add")) == 2
    node(m, "layer2.0.downsample.conv")
    assert not [n for n in m.graph.node if n.name.startswith("layer1.0.downsample")]


def _check_constant_nodes(m: onnx.ModelProto) -> None:
    assert len(m.graph.initializer) == 0
    consts = {n.output[0] for n in nodes(m, "Constant")}
    assert {"conv1.weight", "conv1.bias", "bn1.scale", "fc.weight"} <= consts


def _check_same_pad(m: onnx.ModelProto) -> None:
    assert {"Shape", "Gather", "Concat", "Pad", "Max", "Div"} <= set(ops(m))
    conv2 = node(m, "conv2")
    assert attr(conv2, "pads") == [0, 0, 0, 0] and attr(conv2, "strides") == [2, 2]
    (pad,) = nodes(m, "Pad")
    assert pad.input[1] == "same_pad.pads"


def _check_padded_const(m: onnx.ModelProto) -> None:
    assert [attr(c, "pads") for c in nodes(m, "Conv")] == [[1] * 4, [1] * 4, [0] * 4]
    assert len(nodes(m, "BatchNormalization")) == 2


def _check_block_output(m: onnx.ModelProto) -> None:
    consumers = [n.name for n in m.graph.node if "features" in n.input]
    assert consumers == ["conv2"]
    assert node(m, "conv1").output[0] == "features"


def _check_block_layernorm(m: onnx.ModelProto) -> None:
    (ln,) = nodes(m, "LayerNormalization")
    assert attr(ln, "axis") == -1
    assert weights(m)["ln.scale"].shape == (8,)


def _check_block_reshape_split(m: onnx.ModelProto) -> None:
    w = weights(m)
    assert [w[r.input[1]].tolist()[1:] for r in nodes(m, "Reshape")] == [
        [2, 4, 16, 16],
        [8, 16, 16],
    ]


def _check_block_shared_weight(m: onnx.ModelProto) -> None:
    a, b = node(m, "shared_a"), node(m, "shared_b")
    assert a.input[1] == b.input[1] == "shared.weight"
    assert a.input[0] != b.input[0]
    assert "Add" not in ops(m)


def _check_block_unknown_op(m: onnx.ModelProto) -> None:
    assert attr(node(m, "hardmax"), "axis") == 1
    assert attr(node(m, "depth_to_space"), "blocksize") == 2


def _check_mlp_input_gather(m: onnx.ModelProto) -> None:
    assert weights(m)["fc1.weight"].shape == (32, 64)


STRUCTURE: dict[str, Callable[[onnx.ModelProto], None]] = {
    "lenet": _check_lenet,
    "mlp": _check_mlp,
    "cifar_convnet": _check_cifar_convnet,
    "resnet20": _check_resnet(3),
    "resnet32": _check_resnet(5),
    "resnet56": _check_resnet(9),
    "alexnet": _check_alexnet(pool_before_lrn=False),
    "caffenet": _check_alexnet(pool_before_lrn=True),
    "syn_concat": _check_concat,
    "syn_split": _check_split,
    "syn_slice": _check_slice,
    "syn_depthwise": _check_depthwise(1),
    "syn_depthwise_mult": _check_depthwise(2),
    "syn_grouped": _check_grouped,
    "syn_se": _check_se,
    "syn_flatten_fc": _check_flatten_fc,
    "syn_reshape_fc": _check_reshape_fc,
    "syn_transpose": _check_transpose,
    "syn_residual": _check_residual,
    "syn_constant_nodes": _check_constant_nodes,
    "syn_same_pad": _check_same_pad,
    "syn_padded_const": _check_padded_const,
    "syn_block_output": _check_block_output,
    "syn_block_layernorm": _check_block_layernorm,
    "syn_block_reshape_split": _check_block_reshape_split,
    "syn_block_shared_weight": _check_block_shared_weight,
    "syn_block_unknown_op": _check_block_unknown_op,
    "syn_mlp_input_gather": _check_mlp_input_gather,
}


def test_structure(built: Built) -> None:
    assert set(STRUCTURE) == set(NAMES)
    STRUCTURE[built.name](built.model)
