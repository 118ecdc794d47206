"""Self-distilling SSL: unlabelled data, the teacher's cached outputs, the distillation losses
against numpy, every output in the loss, a multi-input int64 model, the fidelity metric, and
the refusals of bad input (onnx_ssl.training.distill, .fidelity, .loss_block)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_training_helpers import digits, pretrained_tiny

from onnx_ssl.cli import main
from onnx_ssl.errors import InputError
from onnx_ssl.training import evaluate as evaluate_mod
from onnx_ssl.training.artifacts import build_artifacts
from onnx_ssl.training.chain import SslOptions, run_ssl
from onnx_ssl.training.data import Dataset, load_data
from onnx_ssl.training.distill import parse_weights, teacher_targets
from onnx_ssl.training.fidelity import fidelity, measure, output_kind
from onnx_ssl.training.penalty import Lambdas
from onnx_ssl.training.spec import ArtifactOptions
from onnx_ssl.training.trainer import TrainConfig, Trainer

VOCAB, SEQ, HIDDEN, FFN, CLASSES = 30, 6, 16, 24, 5
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def bert_like(seed: int = 0, noise: float = 0.0, int_output: bool = False) -> onnx.ModelProto:
    """A BERT-like encoder layer: int64 input_ids, attention_mask, token_type_ids -> word and
    type embeddings (Gather), masked, a ReLU feed-forward block with a residual, mean pooling
    and a classifier. Outputs ``logits`` [N, 5] and ``hidden`` [N, 6, 16] (and, with
    ``int_output``, ``pred`` = argmax, int64). ``noise`` perturbs the weights (a student)."""
    rng = np.random.default_rng(seed)
    prng = np.random.default_rng(seed + 100)

    def init(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        w = rng.standard_normal(shape) * scale
        if noise:
            w = w + prng.standard_normal(shape) * noise * scale
        return numpy_helper.from_array(w.astype(np.float32), name)

    inits = [init("word_emb", (VOCAB, HIDDEN), 0.5), init("type_emb", (2, HIDDEN), 0.5),
             init("w1", (HIDDEN, FFN), 0.4), init("b1", (FFN,), 0.1),
             init("w2", (FFN, HIDDEN), 0.3), init("b2", (HIDDEN,), 0.1),
             init("wc", (HIDDEN, CLASSES), 0.5), init("bc", (CLASSES,), 0.1),
             numpy_helper.from_array(np.array([2], np.int64), "ax2"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    mk = helper.make_node
    nodes = [
        mk("Gather", ["word_emb", "input_ids"], ["we"], name="word_gather"),
        mk("Gather", ["type_emb", "token_type_ids"], ["te"], name="type_gather"),
        mk("Add", ["we", "te"], ["emb"], name="emb_add"),
        mk("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="mask_cast"),
        mk("Unsqueeze", ["maskf", "ax2"], ["mask3"], name="mask_unsq"),
        mk("Mul", ["emb", "mask3"], ["h0"], name="mask_mul"),
        mk("MatMul", ["h0", "w1"], ["f1"], name="ffn1"),
        mk("Add", ["f1", "b1"], ["f1b"], name="ffn1_bias"),
        mk("Relu", ["f1b"], ["f1r"], name="ffn1_relu"),
        mk("MatMul", ["f1r", "w2"], ["f2"], name="ffn2"),
        mk("Add", ["f2", "b2"], ["f2b"], name="ffn2_bias"),
        mk("Add", ["f2b", "h0"], ["hidden"], name="residual"),
        mk("ReduceMean", ["hidden", "ax1"], ["pooled"], keepdims=0, name="pool"),
        mk("MatMul", ["pooled", "wc"], ["lg"], name="cls"),
        mk("Add", ["lg", "bc"], ["logits"], name="cls_bias"),
    ]
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", SEQ]) for n in INPUTS]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])]
    if int_output:
        nodes.append(mk("ArgMax", ["logits"], ["pred"], axis=1, keepdims=0, name="argmax"))
        outs.append(helper.make_tensor_value_info("pred", TensorProto.INT64, ["batch"]))
    g = helper.make_graph(nodes, "bert_like", ins, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def tokens(n: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, SEQ), np.int64)
    mask[:, SEQ - 2:] = rng.integers(0, 2, (n, 2))
    types = np.zeros((n, SEQ), np.int64)
    types[:, SEQ // 2:] = 1
    return {"input_ids": rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64),
            "attention_mask": mask, "token_type_ids": types}


def ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnxruntime import InferenceSession

    sess = InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, sess.run(names, feeds), strict=True))


# --- data and teacher -----------------------------------------------------------------------


def test_npz_without_labels_loads_as_unlabelled_int64_inputs(tmp_path):
    np.savez(tmp_path / "t.npz", **tokens(10), _note=np.zeros(1))
    d = load_data(tmp_path / "t.npz")
    assert d.y is None and not d.labelled and len(d) == 10
    assert sorted(d.x) == sorted(INPUTS) and all(v.dtype == np.int64 for v in d.x.values())
    sub = d.subset(np.array([1, 3]))
    np.testing.assert_array_equal(sub.x["input_ids"], d.x["input_ids"][[1, 3]])
    with pytest.raises(InputError, match="no labels"):
        next(d.batches(4))


def test_teacher_outputs_are_cached_once_per_sample_and_match_the_model():
    m = bert_like()
    feeds = tokens(37)
    d = teacher_targets(m, Dataset(feeds, None, "toks"), batch_size=8)
    ref = ort_outputs(m, feeds)
    assert set(d.targets) == {"logits", "hidden"}
    for k in ref:
        np.testing.assert_allclose(d.targets[k], ref[k], rtol=1e-5, atol=1e-6)
        assert d.target_rms[k] == pytest.approx(float(np.sqrt(np.mean(ref[k] ** 2))), rel=1e-6)
    # a split keeps the rows of the targets with their inputs, and the data set's RMS
    tr, va = d.split(0.25, seed=0)
    assert len(tr) + len(va) == 37 and tr.target_rms == d.target_rms
    row = np.flatnonzero((feeds["input_ids"] == va.x["input_ids"][0]).all(axis=1))[0]
    np.testing.assert_array_equal(va.targets["hidden"][0], d.targets["hidden"][row])


def test_the_chain_runs_the_teacher_once(monkeypatch):
    teacher = bert_like()
    calls: list[int] = []
    real = evaluate_mod.run_model

    def counting(model, data, *a, **k):  # type: ignore[no-untyped-def]
        if model is teacher:
            calls.append(len(data))
        return real(model, data, *a, **k)

    monkeypatch.setattr(evaluate_mod, "run_model", counting)
    opts = SslOptions(lambdas=Lambdas(coupled=0.01), epochs=2, finetune_epochs=1, lr=0.01,
                      batch_size=16)
    rep = run_ssl(teacher, Dataset(tokens(48), None, "toks"), opts).report
    assert calls == [48]  # every sample once, not per batch or per epoch
    stages = dict(rep.fidelity)
    assert set(stages) == {"before", "ssl", "thresholded", "pruned", "final"}
    assert [(f.output, f.kind) for f in stages["final"]] == [("logits", "top1"),
                                                             ("hidden", "cosine")]
    assert stages["before"][0].value == 1.0 and stages["before"][1].value == pytest.approx(1.0)


# --- the loss graph against numpy -----------------------------------------------------------


def _np_loss(kind: str, s: np.ndarray, t: np.ndarray, rms: float, w: float, temp: float) -> float:
    s = s.astype(np.float64)
    t = t.astype(np.float64)
    if kind == "mse":  # squared distance along the last axis, mean over the rest
        return w / rms**2 * float(np.mean(np.sum((s - t) ** 2, axis=-1)))
    if kind == "kl":
        def log_softmax(z: np.ndarray) -> np.ndarray:
            z = z / temp
            z = z - z.max(axis=-1, keepdims=True)
            return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

        ls, lt = log_softmax(s), log_softmax(t)
        return w * temp**2 * float(np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1)))
    cos = np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    return w * float(np.mean(1 - cos))


@pytest.mark.parametrize("loss", ["mse", "kl", "cosine"])
def test_distillation_loss_matches_numpy(tmp_path, loss):
    """The eval model's ssl_data_loss on a batch of student (the model) outputs against
    teacher (a perturbed model) outputs, weights 3:1, temperature 1.5."""
    student = bert_like()
    feeds = tokens(40)
    data = teacher_targets(bert_like(noise=0.5), Dataset(feeds, None, "toks"))
    art = build_artifacts(student, tmp_path / "a", ArtifactOptions(
        distill=loss, temperature=1.5, distill_weights="logits=3,hidden=1",
        lambdas=Lambdas(coupled=0.1)))
    assert art.info.distill_weights == (0.75, 0.25)
    tr = Trainer(art, TrainConfig(batch_size=64, save_state=False, export=False))
    value, outs = tr.outputs(data, ["logits", "hidden"])
    s = ort_outputs(student, feeds)
    np.testing.assert_allclose(outs["logits"], s["logits"], rtol=1e-5, atol=1e-5)
    ref = sum(_np_loss(loss, s[o], data.targets[o], data.target_rms[o], w, 1.5)
              for o, w in (("logits", 0.75), ("hidden", 0.25)))
    assert ref > 1e-3
    assert value == pytest.approx(ref, rel=1e-4)


def test_every_output_is_in_the_loss(tmp_path):
    """Teacher logits equal to the student's: only the hidden output can make the loss
    non-zero, and training must move the hidden output towards its target."""
    student = bert_like()
    feeds = tokens(64)
    s = ort_outputs(student, feeds)
    other = teacher_targets(bert_like(noise=0.5), Dataset(feeds, None, "toks"))
    data = Dataset(feeds, None, "toks", targets={"logits": s["logits"],
                                                 "hidden": other.targets["hidden"]},
                   target_rms={"logits": 1.0, "hidden": 1.0})
    art = build_artifacts(student, tmp_path / "a", ArtifactOptions(distill="mse",
                                                                   lambdas=Lambdas()))
    assert [o for o, _, _ in art.info.distill_terms] == ["logits", "hidden"]
    tr = Trainer(art, TrainConfig(epochs=15, lr=0.01, batch_size=16, val_fraction=0,
                                  save_state=False, export=False))
    loss0, _ = tr.outputs(data, [])
    ref = 0.5 * float(np.mean(np.sum((s["hidden"] - data.targets["hidden"]) ** 2, axis=-1)))
    assert loss0 == pytest.approx(ref, rel=1e-4) and loss0 > 0.05
    tr.fit(data)
    loss1, outs = tr.outputs(data, ["hidden"])
    assert loss1 < 0.5 * loss0
    before = measure("relerr", s["hidden"], data.targets["hidden"])
    after = measure("relerr", outs["hidden"], data.targets["hidden"])
    assert after < 0.75 * before


def test_bert_like_student_distils_towards_its_teacher(tmp_path):
    """int64 multi-input, two outputs: a perturbed copy trained on the teacher's outputs
    agrees with it more on held-out inputs."""
    teacher = bert_like()
    data = teacher_targets(teacher, Dataset(tokens(400), None, "toks"))
    train, held = data.split(0.25, seed=0)
    art = build_artifacts(bert_like(noise=0.6), tmp_path / "a",
                          ArtifactOptions(distill="mse", lambdas=Lambdas()))
    tr = Trainer(art, TrainConfig(epochs=20, lr=3e-3, batch_size=32, save_state=False,
                                  export=False))
    loss0, err0, fid0 = tr.evaluate_all(held)
    res = tr.fit(train, held)
    loss1, err1, fid1 = tr.evaluate_all(held)
    assert err0 is None and err1 is None
    f0, f1 = {f.output: f.value for f in fid0}, {f.output: f.value for f in fid1}
    assert loss1 < 0.1 * loss0
    assert f1["hidden"] > f0["hidden"] + 0.1 and f1["hidden"] > 0.85
    assert f1["logits"] > f0["logits"] + 0.3
    assert res.history[-1].fidelity == tuple((f.key, round(f.value, 6)) for f in fid1)
    assert res.history[-1].row()["fidelity:cosine:hidden"] == pytest.approx(f1["hidden"])


# --- fidelity -------------------------------------------------------------------------------


def test_fidelity_kind_and_value_per_output():
    assert output_kind("logits", (None, 10)) == "top1"
    assert output_kind("pooler_output", (None, 32)) == "cosine"
    assert output_kind("last_hidden_state", (None, 8, 32)) == "cosine"
    assert output_kind("token_logits", (None, 8, 32), "kl") == "top1"
    assert output_kind("logits", (None, 10), "cosine") == "cosine"
    assert output_kind("score", (None, 1)) == "relerr"
    assert output_kind("y", (None,)) == "relerr"
    t = np.array([[1.0, 0, 0], [0, 2, 0], [0, 0, 3], [1, 2, 0]])
    s = np.array([[2.0, 1, 0], [0, 1, 3], [0, 0, 1], [0, 1, 0]])  # argmax agrees on 3 of 4
    assert measure("top1", s, t) == 0.75
    cos = [2 / np.sqrt(5), 1 / np.sqrt(10), 1.0, 2 / np.sqrt(5)]
    assert measure("cosine", s, t) == pytest.approx(np.mean(cos))
    assert measure("relerr", s, t) == pytest.approx(np.linalg.norm(s - t) / np.linalg.norm(t))
    assert measure("relerr", t, t) == 0.0 and measure("cosine", t, t) == pytest.approx(1.0)
    fids = fidelity({"a": s, "b": t}, {"a": t, "b": t}, {"a": "top1", "b": "cosine"})
    assert [(f.output, f.kind, f.value) for f in fids] == [("a", "top1", 0.75),
                                                           ("b", "cosine", pytest.approx(1.0))]
    assert fids[0].text() == "a top-1 agreement 75.00%" and fids[0].key == "fidelity:top1:a"


def test_distill_weights_parse():
    assert parse_weights(None, ["a", "b"]) == (0.5, 0.5)
    assert parse_weights("3,1", ["a", "b"]) == (0.75, 0.25)
    assert parse_weights("b=1", ["a", "b"]) == (0.0, 1.0)
    for bad, word in (("1", "1 weight"), ("c=1", "'c' is not a model output"),
                      ("0,0", "not all 0"), ("x,1", "not a list")):
        with pytest.raises(InputError, match=word):
            parse_weights(bad, ["a", "b"])
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="--distill-temperature"):
            SslOptions(distill=True, distill_loss="kl", distill_temperature=t)
    with pytest.raises(InputError, match="unknown distillation loss"):
        ArtifactOptions(distill="l2")


# --- end to end through the CLI ---------------------------------------------------------------


def test_cnn_label_free_ssl_with_budget_log_plots_and_resume(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = tmp_path / "cnn.onnx"
    onnx.save(pretrained_tiny(), str(model))
    x = digits(600).x["x"]
    np.savez(tmp_path / "x.npz", x=x)  # inputs only: no labels
    args = ["ssl", str(model), "--data", str(tmp_path / "x.npz"), "-o",
            str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"), "--epochs", "8",
            "--finetune-epochs", "3", "--lr", "0.05", "--target-macs", "0.6",
            "--lambda-filter", "0.5", "--lambda-channel", "0.5", "--batch-size", "32",
            "--log", str(tmp_path / "log.jsonl"), "--plots", str(tmp_path / "plots"),
            "--work-dir", str(tmp_path / "work"), "--start", "ssl"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out fidelity to the input model: before logits top-1 agreement 100.00%" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["error"]["final"] is None and rep["budget"]["met"]
    assert rep["macs_after"] <= 0.6 * rep["macs_before"]
    final = rep["fidelity"]["final"]
    assert [(f["output"], f["kind"]) for f in final] == [("logits", "top1")]
    assert rep["metric"]["name"] == "fidelity:top1:logits"
    # the reported fidelity is the written model's agreement with the input model
    d = load_data(tmp_path / "x.npz")
    _, val = d.split(0.2, 0)
    small = onnx.load(str(tmp_path / "out.onnx"))
    got = evaluate_mod.run_model(small, val)[1]["logits"]
    want = evaluate_mod.run_model(pretrained_tiny(), val)[1]["logits"]
    assert final[0]["value"] == pytest.approx(float(np.mean(got.argmax(1) == want.argmax(1))))
    assert final[0]["value"] > 0.8  # measured: 91.67% at 44.9% of the MACs
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 11 and all("fidelity:top1:logits" in r for r in rows)
    assert all(r["val_error"] is None for r in rows)
    assert (tmp_path / "plots" / "error_vs_macs.png").exists()
    # --resume of the finished run: nothing is retrained, the same model comes out
    assert main([*args[:5], str(tmp_path / "again.onnx"), *args[6:],
                 "--resume", str(tmp_path / "work")]) == 0
    a, b = onnx.load(str(tmp_path / "again.onnx")), small
    for t, u in zip(a.graph.initializer, b.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))


def test_cli_train_distils_with_artifacts_built_for_it(tmp_path, capsys):
    m = tmp_path / "bert.onnx"
    onnx.save(bert_like(), str(m))
    np.savez(tmp_path / "t.npz", **tokens(80))
    assert main(["artifacts", str(m), "-o", str(tmp_path / "art"), "--distill-loss", "cosine",
                 "--lambda-coupled", "0.01"]) == 0
    assert "distillation (cosine) on logits, hidden" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "art"), "--data", str(tmp_path / "t.npz"),
                 "--epochs", "2", "--log", str(tmp_path / "log.csv")]) == 0
    out = capsys.readouterr().out
    assert "fidelity to the teacher: logits cosine" in out
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert "fidelity:cosine:logits" in header and "fidelity:cosine:hidden" in header
    # labelled artifacts refuse unlabelled data
    assert main(["artifacts", str(m), "-o", str(tmp_path / "lab"), "--loss", "mse"]) == 0
    capsys.readouterr()
    assert main(["train", str(tmp_path / "lab"), "--data", str(tmp_path / "t.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no labels" in err and "--distill-loss" in err and len(err.splitlines()) == 1


def _bad(tmp_path, capfd, model: onnx.ModelProto, arrays: dict[str, np.ndarray],
         *words: str) -> None:
    mp = tmp_path / "m.onnx"
    onnx.save(model, str(mp))
    np.savez(tmp_path / "bad.npz", **arrays)
    out = tmp_path / "out.onnx"
    capfd.readouterr()
    rc = main(["ssl", str(mp), "--data", str(tmp_path / "bad.npz"), "-o", str(out),
               "--report", str(tmp_path / "r.json"), "--epochs", "1", "--finetune-epochs", "0"])
    captured = capfd.readouterr()
    err = captured.err.strip()
    assert rc == 2, err
    assert err.startswith("onnx-ssl: error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_bad_input_is_refused_in_one_line(tmp_path, capfd):
    m = bert_like()
    good = tokens(20)
    wrong_name = {"input_idz" if k == "input_ids" else k: v for k, v in good.items()}
    _bad(tmp_path, capfd, m, wrong_name, "input_idz",
         "input_ids, attention_mask, token_type_ids")
    _bad(tmp_path, capfd, m, {**good, "input_ids": good["input_ids"].astype(np.float32)},
         "'input_ids'", "float32", "int64")
    _bad(tmp_path, capfd, m, {**good, "attention_mask": good["attention_mask"][..., None]},
         "'attention_mask'", "rank 3")
    _bad(tmp_path, capfd, m, {**good, "token_type_ids": good["token_type_ids"][:-1]},
         "token_type_ids", "19", "20")
    _bad(tmp_path, capfd, m, {"_meta": np.zeros(2)}, "neither targets nor inputs")
    _bad(tmp_path, capfd, bert_like(int_output=True), good, "output 'pred'", "int64")
    ids = good["input_ids"].copy()
    ids[3, 2] = 99  # past the vocabulary: the teacher's Gather fails
    _bad(tmp_path, capfd, m, {**good, "input_ids": ids}, "teacher", "node 'word_gather'",
         "Gather", "input 'input_ids'", "idx=99")


def test_distill_with_labels_reports_error_beside_fidelity_and_ignores_the_labels():
    """--distill on labelled data: the labels never enter the loss (shuffled labels give the
    same model), and the held-out error is reported beside the fidelity."""
    d = digits(300)
    opts = SslOptions(lambdas=Lambdas(filter=0.1, channel=0.1), epochs=2, finetune_epochs=1,
                      lr=0.05, batch_size=32, distill=True, distill_loss="kl")
    a = run_ssl(pretrained_tiny(), d, opts)
    shuffled = Dataset(d.x, np.random.default_rng(0).permutation(d.y), d.name)
    b = run_ssl(pretrained_tiny(), shuffled, opts)
    for t, u in zip(a.model.graph.initializer, b.model.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))
    rep = a.report
    assert rep.error_before is not None and rep.error_final is not None
    assert rep.metric is not None and rep.metric.name == "error"
    final = dict(rep.fidelity)["final"]
    assert [(f.output, f.kind) for f in final] == [("logits", "top1")]
    assert b.report.error_final != rep.error_final  # measured against each run's labels
    assert rep.ssl_history[-1].train_error is not None
    assert dict(rep.ssl_history[-1].fidelity)["fidelity:top1:logits"] > 0.5
