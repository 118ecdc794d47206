"""The pass framework: reports, the pass manager's errors, passes never mutate their input."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers import pick_groups, zero_groups
from onnx import numpy_helper

from onnx_ssl import models
from onnx_ssl.analysis import analyze, prepare
from onnx_ssl.errors import PassError
from onnx_ssl.io import to_graph
from onnx_ssl.passes.cleanup import CleanupPass
from onnx_ssl.passes.remove_channels import RemoveZeroChannelsPass
from onnx_ssl.pipeline import FixpointPass, PassManager, PassResult, PipelineReport, Report


@dataclass(frozen=True)
class CountReport(Report):
    nodes_removed: int = 0
    names: tuple[str, ...] = ()


class Identity:
    name = "identity"

    def __call__(self, graph: gs.Graph) -> PassResult[CountReport]:
        return PassResult(graph, CountReport())


class Boom:
    name = "boom"

    def __call__(self, graph: gs.Graph) -> PassResult[CountReport]:
        raise ValueError("kaboom")


def test_modified_is_derived_from_the_report():
    assert not CountReport().modified
    assert CountReport(nodes_removed=2).modified
    assert CountReport(names=("a",)).modified
    assert CountReport(nodes_removed=1).to_json() == {"nodes_removed": 1, "names": [],
                                                      "modified": True}


@dataclass(frozen=True)
class WordsReport(Report):
    branches_removed: tuple[str, ...] = ()
    layers_removed: int = 0
    by_kind: tuple[tuple[str, int], ...] = ()
    threshold: float = 0.0
    kept: tuple[str, ...] = field(default=(), metadata={"info": True})
    aim: float | None = None
    folded: bool = False


def test_report_renders_as_one_line_of_words():
    r = WordsReport(branches_removed=("a", "b", "c"), layers_removed=48,
                    by_kind=(("channel", 3), ("depth", 1)), threshold=1e-3, kept=("x",),
                    folded=True)
    assert r.to_text(skip=("kept",)) == ("branches removed 3 (a, b, c), layers removed 48, "
                                         "by kind (channel 3, depth 1), threshold 0.001, "
                                         "folded")
    # Empty, zero, None and False fields are left out; long tuples are cut after five.
    many = WordsReport(branches_removed=tuple("abcdefg"))
    assert many.to_text() == "branches removed 7 (a, b, c, d, e, ...)"
    assert WordsReport().to_text() == ""
    pipe = PipelineReport(results=(("collapse", WordsReport(layers_removed=2)),
                                   ("idle", WordsReport())))
    assert pipe.to_text() == "collapse: layers removed 2"


def test_pass_manager_names_the_passes_that_ran_before():
    g = to_graph(models.build("lenet"))
    with pytest.raises(PassError, match=r"pass boom failed \(after: identity, cleanup\): kaboom"
                       ) as info:
        PassManager([Identity(), CleanupPass(), Boom()])(g)
    assert isinstance(info.value.__cause__, ValueError)


def test_passes_do_not_mutate_their_input_and_are_idempotent():
    model = prepare(models.build("syn_residual"))
    z = zero_groups(model, pick_groups(analyze(model, prepared=True), 4, seed=3))
    g = to_graph(z)
    before = {n: np.array(t.values) for n, t in g.tensors().items()
              if isinstance(t, gs.Constant)}
    res = RemoveZeroChannelsPass()(g)
    assert res.modified and res.report.channels_removed == 4
    after = {n: np.array(t.values) for n, t in g.tensors().items()
             if isinstance(t, gs.Constant)}
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # The same pass on its own output reports no change.
    from onnx_ssl.io import ModelMeta
    from onnx_ssl.pipeline import finish

    out = finish(res.graph, ModelMeta.of(z))
    again = RemoveZeroChannelsPass()(to_graph(out))
    assert not again.modified
    assert numpy_helper.to_array(next(t for t in out.graph.initializer
                                      if t.name == "fc.weight")).shape[0] == 10


@dataclass(frozen=True)
class RoundReport(Report):
    removed: int = 0
    names: tuple[str, ...] = ()
    kept: tuple[str, ...] = field(default=(), metadata={"info": True})


class Countdown:
    """Removes one node per call until ``stop`` nodes are left; says what it kept."""

    name = "countdown"

    def __init__(self, stop: int) -> None:
        self.stop = stop

    def __call__(self, graph: gs.Graph) -> PassResult[RoundReport]:
        if len(graph.nodes) <= self.stop:
            return PassResult(graph, RoundReport(kept=(f"{len(graph.nodes)} left",)))
        graph = graph.copy()
        gone = graph.nodes.pop()
        return PassResult(graph, RoundReport(1, (gone.name,), (f"{len(graph.nodes)} left",)))


class Forever:
    name = "forever"

    def __call__(self, graph: gs.Graph) -> PassResult[CountReport]:
        return PassResult(graph, CountReport(nodes_removed=1))


def test_fixpoint_reruns_until_a_round_changes_nothing():
    g = gs.Graph(nodes=[gs.Node("Relu", name=f"n{i}") for i in range(5)])
    out = PassManager([FixpointPass([Countdown(2), Identity()]), Identity()])(g)
    assert len(out.graph.nodes) == 2
    # The fixpoint's passes report under their own names, merged over the rounds: counts
    # add up, what changed is concatenated, what is kept is the last round's.
    assert [n for n, _ in out.report.results] == ["countdown", "identity", "identity"]
    rep = out.report.get("countdown")
    assert rep == RoundReport(3, ("n4", "n3", "n2"), ("2 left",))
    # Its own output: no change.
    again = FixpointPass([Countdown(2)])(out.graph)
    assert not again.modified and again.report.rounds == 1


def test_fixpoint_that_never_settles_is_an_error():
    g = gs.Graph(nodes=[gs.Node("Relu", name="n")])
    with pytest.raises(PassError, match=r"still changing the graph after 5 rounds"):
        PassManager([FixpointPass([Forever()], max_rounds=5)])(g)


def test_report_merge_keeps_the_later_info():
    a = RoundReport(1, ("a",), ("x",))
    assert a.merge(RoundReport()) == RoundReport(1, ("a",), ())
    with pytest.raises(TypeError):
        a.merge(CountReport())
