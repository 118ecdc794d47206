"""The pass contract (``pipeline.PassBase``): an analysis handed to a pass is reused only for
a graph it matches and computed afresh otherwise (counted); managers are passes and nest;
``requires``/``ensures`` failures name the pass and the passes that ran before it; passes
that declare they do not change their input leave it alone; ``finish`` changes no graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import arrays, pick_groups, with_arrays, zero_groups

from onnx_ssl import analysis as analysis_module
from onnx_ssl import compiler, models
from onnx_ssl.analysis import SharedAnalysis, analyze, analyze_graph, prepare
from onnx_ssl.graphutil import graph_key
from onnx_ssl.io import ModelMeta, to_graph
from onnx_ssl.passes import zero_small_groups
from onnx_ssl.passes.cleanup import CleanupPass
from onnx_ssl.passes.collapse_residual import CollapseResidualPass
from onnx_ssl.passes.remove_channels import RemoveZeroChannelsPass
from onnx_ssl.passes.shrink_kernels import ShrinkKernelsPass
from onnx_ssl.passes.zero_small_groups import ZeroSmallGroupsPass
from onnx_ssl.pipeline import (
    FixpointPass,
    PassBase,
    PassManager,
    PassResult,
    PostconditionError,
    PreconditionError,
    Report,
    finish,
    unfinished_reason,
)


@pytest.fixture(scope="module")
def zeroed() -> onnx.ModelProto:
    """syn_residual, prepared, with 4 channel groups zeroed: the channel pass removes 4."""
    model = prepare(models.build("syn_residual"))
    return zero_groups(model, pick_groups(analyze(model, prepared=True), 4, seed=3))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every analysis run (SharedAnalysis calls ``analysis.analyze_graph``) adds its graph's
    node count here."""
    calls: list[int] = []
    real = analysis_module.analyze_graph

    def counting(graph: gs.Graph, *args: object, **kw: object) -> object:
        calls.append(len(graph.nodes))
        return real(graph, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(analysis_module, "analyze_graph", counting)
    return calls


# --- an analysis handed to a pass ---------------------------------------------------------


def test_a_matching_analysis_is_reused(zeroed, counted):
    g = to_graph(zeroed)
    a = analyze_graph(g, kinds=())
    assert a.key == graph_key(g) == graph_key(g.copy())
    p = RemoveZeroChannelsPass(a)
    res = p(g.copy())  # a copy has the same key: the analysis still describes it
    assert res.report.channels_removed == 4
    assert p.shared.computed == 0 and counted == []


def test_a_stale_analysis_is_detected_and_recomputed(zeroed, counted):
    g = to_graph(zeroed)
    stale = analyze_graph(g, kinds=())
    pruned = RemoveZeroChannelsPass(stale)(g).graph
    assert counted == []
    # `stale` describes the graph before the removal: its spaces have 4 channels more. Used
    # on the pruned graph it would slice filters that are gone; the pass analyses afresh.
    assert stale.key != graph_key(pruned)
    p = RemoveZeroChannelsPass(stale)
    again = p(pruned)
    assert p.shared.computed == 1 and counted == [len(pruned.nodes)]
    assert not again.modified
    fresh = analyze_graph(pruned, kinds=())
    assert sum(s.channels for s in fresh.spaces) == sum(
        s.channels for s in stale.spaces) - 4


def test_the_same_graph_object_changed_in_place_is_analysed_again(zeroed, counted):
    """The old check compared graph objects: a graph changed in place kept its analysis."""
    g = to_graph(zeroed)
    shared = SharedAnalysis()
    first = shared.of(g)
    assert shared.of(g) is first and shared.computed == 1
    # A second output: the same object, another graph.
    y = g.outputs[0]
    z = gs.Variable("z", dtype=np.float32)
    g.nodes.append(gs.Node("Relu", name="extra", inputs=[y], outputs=[z]))
    g.outputs.append(z)
    second = shared.of(g)
    assert second is not first and shared.computed == 2 and len(counted) == 2
    # A changed Reshape target or Slice bound (an integer constant) changes the key too;
    # a float weight does not (the analysis never reads float values).
    w = next(t for t in g.tensors().values() if isinstance(t, gs.Constant)
             and np.asarray(t.values).dtype == np.float32 and np.asarray(t.values).ndim == 4)
    key = graph_key(g)
    w.values = np.zeros_like(np.asarray(w.values))
    assert graph_key(g) == key
    g.nodes.append(gs.Node("Reshape", name="flat", inputs=[
        z, gs.Constant("flat.shape", np.array([1, -1], dtype=np.int64))],
        outputs=[gs.Variable("zf", dtype=np.float32)]))
    key = graph_key(g)
    g.nodes[-1].inputs[1].values = np.array([-1, 1], dtype=np.int64)
    assert graph_key(g) != key


def test_zero_small_groups_reuses_only_an_analysis_with_its_group_kinds(zeroed, counted):
    g = to_graph(zeroed)
    channels_only = analyze_graph(g, kinds=("channel",))
    p = ZeroSmallGroupsPass(1e9, channels_only, kinds=("channel",))
    p(g)
    assert p.shared.computed == 0
    p = ZeroSmallGroupsPass(1e9, channels_only, kinds=("depth",))
    res = p(g)
    assert p.shared.computed == 1 and counted == [len(g.nodes)]
    assert dict(res.report.by_kind)["depth"] == 2


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[SharedAnalysis]:
    made: list[SharedAnalysis] = []

    class Recorded(SharedAnalysis):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, **kw)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(compiler, "SharedAnalysis", Recorded)
    monkeypatch.setattr(zero_small_groups, "SharedAnalysis", Recorded)
    return made


