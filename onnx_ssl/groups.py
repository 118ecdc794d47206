"""The analysis result: channel spaces, SSL groups and their members, as plain immutable data.

A *channel space* is a family of tensor axes whose channels are tied: removing channel ``i``
of the space removes one slice from every tensor in it. A *group* is a set of weight slices
that SSL regularises (and the prune pass removes) together. For example, in
``Conv(x, W1, b1) -> Relu -> Conv(., W2)`` the output of the first conv is one space of
``W1.shape[0]`` channels, and its channel-group ``i`` has the members
``W1[i,:,:,:]`` and ``b1[i]`` (role ``out``) and ``W2[:,i,:,:]`` (role ``in``).

Nothing in this module touches a graph: the analysis pass builds these objects, the prune
pass and the training artifacts read them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Generic, Literal, TypeVar

from .reasons import Reason, reason_json

Role = Literal["out", "in", "stat"]
# "act" marks an activation tensor's axis in ChannelRef (never a group member).
RefRole = Literal["out", "in", "stat", "act"]
Kind = Literal["channel", "depth", "head", "shape", "filter2d", "neuron"]
KINDS: tuple[Kind, ...] = ("channel", "depth", "head", "shape", "filter2d", "neuron")
DEFAULT_KINDS: tuple[Kind, ...] = ("channel", "depth", "head")

# One entry per tensor axis: None is the whole axis, a tuple selects those indices.
Slice = tuple[tuple[int, ...] | None, ...]


@dataclass(frozen=True, slots=True)
class Member:
    """One slice of one weight tensor that belongs to a group."""

    tensor: str
    role: Role
    slice: Slice

    def index(self, shape: Sequence[int]) -> tuple[Any, ...]:
        """A numpy index (``np.ix_``) selecting the member in an array of ``shape``."""
        import numpy as np

        if len(shape) != len(self.slice):
            raise ValueError(f"{self.tensor}: slice has {len(self.slice)} axes, "
                             f"tensor {len(shape)}")
        return np.ix_(*[np.arange(d) if s is None else np.asarray(s, dtype=np.int64)
                        for d, s in zip(shape, self.slice, strict=True)])

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "role": self.role,
            "slice": [None if s is None else list(s) for s in self.slice],
        }


# A space by its id (``str``: in an analysis) or by its number while the channel
# propagation (channels.Engine) still unites spaces (``int``).
SpaceKey = TypeVar("SpaceKey", str, int)


@dataclass(frozen=True)
class ChannelRef(Generic[SpaceKey]):
    """Where a contiguous run of a space's channels sits along one axis of one tensor.

    Channels ``space_start .. space_start+length-1`` of ``space`` occupy positions
    ``(tensor_start + j) * block .. (tensor_start + j + 1) * block - 1`` of ``axis``
    (``block`` > 1 after a flatten to a fully connected layer, or a depthwise multiplier).
    ``node`` is the node that reads or writes the tensor at this axis. For the weight of a
    grouped convolution read on its input side (``conv_groups`` > 1, axis 1), channel
    position ``p`` is ``W[g*og:(g+1)*og, p % ig]`` with ``g = p // ig``.
    """

    tensor: str
    axis: int
    role: RefRole
    space: SpaceKey
    space_start: int
    tensor_start: int
    length: int
    block: int
    node: str
    is_weight: bool
    conv_groups: int = 1

    def positions(self, channel: int) -> tuple[int, ...]:
        j = channel - self.space_start
        if not 0 <= j < self.length:
            return ()
        first = (self.tensor_start + j) * self.block
        return tuple(range(first, first + self.block))


@dataclass(frozen=True)
class Space:
    id: str
    channels: int
    prunable: bool
    reason: Reason | None
    nodes: tuple[str, ...]
    origin: Literal["producer", "input"] = "producer"
    # Conv group counts whose groups must keep equal sizes (grouped convolutions).
    partitions: tuple[int, ...] = ()
    # The channel refs of every tensor axis in the space (weights and activations).
    refs: tuple[ChannelRef[str], ...] = ()
    # Reasons beyond the first, for the report.
    all_reasons: tuple[Reason, ...] = ()

    @property
    def constraint(self) -> str | None:
        """What a removal must respect beyond zeroing a channel's members (None: nothing).

        A grouped convolution (``group`` = G) reads or writes the space in G equal blocks of
        consecutive channels, and the rewrite keeps it a grouped convolution: it removes the
        same number of channels from every block and keeps at least one in each."""
        if not self.partitions:
            return None
        g = math.lcm(*self.partitions)
        size = self.channels // g
        return (f"grouped convolutions ({', '.join(map(str, self.partitions))} groups) split "
                f"the {self.channels} channels into {g} blocks of {size} (channels "
                f"k*{size} .. k*{size}+{size - 1}); prune removes zero channels only in equal "
                f"numbers from every block and keeps at least one per block: zero channels "
                f"in equal numbers per block, for example channel i of every block (i, "
                f"i+{size}, ..., i+{(g - 1) * size})")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channels": self.channels,
            "prunable": self.prunable,
            **reason_json(self.reason),
            "nodes": list(self.nodes),
            "conv_groups": list(self.partitions),
            "constraint": self.constraint,
        }


@dataclass(frozen=True, slots=True)
class Group:
    id: str
    kind: Kind
    space: str | None
    index: int | None
    prunable: bool
    reason: Reason | None
    members: tuple[Member, ...]
    # The node the group is of: the Add that joins a depth group's branch, the layer of a
    # shape, filter2d or neuron group; None for a channel group (its space says where).
    node: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "space": self.space,
            "index": self.index,
            "prunable": self.prunable,
            **reason_json(self.reason),
            "members": [m.to_json() for m in self.members],
        }


@dataclass(frozen=True)
class Layer:
    """A parameterised layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight)."""

    node: str
    op_type: str
    weight: str
    bias: str | None
    # Axis of `weight` indexed by output channels / input channels.
    out_axis: int
    in_axis: int
    conv_groups: int
    weight_shape: tuple[int, ...]
    params: int
    macs: int
    in_space: str | None
    out_space: str | None


@dataclass(frozen=True)
class Branch:
    """A residual branch: the nodes between a fork and the Add that joins it to its shortcut."""

    add: str
    fork: str
    branch_output: str
    nodes: tuple[str, ...]
    layers: tuple[str, ...]
    prunable: bool
    reason: Reason | None


@dataclass(frozen=True)
class Analysis:
    model: str
    spaces: tuple[Space, ...]
    groups: tuple[Group, ...]
    layers: tuple[Layer, ...] = ()
    branches: tuple[Branch, ...] = ()
    kinds: tuple[Kind, ...] = DEFAULT_KINDS
    notes: tuple[str, ...] = field(default=())
    # The model's batch is symbolic: layer MACs are per sample (the analysis binds it to 1).
    macs_per_sample: bool = False
    # graphutil.graph_key of the graph analysed: a pass handed this analysis uses it only
    # for a graph with the same key (see analysis.SharedAnalysis). None: not known.
    key: int | None = field(default=None, compare=False, repr=False)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def macs(self) -> int:
        """The layers' MACs; 0 (not static) when any layer's are unknown (0): a sum without
        them would understate the model, and a MAC budget measured against it would miss."""
        if any(layer.macs == 0 for layer in self.layers):
            return 0
        return sum(layer.macs for layer in self.layers)

    @cached_property
    def _spaces_by_id(self) -> dict[str, Space]:
        return {s.id: s for s in self.spaces}

    def space(self, space_id: str) -> Space:
        return self._spaces_by_id[space_id]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "spaces": [s.to_json() for s in self.spaces],
            "groups": [g.to_json() for g in self.groups],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)
