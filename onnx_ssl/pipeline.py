"""The pass framework: passes return a ``PassResult``; a ``PassManager`` runs them in order.

A pass takes a graph (onnx-graphsurgeon ``Graph``) and returns ``PassResult(graph, report)``
where ``report`` is a frozen dataclass saying what changed; ``modified`` is derived from the
report. A pass never mutates the graph it is given: it works on a copy. Errors raised inside
a pass are re-raised as :class:`PassError` naming the passes that ran before it, with the
original exception chained.

A rewrite that enables more rewrites runs to its fixpoint: :class:`FixpointPass` runs its
passes again and again until a round changes nothing (removing a channel can leave a filter
that nobody reads, or an upstream channel that only that filter read), so that running the
pipeline on its own output reports no change. Its per-pass reports are merged over the
rounds (:meth:`Report.merge`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Generic, Protocol, TypeVar

import onnx
import onnx_graphsurgeon as gs

from .errors import OnnxSslError, PassError
from .io import ModelMeta, from_graph, infer_shapes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """Base of every pass report. Subclasses list what changed as counts and tuples."""

    @property
    def modified(self) -> bool:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("_") or f.metadata.get("info"):
                continue
            if isinstance(v, bool) and v:
                return True
            if isinstance(v, int) and not isinstance(v, bool) and v != 0:
                return True
            if isinstance(v, (tuple, list, dict, set, frozenset)) and len(v) > 0:
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = _jsonable(v)
        out["modified"] = self.modified
        return out

    def merge(self, later: Report) -> Report:
        """This report followed by ``later`` (the same pass, run again): counts add up,
        tuples of what changed are concatenated, and ``info`` fields (what is still kept and
        why) and other values are ``later``'s, the state after both."""
        if type(later) is not type(self):
            raise TypeError(f"cannot merge {type(later).__name__} into {type(self).__name__}")
        values: dict[str, Any] = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(later, f.name)
            if f.metadata.get("info"):
                values[f.name] = b
            elif isinstance(a, bool):
                values[f.name] = a or b
            elif isinstance(a, (int, tuple)):
                values[f.name] = a + b
            else:
                values[f.name] = b
        return type(self)(**values)

    def flatten(self, name: str) -> tuple[tuple[str, Report], ...]:
        """``(pass name, report)`` pairs for a pipeline's results (a nested pipeline gives
        those of its passes)."""
        return ((name, self),)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Report):
        return v.to_json()
    if hasattr(v, "__dataclass_fields__"):
        return {f.name: _jsonable(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


R = TypeVar("R", bound=Report, covariant=True)


@dataclass(frozen=True)
class PassResult(Generic[R]):
    graph: gs.Graph
    report: R

    @property
    def modified(self) -> bool:
        return self.report.modified


class GraphPass(Protocol[R]):
    """A graph pass. ``name`` is used in error messages and logs."""

    name: str

    def __call__(self, graph: gs.Graph) -> PassResult[R]: ...


@dataclass(frozen=True)
class PipelineResult:
    graph: gs.Graph
    results: tuple[tuple[str, Report], ...]

    def report(self, name: str) -> Report:
        for n, r in self.results:
            if n == name:
                return r
        raise KeyError(name)


class PassManager:
    """Runs passes in order; an error names the failing pass and the ones that ran before."""

    def __init__(self, passes: Sequence[GraphPass[Any]]) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: gs.Graph) -> PipelineResult:
        ran: list[str] = []
        results: list[tuple[str, Report]] = []
        for p in self.passes:
            t0 = time.perf_counter()
            try:
                res = p(graph)
            except Exception as e:
                before = ", ".join(ran) if ran else "none"
                msg = f"pass {p.name} failed (after: {before}): {_one_line(e)}"
                if isinstance(e, OnnxSslError):
                    raise type(e)(msg) from e
                raise PassError(msg) from e
            log.debug("pass %s: %.3fs modified=%s", p.name, time.perf_counter() - t0,
                      res.modified)
            graph = res.graph
            ran.append(p.name)
            results += res.report.flatten(p.name)
        return PipelineResult(graph, tuple(results))


@dataclass(frozen=True)
class FixpointReport(Report):
    """The merged report of each pass of a :class:`FixpointPass`, and the rounds it took
    (the last round changes nothing)."""

    results: tuple[tuple[str, Report], ...] = ()
    rounds: int = field(default=0, metadata={"info": True})

    @property
    def modified(self) -> bool:
        return any(r.modified for _, r in self.results)

    def flatten(self, name: str) -> tuple[tuple[str, Report], ...]:
        return self.results


class FixpointPass:
    """Runs ``passes`` in order, round after round, until a round changes nothing.

    A pass that still reports a change after ``max_rounds`` rounds is a bug (each round that
    changes something makes the graph strictly smaller): it raises PassError rather than
    loop. Errors name the round and the passes that ran before, like :class:`PassManager`.
    """

    def __init__(self, passes: Sequence[GraphPass[Any]], max_rounds: int = 64) -> None:
        self.passes = tuple(passes)
        self.max_rounds = max_rounds
        self.name = "fixpoint(" + ", ".join(p.name for p in self.passes) + ")"

    def __call__(self, graph: gs.Graph) -> PassResult[FixpointReport]:
        merged: dict[str, Report] = {}
        for k in range(1, self.max_rounds + 1):
            try:
                out = PassManager(self.passes)(graph)
            except OnnxSslError as e:
                raise type(e)(f"round {k}: {e}") from e
            graph = out.graph
            for name, r in out.results:
                merged[name] = merged[name].merge(r) if name in merged else r
            if not any(r.modified for _, r in out.results):
                log.debug("%s: fixpoint after %d round(s)", self.name, k)
                return PassResult(graph, FixpointReport(tuple(merged.items()), k))
        raise PassError(f"{self.name}: still changing the graph after {self.max_rounds} "
                        f"rounds")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def finish(graph: gs.Graph, meta: ModelMeta) -> onnx.ModelProto:
    """The end of every pipeline: sort, export, strict shape inference, checker, ORT load.

    Any failure raises with its cause chained; nothing is downgraded to a warning. The graph
    is consumed (cleaned up in place).
    """
    from . import runtime

    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = from_graph(graph, meta)
    model = infer_shapes(model)
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as e:
        raise PassError(f"rewritten model fails the ONNX checker: {_one_line(e)}") from e
    runtime.session(model)
    return model
