"""The one measure that decides whether a group is small: its L2 norm or its RMS.

For a group ``G`` whose weights are ``w_G`` (its ``out`` and ``in`` members; ``stat``
members such as BatchNorm running statistics are no part of it) and whose size ``|G|`` is
its number of weights::

    l2(G)  = ||w_G||_2             = sqrt(sum w^2)
    rms(G) = ||w_G||_2 / sqrt(|G|) = sqrt(sum w^2 / |G|)       (0 for an empty group)

``prune --threshold`` (:class:`~onnx_ssl.passes.zero_small_groups.ZeroSmallGroupsPass`)
compares the L2 norm. ``ssl --threshold``, ``--zero-tol``, the budget's projection
(:mod:`onnx_ssl.training.budget`) and the importance of a residual branch
(:mod:`onnx_ssl.importance`) compare the RMS, which does not grow with the group's size.
Every one of them goes through :func:`norm_of_sums`: the analysis' groups by
:func:`group_norm` and :func:`group_norms`, the penalty's vectorised terms
(:class:`onnx_ssl.training.penalty.Penalty`) from their sums of squares.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, overload

import numpy as np

from .groups import Group, Member

Norm = Literal["l2", "rms"]
NORMS: tuple[Norm, ...] = ("l2", "rms")


@overload
def norm_of_sums(sumsq: float, size: float, norm: Norm = "l2") -> float: ...
@overload
def norm_of_sums(sumsq: np.ndarray, size: np.ndarray, norm: Norm = "l2") -> np.ndarray: ...
def norm_of_sums(sumsq: float | np.ndarray, size: float | np.ndarray,
                 norm: Norm = "l2") -> float | np.ndarray:
    """The ``norm`` of groups given their sums of squares and sizes (scalars, or arrays with
    one entry per group)."""
    if norm == "l2":
        out = np.sqrt(sumsq)
    elif norm == "rms":
        out = np.sqrt(sumsq / np.maximum(size, 1))
    else:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return out if isinstance(out, np.ndarray) else float(out)


def _member_size(m: Member, shape: tuple[int, ...]) -> int:
    return int(np.prod([d if s is None else len(s) for d, s in zip(shape, m.slice,
                                                                  strict=True)]))


def group_norm(group: Group, values: Mapping[str, np.ndarray], norm: Norm = "l2") -> float:
    """The ``norm`` of one group's weights in ``values`` (tensor name -> array)."""
    total, size = 0.0, 0
    for m in group.members:
        if m.role == "stat":
            continue
        v = values[m.tensor]
        total += float(np.sum(np.square(v[m.index(v.shape)], dtype=np.float64)))
        size += _member_size(m, v.shape)
    return norm_of_sums(total, float(size), norm)


def group_is_zero(group: Group, values: Mapping[str, np.ndarray]) -> bool:
    """Whether every weight of the group (its ``out`` and ``in`` members) is exactly zero:
    the test the zeroing passes make to leave such a group alone (so they are idempotent)."""
    return all(not np.any(values[m.tensor][m.index(values[m.tensor].shape)])
               for m in group.members if m.role != "stat")


def group_norms(groups: Iterable[Group], values: Mapping[str, np.ndarray],
                norm: Norm = "l2") -> dict[str, float]:
    """:func:`group_norm` of each group, by id, at a fraction of the cost for many groups: a
    member that slices one axis of its tensor is read from that axis' per-position sums of
    squares, computed once per tensor and axis."""
    sums: dict[tuple[str, int], np.ndarray] = {}
    out: dict[str, float] = {}
    for g in groups:
        total, size = 0.0, 0
        for m in g.members:
            if m.role == "stat":
                continue
            v = values[m.tensor]
            size += _member_size(m, v.shape)
            cut = [a for a, s in enumerate(m.slice) if s is not None]
            if len(cut) != 1:
                total += float(np.sum(np.square(v[m.index(v.shape)], dtype=np.float64)))
                continue
            key = (m.tensor, cut[0])
            if key not in sums:
                other = tuple(a for a in range(v.ndim) if a != cut[0])
                sums[key] = np.sum(np.square(v, dtype=np.float64), axis=other)
            total += float(sums[key][list(m.slice[cut[0]] or ())].sum())
        out[g.id] = norm_of_sums(total, float(size), norm)
    return out