def test_prune_reuses_its_analysis_while_the_graph_is_unchanged(monkeypatch):
    """The threshold step and both passes of the fixpoint reuse the analysis `prune` made:
    zeroing weights keeps the key, and nothing here removes anything."""
    model = prepare(models.build("syn_residual"))
    made = _recording(monkeypatch)
    res = compiler.prune(model, threshold=0.0, verify=1)
    assert not res.report.removed
    assert [s.computed for s in made] == [0, 0]  # ZeroSmallGroupsPass, the pipeline's


def test_prune_analyses_each_changed_graph_once(monkeypatch, zeroed):
    made = _recording(monkeypatch)
    res = compiler.prune(zeroed, verify=1)
    assert res.report.removed
    (shared,) = made
    # The first round reuses the analysis `prune` made; the channel pass changes the graph,
    # and the next round's collapse pass analyses that graph, which the channel pass then
    # reuses (it removes nothing more): one analysis in the pipeline.
    assert shared.computed == 1


# --- managers are passes ------------------------------------------------------------------


@dataclass(frozen=True)
class NamesReport(Report):
    removed: tuple[str, ...] = ()


class DropLast(PassBase[NamesReport]):
    """Removes the last node while more than ``keep`` are left (on a copy)."""

    def __init__(self, name: str, keep: int) -> None:
        self.name, self.keep = name, keep

    def call(self, graph: gs.Graph) -> PassResult[NamesReport]:
        if len(graph.nodes) <= self.keep:
            return PassResult(graph, NamesReport())
        graph = graph.copy()
        return PassResult(graph, NamesReport((graph.nodes.pop().name,)))


def _relus(n: int) -> gs.Graph:
    return gs.Graph(nodes=[gs.Node("Relu", name=f"n{i}") for i in range(n)])


