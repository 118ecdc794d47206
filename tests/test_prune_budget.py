"""Budgeted one-shot pruning: ``prune --target-macs F`` / ``--target-params F``.

The pass (``ZeroGroupsToBudgetPass``) ranks the prunable channel and depth groups by a
normalised importance and zeroes the least important until the real prune lands at or just
under the target; the exact passes then remove them. Checked here:

* landing: on every exported network, the pruned MACs (the report's own count) are at most
  the target and within 2 points of it, and the prune is exact (numeric check);
* constraints: grouped-convolution spaces lose channels in equal numbers per block and keep
  one per block; a budget the constraints cannot meet is a one-line error;
* scores: magnitude picks the small-norm channel (and not a channel whose norm is large on
  one side only); activation picks another channel where the calibration data says so;
* the report: target, reached, groups zeroed by kind, output difference and top-1 agreement,
  recomputed here independently with ONNX Runtime;
* bad input through the CLI: exit 2, one line on stderr, nothing written;
* target 1.0 changes nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import exported as X
import numpy as np
import onnx
import pytest
from helpers import make_model, vi
from onnx import helper

import onnx_ssl
from onnx_ssl.analysis import analyze, analyze_graph, prepare, working_copy
from onnx_ssl.compiler import LANDING, prune
from onnx_ssl.errors import InputError
from onnx_ssl.importance import magnitude
from onnx_ssl.io import to_graph
from onnx_ssl.norms import group_norm, group_norms
from onnx_ssl.passes.zero_to_budget import Budget, ZeroGroupsToBudgetPass
from onnx_ssl.runtime import run, session

ZERO = "zero-groups-to-budget"


def zero_report(result):
    return dict(result.report.passes)[ZERO]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnx_ssl", *args], capture_output=True,
                          text=True, timeout=300)


# --- tiny models -------------------------------------------------------------------------------


def two_convs(out_scale: float = 1.0, in_scale: float = 1.0, channel: int = 2,
              batch: int | str = 1) -> onnx.ModelProto:
    """x[.,3,4,4] -> 1x1 Conv (4 filters) -> Relu -> 1x1 Conv (2 filters) -> y. Channel
    ``channel`` of the middle space has its filter scaled by ``out_scale`` and its input
    slice in the second conv by ``in_scale``. MACs per sample: 192 + 128; one middle channel
    is 48 + 32 = 80 of the 320 (25%)."""
    rng = np.random.default_rng(0)
    w1 = rng.uniform(0.5, 1.0, (4, 3, 1, 1)).astype(np.float32)
    w2 = rng.uniform(0.5, 1.0, (2, 4, 1, 1)).astype(np.float32)
    w1[channel] *= out_scale
    w2[:, channel] *= in_scale
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2")]
    return make_model(nodes, [vi("x", [batch, 3, 4, 4])], [vi("y", [batch, 2, 4, 4])],
                      {"w1": w1, "b1": np.full(4, 0.1, np.float32), "w2": w2,
                       "b2": np.zeros(2, np.float32)})


def grouped(batch: int = 1) -> onnx.ModelProto:
    """x[.,2,4,4] -> 1x1 Conv (4 filters) -> Relu -> 3x3 Conv, group 2 -> y. Channels 0 and 1
    (both in the first block of the grouped conv) have the smallest norms."""
    rng = np.random.default_rng(1)
    w1 = rng.uniform(0.5, 1.0, (4, 2, 1, 1)).astype(np.float32)
    w2 = rng.uniform(0.5, 1.0, (4, 2, 3, 3)).astype(np.float32)
    w1[:2] *= 0.01
    w2[:, :2] *= 0.01
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", group=2,
                              pads=[1, 1, 1, 1])]
    return make_model(nodes, [vi("x", [batch, 2, 4, 4])], [vi("y", [batch, 4, 4, 4])],
                      {"w1": w1, "w2": w2})


def mlp(batch: int | str = "N") -> onnx.ModelProto:
    """x[., 6] -> Gemm (8 hidden) -> Relu -> Gemm -> logits [., 3]."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1)]
    return make_model(nodes, [vi("x", [batch, 6])], [vi("logits", [batch, 3])],
                      {"w1": rng.standard_normal((8, 6)), "b1": rng.standard_normal(8) * 0.1,
                       "w2": rng.standard_normal((3, 8)), "b2": np.zeros(3)})


