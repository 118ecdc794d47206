"""LowerSparseConvPass: exact lowerings of convs with zero fibers and zero 2D filters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, make_model, rand, vi
from onnx import helper

from onnx_ssl.cli import main
from onnx_ssl.compiler import prune
from onnx_ssl.passes.lower_sparse_conv import (
    CANDIDATES,
    ConvSpec,
    LowerSparseConvPass,
    Timer,
    aligned_chunks,
    candidate_macs,
    dense_macs,
    kernel_classes,
    layer_model,
)
from onnx_ssl.runtime import run, session

STRATEGIES = list(CANDIDATES)


def out_size(n: int, k: int, b: int, e: int, s: int, d: int) -> int:
    return (n + b + e - d * (k - 1) - 1) // s + 1


def conv_model(w: np.ndarray, b: np.ndarray | None, pads=(0, 0, 0, 0), strides=(1, 1),
               dilations=(1, 1), group=1, size=(11, 9), batch=2, **attrs) -> onnx.ModelProto:
    n, cg, kh, kw = w.shape
    h, wd = size
    ins = ["x", "w", *(["b"] if b is not None else [])]
    nodes = [helper.make_node("Conv", ins, ["y"], name="conv", pads=list(pads),
                              strides=list(strides), dilations=list(dilations), group=group,
                              **attrs)]
    oh = out_size(h, kh, pads[0], pads[2], strides[0], dilations[0])
    ow = out_size(wd, kw, pads[1], pads[3], strides[1], dilations[1])
    inits = {"w": w, **({"b": b} if b is not None else {})}
    return make_model(nodes, [vi("x", [batch, cg * group, h, wd])],
                      [vi("y", [batch, n, oh, ow])], inits)


def sparse_weight(rng: np.random.Generator, n: int, cg: int, kh: int, kw: int,
                  group: int = 1, holes: float = 0.3) -> np.ndarray:
    """Zero fibers and 2D filters as SSL leaves them: odd channels use a smaller kernel box
    than even ones, random fibers inside the boxes are zero, and the 2D filters form two
    blocks per conv group (a filter reads only the channels of its block)."""
    w = rand(rng, n, cg, kh, kw)
    ng = n // group
    cblk = rng.permutation(cg) % 2
    for c in range(cg):
        r0, r1, c0, c1 = (0, kh - 1, 0, kw - 1) if c % 2 == 0 else (0, kh // 2, 1, kw - 1)
        keep = np.zeros((kh, kw), bool)
        keep[r0:r1 + 1, c0:c1 + 1] = rng.random((r1 - r0 + 1, c1 - c0 + 1)) >= holes
        keep[r0, c0] = keep[r1, c1] = True  # the box stays the box
        w[:, c, ~keep] = 0
        w[(np.arange(n) % ng) % 2 != cblk[c], c] = 0
    return w


GEOMETRIES = [
    # pads, strides, dilations, group, bias
    ((0, 0, 0, 0), (1, 1), (1, 1), 1, True),
    ((1, 1, 1, 1), (1, 1), (1, 1), 1, False),
    ((2, 0, 1, 2), (2, 3), (1, 1), 1, True),
    ((1, 2, 2, 1), (1, 2), (2, 1), 1, True),
    ((1, 1, 1, 1), (2, 1), (1, 2), 2, True),
    ((0, 1, 1, 0), (1, 1), (1, 1), 3, False),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_each_strategy_is_exact_through_prune(rng, strategy, geom):
    pads, strides, dilations, group, bias = geom
    w = sparse_weight(rng, 6, 24 // group, 3, 4, group)
    model = conv_model(w, rand(rng, 6) if bias else None, pads, strides, dilations, group)
    result = prune(model, lower=strategy, verify=2)
    assert_same_outputs(model, result.model, seed=5)
    rep = dict(result.report.passes)["lower-sparse-conv"]
    assert [(e.node, e.strategy) for e in rep.lowered] == [("conv", strategy)]
    assert rep.lowered[0].macs_after < rep.lowered[0].macs_before
    assert not any(n.op_type == "Conv" and n.name == "conv" for n in result.model.graph.node)
    # The report counts the lowered conv as one layer with its lowering's MACs.
    assert result.report.layers[0].macs_after == rep.lowered[0].macs_after
    assert result.report.layers_after == 1
    # A second run finds nothing to lower.
    again = prune(result.model, lower=strategy, verify=1)
    assert not again.report.modified


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("min_class", [1, 8])
def test_layer_models_match_dense(rng, strategy, min_class):
    """The one-layer models the timer runs compute the dense conv, also when one conv group
    has only zero weights (its output is the bias)."""
    w = sparse_weight(rng, 4, 3, 5, 3, 2, holes=0.6)
    w[2:] = 0  # group 1 of 2 is all zero
    spec = ConvSpec(w, rand(rng, 4), 2, (2, 1), (2, 1, 0, 1), (1, 2), (6, 13, 10))
    x = {"x": rand(rng, 3, 6, 13, 10)}
    ref = run(session(layer_model(spec, "dense", 3)), x)["y"]
    got = run(session(layer_model(spec, strategy, 3, min_class=min_class)), x)["y"]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 + 1e-5 * np.abs(ref).max())


def test_kernel_classes_group_channels_by_box():
    w = np.zeros((2, 5, 3, 3), np.float32)
    w[:, 0, 1, 1] = 1  # centre only
    w[:, 1, 1, 1] = 1  # centre only
    w[:, 2, :, 1] = 1  # a column
    w[:, 3, 0, 0] = 1  # corner ...
    w[:, 3, 2, 2] = 1  # ... to corner: full box
    assert kernel_classes(w, 1) == [((1, 1, 1, 1), [0, 1]), ((0, 2, 1, 1), [2]),
                                   ((0, 2, 0, 2), [3])]
    # Classes below min_class merge into the smallest class whose box holds them.
    assert kernel_classes(w, 2) == [((1, 1, 1, 1), [0, 1]), ((0, 2, 0, 2), [2, 3])]
    spec = ConvSpec(w, None, 1, (1, 1), (1, 1, 1, 1), (1, 1), (5, 8, 8))
    assert candidate_macs(spec, "kernel-classes", 1) == 64 * 2 * (1 + 1 + 3 + 9)
    assert candidate_macs(spec, "compact-gemm") == 64 * 2 * (1 + 1 + 3 + 2)
    assert dense_macs(spec) == 64 * 2 * 5 * 9


def test_blocks_become_one_grouped_conv(rng):
    # Filters 0,2 read channels 1,3 only; filters 1,3 read channels 0,2: a permuted 2-group.
    w = rand(rng, 4, 4, 3, 3)
    mask = np.zeros((4, 4), bool)
    mask[np.ix_([0, 2], [1, 3])] = mask[np.ix_([1, 3], [0, 2])] = True
    w[~mask] = 0
    model = conv_model(w, rand(rng, 4), (1, 1, 1, 1))
    result = prune(model, lower="blocks", verify=2)
    assert_same_outputs(model, result.model, seed=1)
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1
    assert next(a.i for a in convs[0].attribute if a.name == "group") == 2


def test_near_misses_are_left_alone(rng):
    dense = conv_model(rand(rng, 4, 3, 3, 3), rand(rng, 4), (1, 1, 1, 1))
    for strategy in ["auto", *STRATEGIES]:
        assert not prune(dense, lower=strategy, verify=1).report.modified
    w = sparse_weight(rng, 4, 3, 3, 3)
    same = conv_model(w, rand(rng, 4), (1, 1, 1, 1))
    same.graph.node[0].ClearField("attribute")
    same.graph.node[0].attribute.extend([helper.make_attribute("auto_pad", "SAME_UPPER")])
    rep = dict(prune(same, lower="kernel-classes", verify=1).report.passes)["lower-sparse-conv"]
    assert not rep.modified
    assert rep.kept == ("conv: zero fibers/2D filters not lowered (auto_pad SAME_UPPER)",)
    # Only zero 2D filters in a full box: kernel classes save nothing, the conv stays.
    w = rand(rng, 4, 3, 3, 3)
    w[0, 1] = 0
    rep = dict(prune(conv_model(w, None), lower="kernel-classes", verify=1).report.passes
               )["lower-sparse-conv"]
    assert not rep.modified
    assert rep.kept == ("conv: kernel-classes does no fewer MACs; kept dense",)


def test_depthwise_is_skipped_with_reason(rng):
    w = rand(rng, 16, 1, 3, 3)
    w[:, :, 0, 1] = 0
    model = conv_model(w, None, (1, 1, 1, 1), group=16)
    rep = dict(prune(model, lower="compact-gemm", verify=1).report.passes)["lower-sparse-conv"]
    assert not rep.modified
    assert "group 16 > 8" in rep.kept[0]


def fake_timer(times: dict[str, float]):
    calls = []

    def measure(spec, models):
        calls.append(sorted(models))
        return {k: times[k] for k in models}, False

    return measure, calls


def test_auto_picks_the_fastest_by_measurement(rng):
    w = sparse_weight(rng, 6, 8, 3, 3, holes=0.6)
    w[:, :, 1, 1] = 1  # every 2D filter is non-zero: no blocks
    model = conv_model(w, rand(rng, 6), (1, 1, 1, 1))
    from onnx_ssl.io import to_graph

    graph = to_graph(model)
    measure, calls = fake_timer({"dense": 1.0, "kernel-classes": 0.9, "group-classes": 0.7,
                                 "compact-gemm": 0.5, "row-gather": 0.6, "blocks": 0.1})
    res = LowerSparseConvPass("auto", timer=measure)(graph)
    # No 2D filter is zero, so blocks saves nothing and is not a candidate.
    assert calls == [["compact-gemm", "dense", "group-classes", "kernel-classes",
                      "row-gather"]]
    (e,) = res.report.lowered
    assert e.strategy == "compact-gemm"
    assert dict(e.times_ms) == {"dense": 1.0, "kernel-classes": 0.9, "group-classes": 0.7,
                                "compact-gemm": 0.5, "row-gather": 0.6}
    # Nothing beats the dense conv by the margin: it stays, and the report says so.
    measure, _ = fake_timer({"dense": 1.0, "kernel-classes": 0.97, "group-classes": 0.99,
                             "compact-gemm": 1.2, "row-gather": 1.1})
    res = LowerSparseConvPass("auto", timer=measure)(graph)
    assert not res.modified
    assert [d.strategy for d in res.report.dense] == ["dense"]


def test_auto_never_picks_a_form_measured_slower(rng):
    """Whatever the timings, the choice is the fastest form measured in the same run, and a
    lowering only when it beats the conv the pass was given (after channel removal) by the
    margin."""
    w = sparse_weight(rng, 6, 8, 3, 3, holes=0.5)
    from onnx_ssl.io import to_graph

    graph = to_graph(conv_model(w, rand(rng, 6), (1, 1, 1, 1)))
    for trial in range(20):
        t = dict(zip(["dense", *STRATEGIES], rng.uniform(0.5, 1.5, 1 + len(STRATEGIES)),
                     strict=True))
        measure, _ = fake_timer(t)
        rep = LowerSparseConvPass("auto", timer=measure)(graph).report
        (e,) = rep.lowered or rep.dense
        times = dict(e.times_ms)
        assert e.strategy in times, trial
        assert times[e.strategy] == min(times.values()) or (
            e.strategy == "dense" and min(times.values()) >= 0.95 * times["dense"]), trial
        assert times[e.strategy] <= times["dense"], trial


def test_auto_times_only_the_candidates_given(rng):
    w = sparse_weight(rng, 6, 8, 3, 3, holes=0.6)
    from onnx_ssl.io import to_graph

    graph = to_graph(conv_model(w, rand(rng, 6), (1, 1, 1, 1)))
    measure, calls = fake_timer({"dense": 1.0, "kernel-classes": 0.9, "group-classes": 0.5,
                                 "compact-gemm": 0.7, "blocks": 0.8})
    rep = LowerSparseConvPass("auto", timer=measure,
                              candidates=("kernel-classes", "compact-gemm"))(graph).report
    assert calls == [["compact-gemm", "dense", "kernel-classes"]]
    assert rep.lowered[0].strategy == "compact-gemm"
    with pytest.raises(ValueError, match="candidates must be among"):
        LowerSparseConvPass("auto", candidates=("bogus",))


def test_aligned_chunks_pad_or_split_for_nchwc():
    assert aligned_chunks(12) == [(0, 12, 12)]  # fewer than a block: as it is
    assert aligned_chunks(32) == [(0, 32, 32)]
    assert aligned_chunks(105) == [(0, 105, 112)]  # 7 channels of padding, under 15%
    assert aligned_chunks(20) == [(0, 16, 16), (16, 20, 4)]  # 12 would be 60%: split
    assert aligned_chunks(35) == [(0, 32, 32), (32, 35, 3)]


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_group_classes_padded_and_split_classes_are_exact(rng, group, bias):
    """Classes large enough to be padded (58 -> 64) and split (22 -> 16 + 6) for NCHWc, a
    random zero pattern inside the full boxes, a cropped border box, and other class sizes
    in the second conv group."""
    cg = 80
    mask = np.zeros((6 * group, cg, 3, 3), bool)
    for g in range(group):
        f = slice(6 * g, 6 * (g + 1))
        perm = rng.permutation(cg)
        centre, full, edge = perm[:58 - 4 * g], perm[58 - 4 * g:78 - 4 * g], perm[78 - 4 * g:]
        mask[f, centre, 1, 1] = True
        full_mask = rng.random((6, len(full), 3, 3)) >= 0.3
        full_mask[:, :, 0, 0] = full_mask[:, :, 2, 2] = True  # the box stays 3x3
        mask[f, full] = full_mask
        mask[f, edge, 0, :2] = True  # box (0, 0, 0, 1): its conv crops the bottom row
    w = rand(rng, 6 * group, cg, 3, 3) * mask
    spec = ConvSpec(w, rand(rng, 6 * group) if bias else None, group, (1, 1), (1, 1, 1, 1),
                    (1, 1), (cg * group, 7, 6))
    x = {"x": rand(rng, 2, cg * group, 7, 6)}
    model = layer_model(spec, "group-classes", 2)
    init = {t.name: t for t in model.graph.initializer}
    widths = {int(init[n.input[1]].dims[1]) for n in model.graph.node if n.op_type == "Conv"}
    assert {64, 16, 6} <= widths  # padded, and split into a block multiple and the rest
    ref = run(session(layer_model(spec, "dense", 2)), x)["y"]
    got = run(session(model), x)["y"]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 + 1e-5 * np.abs(ref).max())
    assert candidate_macs(spec, "group-classes") < dense_macs(spec)


def test_timer_cache_avoids_retiming(rng, tmp_path: Path):
    w = sparse_weight(rng, 4, 3, 3, 3)
    spec = ConvSpec(w, None, 1, (1, 1), (1, 1, 1, 1), (1, 1), (3, 8, 8))
    models = {s: layer_model(spec, s, 1) for s in ("dense", "compact-gemm")}
    timer = Timer(threads=1, iters=3, budget_s=0.01, cache_dir=tmp_path)
    first, cached = timer.measure(spec, models)
    assert not cached and set(first) == {"dense", "compact-gemm"}
    again, cached = timer.measure(spec, models)
    assert cached and again == first
    w2 = w.copy()
    w2[0, 0, 0, 0] = 0 if w2[0, 0, 0, 0] else 1  # another zero pattern: another key
    spec2 = ConvSpec(w2, None, 1, (1, 1), (1, 1, 1, 1), (1, 1), (3, 8, 8))
    assert timer.key(spec2, sorted(models)) != timer.key(spec, sorted(models))


def test_cli_lower_writes_choice_into_report(rng, tmp_path: Path):
    w = sparse_weight(rng, 6, 4, 3, 3)
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(conv_model(w, rand(rng, 6), (1, 1, 1, 1)), src)
    assert main(["prune", str(src), "-o", str(out), "--report", str(rep), "--lower", "auto",
                 "--threads", "1", "--batch", "2", "--lower-cache", str(tmp_path / "c")]) == 0
    data = json.loads(rep.read_text())
    (p,) = [p for p in data["passes"] if p["name"] == "lower-sparse-conv"]
    (e,) = p["lowered"] or p["dense"]
    assert e["node"] == "conv" and {t[0] for t in e["times_ms"]} >= {"dense"}
    assert list((tmp_path / "c").glob("*.json"))
    with pytest.raises(SystemExit) as e:
        main(["prune", str(src), "-o", str(tmp_path / "x.onnx"), "--lower", "bogus"])
    assert e.value.code == 2


def test_lowering_after_channel_removal_in_a_chain(rng):
    """Channels 1 and 4 between the convs are removed, then conv2 is lowered; exact, and a
    second run changes nothing."""
    w1 = rand(rng, 6, 3, 3, 3)
    w1[[1, 4]] = 0
    w2 = sparse_weight(rng, 5, 6, 3, 3)
    w2[:, [1, 4]] = 0  # nobody reads channels 1 and 4: removed
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2", pads=[1] * 4)]
    model = make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 5, 8, 8])],
                       {"w1": w1, "b1": rand(rng, 6), "w2": w2, "b2": rand(rng, 5)})
    result = prune(model, lower="compact-gemm", verify=2)
    passes = dict(result.report.passes)
    assert passes["remove-zero-channels"].channels_removed == 2
    assert [e.node for e in passes["lower-sparse-conv"].lowered] == ["conv2"]
    assert_same_outputs(model, result.model, seed=3)
    assert not prune(result.model, lower="compact-gemm", verify=1).report.modified


def test_unavailable_provider_is_an_input_error(rng):
    from onnx_ssl.errors import InputError

    w = sparse_weight(rng, 4, 8, 3, 3)
    with pytest.raises(InputError, match="CUDAExecutionProvider is not available"):
        prune(conv_model(w, None, (1, 1, 1, 1)), lower="auto", provider="cuda",
              lower_cache="")


def test_forms_measured_and_not_kept_are_exact(rng):
    """``benchmarks/bench_lowering_forms.py`` times forms that were rejected against the kept
    ones; its figures in the docs mean something only while those forms compute the conv."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_lowering_forms import FORMS, form_model, max_rel_diff

    for group, pads in ((1, (1, 1, 1, 1)), (2, (2, 1, 0, 1))):
        w = sparse_weight(rng, 4, 6 // group, 5, 3, group, holes=0.6)
        spec = ConvSpec(w, rand(rng, 4), group, (1, 1), pads, (1, 2), (6, 13, 10))
        diff = max_rel_diff({f: form_model(spec, f, 2) for f in FORMS}, spec, 2)
        assert set(diff) == set(FORMS) and max(diff.values()) < 1e-5, diff