def test_nested_managers_report_their_inner_passes():
    inner = PassManager([DropLast("a", 4), DropLast("b", 3)], name="inner")
    outer = PassManager([inner, DropLast("c", 0), PassManager([])])
    assert isinstance(inner, PassBase) and isinstance(outer, PassBase)
    g = _relus(6)
    res = outer(g)
    assert [n for n, _ in res.report.results] == ["a", "b", "c"]
    assert res.report.get("a") == NamesReport(("n5",))
    assert res.report.get("c") == NamesReport(("n3",))
    assert res.modified and len(res.graph.nodes) == 3 and len(g.nodes) == 6
    with pytest.raises(KeyError):
        res.report.get("inner")


def test_a_manager_nests_in_a_fixpoint_and_a_fixpoint_in_a_manager():
    fix = FixpointPass([PassManager([DropLast("a", 2)]), DropLast("b", 0)])
    res = PassManager([fix, DropLast("c", 0)])(_relus(5))
    # Each round, a drops one node while more than 2 are left and b one while any is: the
    # fixpoint's report merges the rounds of the inner manager's pass like its own.
    assert [n for n, _ in res.report.results] == ["a", "b", "c"]
    assert res.report.get("a") == NamesReport(("n4", "n2"))
    assert res.report.get("b") == NamesReport(("n3", "n1", "n0"))
    assert not res.report.get("c").modified and len(res.graph.nodes) == 0


# --- requires / ensures -------------------------------------------------------------------


class Picky(PassBase[NamesReport]):
    """Refuses graphs with fewer than ``least`` nodes; promises at most ``most``."""

    name = "picky"

    def __init__(self, least: int, most: int) -> None:
        self.least, self.most = least, most

    def requires(self, graph: gs.Graph) -> None:
        if len(graph.nodes) < self.least:
            raise ValueError(f"needs {self.least} nodes, got {len(graph.nodes)}")

    def ensures(self, graph: gs.Graph) -> None:
        if len(graph.nodes) > self.most:
            raise ValueError(f"left {len(graph.nodes)} nodes")

    def call(self, graph: gs.Graph) -> PassResult[NamesReport]:
        return PassResult(graph, NamesReport())


def test_a_failed_precondition_names_the_pass_and_those_before():
    pm = PassManager([DropLast("a", 3), DropLast("b", 2), Picky(least=3, most=9)])
    with pytest.raises(PreconditionError, match=r"pass picky failed \(after: a, b\): picky: "
                                                 r"precondition failed: needs 3 nodes, got 2"
                       ) as info:
        pm(_relus(4))
    assert isinstance(info.value.__cause__, PreconditionError)
    assert isinstance(info.value.__cause__.__cause__, ValueError)
    assert Picky(least=2, most=9)(_relus(2)).graph is not None  # a near miss passes


def test_a_failed_postcondition_names_the_pass_and_those_before():
    pm = PassManager([DropLast("a", 4), Picky(least=0, most=3)], name="inner")
    with pytest.raises(PostconditionError, match=r"pass inner failed \(after: none\): pass "
                                                  r"picky failed \(after: a\): picky: "
                                                  r"postcondition failed: left 4 nodes"):
        PassManager([pm])(_relus(5))


def test_a_real_pass_refuses_duplicate_node_names(zeroed):
    g = to_graph(zeroed)
    g.nodes[1].name = g.nodes[0].name
    with pytest.raises(PreconditionError, match=r"pass remove-zero-channels failed \(after: "
                                                 r"cleanup\): remove-zero-channels: "
                                                 r"precondition failed: node names"):
        PassManager([CleanupPass(), RemoveZeroChannelsPass()])(g)


class Liar(PassBase[NamesReport]):
    name = "liar"

    def __init__(self, in_place: bool) -> None:
        self.in_place = in_place

    def call(self, graph: gs.Graph) -> PassResult[NamesReport]:
        if self.in_place:
            return PassResult(graph.copy(), NamesReport(("x",)))  # not the graph it got
        graph.nodes.pop()  # changes its input, and says it does not
        return PassResult(graph, NamesReport(("x",)))


