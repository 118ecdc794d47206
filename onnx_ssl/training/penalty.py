"""The group-Lasso regulariser of SSL (Wen et al. 2016): which weights form each group, and
the same penalty two ways: as ONNX nodes in the loss graph and vectorised in numpy (for the
proximal step and the sparsity statistics). The tests check both against a group-by-group
reference in plain numpy (tests/penalty_oracle.py).

The training loss is the paper's equation (1)::

    E(W) = E_D(W) + lambda * R(W) + sum_g lambda_g * sum_l R_g(W^(l)),
    R_g(w) = sum over groups G of ||w^(G)||_2,

with one ``lambda_g`` per *structure*. The structures share the analysis' vocabulary: each
kind of group the analysis lists (:data:`onnx_ssl.groups.KINDS`) is a structure named after
the kind (:data:`STRUCTURE_OF_KIND`), except the coupled channel (kind ``channel``), which is
``coupled`` because the paper's channel-wise structure of one layer already has that name;
``filter`` and ``channel`` are the paper's structures of one layer's weight that no analysis
group is (:data:`LAYER_STRUCTURES`). A kind added to ``KINDS`` is a structure here, with its
``--lambda-KIND`` option:

``filter``   ``W[n, :, :, :]`` of every convolution (equation 2, rows of the lowered matrix)
``channel``  ``W[:, c, :, :]`` of every convolution (equation 2, its input channels)
``shape``    ``W[:, c, m, k]`` of every convolution (equation 3, columns of the lowered matrix)
``filter2d`` ``W[n, c, :, :]`` of every convolution (section 3.3, 2D filters)
``neuron``   rows and columns of every fully connected weight (the MLP experiment)
``depth``    all weights of one residual branch (section 3.3, layer depth)
``coupled``  one group per channel of a prunable channel space: every ``out`` and ``in``
             slice the analysis ties to that channel, across tensors (a filter, its bias,
             its BatchNorm scale and shift, and the next layers' input slices), so that a
             channel and everything that only serves it go to zero together.

"Convolution" means a Conv or ConvTranspose layer whose weight has rank >= 3; "fully
connected" a Gemm or MatMul layer with a constant rank-2 weight. ``W[n, ...]`` indexes the
layer's output-channel axis and ``W[:, c, ...]`` its input-channel axis (the analysis'
``Layer.out_axis`` and ``in_axis``).

Each group norm is computed as ``sqrt(sum(w^2) + eps)`` so that a group already at zero has
a finite (zero) gradient (the thresholds and statistics compare the norms without ``eps``,
through :func:`onnx_ssl.norms.norm_of_sums`, as every threshold of onnx-ssl does); with
``scale_by_size`` a group's term is multiplied by ``sqrt(number of weights in the group)``
(the group-Lasso weighting of Yuan & Lin).

The proximal operator of ``t * lambda * ||w||`` is group soft-thresholding::

    w <- w * max(0, 1 - t * lambda / ||w||)

which sets a group exactly to zero when its norm is at most ``t * lambda``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_ssl.errors import InputError
from onnx_ssl.groups import KINDS, Analysis, ChannelRef, Group, Kind
from onnx_ssl.names import fresh_name
from onnx_ssl.norms import Norm, norm_of_sums
from onnx_ssl.rules import RULES

log = logging.getLogger(__name__)

# One vocabulary with the analysis: the structure of each kind of group (see the module doc).
STRUCTURE_OF_KIND: dict[Kind, str] = {k: "coupled" if k == "channel" else k for k in KINDS}
# The paper's filter-wise and channel-wise structures of one layer's weight (equation 2).
LAYER_STRUCTURES: tuple[str, ...] = ("filter", "channel")
STRUCTURES: tuple[str, ...] = (*LAYER_STRUCTURES, *STRUCTURE_OF_KIND.values())
DEFAULT_EPS = 1e-12
# Layers by their kind in the op table: convolutions get filter/channel/shape/filter2d terms,
# fully connected layers neuron terms.
CONV_OPS = tuple(op for op, r in RULES.items() if r.layer is not None and r.layer.kind == "conv")
FC_OPS = tuple(op for op, r in RULES.items() if r.layer is not None and r.layer.kind == "fc")


@dataclass(frozen=True, init=False)
class Lambdas:
    """The per-structure strengths ``lambda_g`` of equation (1) (0 disables a structure),
    given by structure name (``Lambdas(filter=1e-3, coupled=1e-2)``, one of
    :data:`STRUCTURES`; kept as ``strengths``, every structure in order), and per-term
    multipliers: ``scales`` maps a term's key ``structure:layer`` (``filter:conv2``; the layer
    is the node name, a coupled term's space id, a depth term's branch) to a factor on that
    term's lambda, like the per-layer multipliers of the paper's Caffe solvers. The key is the
    one ``ssl``'s reports list zero groups under."""

    strengths: tuple[tuple[str, float], ...]
    scales: tuple[tuple[str, float], ...]

    def __init__(self, *, scales: tuple[tuple[str, float], ...] = (),
                 **strengths: float) -> None:
        unknown = [s for s in strengths if s not in STRUCTURES]
        if unknown:
            raise TypeError(f"Lambdas: no structure {unknown[0]!r}; the structures are "
                            f"{', '.join(STRUCTURES)}")
        for f, v in strengths.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InputError(f"lambda for {f} must be a finite number >= 0, got {v!r}")
        object.__setattr__(self, "strengths",
                           tuple((s, float(strengths.get(s, 0.0))) for s in STRUCTURES))
        object.__setattr__(self, "scales", tuple(scales))
        for k, v in self.scales:
            if k.split(":", 1)[0] not in STRUCTURES or ":" not in k:
                raise InputError(f"lambda scale {k!r}: the key must be STRUCTURE:LAYER with "
                                 f"STRUCTURE one of {', '.join(STRUCTURES)}")
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InputError(f"lambda scale {k}: must be a finite number >= 0, got {v!r}")

    def get(self, s: str) -> float:
        for name, v in self.strengths:
            if name == s:
                return v
        raise KeyError(f"no structure {s!r}; the structures are {', '.join(STRUCTURES)}")

    @staticmethod
    def parse_scale(item: str) -> tuple[str, float]:
        """``"filter:conv2=2"`` -> ``("filter:conv2", 2.0)`` (one ``scales`` entry)."""
        key, eq, value = item.rpartition("=")
        try:
            factor = float(value)
        except ValueError:
            eq = ""
        if not eq or not key:
            raise InputError(f"lambda scale {item!r}: write STRUCTURE:LAYER=X, e.g. "
                             f"filter:conv2=2")
        return key, factor

    def for_term(self, structure: str, label: str) -> float:
        """The lambda of one term: its structure's, times the term's scale if given."""
        return self.get(structure) * dict(self.scales).get(f"{structure}:{label}", 1.0)

    def active(self) -> tuple[str, ...]:
        return tuple(s for s in STRUCTURES if self.get(s) > 0)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {s: self.get(s) for s in STRUCTURES}
        if self.scales:
            d["scales"] = {k: float(v) for k, v in self.scales}
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Lambdas:
        return Lambdas(**{s: float(d.get(s, 0.0)) for s in STRUCTURES},
                       scales=tuple((str(k), float(v)) for k, v in d.get("scales", {}).items()))

    def scaled(self, factor: float) -> Lambdas:
        return Lambdas(**{s: self.get(s) * factor for s in STRUCTURES}, scales=self.scales)

    def describe(self) -> str:
        act = [f"{s}={self.get(s):g}" for s in self.active()]
        out = ", ".join(act) if act else "none"
        if self.scales:
            out += " (" + ", ".join(f"{k} x{v:g}" for k, v in self.scales) + ")"
        return out


