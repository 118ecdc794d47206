"""The trainer: sparsity, exact zeros with the proximal step, BatchNorm, resume, PyTorch
exports, data loading and refusals."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_training_helpers import digits, pretrained_tiny, tiny_cnn

from onnx_ssl.errors import EnvironmentProblem, InputError
from onnx_ssl.runtime import session
from onnx_ssl.training import _ort
from onnx_ssl.training.artifacts import ArtifactOptions, build_artifacts
from onnx_ssl.training.data import Dataset, load_data, load_idx_folder
from onnx_ssl.training.penalty import Lambdas
from onnx_ssl.training.trainer import STATE, TrainConfig, Trainer

DATA = digits(480)


def _train(
    tmp: Path,
    lambdas: Lambdas,
    *,
    prox: bool,
    epochs: int = 3,
    optimizer: str = "sgd",
    lr: float = 0.05,
    model: onnx.ModelProto | None = None,
    **cfg: object,
) -> Trainer:
    art = build_artifacts(
        model or tiny_cnn(), tmp, ArtifactOptions(lambdas=lambdas, optimizer=optimizer)
    )
    t = Trainer(art, TrainConfig(epochs=epochs, lr=lr, prox=prox, batch_size=32, **cfg))
    t.fit(DATA)
    return t


def _zero_fraction(t: Trainer, structure: str, label: str) -> float:
    return dict(t.sparsity())[f"{structure}:{label}"]


@pytest.fixture(scope="module")
def pretrained() -> onnx.ModelProto:
    return pretrained_tiny()


def test_prox_gives_exact_zeros_and_sparsity_grows_with_lambda(tmp_path, pretrained):
    fractions = []
    for k, lam in enumerate((0.0, 0.3, 0.6)):
        art = build_artifacts(
            pretrained,
            tmp_path / str(k),
            ArtifactOptions(lambdas=Lambdas(filter=lam, channel=lam), optimizer="sgd"),
        )
        t = Trainer(art, TrainConfig(epochs=3, lr=0.05, prox=True, batch_size=32))
        t.fit(digits())
        sp = dict(t.sparsity(tol=0.0))  # tol 0: only groups that are exactly zero count
        fractions.append(
            float(
                np.mean([v for key, v in sp.items() if key.split(":")[0] in ("filter", "channel")])
            )
        )
        w = t.params(["c2.weight"])["c2.weight"]
        zero_filters = int(np.sum(np.all(w.reshape(w.shape[0], -1) == 0, axis=1)))
        assert sp["filter:c2"] == pytest.approx(zero_filters / w.shape[0], abs=1e-4)
    assert fractions[0] == 0
    assert fractions[0] <= fractions[1] <= fractions[2]
    assert fractions[2] >= 0.25


def test_penalty_gradient_shrinks_groups(tmp_path):
    def norm(t: Trainer) -> float:
        return float(np.linalg.norm(t.params(["c3.weight"])["c3.weight"]))

    base = _train(tmp_path / "a", Lambdas(), prox=False, epochs=2)
    strong = _train(tmp_path / "b", Lambdas(filter=0.5), prox=False, epochs=2)
    assert norm(strong) < 0.8 * norm(base)
    assert strong.info.penalty.active_terms


def test_batchnorm_trains_updates_statistics_and_exports(tmp_path):
    t = _train(
        tmp_path / "a", Lambdas(coupled=0.01), prox=False, epochs=2, optimizer="adamw", lr=3e-3
    )
    art = t.art
    before = onnx.load(str(art.inference_model))
    init0 = {x.name: onnx.numpy_helper.to_array(x) for x in before.graph.initializer}
    after = t.params()
    assert not np.allclose(after["bn1.mean"], init0["bn1.mean"])  # running stats updated
    assert not np.allclose(after["bn1.scale"], init0["bn1.scale"])  # BN affine trained
    exported = onnx.load(str(art.path / "trained_model.onnx"))
    assert [i.name for i in exported.graph.input] == ["input"]
    assert [o.name for o in exported.graph.output] == ["logits"]
    fitted = t.prepare_data(DATA.subset(np.arange(32)))
    x = fitted.x["input"]
    ref = t.predict(fitted)
    sess = session(exported)
    got = np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    log = (art.path / "train_log.csv").read_text().splitlines()
    assert len(log) == 3 and "zero:coupled:c1" in log[0] and "val_error" in log[0]


def test_resume_continues_exactly(tmp_path):
    cfg = {"schedule": "constant", "val_fraction": 0.25}
    full = _train(tmp_path / "full", Lambdas(filter=0.05), prox=True, epochs=2, **cfg)
    part = _train(tmp_path / "part", Lambdas(filter=0.05), prox=True, epochs=1, **cfg)
    resumed = Trainer(
        part.art, TrainConfig(epochs=2, lr=0.05, prox=True, batch_size=32, resume=True, **cfg)
    )  # type: ignore[arg-type]
    assert resumed.start_epoch == 1
    res = resumed.fit(DATA)
    assert [h.epoch for h in res.history] == [2]
    a, b = full.params(), resumed.params()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    log = (part.art.path / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2"]


def test_checkpoint_from_other_artifacts_is_refused(tmp_path):
    a = _train(tmp_path / "a", Lambdas(), prox=False, epochs=1)
    b = build_artifacts(tiny_cnn(residual=False), tmp_path / "b")
    shutil.copy(a.state_path, b.path / STATE)
    before = (b.path / STATE).read_bytes()
    with pytest.raises(InputError, match="does not match the artifacts"):
        Trainer(b, TrainConfig(resume=True))
    assert (b.path / STATE).read_bytes() == before  # left as it was
    (b.path / STATE).write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        Trainer(b, TrainConfig(resume=True))


@pytest.mark.filterwarnings("ignore")
def test_pytorch_training_mode_export_trains(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.drop = nn.Dropout(0.2)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))

    net = Net().train()
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        net,
        (torch.randn(2, 1, 8, 8),),
        str(path),
        dynamo=False,
        training=torch.onnx.TrainingMode.TRAINING,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
    model = onnx.load(str(path))
    assert any(
        a.name == "training_mode" and a.i == 1 for n in model.graph.node for a in n.attribute
    )
    t = _train(
        tmp_path / "a",
        Lambdas(coupled=0.01),
        prox=False,
        epochs=2,
        optimizer="adamw",
        lr=3e-3,
        model=model,
    )
    assert t.info.frozen == ("bn.running_mean", "bn.running_var")
    out = onnx.load(str(t.art.path / "trained_model.onnx"))
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    bn = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    assert len(bn.output) == 1
    res = session(out).run(None, {"input": np.zeros((3, 1, 8, 8), np.float32)})[0]
    assert res.shape == (3, 10)


def test_wrong_data_is_refused_clearly(tmp_path):
    art = build_artifacts(tiny_cnn(), tmp_path / "a")
    t = Trainer(art, TrainConfig(epochs=1))
    bad_shape = Dataset({"x": np.zeros((10, 5, 5), np.float32)}, np.zeros(10, np.int64), "bad")
    with pytest.raises(
        InputError,
        match=r"samples of shape \(5, 5\) do not fit model input "
        r"'input' of shape \[N, 1, 8, 8\]",
    ):
        t.fit(bad_shape)
    bad_labels = Dataset({"x": np.zeros((10, 8, 8), np.float32)}, np.arange(10) + 3, "bad")
    with pytest.raises(
        InputError,
        match=r"labels out of range: found 3\.\.12 but the model "
        r"has 10 classes",
    ):
        t.fit(bad_labels)
    np.savez(tmp_path / "noy.npz", x=np.zeros((3, 8, 8)))
    # without 'y' the data loads unlabelled (for distillation); labelled artifacts refuse it
    with pytest.raises(InputError, match="no labels"):
        t.fit(load_data(tmp_path / "noy.npz"))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_data(tmp_path / "broken.npz")
    with pytest.raises(InputError, match="no such data file"):
        load_data(tmp_path / "missing.npz")
    assert not (art.path / STATE).exists()


def test_mnist_idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.arange(6, dtype=np.uint8)
    hdr = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(hdr + images.tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + (6).to_bytes(4, "big") + labels.tobytes()
    )
    d = load_idx_folder(tmp_path)
    assert d.x["x"].shape == (6, 28, 28) and d.x["x"].max() <= 1.0
    np.testing.assert_array_equal(d.y, labels)
    np.testing.assert_allclose(d.x["x"] * 255, images, atol=1e-3)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + (7).to_bytes(4, "big") + labels.tobytes()
    )
    with pytest.raises(InputError, match="truncated"):
        load_idx_folder(tmp_path)


def test_training_api_import_does_not_import_torch():
    code = (
        "import sys; from onnx_ssl.training import _ort; _ort.load(); _ort.artifacts_module();"
        "import onnx_ssl.training.trainer, onnx_ssl.runtime;"
        "onnx_ssl.runtime.session;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_broken_runtime_mix_is_reported():
    class Plain:  # the native module of a plain onnxruntime wheel: no training symbols
        InferenceSession = object

    with pytest.raises(
        EnvironmentProblem, match="pip uninstall -y onnxruntime onnxruntime-training-cpu"
    ):
        _ort.check_training_build(Plain(), "1.20.0")
    _ort.check_training_build(_ort.load().capi, "1.19.2")


@pytest.mark.parametrize(
    ("net", "exporter"),
    [("hand_resnet", "ts_train"), ("hf_resnet_bottleneck", "dynamo"), ("hf_bert", "ts")],
)
def test_exported_networks_train(tmp_path, net, exporter):
    """PyTorch exports: training-mode BatchNorm, literal batch-sized shapes (trained at the
    export's batch size), integer inputs and an output head the loss does not read."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import exported

    model = exported.load(net, exporter)
    out = model.graph.output[0]
    loss = "cross-entropy" if len(out.type.tensor_type.shape.dim) == 2 else "mse"
    art = build_artifacts(
        model,
        tmp_path / "a",
        ArtifactOptions(loss=loss, lambdas=Lambdas(coupled=1e-3, filter=1e-3)),
    )
    info = art.info
    rng = np.random.default_rng(0)
    n = info.fixed_batch or 4
    xs = {}
    for s in info.inputs:
        shape = [n] + [d or 1 for d in s.shape[1:]]
        xs[s.name] = (
            rng.standard_normal(shape).astype(s.dtype)
            if "float" in s.dtype
            else rng.integers(0, 10, shape).astype(s.dtype)
        )
    o = next(o for o in info.outputs if o.name == info.loss_output)
    y = (
        rng.integers(0, o.shape[-1], n)
        if loss == "cross-entropy"
        else rng.standard_normal([n] + [d or 1 for d in o.shape[1:]]).astype(np.float32)
    )
    res = Trainer(art, TrainConfig(epochs=1, batch_size=n, val_fraction=0)).fit(
        Dataset(xs, y, "random")
    )
    assert np.isfinite(res.history[0].loss)
    trained = onnx.load(str(art.path / "trained_model.onnx"))
    # The step moved the trainable weights and left every shape as it was.
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in trained.graph.initializer
             if t.name in before}
    assert {k: v.shape for k, v in after.items()} == {k: before[k].shape for k in after}
    moved = [k for k in info.trainable if k in after and not np.array_equal(after[k], before[k])]
    assert moved, "one training step changed no trainable weight"
    assert [i.name for i in trained.graph.input] == [
        i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    assert [o.name for o in trained.graph.output] == [o.name for o in model.graph.output]
