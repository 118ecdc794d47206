"""The test oracle of the group-Lasso penalty: every group enumerated one by one and its
value and gradient computed group by group in float64, with no vectorisation, against which
the ONNX loss graph and the numpy versions of :mod:`onnx_ssl.training.penalty` are checked
(tests/test_training_penalty.py).

For groups ``G`` with multipliers ``lambda_G``::

    R(W) = sum_G lambda_G sqrt(||w_G||^2 + eps),   dR/dw_G = lambda_G w_G / sqrt(||w_G||^2 + eps)

(``lambda_G`` times ``sqrt(|G|)`` with ``scale_by_size``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_ssl.groups import Analysis, Member
from onnx_ssl.training.penalty import CONV_OPS, DEFAULT_EPS, Lambdas


@dataclass(frozen=True)
class RefGroup:
    """One group as explicit (tensor, flat indices) pairs, with its multiplier."""

    structure: str
    members: tuple[tuple[str, np.ndarray], ...]
    lam: float

    @property
    def size(self) -> int:
        return sum(int(ix.size) for _, ix in self.members)


def reference_groups(
    analysis: Analysis, lambdas: Lambdas, shapes: Mapping[str, Sequence[int]]
) -> list[RefGroup]:
    """Every group of every active structure, enumerated one by one.

    ``filter``/``channel`` are enumerated here by index loops; ``shape``, ``filter2d``,
    ``neuron``, ``depth`` and ``coupled`` come from the analysis' own group lists (the
    ``channel`` groups of the analysis are the coupled groups), as slices via
    :meth:`Member.index`; the analysis must have been run with those kinds.
    """
    out: list[RefGroup] = []

    def flat(tensor: str, member: Member) -> np.ndarray:
        shp = tuple(int(d) for d in shapes[tensor])
        return (
            np.arange(int(np.prod(shp, dtype=np.int64))).reshape(shp)[member.index(shp)].reshape(-1)
        )

    for la in analysis.layers:
        if la.weight not in shapes or la.op_type not in CONV_OPS or len(la.weight_shape) < 3:
            continue
        shp = tuple(int(d) for d in shapes[la.weight])
        for structure, axis in (("filter", la.out_axis), ("channel", la.in_axis)):
            if lambdas.get(structure) <= 0:
                continue
            for i in range(shp[axis]):
                sl: list[tuple[int, ...] | None] = [None] * len(shp)
                sl[axis] = (i,)
                m = Member(la.weight, "out", tuple(sl))
                out.append(
                    RefGroup(structure, ((la.weight, flat(la.weight, m)),), lambdas.get(structure))
                )
    kind_to_structure = {
        "channel": "coupled",
        "shape": "shape",
        "filter2d": "filter2d",
        "neuron": "neuron",
        "depth": "depth",
    }
    for g in analysis.groups:
        structure = kind_to_structure[g.kind]
        lam = lambdas.get(structure)
        if lam <= 0 or (structure in ("coupled", "depth") and not g.prunable):
            continue
        members = tuple(
            (m.tensor, flat(m.tensor, m))
            for m in g.members
            if m.role != "stat" and m.tensor in shapes
        )
        if members:
            out.append(RefGroup(structure, members, lam))
    return out


def reference_value_and_grad(
    groups: Iterable[RefGroup],
    params: Mapping[str, np.ndarray],
    *,
    scale_by_size: bool = False,
    eps: float = DEFAULT_EPS,
) -> tuple[float, dict[str, np.ndarray]]:
    """``sum_G lambda_G sqrt(||w_G||^2 + eps)`` and its gradient, in float64."""
    value = 0.0
    grads = {k: np.zeros(np.shape(v), np.float64) for k, v in params.items()}
    for g in groups:
        vals = [np.asarray(params[t], np.float64).reshape(-1)[ix] for t, ix in g.members]
        norm = math.sqrt(sum(float(np.sum(v * v)) for v in vals) + eps)
        lam = g.lam * (math.sqrt(g.size) if scale_by_size else 1.0)
        value += lam * norm
        for (t, ix), v in zip(g.members, vals, strict=True):
            grads[t].reshape(-1)[ix] += lam * v / norm
    return value, grads