def two_inputs() -> onnx.ModelProto:
    """x[N, 3] + z[N, 3] -> Gemm -> Relu -> Gemm: two inputs, for the data checks."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Add", ["x", "z"], ["s"], name="add"),
             helper.make_node("Gemm", ["s", "w1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)]
    return make_model(nodes, [vi("x", ["N", 3]), vi("z", ["N", 3])], [vi("y", ["N", 2])],
                      {"w1": rng.standard_normal((5, 3)), "w2": rng.standard_normal((2, 5))})


# --- scores --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("out_scale", "in_scale", "picked"), [
    (0.01, 0.01, True),   # a small filter and a small input slice: the smallest group
    (0.01, 30.0, False),  # near miss: a small filter read by a large slice is no small group
    (30.0, 0.01, False),  # near miss the other way round
])
def test_magnitude_picks_the_small_norm_channel(out_scale, in_scale, picked):
    model = two_convs(out_scale, in_scale, channel=2)
    result = prune(model, target_macs=0.75, verify=2)
    zeroed = zero_report(result).zeroed
    assert len(zeroed) == 1  # one channel is exactly 25% of the MACs
    assert (zeroed[0] == "c1/2") is picked, zeroed
    assert result.report.macs_after / result.report.macs_before == pytest.approx(0.75)
    assert result.report.verification  # the prune itself was checked exact


def test_magnitude_scores_are_normalised_per_space():
    """Torch-Pruning's mean normaliser: every space's channel scores average to 1, so a
    layer of large weights does not outrank a layer of small weights as a whole."""
    wc = working_copy(X.load("hand_resnet", "ts"))
    a = analyze_graph(wc.graph, kinds=("channel", "depth"))
    scores = magnitude(a, wc.graph).by_group
    by_space: dict[str, list[float]] = {}
    for g in a.groups:
        if g.id in scores and g.kind == "channel":
            by_space.setdefault(g.space, []).append(scores[g.id])
    assert len(by_space) >= 3
    for sid, vals in by_space.items():
        assert np.mean(vals) == pytest.approx(1.0), sid
        assert np.std(vals) > 0.01, sid  # real, different scores
    # A branch: its RMS over the branches' mean, times the filters its layers remove.
    filters = {la.node: la.weight_shape[0] for la in a.layers}
    depth = [scores[f"{b.add}/depth"] / sum(filters[n] for n in b.layers) for b in a.branches]
    assert len(depth) == 3 and np.mean(depth) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["hf_regnet", "hand_concat", "hf_mobilenet_v2"])
def test_group_norms_is_group_norm(name):
    """The vectorised norms (grouped-conv members slice two axes: the slow path) agree."""
    wc = working_copy(X.load(name, "ts"))
    a = analyze_graph(wc.graph, kinds=("channel",))
    values = {t.name: np.asarray(t.values) for t in wc.graph.tensors().values()
              if hasattr(t, "values")}
    groups = [g for g in a.groups if g.prunable]
    fast = group_norms(groups, values)
    assert fast == pytest.approx({g.id: group_norm(g, values) for g in groups}, rel=1e-9)


def test_activation_score_differs_where_the_activations_say_so():
    """Channel 0 has the smallest weights, but carries large activations; channel 3 carries
    almost none. Magnitude removes channel 0, activation (Wanda) channel 3."""
    rng = np.random.default_rng(4)
    w1 = np.eye(4, dtype=np.float32).reshape(4, 4, 1, 1)
    w1[0] *= 0.5
    w2 = np.ones((2, 4, 1, 1), np.float32)
    w2[:, 0] *= 0.5
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    model = make_model(nodes, [vi("x", ["N", 4, 4, 4])], [vi("y", ["N", 2, 4, 4])],
                       {"w1": w1, "w2": w2})
    x = np.abs(rng.standard_normal((6, 4, 4, 4))).astype(np.float32)
    x[:, 0] *= 100
    x[:, 3] *= 0.01
    mag = prune(model, target_macs=0.75, verify=1)
    act = onnx_ssl.prune(model, target_macs=0.75, verify=1, calib={"x": x})
    assert zero_report(mag).importance == "magnitude" and zero_report(mag).zeroed == ("c1/0",)
    assert zero_report(act).importance == "activation" and zero_report(act).zeroed == ("c1/3",)
    # Activation removed the channel that carried almost nothing: on the same data, the
    # function moved far less than with the channel magnitude removes.
    assert "calibration" in act.report.effect_inputs and "6 samples" in act.report.effect_inputs
    by_magnitude = prune(model, target_macs=0.75, verify=1, calib={"x": x},
                         importance="magnitude").report
    assert (max(d.relative for d in act.report.effect) * 100
            < max(d.relative for d in by_magnitude.effect))


def test_the_pass_keeps_its_contract_and_a_second_run_changes_nothing():
    g = to_graph(prepare(two_convs(0.01, 0.01)))
    a = analyze_graph(g, kinds=("channel", "depth"))
    weights = {t.name: np.array(t.values) for t in g.tensors().values() if hasattr(t, "values")}
    p = ZeroGroupsToBudgetPass(Budget(macs=0.75), magnitude(a, g).by_group, a, "magnitude")
    res = p(g)
    assert p.shared.computed == 0  # the analysis handed in matched the graph: reused
    assert res.modified and res.report.groups_zeroed == 1 and res.graph is not g
    assert res.report.estimated_macs == pytest.approx(0.75)
    for t in g.tensors().values():  # the input graph is left as it was
        if hasattr(t, "values"):
            assert np.array_equal(np.asarray(t.values), weights[t.name])
    again = ZeroGroupsToBudgetPass(Budget(macs=0.75), magnitude(a, res.graph).by_group, a)
    rerun = again(res.graph)
    assert not rerun.modified and rerun.report.groups_zeroed == 0
    assert rerun.report.zeroed == ()


# --- constraints ---------------------------------------------------------------------------------


def test_grouped_conv_loses_one_channel_per_block():
    """The two smallest channels are both in the first block: the budget takes the least
    important channel of *each* block instead, and the conv stays grouped."""
    result = prune(grouped(), target_macs=0.5, verify=2)
    zeroed = zero_report(result).zeroed
    blocks = sorted(int(z.rsplit("/", 1)[1]) // 2 for z in zeroed)
    assert blocks == [0, 1], zeroed
    c2 = next(n for n in result.model.graph.node if n.name == "c2")
    assert next(a.i for a in c2.attribute if a.name == "group") == 2
    w = next(t for t in result.model.graph.initializer if t.name == c2.input[1])
    assert list(w.dims) == [4, 1, 3, 3]
    assert result.report.macs_after / result.report.macs_before == pytest.approx(0.5)


def test_grouped_conv_keeps_one_channel_per_block():
    # Below 50% the space would have to lose a whole block: nothing else is prunable.
    with pytest.raises(InputError, match="cannot be reached"):
        prune(grouped(), target_macs=0.3, verify=0)


def test_exported_grouped_convs_lose_equal_numbers_per_block():
    model = X.load("hf_regnet", "ts")
    a = analyze(model)
    result = prune(model, target_macs=0.4, verify=1)
    zeroed = zero_report(result).zeroed
    per_block: dict[str, Counter[int]] = {}
    for z in zeroed:
        sid, _, idx = z.rpartition("/")
        if sid in {s.id for s in a.spaces}:
            sp = a.space(sid)
            if sp.partitions:
                size = sp.channels // math.lcm(*sp.partitions)
                per_block.setdefault(sid, Counter())[int(idx) // size] += 1
    assert per_block  # the budget did take channels of grouped spaces
    for sid, counts in per_block.items():
        sp = a.space(sid)
        blocks = math.lcm(*sp.partitions)
        size = sp.channels // blocks
        assert sorted(counts) == list(range(blocks)), sid
        assert len(set(counts.values())) == 1 and max(counts.values()) < size, (sid, counts)
    for n in result.model.graph.node:
        if n.op_type == "Conv":
            g = next((a.i for a in n.attribute if a.name == "group"), 1)
            assert g == 1 or g in {2, 4, 6, 8}


def test_no_space_loses_every_channel():
    model = X.load("hf_mobilenet_v2", "ts")
    result = prune(model, target_macs=0.3, verify=1)
    for s in result.report.layers:
        if s.filters_after:
            assert s.channels_after >= 1


# --- landing -------------------------------------------------------------------------------------

# Where a network's groups are too coarse for a target, the test takes the nearest target
# they can land within 2 points of (said per case).
TARGETS: dict[str, tuple[float, ...]] = {
    # A channel of c1 is 13-16% of the MACs (it feeds c2, the depthwise and the pointwise
    # convs); 3 of them and every pointwise channel leave 51%, 4 leave 39-44%.
    "hand_dense": (0.45, 0.3),
    # One FFN branch: its 48 channels are 41% of the MACs, the attention branch 56%; 50% lies
    # between what either leaves.
    "hf_bert": (0.4, 0.3),
}
LANDING_CASES = [(n, ex, t) for n, ex in X.cases() for t in TARGETS.get(n, (0.5, 0.3))]


@pytest.mark.parametrize(("name", "exporter", "target"), LANDING_CASES)
def test_budget_lands_at_or_just_under_the_target(name, exporter, target):
    model = X.load(name, exporter)
    # An ill-conditioned export fails any exact check (see exported.Net): counted unchecked.
    checked = exporter not in X.NETS[name].ill_conditioned
    result = prune(model, target_macs=target, verify=1 if checked else 0)
    rep = result.report
    reached = rep.macs_after / rep.macs_before
    assert target - LANDING <= reached <= target, (reached, zero_report(result).by_kind)
    if checked:
        assert rep.verification and all(d.within_tolerance for d in rep.verification)
        assert rep.effect and max(d.relative for d in rep.effect) > 0  # it did change


@pytest.mark.parametrize(("macs", "params"), [(None, 0.4), (0.6, 0.3), (0.3, 0.6)])
def test_param_budget_and_both_budgets(macs, params):
    result = prune(X.load("hf_resnet_bottleneck", "ts"), target_macs=macs,
                   target_params=params, verify=1)
    rep = result.report
    got = {"macs": rep.macs_after / rep.macs_before, "params": rep.params_after /
           rep.params_before}
    targets = {k: v for k, v in (("macs", macs), ("params", params)) if v is not None}
    assert all(got[k] <= v for k, v in targets.items()), got
    # The binding one lands within 2 points.
    assert min(v - got[k] for k, v in targets.items()) <= LANDING, got


def test_activation_budget_on_an_exported_network():
    model = X.load("hf_resnet_basic", "ts")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)  # 4 batches of the static 2
    result = prune(model, target_macs=0.5, verify=1, calib={"pixel_values": x})
    rep = result.report
    assert zero_report(result).importance == "activation"
    assert 0.5 - LANDING <= rep.macs_after / rep.macs_before <= 0.5
    (logits,) = rep.effect
    assert logits.agreement is not None and 0 <= logits.agreement <= 1
    assert "8 samples" in rep.effect_inputs


# --- the report -----------------------------------------------------------------------------------


def test_report_states_target_groups_difference_and_top1(tmp_path: Path):
    model = mlp()
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    result = prune(model, target_macs=0.5, verify=2, calib={"x": x}, importance="magnitude")
    rep = result.report
    # Recompute the change independently: the input model against the zeroed model, which
    # computes what the pruned model computes (the numeric check held).
    ref = run(session(model), {"x": x})["logits"]
    got = run(session(result.model), {"x": x})["logits"]
    (d,) = rep.effect
    assert d.output == "logits"
    assert d.relative == pytest.approx(np.max(np.abs(got - ref)) / np.max(np.abs(ref)),
                                       rel=1e-3)
    assert d.agreement == pytest.approx(np.mean(got.argmax(1) == ref.argmax(1)))
    z = zero_report(result)
    assert z.groups_zeroed == 4 and dict(z.by_kind) == {"channel": 4}  # 4 of 8 hidden
    doc = rep.to_json()
    change = doc["function_change"]
    assert (doc["target_macs"], doc["target_params"]) == (0.5, None)
    assert doc["mac_fraction"] == pytest.approx(0.5)
    assert change["step"] == "budget" and change["groups_zeroed"] == 4
    assert change["by_kind"] == {"channel": 4} and change["importance"] == "magnitude"
    assert change["outputs"][0]["top1_agreement"] == pytest.approx(d.agreement)
    assert "40 samples" in change["inputs"]
    text = rep.to_text()
    assert "budget (target -> reached, of the input's count): macs 50.0% -> 50.0%" in text
    assert "zeroed 4 group(s) by magnitude importance (channel 4)" in text
    assert f"this CHANGED the function: max output difference {d.relative:.3g}" in text
    assert f"top-1 agreement {d.agreement:.1%}" in text
    assert "numeric check: passed" in text
    json.dumps(doc)


def test_without_data_the_change_is_measured_on_seeded_random_inputs():
    result = prune(mlp(), target_macs=0.5, verify=3)
    rep = result.report
    assert rep.effect_inputs == "3 seeded random input(s) (seed 0)"
    (d,) = rep.effect
    assert d.agreement is not None and d.relative > 0  # logits [2, 3]: top-1 is measured


def test_an_output_that_is_no_logits_gets_no_agreement():
    (d,) = prune(two_convs(0.01, 0.01), target_macs=0.75, verify=1).report.effect
    assert d.agreement is None and d.relative > 0  # [1, 2, 4, 4] is an image, not logits


def test_threshold_reports_its_change_the_same_way():
    """One mechanism: a threshold's change is measured on calibration data too, and reported
    with the same fields."""
    x = np.random.default_rng(8).standard_normal((5, 3, 4, 4)).astype(np.float32)
    result = prune(two_convs(0.01, 0.01), threshold=0.2, verify=1, calib={"x": x})
    rep = result.report
    assert dict(result.report.passes)["zero-small-groups"].groups_zeroed == 1
    assert rep.effect_inputs == "calibration data (5 samples)"
    assert rep.threshold_effect == rep.effect and rep.effect[0].relative > 0
    change = rep.to_json()["function_change"]
    assert change["step"] == "threshold" and change["by_kind"] == {"channel": 1}
    assert "this CHANGED the function" in rep.to_text()
    assert "on calibration data (5 samples)" in rep.to_text()


@pytest.mark.parametrize("model", [two_convs, mlp])
def test_target_one_changes_nothing(model):
    m = model()
    result = prune(m, target_macs=1.0, target_params=1.0, verify=2)
    rep = result.report
    assert zero_report(result).groups_zeroed == 0
    assert all(d.max_abs == 0 for d in rep.effect)
    assert (rep.macs_after, rep.params_after) == (rep.macs_before, rep.params_before)
    assert "the outputs did not change (max output difference 0)" in rep.to_text()


def test_target_one_on_an_exported_network():
    result = prune(X.load("hand_resnet", "ts"), target_macs=1.0, verify=1)
    assert zero_report(result).groups_zeroed == 0
    assert result.report.macs_after == result.report.macs_before


# --- bad input ------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    m = tmp_path / "m.onnx"
    onnx.save_model(two_inputs(), m)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    out = {"model": m, "out": tmp_path / "out.onnx", "good": tmp_path / "good.npz"}
    np.savez(out["good"], x=x, z=x)
    cases = {
        "names": {"x": x, "w": x},
        "missing": {"x": x},
        "dtype": {"x": x.astype(np.int64), "z": x},
        "rank": {"x": x[:, :, None], "z": x},
        "size": {"x": x[:, :2], "z": x},
        "counts": {"x": x, "z": x[:3]},
        "empty": {},
        "nan": {"x": np.full_like(x, np.nan), "z": x},
    }
    for k, v in cases.items():
        out[k] = tmp_path / f"{k}.npz"
        np.savez(out[k], **v)
    out["text"] = tmp_path / "text.npz"
    out["text"].write_text("not an npz")
    out["single"] = tmp_path / "single.npz"
    with open(out["single"], "wb") as f:
        np.save(f, x)  # one .npy array under an .npz name
    return out


BAD_ARGS = {
    "zero": (["--target-macs", "0"], "in (0, 1]"),
    "above one": (["--target-macs", "1.5"], "in (0, 1]"),
    "negative": (["--target-params", "-0.2"], "in (0, 1]"),
    "nan": (["--target-macs", "nan"], "in (0, 1]"),
    "inf": (["--target-params", "inf"], "in (0, 1]"),
    "with threshold": (["--target-macs", "0.5", "--threshold", "0.1"], "pick one"),
    "activation without data": (["--target-macs", "0.5", "--importance", "activation"],
                                "needs calibration inputs"),
    "importance without budget": (["--importance", "magnitude"], "ranks the groups of a budget"),
}
BAD_DATA = {
    "names": "name no model input; the model's inputs are x, z",
    "missing": "no array for model input(s) z; it needs one per input, named x, z",
    "dtype": "has dtype int64; model input 'x' is float32",
    "rank": "has rank 3",
    "size": "has size 2 on axis 1",
    "counts": "different numbers of samples (x 4, z 3)",
    "empty": "holds no arrays; it needs one per model input, named x, z",
    "nan": "NaN",
    "text": "cannot read calibration data",
    "single": "is a single array, not an .npz with one array per model input (x, z)",
}


def _refused(r: subprocess.CompletedProcess[str], out: Path, says: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-ssl: error: "), r.stderr
    assert says in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob("out.onnx*"))


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_cli_refuses_bad_budget_arguments(case, files):
    args, says = BAD_ARGS[case]
    _refused(cli("prune", str(files["model"]), "-o", str(files["out"]), *args), files["out"],
             says)


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_cli_refuses_bad_calibration_data(case, files):
    r = cli("prune", str(files["model"]), "-o", str(files["out"]), "--target-macs", "0.5",
            "--data", str(files[case]))
    _refused(r, files["out"], BAD_DATA[case])


def test_cli_budget_with_data_writes_model_and_report(files, tmp_path: Path):
    rep = tmp_path / "r.json"
    r = cli("prune", str(files["model"]), "-o", str(files["out"]), "--target-macs", "0.6",
            "--data", str(files["good"]), "--report", str(rep))
    assert r.returncode == 0, r.stderr
    doc = json.loads(rep.read_text())
    assert doc["target_macs"] == 0.6 and 0.58 <= doc["mac_fraction"] <= 0.6
    assert doc["function_change"]["importance"] == "activation"
    assert "calibration data" in doc["function_change"]["inputs"]
    assert "budget (target -> reached" in r.stdout and files["out"].exists()
    # The model read back computes what the report's check compared.
    onnx.checker.check_model(onnx.load_model(files["out"]))


def test_data_for_a_static_batch_must_fill_its_batches(tmp_path: Path):
    m = tmp_path / "m.onnx"
    onnx.save_model(mlp(batch=4), m)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((6, 6), np.float32))
    out = tmp_path / "out.onnx"
    _refused(cli("prune", str(m), "-o", str(out), "--target-macs", "0.5", "--data", str(bad)),
             out, "6 samples do not fill batches of the model's static batch size 4")
