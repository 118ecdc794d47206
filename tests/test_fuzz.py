"""The prune fuzzer on fixed seeds: random CNN graphs with zeroed channels, pruned.

Each seed is a graph of ``tests/fuzz_graphs.py`` with its channels zeroed in one of five
ways; the check prunes it and asserts, independently of the passes, equal outputs, unchanged
graph inputs and outputs, params and MACs that never grow, idempotence, every all-zero
channel removed or kept with a reason, and a prune within seconds. Each case runs in a child
process with a time limit, so that a hang fails instead of stalling the suite. To run
thousands of seeds and shrink the failures: ``python scripts/fuzz_prune.py``.
"""

from __future__ import annotations

import time

import pytest
from fuzz_graphs import (
    BLOCKS,
    HEADS,
    INNER,
    SCHEMES,
    Worker,
    build,
    float_params,
    macs,
    random_case,
)
from helpers import make_model, rand, vi
from onnx import helper

SEEDS = range(160)  # 32 per zeroing scheme: about a minute on two cores


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_random_graph_prunes_exactly(worker, seed):
    case = random_case(seed)
    fails = worker.run(case)
    assert not fails, "\n".join([case.describe(), *(f"{k}: {m}" for k, m in fails),
                                 f"shrink it: python scripts/fuzz_prune.py --seeds {seed}"])


def test_the_seeds_cover_every_construct_and_zeroing_scheme():
    cases = [random_case(s) for s in SEEDS]
    assert {b.kind for c in cases for b in c.blocks} == set(BLOCKS)
    assert {c.scheme for c in cases} == set(SCHEMES)
    assert {c.head for c in cases} == set(HEADS)
    assert sum(c.extra_output is not None for c in cases) >= 20
    assert set(INNER) <= set(BLOCKS)
    models = [build(c) for c in cases[:40]]
    assert max(len(m.graph.node) for m in models) < 100
    ops = {n.op_type for m in models for n in m.graph.node}
    assert {"Split", "Slice", "Concat", "Transpose", "Pad", "GlobalAveragePool", "Mul",
            "Sigmoid", "MatMul", "Gemm", "Add", "BatchNormalization"} <= ops


def test_a_hang_fails_within_the_time_limit():
    w = Worker()
    try:
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            w.call(time.sleep, 60, timeout=3)
        assert time.perf_counter() - t0 < 30
    finally:
        w.close()


def test_params_count_bias_maps_and_macs_follow_shapes(rng):
    inits = {"w": rand(rng, 4, 3, 3, 3), "k": rand(rng, 1, 4, 5, 5)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "k"], ["y"], name="map")]
    m = make_model(nodes, [vi("x", [2, 3, 5, 5])], [vi("y", [2, 4, 5, 5])], inits)
    assert float_params(m) == 4 * 3 * 9 + 4 * 25
    assert macs(m) == 2 * 4 * 25 * 3 * 9