# --- terms ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisTerm:
    """Groups of one weight tensor: one group per index of the ``keep`` axes, each holding
    the weights along all other axes (``filter``: keep the output axis, and so on)."""

    structure: str
    layer: str
    tensor: str
    shape: tuple[int, ...]
    keep: tuple[int, ...]
    lam: float
    side: str = ""

    @property
    def reduce(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.shape)) if a not in self.keep)

    @property
    def group_size(self) -> int:
        return int(np.prod([self.shape[a] for a in self.reduce], dtype=np.int64))

    @property
    def groups(self) -> int:
        return int(np.prod([self.shape[a] for a in self.keep], dtype=np.int64))

    @property
    def label(self) -> str:
        return f"{self.layer}/{self.side}" if self.side else self.layer

    def sizes(self) -> np.ndarray:
        return np.full(self.groups, float(self.group_size))

    def sumsq(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        w = np.asarray(params[self.tensor], dtype=np.float64)
        return np.sum(w * w, axis=self.reduce).reshape(-1)

    def scale(self, params: Mapping[str, np.ndarray], factor: np.ndarray) -> None:
        w = params[self.tensor]
        f = factor.reshape([self.shape[a] for a in self.keep])
        f = np.expand_dims(f, self.reduce) if self.reduce else f
        w *= f.astype(w.dtype)


@dataclass(frozen=True)
class CoupledPart:
    """A weight's share of a coupled term: where the space's channels sit in it (``ref``,
    see :class:`~onnx_ssl.groups.ChannelRef`: channels ``space_start .. +length`` at
    positions ``(tensor_start + j) * block ..`` of ``axis``; ``conv_groups`` > 1 for the
    input side of a grouped convolution, whose axis 1 holds the channels of one group and
    axis 0 the groups' filters), and the weight's ``shape``."""

    ref: ChannelRef[str]
    shape: tuple[int, ...]

    @property
    def tensor(self) -> str:
        return self.ref.tensor

    @property
    def axis(self) -> int:
        return self.ref.axis

    @property
    def space_start(self) -> int:
        return self.ref.space_start

    @property
    def tensor_start(self) -> int:
        return self.ref.tensor_start

    @property
    def length(self) -> int:
        return self.ref.length

    @property
    def block(self) -> int:
        return self.ref.block

    @property
    def conv_groups(self) -> int:
        return self.ref.conv_groups

    def to_json(self) -> dict[str, Any]:
        """The reference's fields and ``shape``, in one flat object."""
        return {**asdict(self.ref), "shape": list(self.shape)}

    @staticmethod
    def from_json(d: Mapping[str, Any], space: str) -> CoupledPart:
        """A part as :meth:`to_json` wrote it, or as files written before the reference was
        kept whole wrote it (without ``role``, ``space``, ``node`` and ``is_weight``, which
        the penalty never reads: a weight of ``space`` on its producing side)."""
        ref = ChannelRef(
            tensor=str(d["tensor"]), axis=int(d["axis"]), role=d.get("role", "out"),
            space=str(d.get("space", space)), space_start=int(d["space_start"]),
            tensor_start=int(d["tensor_start"]), length=int(d["length"]),
            block=int(d["block"]), node=str(d.get("node", "")),
            is_weight=bool(d.get("is_weight", True)),
            conv_groups=int(d.get("conv_groups", 1)))
        return CoupledPart(ref, tuple(int(x) for x in d["shape"]))

    @property
    def grouped(self) -> bool:
        return self.conv_groups > 1 and self.axis == 1

    @property
    def positions(self) -> int:
        """Number of positions along the (grouped: virtual, groups x axis-1) channel axis."""
        return self.shape[1] * self.conv_groups if self.grouped else self.shape[self.axis]

    def profile(self, w: np.ndarray) -> np.ndarray:
        """Sum of squares of ``w`` at each position of the channel axis."""
        w = np.asarray(w, dtype=np.float64)
        if self.grouped:
            g = self.conv_groups
            v = (w * w).reshape(g, self.shape[0] // g, *self.shape[1:])
            return v.sum(axis=(1, *range(3, v.ndim))).reshape(-1)
        return np.sum(w * w, axis=tuple(a for a in range(w.ndim) if a != self.axis))

    def scale_positions(self, w: np.ndarray, factor: np.ndarray) -> None:
        """Multiply the slices of ``w`` at each channel-axis position by ``factor``."""
        if self.grouped:
            g = self.conv_groups
            v = w.reshape(g, self.shape[0] // g, *self.shape[1:])
            f = factor.reshape(g, 1, self.shape[1], *([1] * (len(self.shape) - 2)))
            v *= f.astype(w.dtype)
            return
        shape = [1] * len(self.shape)
        shape[self.axis] = self.shape[self.axis]
        w *= factor.reshape(shape).astype(w.dtype)

    def elements_per_position(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        return n // self.positions


@dataclass(frozen=True)
class CoupledTerm:
    """One group per channel of a prunable space: the sum over its parts."""

    structure: str
    space: str
    channels: int
    parts: tuple[CoupledPart, ...]
    lam: float

    @property
    def label(self) -> str:
        return self.space

    @property
    def groups(self) -> int:
        return self.channels

    def sizes(self) -> np.ndarray:
        s = np.zeros(self.channels)
        for p in self.parts:
            s[p.space_start : p.space_start + p.length] += p.block * p.elements_per_position()
        return s

    def sumsq(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        acc = np.zeros(self.channels)
        for p in self.parts:
            prof = p.profile(params[p.tensor])
            lo = p.tensor_start * p.block
            piece = prof[lo : lo + p.length * p.block].reshape(p.length, p.block).sum(axis=1)
            acc[p.space_start : p.space_start + p.length] += piece
        return acc

    def scale(self, params: Mapping[str, np.ndarray], factor: np.ndarray) -> None:
        for p in self.parts:
            full = np.ones(p.positions)
            lo = p.tensor_start * p.block
            full[lo : lo + p.length * p.block] = np.repeat(
                factor[p.space_start : p.space_start + p.length], p.block
            )
            p.scale_positions(params[p.tensor], full)


@dataclass(frozen=True)
class DepthTerm:
    """One group: all trainable weights of a residual branch."""

    structure: str
    branch: str
    tensors: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    lam: float

    @property
    def label(self) -> str:
        return self.branch

    @property
    def groups(self) -> int:
        return 1

    def sizes(self) -> np.ndarray:
        return np.array([float(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))])

    def sumsq(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.array(
            [sum(float(np.sum(np.asarray(params[t], np.float64) ** 2)) for t in self.tensors)]
        )

    def scale(self, params: Mapping[str, np.ndarray], factor: np.ndarray) -> None:
        for t in self.tensors:
            w = params[t]
            w *= w.dtype.type(factor[0])


Term = AxisTerm | CoupledTerm | DepthTerm


@dataclass(frozen=True)
class Penalty:
    """The regulariser: its terms (all structures, including those with lambda 0, which only
    serve the sparsity statistics) and the options that shape the group norms."""

    terms: tuple[Term, ...]
    lambdas: Lambdas
    scale_by_size: bool = False
    eps: float = DEFAULT_EPS
    layers: tuple[str, ...] = field(default=())

    @property
    def active_terms(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.lam > 0)

    def tensors(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for t in self.active_terms:
            for name in term_tensors(t):
                seen[name] = None
        return tuple(seen)

    def weights(self, term: Term) -> np.ndarray:
        """Per-group multipliers ``lambda_g`` (times ``sqrt(size)`` when scaling by size)."""
        w = np.full(term.groups, term.lam)
        if self.scale_by_size:
            w = w * np.sqrt(term.sizes())
        return w

    # --- numpy, vectorised ------------------------------------------------------------
    def norms(self, term: Term, params: Mapping[str, np.ndarray],
              norm: Norm = "l2") -> np.ndarray:
        """The group norms (no epsilon) of one term: L2, or ``"rms"`` (divided by
        ``sqrt(size)``), what the ``--threshold`` and ``--zero-tol`` of ``ssl`` are compared
        with (:func:`onnx_ssl.norms.norm_of_sums`)."""
        return norm_of_sums(term.sumsq(params), term.sizes(), norm)

    def value(self, params: Mapping[str, np.ndarray]) -> float:
        """``sum_g lambda_g sum_G sqrt(||w_G||^2 + eps)`` over the active terms."""
        total = 0.0
        for t in self.active_terms:
            total += float(np.sum(self.weights(t) * np.sqrt(t.sumsq(params) + self.eps)))
        return total

    def prox(self, params: Mapping[str, np.ndarray], step: float) -> int:
        """Group soft-thresholding ``w <- w * max(0, 1 - step * lambda_G / ||w_G||)`` of every
        active term, in place (terms that overlap are applied one after the other).

        Returns the number of groups that are exactly zero afterwards.
        """
        zero = 0
        for t in self.active_terms:
            n = self.norms(t, params)
            thr = step * self.weights(t)
            with np.errstate(divide="ignore", invalid="ignore"):
                factor = np.where(n > thr, 1.0 - thr / np.where(n > 0, n, 1.0), 0.0)
            t.scale(params, factor)
            zero += int(np.sum(factor == 0))
        return zero

    def zero_groups(self, params: Mapping[str, np.ndarray], threshold: float) -> int:
        """Set to exactly zero every group of the active terms whose RMS (norm divided by
        ``sqrt(size)``) is at most ``threshold``; returns how many groups were zeroed."""
        count = 0
        for t in self.active_terms:
            factor = np.where(self.norms(t, params, "rms") <= threshold, 0.0, 1.0)
            if np.any(factor == 0):
                t.scale(params, factor)
            count += int(np.sum(factor == 0))
        return count

    def sparsity(self, params: Mapping[str, np.ndarray], tol: float = 0.0) -> list[SparsityRow]:
        """For every term (active or not): how many of its groups are zero, i.e. have an RMS
        (a norm divided by ``sqrt(size)``) of at most ``tol``."""
        rows = []
        for t in self.terms:
            zero = int(np.sum(self.norms(t, params, "rms") <= tol))
            rows.append(SparsityRow(t.structure, t.label, zero, t.groups))
        return rows

    # --- json -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "lambdas": self.lambdas.to_json(),
            "scale_by_size": self.scale_by_size,
            "eps": self.eps,
            "layers": list(self.layers),
            "terms": [_term_to_json(t) for t in self.terms],
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Penalty:
        return Penalty(
            terms=tuple(_term_from_json(t) for t in d["terms"]),
            lambdas=Lambdas.from_json(d["lambdas"]),
            scale_by_size=bool(d.get("scale_by_size", False)),
            eps=float(d.get("eps", DEFAULT_EPS)),
            layers=tuple(d.get("layers", ())),
        )


@dataclass(frozen=True)
class SparsityRow:
    structure: str
    label: str
    zero: int
    total: int

    @property
    def fraction(self) -> float:
        return self.zero / self.total if self.total else 0.0


def term_tensors(t: Term) -> tuple[str, ...]:
    if isinstance(t, AxisTerm):
        return (t.tensor,)
    if isinstance(t, CoupledTerm):
        return tuple(dict.fromkeys(p.tensor for p in t.parts))
    return t.tensors


def _term_to_json(t: Term) -> dict[str, Any]:
    d = asdict(t)
    if isinstance(t, CoupledTerm):
        d["parts"] = [p.to_json() for p in t.parts]
    d["type"] = type(t).__name__
    return d


def _tuple(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_tuple(v) for v in x)
    return x


def _term_from_json(d: Mapping[str, Any]) -> Term:
    kind = d["type"]
    body = {k: _tuple(v) for k, v in d.items() if k != "type"}
    if kind == "AxisTerm":
        return AxisTerm(**body)
    if kind == "CoupledTerm":
        body["parts"] = tuple(CoupledPart.from_json(p, str(d["space"])) for p in d["parts"])
        return CoupledTerm(**body)
    if kind == "DepthTerm":
        return DepthTerm(**body)
    raise ValueError(f"unknown penalty term type {kind!r}")


# --- building the terms from the analysis --------------------------------------------------


def build_penalty(
    analysis: Analysis,
    lambdas: Lambdas,
    trainable: Mapping[str, Sequence[int]],
    *,
    scale_by_size: bool = False,
    eps: float = DEFAULT_EPS,
) -> Penalty:
    """The terms of every structure for the parameterised layers, prunable channel spaces and
    prunable residual branches of ``analysis``; only tensors in ``trainable`` (name -> shape)
    take part. Structures whose lambda is 0 are kept as inactive terms for the statistics,
    except ``coupled`` and ``depth``, which are only built when asked for (they may be large).
    """
    of_kind = STRUCTURE_OF_KIND
    filter_, channel = LAYER_STRUCTURES
    terms: list[Term] = []
    seen: set[tuple[str, str, tuple[int, ...]]] = set()
    layers: list[str] = []
    for la in analysis.layers:
        if la.weight not in trainable:
            log.debug("layer %s: weight %s is not trainable; no penalty", la.node, la.weight)
            continue
        shape = tuple(int(d) for d in trainable[la.weight])
        layers.append(la.node)
        if la.op_type in CONV_OPS and len(shape) >= 3:
            spatial = tuple(a for a in range(len(shape)) if a not in (la.out_axis, la.in_axis))
            structures: list[tuple[str, tuple[int, ...]]] = [
                (filter_, (la.out_axis,)),
                (channel, (la.in_axis,)),
                (of_kind["shape"], tuple(sorted((la.in_axis, *spatial)))),
                (of_kind["filter2d"], tuple(sorted((la.out_axis, la.in_axis)))),
            ]
        elif la.op_type in FC_OPS and len(shape) == 2:
            structures = [(of_kind["neuron"], (la.out_axis,)), (of_kind["neuron"], (la.in_axis,))]
        else:
            continue
        for structure, keep in structures:
            key = (structure, la.weight, keep)
            if key in seen:
                continue
            seen.add(key)
            side = (("rows" if keep == (la.out_axis,) else "columns")
                    if structure == of_kind["neuron"] else "")
            terms.append(
                AxisTerm(structure, la.node, la.weight, shape, keep,
                         lambdas.for_term(structure, la.node), side)
            )
    # The analysis' channel groups, one per channel of a space, as one term per space.
    coupled = of_kind["channel"]
    if lambdas.get(coupled) > 0:
        for sp in analysis.spaces:
            if not sp.prunable:
                continue
            parts = tuple(
                CoupledPart(r, tuple(int(d) for d in trainable[r.tensor]))
                for r in sp.refs
                if r.is_weight and r.role in ("out", "in") and r.tensor in trainable
            )
            if parts:
                terms.append(CoupledTerm(coupled, sp.id, sp.channels, parts,
                                         lambdas.for_term(coupled, sp.id)))
    depth = of_kind["depth"]
    if lambdas.get(depth) > 0:
        depth_groups = [g for g in analysis.groups if g.kind == "depth"]
        if not depth_groups and analysis.branches:
            log.warning(
                "the analysis lists residual branches but no depth groups; "
                "analyse with kind 'depth' to regularise depth"
            )
        for g in depth_groups:
            if not g.prunable:
                continue
            names = tuple(
                dict.fromkeys(
                    m.tensor
                    for m in g.members
                    if m.role != "stat"
                    and m.tensor in trainable
                    and all(s is None for s in m.slice)
                )
            )
            if names:
                assert g.node is not None  # a depth group names the Add of its branch
                label = g.node
                terms.append(
                    DepthTerm(
                        depth,
                        label,
                        names,
                        tuple(tuple(int(d) for d in trainable[n]) for n in names),
                        lambdas.for_term(depth, label),
                    )
                )
    head = of_kind["head"]
    if lambdas.get(head) > 0:
        by_attention: dict[str, list[Group]] = {}
        for g in analysis.groups:
            if g.kind == "head" and g.prunable and g.node is not None:
                by_attention.setdefault(g.node, []).append(g)
        for node, heads in by_attention.items():
            heads.sort(key=lambda g: g.index or 0)
            head_parts = _head_parts(heads, trainable)
            if head_parts is None:
                log.warning("attention %s: its heads are not equal runs of rows; no head "
                            "penalty", node)
                continue
            terms.append(CoupledTerm(head, node, len(heads), head_parts,
                                     lambdas.for_term(head, node)))
    keys = {f"{t.structure}:{t.label}" for t in terms}
    unknown = [k for k, _ in lambdas.scales if k not in keys]
    if unknown:
        raise InputError(
            f"lambda scale for {unknown[0]}: the model has no such term; its terms are "
            f"{', '.join(sorted(keys)[:12])}{', ...' if len(keys) > 12 else ''}")
    for s in lambdas.active():
        if not any(t.structure == s and t.lam > 0 for t in terms):
            log.warning("lambda-%s is set but the model has no %s groups", s, s)
    return Penalty(tuple(terms), lambdas, scale_by_size, eps, tuple(layers))


def _head_parts(heads: Sequence[Group], trainable: Mapping[str, Sequence[int]]
                ) -> tuple[CoupledPart, ...] | None:
    """The heads of one attention as parts of a coupled term: in each tensor, head ``u``
    holds the same runs of positions along one axis, shifted by ``u`` runs (Q, K, V rows of
    a fused projection are three runs). None when they are not laid out so."""
    parts: list[CoupledPart] = []
    tensors = dict.fromkeys(x.tensor for x in heads[0].members)
    for name in tensors:
        if name not in trainable:
            continue
        per: list[tuple[int, ...]] = []
        axis = -1
        for g in heads:
            ms = [x for x in g.members if x.tensor == name]
            if len(ms) != 1:
                return None
            axes = [i for i, sl in enumerate(ms[0].slice) if sl is not None]
            if len(axes) != 1 or axis not in (-1, axes[0]):
                return None
            axis = axes[0]
            per.append(tuple(ms[0].slice[axis] or ()))
        runs = _runs(per[0])
        shape = tuple(int(d) for d in trainable[name])
        for start, length in runs:
            if start % length:
                return None
            for u, pos in enumerate(per):
                want = [p + u * length for r0, n in runs for p in range(r0, r0 + n)]
                if list(pos) != want:
                    return None
            ref = ChannelRef(tensor=name, axis=axis, role="out", space=heads[0].node or "",
                             space_start=0, tensor_start=start // length, length=len(heads),
                             block=length, node=heads[0].node or "", is_weight=True)
            parts.append(CoupledPart(ref, shape))
    return tuple(parts) or None


def _runs(pos: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive positions: (start, length)."""
    out: list[tuple[int, int]] = []
    for p in pos:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


# --- the ONNX graph of the penalty ---------------------------------------------------------


class GraphWriter:
    """Appends nodes and initializers to a graph (protobuf messages built directly).

    This is the one writer that stays on protobuf: it writes the loss graph inside
    onnxblock's ``Block.build``, where onnxblock hands over its own ``ModelProto`` (the door
    to ONNX Runtime's training API; the loss nodes are part of the model onnxblock then
    differentiates). The forward graph reaches onnxblock already rewritten on
    onnx-graphsurgeon (:mod:`onnx_ssl.training.forms`, :mod:`onnx_ssl.decompositions`).
    """

    def __init__(self, graph: onnx.GraphProto, opset: int, prefix: str = "ssl") -> None:
        if opset < 11:
            raise InputError(
                f"opset {opset} is too old for training (need >= 11); convert "
                f"the model with onnx.version_converter"
            )
        self.graph = graph
        self.opset = opset
        self.prefix = prefix
        self._n = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._taken: set[str] | None = None  # the graph's names, collected at the first name

    def name(self, hint: str) -> str:
        if self._taken is None:
            g = self.graph
            self._taken = ({t.name for t in g.initializer}
                           | {v.name for v in (*g.input, *g.output, *g.value_info)}
                           | {x for n in g.node for x in (n.name, *n.output)})
        self._n += 1
        return fresh_name(self._taken, f"{self.prefix}/{hint}/{self._n}")

    def const(self, value: Any, dtype: Any = np.float32, hint: str = "const") -> str:
        """An initializer; scalars get shape [1] (see :meth:`reduce_sum`)."""
        arr = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        if arr.ndim == 0:
            arr = arr.reshape(1)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            name = self.name(hint)
            self.graph.initializer.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        hint: str | None = None,
        output: str | None = None,
        **attrs: int | float | Sequence[int],
    ) -> str:
        out = output or self.name(hint or op.lower())
        n = onnx.NodeProto(op_type=op, name=f"{out}:node")
        n.input.extend(inputs)
        n.output.append(out)
        for k, v in attrs.items():
            a = onnx.AttributeProto(name=k)
            if isinstance(v, bool | int):
                a.type = onnx.AttributeProto.INT
                a.i = int(v)
            elif isinstance(v, float):
                a.type = onnx.AttributeProto.FLOAT
                a.f = v
            else:
                a.type = onnx.AttributeProto.INTS
                a.ints.extend(int(i) for i in v)
            n.attribute.append(a)
        self.graph.node.append(n)
        return out

    def reduce_sum(
        self, x: str, axes: Sequence[int] | None, keepdims: int = 0, hint: str = "sum"
    ) -> str:
        """ReduceSum over ``axes``; ``None``: over all axes, to shape [1].

        Every scalar of the loss graph has shape [1], never rank 0: ONNX Runtime's constant
        sharing turns scalar initializers into [1] tensors, and the gradient of an Add that
        broadcasts a rank-0 operand against a [1] one fails to build.
        """
        if axes is not None and not axes:
            raise ValueError("reduce_sum over no axes (ReduceSum would reduce all)")
        if axes is None:
            total = self.node("ReduceSum", [x], hint, keepdims=0)
            return self.to_vector(total)
        if self.opset >= 13:
            return self.node(
                "ReduceSum", [x, self.const(list(axes), np.int64, "axes")], hint, keepdims=keepdims
            )
        return self.node("ReduceSum", [x], hint, axes=list(axes), keepdims=keepdims)

    def to_vector(self, x: str) -> str:
        """Reshape a scalar to shape [1]."""
        return self.node("Reshape", [x, self.const([1], np.int64, "shape1")], "vector")

    def add_all(self, xs: Sequence[str], hint: str = "add") -> str:
        """A chain of Adds (``Sum`` has no gradient in ONNX Runtime)."""
        if not xs:
            return self.const(0.0, hint="zero")
        acc = xs[0]
        for x in xs[1:]:
            acc = self.node("Add", [acc, x], hint)
        return acc


def add_penalty_nodes(penalty: Penalty, w: GraphWriter) -> str:
    """Append the active terms' nodes; return the name of the scalar penalty value."""
    squares: dict[str, str] = {}
    profiles: dict[tuple[str, int, int], str] = {}
    eps = w.const(penalty.eps, hint="eps")

    def sq(t: str) -> str:
        if t not in squares:
            squares[t] = w.node("Mul", [t, t], "sq")
        return squares[t]

    def weighted_norm_sum(sumsq: str, term: Term) -> str:
        norms = w.node("Sqrt", [w.node("Add", [sumsq, eps], "sumsq_eps")], "norm")
        weights = penalty.weights(term)
        if np.all(weights == weights[0]):
            total = w.reduce_sum(norms, None, hint="norm_sum")
            return w.node("Mul", [total, w.const(weights[0], hint="lambda")], "term")
        flat = w.node("Reshape", [norms, w.const([-1], np.int64, "shape")], "norm_flat")
        scaled = w.node("Mul", [flat, w.const(weights, hint="lambda")], "norm_weighted")
        return w.reduce_sum(scaled, None, hint="term")

    def profile(p: CoupledPart) -> str:
        key = (p.tensor, p.axis, p.conv_groups if p.grouped else 1)
        if key not in profiles:
            s = sq(p.tensor)
            rank = len(p.shape)
            if p.grouped:
                g = p.conv_groups
                view = [g, p.shape[0] // g, *p.shape[1:]]
                v = w.node("Reshape", [s, w.const(view, np.int64, "shape")], "grouped")
                r = w.reduce_sum(v, [1, *range(3, rank + 1)], hint="profile")
                profiles[key] = w.node("Reshape", [r, w.const([-1], np.int64, "shape")], "profile")
            elif rank == 1:
                profiles[key] = s
            else:
                profiles[key] = w.reduce_sum(
                    s, [a for a in range(rank) if a != p.axis], hint="profile"
                )
        return profiles[key]

    terms_out: list[str] = []
    for t in penalty.active_terms:
        if isinstance(t, AxisTerm):
            s = w.reduce_sum(sq(t.tensor), list(t.reduce), hint=f"{t.structure}_sumsq")
            terms_out.append(weighted_norm_sum(s, t))
        elif isinstance(t, CoupledTerm):
            pieces = []
            for p in t.parts:
                prof = profile(p)
                lo, hi = p.tensor_start * p.block, (p.tensor_start + p.length) * p.block
                if lo != 0 or hi != p.positions:
                    prof = w.node(
                        "Slice",
                        [
                            prof,
                            w.const([lo], np.int64, "start"),
                            w.const([hi], np.int64, "end"),
                            w.const([0], np.int64, "axes"),
                        ],
                        "slice",
                    )
                if p.block > 1:
                    prof = w.node(
                        "Reshape", [prof, w.const([p.length, p.block], np.int64, "shape")], "blocks"
                    )
                    prof = w.reduce_sum(prof, [1], hint="block_sum")
                if p.length != t.channels:
                    pads = [p.space_start, t.channels - p.space_start - p.length]
                    prof = w.node("Pad", [prof, w.const(pads, np.int64, "pads")], "pad")
                pieces.append(prof)
            terms_out.append(weighted_norm_sum(w.add_all(pieces, "coupled_sumsq"), t))
        else:
            parts = [w.reduce_sum(sq(name), None, hint="depth_sumsq") for name in t.tensors]
            terms_out.append(weighted_norm_sum(w.add_all(parts, "depth_sumsq"), t))
    return w.add_all(terms_out, "penalty")
