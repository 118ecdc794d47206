"""Channel counts chosen for speed: ``prune --round-to N|auto``.

* exactness: zero a random subset of channels, prune with ``round_to=8``: the output equals
  the zeroed model's, and every layer keeps a multiple of 8 channels or its original count
  (zero channels kept are still the same function); a second prune changes nothing;
* a budget with rounding lands at or under the target with rounded counts;
* grouped convolutions keep equal counts per block, rounded;
* ``auto`` picks from measured times (a fake timer: deterministic), never a slower count;
* bad input through the CLI: exit 2, one line.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, make_model, pick_groups, vi, zero_groups
from onnx import helper

from onnx_ssl.analysis import analyze
from onnx_ssl.compiler import prune
from onnx_ssl.errors import InputError
from onnx_ssl.passes.round_channels import parse_round_to, round_down, round_up

REMOVE = "remove-zero-channels"


def convnet(c1: int = 40, c2: int = 36, c3: int = 20, group2: int = 1) -> onnx.ModelProto:
    """x[1,3,8,8] -> 3x3 Conv (c1) -> BN -> Relu -> 3x3 Conv (c2, group ``group2``) -> Relu
    -> 1x1 Conv (c3) -> GlobalAveragePool -> Flatten -> Gemm (5)."""
    rng = np.random.default_rng(0)

    def w(*s: int) -> np.ndarray:
        return rng.standard_normal(s).astype(np.float32) * 0.3

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="c1", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["h1", "g", "be", "mu", "var"], ["n1"],
                              name="bn"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], name="c2", pads=[1] * 4,
                              group=group2),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["h3"], name="c3"),
             helper.make_node("GlobalAveragePool", ["h3"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], name="fc", transB=1)]
    inits = {"w1": w(c1, 3, 3, 3), "b1": w(c1), "g": 1 + w(c1), "be": w(c1), "mu": w(c1),
             "var": np.abs(w(c1)) + 0.5, "w2": w(c2, c1 // group2, 3, 3), "b2": w(c2),
             "w3": w(c3, c2, 1, 1), "b3": w(c3), "w4": w(5, c3), "b4": w(5)}
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 5])], inits)


def counts(result) -> dict[str, tuple[int, int, int, int]]:
    return {s.node: (s.filters_before, s.filters_after, s.channels_before, s.channels_after)
            for s in result.report.layers}


def assert_rounded(result, n: int) -> None:
    for node, (fb, fa, cb, ca) in counts(result).items():
        assert fa % n == 0 or fa == fb, (node, fb, fa)
        assert ca % n == 0 or ca == cb or node == "c1", (node, cb, ca)  # c1 reads the input


# --- the arithmetic ---------------------------------------------------------------------------


def test_round_up_and_down():
    assert round_up(51, 96, 8) == 56
    assert round_up(283, 576, 16) == 288
    assert round_up(93, 96, 8) == 96
    assert round_up(93, 95, 8) == 95  # rounding up would reach the original: keep it
    assert round_up(10, 24, 4, blocks=8) == 16  # multiples of lcm(4, 8)
    assert round_up(16, 96, 8) == 16
    assert round_down(51, 8) == 48 and round_down(5, 8) == 0


# --- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["both", "filter", "in"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_zero_channels_are_exact(side, seed):
    model = convnet()
    a = analyze(model)
    zeroed = zero_groups(model, pick_groups(a, 30, seed), side=side)
    result = prune(zeroed, round_to=8, verify=2, seed=seed)
    assert_same_outputs(zeroed, result.model)
    assert_rounded(result, 8)
    plain = prune(zeroed, verify=0)
    # Rounding only keeps channels: never fewer than the plain prune.
    for node, (_, fa, _, _) in counts(result).items():
        assert fa >= counts(plain)[node][1], node
    rep = dict(result.report.passes)[REMOVE]
    for e in rep.rounded:
        assert e.kept % 8 == 0 or e.kept == e.channels
        assert any(k.startswith(f"{e.space}: keeps {e.kept - e.bare} zero channel(s) for "
                                f"rounding") for k in result.report.kept)
    js = next(p for p in result.report.to_json()["passes"] if p["name"] == REMOVE)
    assert [(e["space"], e["bare"], e["kept"]) for e in js["rounded"]] == [
        (e.space, e.bare, e.kept) for e in rep.rounded]
    # Pruning the result again removes nothing more.
    again = prune(result.model, round_to=8, verify=1)
    assert not again.report.removed


def test_rounding_is_reported():
    model = convnet()
    a = analyze(model)
    c1 = [g for g in a.groups if g.kind == "channel" and g.id.startswith("c1/")][:5]
    zeroed = zero_groups(model, c1)
    result = prune(zeroed, round_to=8, verify=1)
    text = result.report.to_text()
    # 40 channels, 5 zero: 35 left, rounded up to 40 = the original: nothing removed.
    assert counts(result)["c1"][1] == 40
    assert "keeps 5 zero channel(s) for rounding: 35 -> 40 channels, a multiple of 8 " \
           "(--round-to 8)" in text, text
    plain = prune(zeroed, verify=0)
    assert counts(plain)["c1"][1] == 35
    c1 = [g for g in a.groups if g.kind == "channel" and g.id.startswith("c1/")][:13]
    result = prune(zero_groups(model, c1), round_to=8, verify=1)
    assert counts(result)["c1"][1] == 32  # 27 rounded up to 32
    js = result.report.to_json()
    rounded = next(p for p in js["passes"] if p["name"] == REMOVE)["rounded"]
    assert any(e["bare"] == 27 and e["kept"] == 32 and e["multiple"] == 8
               and e["channels"] == 40 for e in rounded), rounded


def test_exported_network_exact():
    import exported as X

    model = X.load("hf_resnet_basic", "ts")
    a = analyze(model)
    cands = [g for g in a.groups if g.kind == "channel" and g.prunable]
    rng = np.random.default_rng(0)
    pick = [cands[i] for i in sorted(rng.choice(len(cands), len(cands) // 2, replace=False))]
    zeroed = zero_groups(model, pick)
    result = prune(zeroed, round_to=8, verify=2)
    assert_same_outputs(zeroed, result.model)
    for node, (fb, fa, _, _) in counts(result).items():
        assert fa % 8 == 0 or fa == fb, (node, fb, fa)


# --- grouped convolutions -------------------------------------------------------------------------


def test_grouped_conv_keeps_equal_blocks():
    model = convnet(c1=32, c2=32, group2=4)  # c1's space: 4 blocks of 8
    a = analyze(model)
    # Zero 5 channels in every block (equal per block): 12 left; round to 8 -> lcm(8, 4) = 8:
    # 16 (4 per block).
    groups = [g for g in a.groups if g.kind == "channel" and g.id.startswith("c1/")
              and int(g.id.split("/")[1]) % 8 < 5]
    assert len(groups) == 20
    zeroed = zero_groups(model, groups)
    result = prune(zeroed, round_to=8, verify=2)
    assert_same_outputs(zeroed, result.model)
    assert counts(result)["c1"][1] == 16
    conv = next(n for n in result.model.graph.node if n.name == "c2")
    assert helper.get_attribute_value(conv.attribute[[a.name for a in conv.attribute].index(
        "group")]) == 4
    # Multiples of 3 and 4 blocks: lcm 12 -> 12 (3 per block).
    result = prune(zeroed, round_to=3, verify=2)
    assert counts(result)["c1"][1] == 12


# --- budget ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.7, 0.5, 0.33])
def test_budget_lands_under_with_rounded_counts(target):
    model = convnet()
    result = prune(model, target_macs=target, round_to=8, verify=2)
    assert result.report.mac_fraction <= target + 1e-9
    assert_rounded(result, 8)
    zero = dict(result.report.passes)["zero-groups-to-budget"]
    assert zero.rounding  # the report says how each space was rounded
    assert "budget rounding:" in result.report.to_text()


@pytest.mark.parametrize(("name", "target"), [("hf_mobilenet_v2", 0.3),
                                             ("hf_efficientnet", 0.5), ("hf_regnet", 0.3)])
def test_budget_on_exported_networks(name, target):
    import exported as X

    result = prune(X.load(name, "ts"), target_macs=target, round_to=8, verify=2)
    assert target - 0.1 <= result.report.mac_fraction <= target + 1e-9
    for node, (fb, fa, _, _) in counts(result).items():
        assert fa % 8 == 0 or fa == fb, (node, fb, fa)


def test_budget_below_what_rounding_allows_is_one_error():
    with pytest.raises(InputError, match="--round-to 8 allows only rounded counts"):
        prune(convnet(c1=8, c2=8, c3=8), target_macs=0.2, round_to=8, verify=0)


# --- auto ---------------------------------------------------------------------------------------


def fake_timer(fast: dict[str, float]):
    """Times by model name (the candidate count): ``fast`` per count, else 1 ms."""
    calls: list[tuple[str, ...]] = []

    def measure(spec, models):
        calls.append((spec.w.shape, spec.group, spec.in_shape, *sorted(models)))
        # c1's output (or c2's input) channels: the count of the space rounded in the tests.
        count = str(spec.w.shape[0] if spec.in_shape[0] == 3 else spec.in_shape[0])
        return {k: fast.get(count, 1.0) for k in models}, False

    return measure, calls


def auto_prune(zeroed, fast):
    import onnx_ssl.passes.round_channels as rc

    measure, calls = fake_timer(fast)
    orig = rc.RoundChannelCounts.__init__

    def init(self, *a, **kw):
        orig(self, *a, **{**kw, "timer": measure})

    rc.RoundChannelCounts.__init__ = init  # type: ignore[method-assign]
    try:
        return prune(zeroed, round_to="auto", verify=2), calls
    finally:
        rc.RoundChannelCounts.__init__ = orig  # type: ignore[method-assign]


def c1_zeroed(n: int = 13):
    model = convnet()
    a = analyze(model)
    c1 = [g for g in a.groups if g.kind == "channel" and g.id.startswith("c1/")][:n]
    return zero_groups(model, c1)


def test_auto_picks_the_fastest_measured():
    zeroed = c1_zeroed()  # c1: 27 of 40 left; candidates 27, 28 (4), 32 (8, 16)
    result, calls = auto_prune(zeroed, {"32": 0.5})
    assert_same_outputs(zeroed, result.model)
    assert counts(result)["c1"][1] == 32
    assert {c[0][0] for c in calls if c[2][0] == 3} == {27, 28, 32}  # c1 at each count
    e = next(e for e in dict(result.report.passes)[REMOVE].rounded if e.bare == 27)
    assert e.how == "measured" and e.kept == 32
    # Two convs touch the space (c1 makes it, c2 reads it): sums of their times.
    assert dict(e.times_ms) == {"27": 2.0, "28": 2.0, "32": 1.0}


def test_auto_never_picks_a_slower_count():
    zeroed = c1_zeroed()
    result, _ = auto_prune(zeroed, {"27": 0.5})  # the bare count is fastest
    assert counts(result)["c1"][1] == 27
    result, _ = auto_prune(zeroed, {"28": 0.99})  # 1% faster: within the margin, noise
    assert counts(result)["c1"][1] == 27
    result, _ = auto_prune(zeroed, {"28": 0.8})
    assert counts(result)["c1"][1] == 28


def test_auto_times_distinct_layers_once():
    zeroed = c1_zeroed()
    _, calls = auto_prune(zeroed, {})
    assert calls and len(calls) == len(set(calls))  # one measurement per distinct layer shape


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["0", "-8", "2.5", "eight", ""])
def test_bad_round_to_is_one_line(tmp_path, bad):
    src = tmp_path / "m.onnx"
    onnx.save(convnet(), str(src))
    out = tmp_path / "o.onnx"
    p = subprocess.run([sys.executable, "-m", "onnx_ssl", "prune", str(src), "-o", str(out),
                        "--round-to", bad], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--round-to" in lines[0], p.stderr
    assert not out.exists()


@pytest.mark.parametrize("bad", [0, -1, 2.5, "x", True])
def test_parse_round_to_rejects(bad):
    with pytest.raises(InputError, match="--round-to"):
        parse_round_to(bad)


def test_parse_round_to_accepts():
    assert parse_round_to("8") == 8 and parse_round_to("auto") == "auto"
    assert parse_round_to(None) is None and parse_round_to(16) == 16
