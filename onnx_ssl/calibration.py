"""Calibration inputs: an ``.npz`` file with one array per model input, checked against the
model before anything runs.

Every array is named as the model input it feeds and holds ``N`` samples along its first
axis (the same ``N`` for all of them); its other axes are the input's static dims. A float
input takes any floating array (cast to the input's type), an integer input any integer
array, a bool input a bool array; float samples must be finite. Where the model's batch is
static (``b``), ``N`` must be a multiple of ``b`` and the samples are fed ``b`` at a time;
a symbolic batch takes up to :data:`BATCH` samples at a time.

Each problem is one line (:class:`~onnx_ssl.errors.InputError`) that names the file, the
array and what the model expects. This module is part of the core (``prune --data``) and
imports nothing from the training package, which may reuse it for the same checks.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, one_line
from .io import ModelProto, onnx_to_dtype

# Samples per run where the model's batch is symbolic.
BATCH = 16


@dataclass(frozen=True)
class InputSpec:
    """A graph input: its name, numpy dtype and dims (an int, or None where symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]

    @property
    def batch(self) -> int | None:
        """The static batch size (the first dim), or None when it is symbolic."""
        return self.dims[0] if self.dims else None


def input_specs(model: ModelProto) -> tuple[InputSpec, ...]:
    """The graph inputs that are not initializers (older IR versions list weights too)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim)
        out.append(InputSpec(vi.name, onnx_to_dtype(tt.elem_type),
                             dims))
    return tuple(out)


@dataclass(frozen=True)
class Calibration:
    """Validated calibration inputs: input name -> ``[samples, ...]`` array of its dtype."""

    arrays: Mapping[str, np.ndarray]
    samples: int
    source: str
    # The model's static batch size, or None when its batch is symbolic.
    batch: int | None = None

    def batches(self, size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``size`` samples (default: the model's static batch, else ``BATCH``)."""
        step = size or self.batch or BATCH
        for start in range(0, self.samples, step):
            yield {k: v[start:start + step] for k, v in self.arrays.items()}


def _kind(dtype: np.dtype) -> str:
    return "float" if dtype.kind == "f" else "bool" if dtype.kind == "b" else (
        "integer" if dtype.kind in "iu" else dtype.kind)


def read_calibration(path: str | Path, inputs: Sequence[InputSpec]) -> Calibration:
    """Read ``path`` (an ``.npz``) and check it against ``inputs`` (see the module doc)."""
    src = f"calibration data {path}"
    expected = ", ".join(i.name for i in inputs)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise InputError(f"{src} is a single array, not an .npz with one array per "
                             f"model input ({expected})")
        with z:
            raw = {k: np.asarray(z[k]) for k in z.files}
    except InputError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"cannot read {src}: {one_line(e)}") from e
    return check_calibration(raw, inputs, src)


def check_calibration(raw: Mapping[str, np.ndarray], inputs: Sequence[InputSpec],
                      source: str = "calibration data") -> Calibration:
    """Check arrays already in memory against ``inputs``; the arrays cast to their inputs'
    dtypes (see the module doc for the rules)."""
    expected = ", ".join(i.name for i in inputs)
    if not raw:
        raise InputError(f"{source} holds no arrays; it needs one per model input, named "
                         f"{expected}")
    names = {i.name for i in inputs}
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise InputError(f"{source}: array(s) {', '.join(unknown)} name no model input; the "
                         f"model's inputs are {expected}")
    missing = [i.name for i in inputs if i.name not in raw]
    if missing:
        raise InputError(f"{source} has no array for model input(s) {', '.join(missing)}; "
                         f"it needs one per input, named {expected}")
    arrays: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for spec in inputs:
        a = raw[spec.name]
        if _kind(a.dtype) != _kind(spec.dtype):
            raise InputError(f"{source}: array '{spec.name}' has dtype {a.dtype}; model input "
                             f"'{spec.name}' is {spec.dtype} (needs {_kind(spec.dtype)} "
                             f"samples)")
        if a.ndim != len(spec.dims):
            raise InputError(f"{source}: array '{spec.name}' has rank {a.ndim} (shape "
                             f"{list(a.shape)}); model input '{spec.name}' has rank "
                             f"{len(spec.dims)} ({_dims(spec.dims)}), samples on the first axis")
        for axis, (got, want) in enumerate(zip(a.shape[1:], spec.dims[1:], strict=True), 1):
            if want is not None and got != want:
                raise InputError(f"{source}: array '{spec.name}' has size {got} on axis {axis}; "
                                 f"model input '{spec.name}' is {_dims(spec.dims)}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise InputError(f"{source}: array '{spec.name}' holds NaN or infinite values")
        arrays[spec.name] = np.ascontiguousarray(a.astype(spec.dtype, copy=False))
        counts[spec.name] = int(a.shape[0]) if a.ndim else 1
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise InputError(f"{source}: the arrays hold different numbers of samples ({shown}); "
                         f"every input needs the same number")
    n = next(iter(counts.values()))
    if n == 0:
        raise InputError(f"{source}: the arrays hold no samples")
    batches = {spec.batch for spec in inputs}
    static = next((b for b in batches if b is not None), None)
    if static is not None and n % static:
        raise InputError(f"{source}: {n} samples do not fill batches of the model's static "
                         f"batch size {static}; give a multiple of {static}")
    return Calibration(arrays, n, source, static)


def _dims(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
