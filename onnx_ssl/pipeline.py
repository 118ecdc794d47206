"""The pass framework: passes return a ``PassResult``; a ``PassManager`` runs them in order.

A pass takes a graph (onnx-graphsurgeon ``Graph``) and returns ``PassResult(graph, report)``
where ``report`` is a frozen dataclass saying what changed; ``modified`` is derived from the
report. The passes here never mutate the graph they are given (``in_place`` is False): they
work on a copy, unless made in place (:class:`AnalysedPass`, for a caller that owns the
graph, as ``prune`` owns its working copy). Errors raised inside a pass are re-raised as
:class:`PassError` naming the passes that ran before it, with the original exception
chained.

Passes state their contract (:class:`PassBase`, after onnx-ir's): whether they work in place
and change their input, a precondition ``requires`` checked before ``call`` and a
postcondition ``ensures`` checked on its result. :class:`PassManager` and
:class:`FixpointPass` are passes themselves, so pipelines nest. :func:`finish` is the
postcondition of a whole pipeline: it checks and exports the graph the passes left, and
never changes it.

A whole pipeline (``prune``: load -> preparation -> rewrites -> finish -> check) runs on one
:class:`Model` object, the graph and the model's metadata: its steps are
:class:`ModelPass` es with the same contract, which run graph passes on the model's graph,
and :class:`FinishPass` exports the graph once at the end.

A rewrite that enables more rewrites runs to its fixpoint: :class:`FixpointPass` runs its
passes again and again until a round changes nothing (removing a channel can leave a filter
that nobody reads, or an upstream channel that only that filter read), so that running the
pipeline on its own output reports no change. Its per-pass reports are merged over the
rounds (:meth:`Report.merge`).
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import gc
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import onnx
import onnx_graphsurgeon as gs

from .analysis import SharedAnalysis
from .errors import OnnxSslError, PassError
from .errors import one_line as _one_line
from .graphutil import has_subgraphs, require_unique_node_names
from .io import ModelMeta, from_graph, infer_shapes

if TYPE_CHECKING:
    from .groups import Analysis

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

    def to_text(self, skip: Collection[str] = ()) -> str:
        """The report in one line for people: each field that holds something, by its name
        in words, for example ``branches removed 3 (a, b, c), layers removed 48``. A count of
        0, an empty tuple, False, None and the fields in ``skip`` are left out ("" when
        nothing is left)."""
        parts = []
        for f in fields(self):
            if f.name.startswith("_") or f.name in skip:
                continue
            text = _describe(getattr(self, f.name))
            if text is not None:
                words = f.name.replace("_", " ")
                parts.append(f"{words} {text}" if text else words)
        return ", ".join(parts)


# Items of a tuple a report line names before it says "..." (the count says how many).
_SHOWN_ITEMS = 5


def _describe(v: Any) -> str | None:
    """A report field's value in words for :meth:`Report.to_text` ("" for a flag that is
    set; None to leave the field out)."""
    if v is None or v is False or (isinstance(v, (int, float, str)) and not v):
        return None
    if v is True:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (int, str)):
        return str(v)
    if isinstance(v, dict):
        v = tuple(v.items())
    if isinstance(v, (tuple, list, set, frozenset)):
        if not v:
            return None
        items = sorted(v) if isinstance(v, (set, frozenset)) else list(v)
        named = [_describe_item(x) for x in items[:_SHOWN_ITEMS]]
        if any(x is None for x in named):  # items without words of their own: the count
            return str(len(items))
        more = ", ..." if len(items) > _SHOWN_ITEMS else ""
        if all(isinstance(x, tuple) for x in items):  # (name, count) pairs
            return f"({', '.join(n for n in named if n)}{more})"
        return f"{len(items)} ({', '.join(n for n in named if n)}{more})"
    return None


def _describe_item(x: Any) -> str | None:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, (int, str)):
        return str(x)
    if (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
            and isinstance(x[1], (int, float, str))):
        return f"{x[0]} {_describe_item(x[1])}"
    return None


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
    """What a pass returns: the graph (a :class:`Model`, from a :class:`ModelPass`) and its
    report."""

    graph: Any
    report: R

    @property
    def modified(self) -> bool:
        return self.report.modified


class GraphPass(Protocol[R]):
    """A graph pass. ``name`` is used in error messages and logs."""

    name: str

    def __call__(self, graph: gs.Graph) -> PassResult[R]: ...


class PreconditionError(PassError):
    """A pass refused the graph it was handed: its ``requires`` failed."""


class PostconditionError(PassError):
    """A pass broke its own contract: its ``ensures`` failed on the graph it returned, or it
    returned a graph its ``in_place``/``changes_input`` declaration rules out."""


class PassBase(abc.ABC, Generic[R]):
    """A graph pass that states its contract (onnx-ir's ``PassBase``).

    ``in_place``: the pass changes the graph it is handed and returns that very object.
    ``changes_input``: it may change the graph it is handed (by default, when in place); a
    pass that does not works on a copy, and hands back its input only when nothing changed.
    Calling the pass runs ``requires(graph)``, ``call(graph)``, then ``ensures`` on the graph
    ``call`` returned; a failure raises :class:`PreconditionError` or
    :class:`PostconditionError` naming the pass, with its cause chained (a
    :class:`PassManager` adds the passes that ran before).
    """

    name: str = ""
    in_place: bool = False

    @property
    def changes_input(self) -> bool:
        return self.in_place

    def requires(self, graph: gs.Graph) -> None:
        """Raise when ``graph`` is not one this pass can take."""

    def ensures(self, graph: gs.Graph) -> None:
        """Raise when ``graph``, the graph this pass returned, breaks what it promises."""

    @abc.abstractmethod
    def call(self, graph: gs.Graph) -> PassResult[R]:
        """The pass itself."""

    def __call__(self, graph: gs.Graph) -> PassResult[R]:
        try:
            self.requires(graph)
        except PreconditionError:
            raise
        except Exception as e:
            raise PreconditionError(f"{self.name}: precondition failed: {_one_line(e)}"
                                    ) from e
        result = self.call(graph)
        if not isinstance(result, PassResult):
            raise PostconditionError(f"{self.name}: returned {type(result).__name__}, not a "
                                     f"PassResult")
        if self.in_place and result.graph is not graph:
            raise PostconditionError(f"{self.name}: declared in place, but returned another "
                                     f"graph than it was handed")
        if not self.changes_input and result.graph is graph and result.modified:
            raise PostconditionError(f"{self.name}: declared not to change its input, but "
                                     f"reports a change on the very graph it was handed")
        try:
            self.ensures(result.graph)
        except PostconditionError:
            raise
        except Exception as e:
            raise PostconditionError(f"{self.name}: postcondition failed: {_one_line(e)}"
                                     ) from e
        return result


class AnalysedPass(PassBase[R]):
    """A rewrite driven by the channel analysis of the graph it gets (the channel and the
    residual pass), with the constructor and contract they share.

    ``analysis`` is used only for a graph it matches (see
    :class:`~onnx_ssl.analysis.SharedAnalysis`); any other graph is analysed afresh.
    ``shared`` hands the analysis on between the passes of a pipeline (and the rounds of a
    fixpoint) instead. ``seed`` seeds the random inputs on which constants are evaluated.
    ``in_place``: rewrite the graph handed in rather than a copy of it (for a caller that
    owns that graph and no longer needs it as it was, such as ``prune``'s working copy).
    Node names must be unique before and after (the analysis finds nodes by name).
    """

    def __init__(self, analysis: Analysis | None = None, seed: int = 0, *,
                 shared: SharedAnalysis | None = None, in_place: bool = False) -> None:
        self.shared = shared or SharedAnalysis(analysis)
        self.seed = seed
        self.in_place = in_place

    def requires(self, graph: gs.Graph) -> None:
        require_unique_node_names(graph)

    def ensures(self, graph: gs.Graph) -> None:
        require_unique_node_names(graph)

    def _writable(self, graph: gs.Graph) -> gs.Graph:
        """The graph to rewrite: ``graph`` itself in place, else a copy of it."""
        return graph if self.in_place else graph.copy()


def _in_place(p: GraphPass[Any]) -> bool:
    return bool(getattr(p, "in_place", False))


def _changes_input(p: GraphPass[Any]) -> bool:
    # A pass that states no contract (not a PassBase) may change its input, for all we know.
    return bool(getattr(p, "changes_input", True))


@dataclass(frozen=True)
class PipelineReport(Report):
    """The reports of a pipeline's passes under their names (a nested pipeline contributes
    those of its own passes, see :meth:`Report.flatten`)."""

    results: tuple[tuple[str, Report], ...] = ()

    @property
    def modified(self) -> bool:
        return any(r.modified for _, r in self.results)

    def flatten(self, name: str) -> tuple[tuple[str, Report], ...]:
        return self.results

    def to_text(self, skip: Collection[str] = ()) -> str:
        """The passes that changed something, each as ``name: its report``, joined by "; "."""
        return "; ".join(f"{n}: {r.to_text(skip)}" for n, r in self.results
                         if r.modified and r.to_text(skip))

    def get(self, name: str) -> Report:
        """The report of the pass called ``name`` (KeyError when none ran)."""
        for n, r in self.results:
            if n == name:
                return r
        raise KeyError(name)


# Python's automatic garbage collection made a prune superlinear in the graph's size
# (onnx-graphsurgeon graphs are webs of cycles, and the collector walked the live ones again
# and again: 10k nodes took twice the time per node of 1k). While it is paused, the
# pipeline collects after a pass only when the tracked objects have grown by at least the
# number alive after the last collection: linear time, at most about twice the objects.
# Per paused level: (tracked objects counted alive, the collector's generation-0 count then);
# that count is the net number of tracked objects made since the last collection.
_LIVE: list[tuple[int, int]] = []
_MIN_GROWTH = 200_000


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause automatic garbage collection (also a decorator); see :func:`collect_if_grown`."""
    was = gc.isenabled()
    gc.disable()
    _LIVE.append((len(gc.get_objects()), gc.get_count()[0]))
    try:
        yield
    finally:
        _LIVE.pop()
        if was:
            gc.enable()


def _collected() -> None:
    if _LIVE:
        _LIVE[-1] = (len(gc.get_objects()), gc.get_count()[0])


def release_memory() -> None:
    """Collect garbage now, and hand the freed heap back to the system (glibc keeps it
    otherwise, and what the process maps next, such as a session's weights, adds to it)."""
    gc.collect()
    _collected()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def settle() -> None:
    """Count the tracked objects made since the last collection as alive: what the caller
    built to keep (a working copy and its analysis) then does not, by itself, trigger a
    collection that would walk all of it and free next to nothing."""
    if _LIVE:
        live, base = _LIVE[-1]
        now = gc.get_count()[0]
        _LIVE[-1] = (live + max(0, now - base), now)


def collect_if_grown() -> None:
    """Collect garbage now if, while paused, the tracked objects have doubled since the
    last collection (or :func:`settle`)."""
    if _LIVE:
        live, base = _LIVE[-1]
        if gc.get_count()[0] - base > max(_MIN_GROWTH, live):
            gc.collect()
            _collected()


class PassManager(PassBase[PipelineReport]):
    """Runs passes in order; an error names the failing pass and the ones that ran before.

    It is a pass itself (onnx-ir's ``Sequential``), so pipelines nest: its report holds
    the reports of its passes under their names, those of a nested pipeline included. It
    works in place when all its passes do, and changes its input when one of them does.
    """

    def __init__(self, passes: Sequence[GraphPass[Any]], name: str | None = None, *,
                 as_they_are: tuple[type[Exception], ...] = ()) -> None:
        self.passes = tuple(passes)
        self.name = name or "pipeline(" + ", ".join(p.name for p in self.passes) + ")"
        self.in_place = all(_in_place(p) for p in self.passes)
        # Errors of these types (the user's input, a failed numeric check) keep their one-line
        # message; a note names the pass (shown in the traceback with --debug).
        self.as_they_are = as_they_are

    @property
    def changes_input(self) -> bool:
        return any(_changes_input(p) for p in self.passes)

    def call(self, graph: gs.Graph) -> PassResult[PipelineReport]:
        ran: list[str] = []
        results: list[tuple[str, Report]] = []
        for p in self.passes:
            t0 = time.perf_counter()
            try:
                res = p(graph)
            except Exception as e:
                before = ", ".join(ran) if ran else "none"
                if isinstance(e, self.as_they_are):
                    e.add_note(f"in pass {p.name} (after: {before})")
                    raise
                msg = f"pass {p.name} failed (after: {before}): {_one_line(e)}"
                if isinstance(e, OnnxSslError):
                    raise type(e)(msg) from e
                raise PassError(msg) from e
            log.debug("pass %s: %.3fs modified=%s", p.name, time.perf_counter() - t0,
                      res.modified)
            graph = res.graph
            ran.append(p.name)
            results += res.report.flatten(p.name)
            collect_if_grown()
        return PassResult(graph, PipelineReport(tuple(results)))


@dataclass(frozen=True)
class FixpointReport(PipelineReport):
    """The merged report of each pass of a :class:`FixpointPass`, and the rounds it took
    (the last round changes nothing)."""

    rounds: int = field(default=0, metadata={"info": True})


class FixpointPass(PassBase[FixpointReport]):
    """Runs ``passes`` in order, round after round, until a round changes nothing.

    A pass that still reports a change after ``max_rounds`` rounds is a bug (each round that
    changes something makes the graph strictly smaller): it raises PassError rather than
    loop. Errors name the round and the passes that ran before, like :class:`PassManager`.
    """

    def __init__(self, passes: Sequence[GraphPass[Any]], max_rounds: int = 64) -> None:
        self.passes = tuple(passes)
        self.max_rounds = max_rounds
        self.name = "fixpoint(" + ", ".join(p.name for p in self.passes) + ")"
        self.in_place = all(_in_place(p) for p in self.passes)

    @property
    def changes_input(self) -> bool:
        return any(_changes_input(p) for p in self.passes)

    def call(self, graph: gs.Graph) -> PassResult[FixpointReport]:
        merged: dict[str, Report] = {}
        for k in range(1, self.max_rounds + 1):
            try:
                out = PassManager(self.passes, name=self.name)(graph)
            except OnnxSslError as e:
                raise type(e)(f"round {k}: {e}") from e
            graph = out.graph
            for name, r in out.report.results:
                merged[name] = merged[name].merge(r) if name in merged else r
            if not out.modified:
                log.debug("%s: fixpoint after %d round(s)", self.name, k)
                return PassResult(graph, FixpointReport(tuple(merged.items()), k))
        raise PassError(f"{self.name}: still changing the graph after {self.max_rounds} "
                        f"rounds")


# --- one model object from load to write -------------------------------------------------


@dataclass(eq=False)
class Model:
    """The one object a whole pipeline hands from pass to pass (load -> preparation ->
    rewrites -> finish -> check): the graph the passes rewrite and the model-level fields of
    the model it was read from (``meta``); ``proto``: the model as read until a pass
    imports it (the one proto -> graph conversion), and the model handed out once
    :class:`FinishPass` exported it (the one graph -> proto conversion). A pipeline's own
    state (an analysis, the model the result is checked against) lives in a subclass."""

    graph: gs.Graph | None
    meta: ModelMeta
    proto: onnx.ModelProto | None = None

    def the_graph(self) -> gs.Graph:
        """``graph``, which a pass that needs it requires."""
        if self.graph is None:
            raise PreconditionError("the model has no graph (it was not imported)")
        return self.graph


@dataclass(frozen=True)
class StepReport(Report):
    """The report of a step of a whole pipeline that changes no weight or channel: the
    preparation, finishing and checking passes (a prune's report lists the rewrites'
    reports only; :class:`PassManager` logs every pass's time)."""


class ModelPass(PassBase[R]):
    """A pass over a :class:`Model` (changed in place and returned: ``in_place``), with the
    contract of a graph pass: :class:`PassManager` runs model passes as it runs graph
    passes, and names the one that failed."""

    in_place = True

    @abc.abstractmethod
    def call(self, graph: Any) -> PassResult[R]:
        """The pass itself, on the :class:`Model` ``graph``."""


def unfinished_reason(graph: gs.Graph) -> str | None:
    """Why ``graph`` is not as a pipeline must leave it, or None: its nodes sorted (in the
    order of onnx-graphsurgeon's ``toposort``, by depth) and none of them dead (every node
    feeds a graph output). Linear in the graph's size."""
    if has_subgraphs(graph):
        return "it has subgraphs"  # control flow: left to onnx-graphsurgeon's cleanup
    depth: dict[str, int] = {t.name: -1 for t in graph.inputs}
    last = -1
    for n in graph.nodes:
        d = 0
        for t in n.inputs:
            if isinstance(t, gs.Constant) or not t.name:
                continue
            if t.name not in depth:
                return f"node {n.name} ({n.op}) reads {t.name} before a node makes it"
            d = max(d, depth[t.name] + 1)
        if d < last:
            return f"node {n.name} ({n.op}) is not in topological (depth) order"
        last = d
        for t in n.outputs:
            depth[t.name] = d
    live = {t.name for t in graph.outputs}
    for n in reversed(graph.nodes):
        if not any(t.name in live for t in n.outputs):
            return f"node {n.name} ({n.op}) is dead: no graph output depends on it"
        live.update(t.name for t in n.inputs)
    return None


def finish(graph: gs.Graph, meta: ModelMeta, load: bool = True) -> onnx.ModelProto:
    """The postcondition of every pipeline, and the model it hands out: the graph sorted
    without dead nodes, exported, strict shape inference, checker, ORT load (``load``
    False leaves the load to the numeric check that follows, which loads the model anyway).

    ``graph`` is never changed (the caller may still be using it: the thresholded graph is
    the passes' input). A pipeline ends with :class:`~onnx_ssl.passes.cleanup.CleanupPass`,
    which leaves its graph as this needs it; any other graph is cleaned up and sorted on a
    copy. Any failure raises with its cause chained; nothing is downgraded to a warning.
    """
    from . import runtime

    if unfinished_reason(graph) is not None:
        graph = graph.copy()
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = infer_shapes(from_graph(graph, meta), copy=False)
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as e:
        raise PassError(f"rewritten model fails the ONNX checker: {_one_line(e)}") from e
    if load:
        runtime.session(model)
    return model


class FinishPass(ModelPass[StepReport]):
    """:func:`finish` as the last pass of a whole pipeline: the model's graph exported (the
    one graph -> proto conversion) and checked; the model's ``proto`` is the result and its
    graph is dropped (nothing reads it after this). ``load``: load the result in ONNX
    Runtime here; a pipeline whose numeric check follows leaves that load to the check,
    rather than open a session only to throw it away."""

    name = "finish"

    def __init__(self, load: bool = True) -> None:
        self.load = load

    def requires(self, graph: Any) -> None:
        graph.the_graph()

    def call(self, graph: Any) -> PassResult[StepReport]:
        model: Model = graph
        model.proto = finish(model.the_graph(), model.meta, load=self.load)
        model.graph = None
        return PassResult(model, StepReport())
