"""Why a channel space, a group or a residual branch cannot be pruned, as data.

A :class:`Reason` has a code (what kind of obstacle), the node and tensor it speaks of, and
the sentence for people. Code branches on ``code``, never on the sentence; the JSON carries
both (``reason`` is the sentence, ``reason_code`` the code's value). For example, LayerNorm
over the channels of ``ln``'s input::

    Reason(ReasonCode.LAYER_NORM_OVER_CHANNELS, "ln (LayerNormalization): normalises over "
           "the channel axis", node="ln")

Nothing here depends on the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ReasonCode(str, Enum):
    """What kind of obstacle blocks channels (the values are the JSON's ``reason_code``)."""

    # An op rule refuses the channels (a reduction, a pad or a slice of the channel axis...).
    OP_CONSTRAINT = "op_constraint"
    # An op missing from the rule table: it blocks every channel it touches.
    UNKNOWN_OP = "unknown_op"
    # A normalisation (LayerNorm, GroupNorm, ...) over the channel axis.
    LAYER_NORM_OVER_CHANNELS = "layer_norm_over_channels"
    # A shape the analysis cannot know before run time (a computed reshape target...).
    RUNTIME_SHAPE = "runtime_shape"
    # Channel layouts of two operands that do not line up (a residual Add, a Concat...).
    LAYOUT_MISMATCH = "layout_mismatch"
    # A tensor of a residual branch read outside the branch (the branch cannot go).
    READ_OUTSIDE_BRANCH = "read_outside_branch"
    # A weight shared with another layer, or read by another op.
    SHARED_WEIGHT = "shared_weight"
    # The channels (or a weight) reach a graph output.
    GRAPH_OUTPUT = "graph_output"
    # The channels of a graph input: the caller fixes them.
    GRAPH_INPUT = "graph_input"
    # Control flow (If, Loop, Scan): its subgraphs are not analysed.
    CONTROL_FLOW = "control_flow"
    # A member that no slice of a tensor of the input model stands for.
    NOT_A_MODEL_SLICE = "not_a_model_slice"


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason, with the node and tensor it names (None where it names none)."""

    code: ReasonCode
    text: str
    node: str | None = None
    tensor: str | None = None

    def __str__(self) -> str:
        return self.text


def reason_json(reason: Reason | None) -> dict[str, str | None]:
    """The JSON fields of an optional reason: ``reason`` (the text) and ``reason_code``."""
    return {"reason": None if reason is None else reason.text,
            "reason_code": None if reason is None else reason.code.value}
