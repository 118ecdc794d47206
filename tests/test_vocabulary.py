"""One vocabulary: the penalty's structures are the analysis' group kinds (and the paper's two
structures of one layer), and one function measures a group for every threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnx_ssl.groups import KINDS, Group, Member
from onnx_ssl.norms import group_is_zero, group_norm, group_norms, norm_of_sums
from onnx_ssl.training.penalty import (
    LAYER_STRUCTURES,
    STRUCTURE_OF_KIND,
    STRUCTURES,
    AxisTerm,
    DepthTerm,
    Lambdas,
    Penalty,
)


def test_structures_are_the_group_kinds():
    assert tuple(STRUCTURE_OF_KIND) == KINDS
    assert STRUCTURES == (*LAYER_STRUCTURES, *(STRUCTURE_OF_KIND[k] for k in KINDS))
    assert len(set(STRUCTURES)) == len(STRUCTURES)
    # The coupled channel keeps its name: "channel" is the paper's structure of one layer.
    assert STRUCTURE_OF_KIND["channel"] == "coupled" and "channel" in LAYER_STRUCTURES
    assert all(STRUCTURE_OF_KIND[k] == k for k in KINDS if k != "channel")
    # The names the CLI options and the JSON have always used are all still there.
    assert set(STRUCTURES) >= {"filter", "channel", "shape", "filter2d", "neuron", "depth",
                               "coupled"}


def test_every_structure_has_its_lambda_option():
    from onnx_ssl.cli import build_parser

    for command in ("ssl", "artifacts"):
        args = build_parser().parse_args([command, "m.onnx", "-o", "out"])
        given = {k for k in vars(args) if k.startswith("lambda_")}
        assert given == {f"lambda_{s}" for s in STRUCTURES} | {"lambda_scale"}


def test_lambdas_by_structure_name():
    lam = Lambdas(filter=0.5, coupled=0.25, scales=(("filter:c1", 2.0),))
    assert lam == Lambdas(coupled=0.25, filter=0.5, depth=0.0, scales=(("filter:c1", 2.0),))
    assert [lam.get(s) for s in STRUCTURES].count(0.0) == len(STRUCTURES) - 2
    assert lam.for_term("filter", "c1") == 1.0 and lam.active() == ("filter", "coupled")
    assert Lambdas.from_json(lam.to_json()) == lam
    assert set(lam.to_json()) == {*STRUCTURES, "scales"}
    assert lam.scaled(2.0).get("coupled") == 0.5
    with pytest.raises(TypeError, match="no structure 'row'"):
        Lambdas(row=1.0)  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        lam.get("row")


def test_norm_of_sums_l2_and_rms():
    assert norm_of_sums(25.0, 4.0) == 5.0
    assert norm_of_sums(25.0, 4.0, "rms") == 2.5
    assert norm_of_sums(0.0, 0.0, "rms") == 0.0  # an empty group
    np.testing.assert_array_equal(norm_of_sums(np.array([9.0, 16.0]), np.array([1.0, 4.0]),
                                               "rms"), [3.0, 2.0])
    with pytest.raises(ValueError, match="norm must be"):
        norm_of_sums(1.0, 1.0, "l1")  # type: ignore[call-overload]


def _values() -> dict[str, np.ndarray]:
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 10
    return {"w": w, "b": np.array([3.0, 4.0], np.float32), "m": np.array([7.0, 8.0], np.float32)}


def test_group_norm_over_out_and_in_members_not_stat():
    v = _values()
    g = Group("s/1", "channel", "s", 1, True, None, (
        Member("w", "out", ((1,), None, None)), Member("b", "out", ((1,),)),
        Member("m", "stat", ((1,),))))
    sumsq = float(np.sum(np.square(v["w"][1], dtype=np.float64))) + 16.0
    assert group_norm(g, v) == pytest.approx(math.sqrt(sumsq), rel=1e-12)
    assert group_norm(g, v, "rms") == pytest.approx(math.sqrt(sumsq / 13), rel=1e-12)
    assert group_norms([g], v, "rms") == pytest.approx({"s/1": group_norm(g, v, "rms")})

    v["w"][1] = 0
    assert not group_is_zero(g, v)  # b[1] is not
    v["b"][1] = 0
    assert group_is_zero(g, v) and group_norm(g, v) == 0.0  # the stat member does not count
    assert v["m"][1] != 0


def test_the_penalty_measures_its_groups_with_the_same_function():
    v = _values()
    filters = AxisTerm("filter", "conv", "w", (2, 3, 4), (0,), 1.0)
    whole = DepthTerm("depth", "add", ("w", "b"), ((2, 3, 4), (2,)), 1.0)
    pen = Penalty((filters, whole), Lambdas(filter=1.0, depth=1.0))
    for i in range(2):
        g = Group(f"f{i}", "channel", "s", i, True, None, (Member("w", "out", ((i,), None, None)),))
        for norm in ("l2", "rms"):
            assert pen.norms(filters, v, norm)[i] == pytest.approx(group_norm(g, v, norm),
                                                                   rel=1e-12)
    d = Group("add/depth", "depth", None, None, True, None,
              (Member("w", "out", (None, None, None)), Member("b", "out", (None,))))
    assert pen.norms(whole, v, "rms")[0] == pytest.approx(group_norm(d, v, "rms"), rel=1e-12)
    # zero_groups and the sparsity statistics compare the RMS.
    rms = pen.norms(filters, v, "rms")
    p = {k: a.copy() for k, a in v.items()}
    assert pen.zero_groups(p, float(rms[0])) == 1 and not np.any(p["w"][0])
    rows = {r.structure: r.zero for r in pen.sparsity(v, tol=float(rms[0]))}
    assert rows == {"filter": 1, "depth": 0}
