"""An honest budget: the held-out metric at every stage, --max-drop and exit status 3, and
the input model's zeros named (onnx_ssl.training.acceptance, onnx_ssl.training.budget)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_training_helpers import digits, pretrained_tiny, tiny_cnn

from onnx_ssl.cli import main
from onnx_ssl.training.acceptance import (
    EXIT_OVER_MAX_DROP,
    Metric,
    VerdictCode,
    judge,
    rejected_path,
)
from onnx_ssl.training.budget import (
    Collapse,
    CollapseCode,
    InputZero,
    ZeroKind,
    collapse_cause,
    input_zeros,
    input_zeros_text,
)
from onnx_ssl.training.chain import SslOptions, _run_identity, run_ssl
from onnx_ssl.training.evaluate import evaluate_model
from onnx_ssl.training.penalty import Lambdas, Penalty


def _zeroed(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``model`` with the initializers ``names`` set to zero."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    hit = set()
    for t in m.graph.initializer:
        if t.name in names:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
            hit.add(t.name)
    assert hit == names
    return m


@pytest.fixture
def files(tmp_path):
    """The pretrained tiny CNN and all the digits, as files for the CLI."""
    model = tmp_path / "tiny.onnx"
    onnx.save(pretrained_tiny(), str(model))
    d = digits()
    np.savez(tmp_path / "d.npz", x=d.x["x"], y=d.y)
    return model, tmp_path / "d.npz"


def _ssl(model, data, out, *extra: str) -> list[str]:
    return ["ssl", str(model), "--data", str(data), "-o", str(out), "--batch-size", "32",
            "--report", str(out.with_suffix(".json")), *extra]


def _pcts(stages: dict) -> list[str]:
    return [f"{100 * stages[k]:.2f}%" for k in ("before", "ssl", "cut", "final")]


# --- (a) a budget met only by cutting live groups, with a large drop -------------------------


def test_budget_met_by_a_raised_threshold_over_max_drop_exits_3(files, tmp_path, capsys):
    # Lambdas far too small for one epoch: nothing is near zero after SSL, so the 30% budget
    # is met only by raising the prune threshold (live groups cut), and the error explodes.
    model, data = files
    out = tmp_path / "o.onnx"
    rc = main(_ssl(model, data, out, "--lambda-filter", "1e-4", "--lambda-channel", "1e-4",
                   "--epochs", "1", "--finetune-epochs", "1", "--target-macs", "0.3"))
    stdout = capsys.readouterr().out.strip().splitlines()
    assert rc == EXIT_OVER_MAX_DROP == 3
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["accepted"] is False and rep["verdict"]["code"] == "over_max_drop"
    assert rep["max_drop"] == pytest.approx(0.03)  # the default for the error
    assert rep["drop"] > 0.03 and rep["drop"] == pytest.approx(rep["metric"]["drop"])
    assert rep["budget"]["met"] is True  # on paper; but not accepted
    assert rep["budget"]["threshold_used"] > 1e-3 and rep["budget"]["live_groups_zeroed"] > 0
    m = rep["metric"]
    assert m["name"] == "error" and m["higher_is_better"] is False
    assert m["cut"] == pytest.approx(rep["error"]["pruned"])
    assert m["drop"] == pytest.approx(m["final"] - min(m["before"], m["ssl"]))
    # the last line: the four values, the drop against the allowed one, where the model went,
    # what to change
    last = stdout[-1]
    assert last == rep["last_line"]
    assert last.startswith("NOT ACCEPTED") and "exit status 3" in last
    for v in _pcts(m):
        assert v in last, (v, last)
    assert f"{100 * m['drop']:.2f} points worse" in last and "allowed 3.00 points" in last
    assert f"{rep['budget']['live_groups_zeroed']} groups that were not near zero" in last
    assert "--epochs" in last and "larger lambda" in last and "--target-macs" in last
    kept = rejected_path(out)
    assert kept.name == "o.over-max-drop.onnx" and f"{kept}, not {out}" in last
    # the model is kept under its own name, never as -o
    assert not out.exists()
    assert rep["written_to"] == str(kept) and any(str(kept) in line for line in stdout)
    _, err = evaluate_model(onnx.load(str(kept)), digits().split(0.2, 0)[1])
    assert err == pytest.approx(m["final"], abs=1e-9)


def test_the_same_cut_within_an_explicit_max_drop_is_accepted(files, tmp_path, capsys):
    model, data = files
    out = tmp_path / "o.onnx"
    rc = main(_ssl(model, data, out, "--lambda-filter", "1e-4", "--lambda-channel", "1e-4",
                   "--epochs", "1", "--finetune-epochs", "1", "--target-macs", "0.3",
                   "--max-drop", "1"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rc == 0 and rep["accepted"] is True and rep["verdict"]["code"] == "accepted"
    assert rep["budget"]["live_groups_zeroed"] > 0 and rep["drop"] > 0.03
    assert out.exists() and not rejected_path(out).exists()
    assert last.startswith("budget met:") and "allowed 100.00 points" in last


# --- (b) a budget met by the lambdas ----------------------------------------------------------


def test_budget_met_by_the_lambdas_is_accepted(files, tmp_path, capsys):
    model, data = files
    out = tmp_path / "o.onnx"
    rc = main(_ssl(model, data, out, "--lambda-filter", "0.2", "--lambda-channel", "0.2",
                   "--epochs", "4", "--finetune-epochs", "1", "--target-macs", "0.5",
                   "--max-drop", "0.1"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rc == 0 and rep["accepted"] is True and rep["verdict"]["code"] == "accepted"
    assert rep["budget"]["met"] and rep["budget"]["threshold_used"] == pytest.approx(1e-3)
    assert rep["budget"]["live_groups_zeroed"] == 0 and rep["budget"]["met_at"] is not None
    assert out.exists() and not rejected_path(out).exists()
    assert last.startswith("budget met: MACs") and "NOT" not in last
    assert "held-out error: before SSL" in last and "fine-tuned" in last
    for v in _pcts(rep["metric"]):
        assert v in last, (v, last)
    assert "allowed 10.00 points, --max-drop 0.1" in last


def test_lambdas_that_cost_too_much_are_judged_only_with_max_drop():
    opts = SslOptions(lambdas=Lambdas(filter=0.2, channel=0.2), epochs=4, lr=0.05,
                      finetune_epochs=1, batch_size=32, target_macs=0.5)
    rep = run_ssl(pretrained_tiny(), digits(), opts).report
    assert rep.live_groups_zeroed == 0 and rep.metric is not None
    drop = rep.metric.drop
    assert drop is not None and drop > 0
    # by default only a raised threshold is judged: the lambdas' drop is shown, not judged
    assert rep.accepted and rep.verdict is not None
    assert rep.verdict.code is VerdictCode.NOT_CHECKED
    assert "not checked: give --max-drop" in rep.last_line()
    # given --max-drop, the same numbers are judged, with the advice for a lambda-made cut
    v = judge(rep.metric, max_drop=0.0, budget=True, live_groups_zeroed=0, threshold=1e-3,
              threshold_used=1e-3)
    assert not v.accepted and any("--target-macs" in a for a in v.advice)
    assert not any("larger lambda" in a for a in v.advice)


# --- (c) zeros in the input model -------------------------------------------------------------


def test_budget_met_by_groups_zero_in_the_input_is_named(tmp_path, capsys):
    # c2's weights all zero, as an eval-mode export of a timm block whose last BatchNorm is
    # zero-initialised leaves them: its removal alone meets the 50% budget.
    model = tmp_path / "z.onnx"
    onnx.save(_zeroed(pretrained_tiny(), {"c2.weight", "c2.bias"}), str(model))
    d = digits()
    np.savez(tmp_path / "d.npz", x=d.x["x"], y=d.y)
    out = tmp_path / "o.onnx"
    rc = main(_ssl(model, tmp_path / "d.npz", out, "--lambda-filter", "0.5",
                   "--lambda-channel", "0.5", "--epochs", "2", "--finetune-epochs", "1",
                   "--target-macs", "0.5"))
    cap = capsys.readouterr()
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rc == 0, cap.err[-2000:]
    zeros = {(z["structure"], z["layer"]): (z["zero"], z["total"]) for z in rep["input_zeros"]}
    assert zeros == {("filter", "c2"): (6, 6), ("channel", "c2"): (6, 6)}
    b = rep["budget"]
    assert b["input_meets_budget"] is True and b["met_at"][0] == 1
    assert b["met_by_input_zeros"] == 12
    met = next(line for line in cap.err.splitlines() if "budget met at SSL epoch 1" in line)
    assert "by 12 groups that were already zero in the input model (layers c2;" in met
    assert "BatchNorm scale initialised to zero" in met and "randomise or train" in met
    text = cap.out
    assert ("already zero in the input model, before training: c2 (6/6 filter groups zero, "
            "6/6 channel groups zero)") in text
    assert "by 12 groups already zero in the input model" in text.strip().splitlines()[-1]


def test_zero_batchnorm_scale_is_named():
    model = _zeroed(tiny_cnn(bn=True), {"bn2.scale"})
    opts = SslOptions(epochs=0, finetune_epochs=0, batch_size=32)
    rep = run_ssl(model, digits(300), opts).report
    bn = [z for z in rep.input_zeros if z.kind is ZeroKind.BN_SCALE]
    assert [(z.layer, z.after, z.tensor, z.zero, z.total) for z in bn] == [
        ("bn2", "c2", "bn2.scale", 6, 6)]
    assert "bn2 (BatchNorm scale 6/6 zero, after c2)" in rep.to_text()
    assert rep.to_json()["input_zeros"][0]["kind"] == "bn_scale"
    # near miss: the same net with its scales as built has nothing to name
    clean = run_ssl(tiny_cnn(bn=True), digits(300), opts).report
    assert clean.input_zeros == () and "already zero in the input" not in clean.to_text()


def test_a_zero_weight_shared_through_identity_is_named():
    # The TorchScript exporter de-duplicates equal initializers: the zero weights of several
    # zero-initialised blocks become one tensor behind Identity nodes, which no regularised
    # group holds. The layers are still named.
    m = _zeroed(pretrained_tiny(), {"c2.weight"})
    ident = onnx.helper.make_node("Identity", ["c2.weight"], ["c2.weight.dedup"], name="dedup")
    m.graph.node.insert(0, ident)
    c2 = next(n for n in m.graph.node if n.name == "c2")
    c2.input[1] = "c2.weight.dedup"
    empty = Penalty(terms=(), lambdas=Lambdas())
    zeros = input_zeros(empty, {}, 1e-3, m)
    assert [(z.kind, z.layer, z.tensor) for z in zeros] == [(ZeroKind.WEIGHT, "c2", "c2.weight")]
    assert input_zeros_text(zeros) == "c2 (weight c2.weight all zero)"
    # near miss: nothing zero, nothing named
    assert input_zeros(empty, {}, 1e-3, pretrained_tiny()) == ()


def test_collapse_by_a_layer_zero_in_the_input_says_why(tmp_path, capsys):
    # c1 all zero (weights and bias): its ReLU passes no gradient back, so it stays zero and
    # the network is cut; the message says it was so before training, not the lambdas' doing.
    model = tmp_path / "z.onnx"
    onnx.save(_zeroed(pretrained_tiny(), {"c1.weight", "c1.bias"}), str(model))
    d = digits(400)
    np.savez(tmp_path / "d.npz", x=d.x["x"], y=d.y)
    out = tmp_path / "o.onnx"
    rc = main(_ssl(model, tmp_path / "d.npz", out, "--epochs", "2", "--target-macs", "0.5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    last = err[-1]
    assert last.startswith("onnx-ssl: error: training collapsed in SSL epoch 1: layer c1 lost")
    assert "layer c1's filter groups were already all zero in the input model" in last
    assert "randomise or train them first" in last
    assert not out.exists() and not rejected_path(out).exists()


def test_collapse_cause_names_only_what_the_input_had():
    zeros = (InputZero(ZeroKind.GROUPS, "filter", "c1", "c1.weight", 6, 6),
             InputZero(ZeroKind.GROUPS, "filter", "c3", "c3.weight", 2, 8),
             InputZero(ZeroKind.BN_SCALE, "scale", "bn2", "bn2.scale", 6, 6, after="c2"))
    cut = Collapse(CollapseCode.LAYER_CUT, "layer c1 lost every filter group", "filter", "c1")
    assert "c1's filter groups were already all zero" in collapse_cause(cut, zeros)
    bn = Collapse(CollapseCode.LAYER_CUT, "layer c2 lost ...", "filter", "c2")
    assert "BatchNorm after it (bn2)" in collapse_cause(bn, zeros)
    # c3 was only partly zero, c4 not at all: nothing to say
    assert collapse_cause(Collapse(CollapseCode.LAYER_CUT, "", "filter", "c3"), zeros) == ""
    assert collapse_cause(Collapse(CollapseCode.LAYER_CUT, "", "filter", "c4"), zeros) == ""
    assert collapse_cause(cut, ()) == ""
    assert collapse_cause(Collapse(CollapseCode.CHANCE, "chance"), zeros) == ""


# --- (d) --max-drop validation ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf", "1.5"])
def test_max_drop_out_of_range_is_a_one_line_error(tmp_path, capsys, value):
    rc = main(["ssl", "builtin:lenet", "-o", str(tmp_path / "o.onnx"), "--target-macs", "0.5",
               "--max-drop", value])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--max-drop" in err and "[0, 1]" in err
    assert not (tmp_path / "o.onnx").exists()


def test_max_drop_does_not_change_the_run_identity():
    opts = SslOptions(target_macs=0.5)
    a = _run_identity(pretrained_tiny(), digits(50), opts)
    b = _run_identity(pretrained_tiny(), digits(50), SslOptions(target_macs=0.5, max_drop=0.2))
    assert a == b  # --resume may judge with another --max-drop
    assert a != _run_identity(pretrained_tiny(), digits(50), SslOptions(target_macs=0.4))


# --- the metric and the verdict ------------------------------------------------------------


def test_drop_is_measured_from_the_better_of_before_and_after_ssl():
    # an untrained export: chance before, SSL trains it, the cut ruins it
    untrained = Metric.error(0.90, 0.0167, 0.886, 0.855)
    assert untrained.reference == pytest.approx(0.0167)
    assert untrained.drop == pytest.approx(0.855 - 0.0167)
    # a trained one that SSL costs: the input is the bar
    trained = Metric.error(0.02, 0.05, 0.05, 0.04)
    assert trained.reference_stage == "before SSL" and trained.drop == pytest.approx(0.02)
    # fidelity: higher is better
    fid = Metric.fidelity(1.0, 0.97, 0.80, 0.93)
    assert fid.drop == pytest.approx(0.07) and fid.worsening(0.9, 0.95) < 0
    kw = dict(budget=True, threshold=1e-3, threshold_used=0.01)
    assert judge(fid, max_drop=None, live_groups_zeroed=5, **kw).accepted  # default 0.1
    assert not judge(Metric.fidelity(1.0, 0.97, 0.5, 0.85), max_drop=None,
                     live_groups_zeroed=5, **kw).accepted
    assert not judge(untrained, max_drop=None, live_groups_zeroed=5, **kw).accepted
    # no raised cut and no --max-drop: shown, not judged; no held-out data: cannot be
    assert judge(untrained, max_drop=None, live_groups_zeroed=0, **kw).code is \
        VerdictCode.NOT_CHECKED
    none = Metric.error(None, None, None, None)
    v = judge(none, max_drop=0.01, live_groups_zeroed=5, **kw)
    assert v.code is VerdictCode.NO_METRIC and v.accepted and none.drop is None
    assert math.isclose(judge(trained, max_drop=0.02, live_groups_zeroed=0, **kw).metric.drop
                        or 0, 0.02)
    assert judge(trained, max_drop=0.02, live_groups_zeroed=0, **kw).accepted  # at the limit
