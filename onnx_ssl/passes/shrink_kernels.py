"""ShrinkKernelsPass: cut all-zero border rows and columns off convolution kernels, exactly.

Shape-wise SSL (the fibers ``W[:, c, m, k]``) can zero whole kernel positions. A position
on the kernel's border that is zero in every filter and channel, for example the first row
``W[:, :, 0, :]``, contributes nothing. Along one spatial axis with kernel size ``k``,
dilation ``d`` and pads ``(b, e)``, output ``i`` reads input rows ``i*s + m*d - b`` for
``m = 0..k-1``. Dropping ``z0`` leading and ``z1`` trailing zero positions leaves the kernel
``W[..., z0:k-z1, ...]`` reading ``i*s + m'*d + (z0*d - b)``, i.e. the same rows with pads

    b' = b - z0*d,   e' = e - z1*d.

A negative pad means the input starts (or ends) later than the padding allows: those rows
are read only by the removed positions, so a Slice crops ``-b'`` leading (``-e'`` trailing)
rows and the pad becomes 0. The output size ``(H + b + e - d*(k-1) - 1) // s + 1`` is
unchanged. Convolutions with ``auto_pad`` other than NOTSET/VALID are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ssl.graphutil import clear_inner_shapes, fresh_names, unique_name
from onnx_ssl.pipeline import PassBase, PassResult, Report


@dataclass(frozen=True)
class ShrinkKernelsReport(Report):
    kernels_shrunk: tuple[str, ...] = ()
    positions_removed: int = 0
    inputs_cropped: int = 0
    kept: tuple[str, ...] = field(default=(), metadata={"info": True})


def _border_zeros(w: np.ndarray, axis: int) -> tuple[int, int]:
    """Leading and trailing all-zero positions of ``axis`` (a kernel keeps one position)."""
    other = tuple(a for a in range(w.ndim) if a != axis)
    nz = np.flatnonzero(np.any(w != 0, axis=other))
    if nz.size == 0:
        return 0, 0
    return int(nz[0]), int(w.shape[axis] - 1 - nz[-1])


class ShrinkKernelsPass(PassBase[ShrinkKernelsReport]):
    name = "shrink-kernels"

    def call(self, graph: gs.Graph) -> PassResult[ShrinkKernelsReport]:
        todo: list[tuple[str, list[tuple[int, int]]]] = []
        kept: list[str] = []
        for node in graph.nodes:
            if node.op != "Conv" or not isinstance(node.inputs[1], gs.Constant):
                continue
            w = np.asarray(node.inputs[1].values)
            cuts = [_border_zeros(w, a) for a in range(2, w.ndim)]
            if not any(z0 or z1 for z0, z1 in cuts):
                continue
            if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                kept.append(f"{node.name}: zero kernel border kept (auto_pad "
                            f"{node.attrs['auto_pad']})")
                continue
            if len(node.inputs[1].outputs) > 1:
                kept.append(f"{node.name}: zero kernel border kept (weight shared)")
                continue
            todo.append((node.name, cuts))
        if not todo:
            return PassResult(graph, ShrinkKernelsReport(kept=tuple(kept)))
        graph = graph.copy()
        nodes = {n.name: n for n in graph.nodes}
        shrunk: list[str] = []
        removed = cropped = 0
        with fresh_names(graph):  # one name set for the pass, not one per name
            for name, cuts in todo:
                node = nodes[name]
                w = np.asarray(node.inputs[1].values)
                sd = w.ndim - 2
                dil = [int(v) for v in node.attrs.get("dilations", [1] * sd)]
                pads = [int(v) for v in node.attrs.get("pads", [0] * (2 * sd))]
                sl = [slice(None), slice(None)]
                crop_lo, crop_hi = [0] * sd, [0] * sd
                for a, (z0, z1) in enumerate(cuts):
                    sl.append(slice(z0, w.shape[a + 2] - z1))
                    b, e = pads[a] - z0 * dil[a], pads[a + sd] - z1 * dil[a]
                    crop_lo[a], crop_hi[a] = max(0, -b), max(0, -e)
                    pads[a], pads[a + sd] = max(0, b), max(0, e)
                new_w = np.ascontiguousarray(w[tuple(sl)])
                removed += int(w.size - new_w.size)
                node.inputs[1] = gs.Constant(unique_name(graph, f"{node.inputs[1].name}.shrunk"),
                                             new_w)
                node.attrs["pads"] = pads
                node.attrs.pop("auto_pad", None)
                if "kernel_shape" in node.attrs:
                    node.attrs["kernel_shape"] = list(new_w.shape[2:])
                if any(crop_lo) or any(crop_hi):
                    axes = [a + 2 for a in range(sd) if crop_lo[a] or crop_hi[a]]
                    starts = [crop_lo[a - 2] for a in axes]
                    ends = [-crop_hi[a - 2] if crop_hi[a - 2] else np.iinfo(np.int64).max
                            for a in axes]
                    x = node.inputs[0]
                    out = gs.Variable(unique_name(graph, f"{x.name}_cropped"), dtype=x.dtype)
                    graph.nodes.append(gs.Node(
                        "Slice", name=unique_name(graph, f"{name}_crop"),
                        inputs=[x, gs.Constant(unique_name(graph, f"{name}.crop_starts"),
                                               np.array(starts, dtype=np.int64)),
                                gs.Constant(unique_name(graph, f"{name}.crop_ends"),
                                            np.array(ends, dtype=np.int64)),
                                gs.Constant(unique_name(graph, f"{name}.crop_axes"),
                                            np.array(axes, dtype=np.int64))],
                        outputs=[out]))
                    node.inputs[0] = out
                    cropped += 1
                shrunk.append(name)
        clear_inner_shapes(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, ShrinkKernelsReport(tuple(shrunk), removed, cropped,
                                                     tuple(kept)))