@pytest.mark.parametrize("in_place", [True, False])
def test_a_pass_that_breaks_its_declaration_is_an_error(in_place):
    with pytest.raises(PostconditionError, match="declared"):
        Liar(in_place)(_relus(3))


# --- passes that do not change their input ------------------------------------------------


def _snapshot(g: gs.Graph) -> tuple[int, list[str], dict[str, bytes]]:
    return graph_key(g), [n.name for n in g.nodes], {
        n: np.asarray(t.values).tobytes() for n, t in g.tensors().items()
        if isinstance(t, gs.Constant)}


def _with_dead_node(g: gs.Graph) -> gs.Graph:
    g.nodes.append(gs.Node("Relu", name="dead", inputs=[g.nodes[0].outputs[0]],
                           outputs=[gs.Variable("dead.y", dtype=np.float32)]))
    return g


def _zero_kernel_border(model: onnx.ModelProto) -> onnx.ModelProto:
    arrs = arrays(model)
    arrs["layer1.0.conv1.weight"][:, :, 0, :] = 0
    return with_arrays(model, arrs)


def _zero_branch(model: onnx.ModelProto) -> onnx.ModelProto:
    a = analyze(model, kinds=("depth",), prepared=True)
    return zero_groups(model, [g for g in a.groups if g.id == "layer1.0.add/depth"])


CASES: dict[str, tuple[Callable[[], PassBase[Report]],
                       Callable[[onnx.ModelProto], gs.Graph]]] = {
    "remove-zero-channels": (RemoveZeroChannelsPass, to_graph),
    "collapse-residual": (CollapseResidualPass, lambda m: to_graph(_zero_branch(m))),
    "zero-small-groups": (lambda: ZeroSmallGroupsPass(1e9), to_graph),
    "shrink-kernels": (ShrinkKernelsPass, lambda m: to_graph(_zero_kernel_border(m))),
    "cleanup": (CleanupPass, lambda m: _with_dead_node(to_graph(m))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_pass_not_in_place_leaves_its_input_alone(name, zeroed):
    make, graph_of = CASES[name]
    p = make()
    assert p.name == name and not p.in_place and not p.changes_input
    g = graph_of(zeroed)
    before = _snapshot(g)
    res = p(g)
    assert res.modified and res.graph is not g
    assert _snapshot(g) == before
    assert _snapshot(res.graph) != before


@pytest.mark.parametrize("cls", [RemoveZeroChannelsPass, CollapseResidualPass])
def test_an_analysed_pass_made_in_place_rewrites_its_input_as_it_would_a_copy(
        cls: type[RemoveZeroChannelsPass | CollapseResidualPass], zeroed):
    """``in_place=True`` (what prune uses on its working copy) returns the very graph it got,
    rewritten exactly as the copying pass rewrites a copy, with the same report."""
    _, graph_of = CASES[cls.name]
    copying, in_place = cls(), cls(in_place=True)
    assert in_place.in_place and in_place.changes_input and not copying.changes_input
    ref = copying(graph_of(zeroed))
    g = graph_of(zeroed)
    res = in_place(g)
    assert res.graph is g and res.modified
    assert res.report == ref.report
    assert _snapshot(g) == _snapshot(ref.graph)


# --- finish -------------------------------------------------------------------------------


def test_finish_changes_no_graph(zeroed):
    g = _with_dead_node(to_graph(zeroed))
    g.nodes.reverse()  # and out of order
    assert unfinished_reason(g) is not None
    before = _snapshot(g)
    out = finish(g, ModelMeta.of(zeroed))
    assert _snapshot(g) == before
    assert "dead" not in {n.name for n in out.graph.node}
    assert len(out.graph.node) == len(g.nodes) - 1
    clean = CleanupPass()(g).graph
    assert unfinished_reason(clean) is None
    # A clean graph is exported as it is, in the same node order as a cleaned copy.
    assert [n.name for n in finish(clean, ModelMeta.of(zeroed)).graph.node] == [
        n.name for n in out.graph.node]
