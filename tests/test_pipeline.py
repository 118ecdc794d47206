"""The pass framework: reports, the pass manager's errors, passes never mutate their input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers import pick_groups, zero_groups
from onnx import numpy_helper
from onnx_ssl.passes.cleanup import CleanupPass
from onnx_ssl.passes.remove_channels import RemoveZeroChannelsPass

from onnx_ssl import models
from onnx_ssl.analysis import analyze, prepare
from onnx_ssl.errors import PassError
from onnx_ssl.io import to_graph
from onnx_ssl.pipeline import PassManager, PassResult, Report


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
