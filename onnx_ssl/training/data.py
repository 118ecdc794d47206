"""Training data: ``.npz`` files, folders of MNIST IDX files, scikit-learn's bundled digits.

A data *spec* is one of

``digits``           scikit-learn's bundled 8x8 digits (1,797 images, the built-in default),
                     resized to the model's input size (bilinear), pixel values in [0, 1]
``PATH.npz``         arrays ``x`` and ``y`` (or one array per model input name, plus ``y``);
                     without ``y`` the data is unlabelled: one array per model input, any
                     dtype the inputs have (int64 token ids included), for distillation
``FOLDER``           MNIST IDX files (``*-images-idx3-ubyte`` and ``*-labels-idx1-ubyte``,
                     gzipped or raw; every pair found is used), pixel values in [0, 1]

The samples are checked against the model input (shape without the batch axis, dtype) and
the labels against the loss (class indices in range for cross-entropy, the output's shape
otherwise); a mismatch is a one-line :class:`~onnx_ssl.errors.InputError`.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from onnx_ssl.errors import InputError

log = logging.getLogger(__name__)

BUILTIN = "digits"


@dataclass(frozen=True)
class Dataset:
    """Inputs (one array per model input, first axis = samples), labels ``y`` (None for
    unlabelled data) and, for distillation, the teacher's outputs.

    ``targets`` holds one array per model output (the teacher's output on every sample,
    computed once: :func:`onnx_ssl.training.distill.teacher_targets`) and ``target_rms``
    each one's RMS over the whole data set, which normalises the MSE distillation loss.
    """

    x: Mapping[str, np.ndarray]
    y: np.ndarray | None
    name: str
    resizable: bool = False
    targets: Mapping[str, np.ndarray] = field(default_factory=dict)
    target_rms: Mapping[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        if self.y is not None:
            return int(self.y.shape[0])
        first = next(iter(self.x.values()), None)
        return 0 if first is None else int(first.shape[0])

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def subset(self, idx: np.ndarray, name: str | None = None) -> Dataset:
        return replace(
            self,
            x={k: v[idx] for k, v in self.x.items()},
            y=None if self.y is None else self.y[idx],
            name=name or self.name,
            targets={k: v[idx] for k, v in self.targets.items()},
        )

    def split(self, val_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """A shuffled split into (train, held-out); the held-out part has
        ``round(len * val_fraction)`` samples (at least 1 when the fraction is > 0)."""
        if not 0 <= val_fraction < 1:
            raise InputError(f"validation fraction must be in [0, 1), got {val_fraction}")
        n = len(self)
        n_val = round(n * val_fraction)
        if val_fraction > 0:
            n_val = max(1, n_val)
        if n - n_val < 1:
            raise InputError(f"{self.name}: {n} samples are too few to hold out {n_val}")
        perm = np.random.default_rng(seed).permutation(n)
        return (
            self.subset(np.sort(perm[n_val:]), f"{self.name} (train)"),
            self.subset(np.sort(perm[:n_val]), f"{self.name} (held-out)"),
        )

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """(inputs, labels) batches of labelled data; see :meth:`batch_indices`."""
        if self.y is None:
            raise InputError(f"{self.name}: no labels (the data has inputs only)")
        for idx in self.batch_indices(batch_size, shuffle=shuffle, seed=seed,
                                      drop_last=drop_last):
            yield {k: v[idx] for k, v in self.x.items()}, self.y[idx]

    def batch_indices(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[np.ndarray]:
        """The sample indices of each batch (a seeded shuffle with ``shuffle``)."""
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        stop = n - (n % batch_size) if drop_last and n >= batch_size else n
        for lo in range(0, stop, batch_size):
            yield order[lo : lo + batch_size]

    def take(self, idx: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None,
                                             dict[str, np.ndarray]]:
        """(inputs, labels or None, teacher targets) of the samples ``idx``."""
        return ({k: v[idx] for k, v in self.x.items()},
                None if self.y is None else self.y[idx],
                {k: v[idx] for k, v in self.targets.items()})

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        if drop_last and n >= batch_size:
            return n // batch_size
        return math.ceil(n / batch_size)


def load_data(spec: str | os.PathLike[str] | None) -> Dataset:
    """Load a dataset from a spec (see the module docstring); ``None`` is the built-in one."""
    if spec is None or str(spec) == BUILTIN:
        return load_digits()
    p = Path(spec)
    if not p.exists():
        raise InputError(
            f"{p}: no such data file or folder (use a .npz file, a folder of "
            f"MNIST IDX files, or '{BUILTIN}')"
        )
    if p.is_dir():
        return load_idx_folder(p)
    if p.suffix == ".npz":
        return load_npz(p)
    raise InputError(
        f"{p}: unknown data format (expected a .npz file or a folder of MNIST IDX files)"
    )


def data_files(spec: str | os.PathLike[str] | None) -> list[Path]:
    """The files :func:`load_data` reads for ``spec`` (none for the built-in digits):
    outputs are checked against them with :func:`onnx_ssl.io.check_writable`."""
    if spec is None or str(spec) == BUILTIN:
        return []
    p = Path(spec)
    if p.is_dir():
        return sorted(
            f for f in p.iterdir() if "images-idx3-ubyte" in f.name or "labels-idx1-ubyte" in f.name
        )
    return [p]


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], as ``[N, 8, 8]`` float32."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise InputError(
            "the built-in digits data set needs scikit-learn (pip install "
            "scikit-learn), or pass --data with your own data"
        ) from e
    d = sk_digits()
    x = (np.asarray(d.images, dtype=np.float32) / 16.0).astype(np.float32)
    return Dataset({"x": x}, np.asarray(d.target, dtype=np.int64), "digits", resizable=True)


def load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    y = arrays.pop("y", None)
    xs = {k: v for k, v in arrays.items() if not k.startswith("_")}
    if not xs:
        raise InputError(
            f"{path}: neither targets nor inputs: no input array (expected 'x' or one array "
            f"per model input, named as the inputs, and optionally 'y', the targets)"
            if y is None else
            f"{path}: no input array (expected 'x' or one per model input)"
        )
    if y is not None and (y.ndim == 0 or y.shape[0] == 0):
        raise InputError(f"{path}: 'y' must hold one target per sample (got shape {y.shape})")
    check_sample_counts(xs, path.name, None if y is None else ("y", y))
    return Dataset(xs, y, path.name)


def check_sample_counts(
    arrays: Mapping[str, np.ndarray], source: str, ref: tuple[str, np.ndarray] | None = None
) -> int:
    """The common number of samples (first axis) of ``arrays`` (and of ``ref``), or a
    one-line :class:`InputError` naming the arrays that differ."""
    items = [*([ref] if ref is not None else []), *arrays.items()]
    counts = {k: (int(v.shape[0]) if v.ndim else 0) for k, v in items}
    first, n = items[0][0], counts[items[0][0]]
    if n == 0:
        raise InputError(f"{source}: array '{first}' holds no samples (shape "
                         f"{tuple(items[0][1].shape)})")
    for k, c in counts.items():
        if c != n:
            raise InputError(f"{source}: array '{k}' has {c} samples but '{first}' has {n}; "
                             f"every array needs one entry per sample")
    return n


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise InputError(
            f"{path}: IDX data has {len(raw) - header} bytes, the header "
            f"promises {size} (truncated file?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_folder(folder: Path) -> Dataset:
    """Every ``<prefix>-images-idx3-ubyte[.gz]`` with its ``<prefix>-labels-idx1-ubyte[.gz]``."""
    images = sorted(
        p for p in folder.iterdir() if "images-idx3-ubyte" in p.name and p.suffix in ("", ".gz")
    )
    if not images:
        raise InputError(f"{folder}: no MNIST IDX files (*-images-idx3-ubyte[.gz]) found")
    xs, ys = [], []
    for img in images:
        stem = img.name.replace("images-idx3-ubyte", "labels-idx1-ubyte")
        lab = folder / stem
        if not lab.exists():
            alt = folder / (stem[:-3] if stem.endswith(".gz") else stem + ".gz")
            if not alt.exists():
                raise InputError(f"{img}: no matching labels file {lab.name}")
            lab = alt
        x, y = _read_idx(img), _read_idx(lab)
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise InputError(
                f"{img}: {x.shape[0] if x.ndim else 0} images but {lab.name} has "
                f"{y.shape[0] if y.ndim else 0} labels"
            )
        xs.append(x)
        ys.append(y)
    x = np.concatenate(xs).astype(np.float32) / 255.0
    y = np.concatenate(ys).astype(np.int64)
    log.info(
        "%s: %d images %s from %s", folder, len(y), x.shape[1:], ", ".join(p.name for p in images)
    )
    return Dataset({"x": x}, y, folder.name)


def resize_bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize ``[N, H0, W0]`` images to ``[N, h, w]`` (bilinear, half-pixel centres)."""
    n, h0, w0 = x.shape

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    ylo, yhi, fy = axis(h, h0)
    xlo, xhi, fx = axis(w, w0)
    top = x[:, ylo][:, :, xlo] * (1 - fx) + x[:, ylo][:, :, xhi] * fx
    bot = x[:, yhi][:, :, xlo] * (1 - fx) + x[:, yhi][:, :, xhi] * fx
    return (top * (1 - fy[:, None]) + bot * fy[:, None]).astype(np.float32)


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError as e:
        raise InputError(f"model input type {name} is not supported for training") from e


def fit_inputs(data: Dataset, inputs: Sequence[tuple[str, tuple[int | None, ...], str]]) -> Dataset:
    """Match the data's input arrays to the model inputs ``(name, shape, dtype)``.

    A single data array ``x`` feeds a single-input model; otherwise arrays are matched by
    name. Samples are reshaped when only unit axes differ (``[28, 28]`` for a
    ``[1, 28, 28]`` input) or to flatten them into a vector input and, for the built-in
    digits, resized to the input's image size; any other rank or layout is refused, and so
    are integer samples for a float input (unscaled pixels, most likely).
    """
    if data.y is None and not (len(data.x) == 1 and len(inputs) == 1):
        # Unlabelled inputs by name: the core's calibration checks (names, dtype, rank,
        # dims, sample counts), with the batch free (training pads the last batch).
        from onnx_ssl.calibration import InputSpec, check_calibration

        check_calibration(
            data.x,
            [InputSpec(n, _np_dtype(d), (None, *shape[1:])) for n, shape, d in inputs],
            data.name,
        )
    if len(data.x) == 1 and len(inputs) == 1:
        arrays = {inputs[0][0]: next(iter(data.x.values()))}
    else:
        missing = [name for name, _, _ in inputs if name not in data.x]
        if missing:
            raise InputError(
                f"{data.name}: no array for model input(s) {', '.join(missing)}; the model "
                f"expects arrays {', '.join(n for n, _, _ in inputs)} (the data has "
                f"{', '.join(data.x)})"
            )
        arrays = {name: data.x[name] for name, _, _ in inputs}
    out: dict[str, np.ndarray] = {}
    for name, shape, dtype_name in inputs:
        a = arrays[name]
        dtype = _np_dtype(dtype_name)
        want = shape[1:]
        got = a.shape[1:]
        if any(d is None for d in want):
            if len(want) != len(got) or any(
                w is not None and w != g for w, g in zip(want, got, strict=True)
            ):
                why = (f"wrong rank: {len(got)} per sample where the input has {len(want)}"
                       if len(want) != len(got) else "the data has the wrong shape")
                raise InputError(
                    f"{data.name}: samples of shape {tuple(got)} do not fit model "
                    f"input '{name}' of shape {_fmt(shape)} ({why})"
                )
        elif tuple(got) != tuple(want):
            same_size = int(np.prod(got, dtype=np.int64)) == _numel(want)
            if same_size and (_squeezed(got) == _squeezed(want) or len(want) == 1):
                # Only unit axes differ, or images are flattened into a vector input.
                a = a.reshape((a.shape[0], *want))  # type: ignore[arg-type]
            elif data.resizable and a.ndim == 3:
                a = _resize_to(a, want, name, data.name)
            elif same_size:
                why = (
                    f"wrong rank: {len(got)} per sample where the input has {len(want)}"
                    if len(got) != len(want)
                    else "same size, other dimensions"
                )
                raise InputError(
                    f"{data.name}: samples of shape {tuple(got)} do not fit model "
                    f"input '{name}' of shape {_fmt(shape)} ({why}; reshape or "
                    f"transpose the data to match)"
                )
            else:
                raise InputError(
                    f"{data.name}: samples of shape {tuple(got)} do not fit model "
                    f"input '{name}' of shape {_fmt(shape)} (the data has the "
                    f"wrong shape)"
                )
        if np.issubdtype(dtype, np.floating):
            if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
                raise InputError(f"{data.name}: input '{name}' has non-numeric dtype {a.dtype}")
            if not np.issubdtype(a.dtype, np.floating):
                raise InputError(
                    f"{data.name}: input '{name}' holds integers ({a.dtype}) but the model "
                    f"input is {dtype_name}; convert it to floats scaled as the model expects "
                    f"(for example x / 255 for 8-bit pixels)"
                )
            a = a.astype(dtype, copy=False)
            if not np.all(np.isfinite(a)):
                raise InputError(f"{data.name}: input '{name}' contains NaN or infinite values")
        elif np.issubdtype(dtype, np.integer):
            if not np.issubdtype(a.dtype, np.integer):
                raise InputError(
                    f"{data.name}: input '{name}' must hold integers for a model "
                    f"input of type {dtype_name}, got {a.dtype}"
                )
            info = np.iinfo(dtype)
            if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
                raise InputError(f"{data.name}: input '{name}' holds values outside "
                                 f"{dtype_name}'s range")
            a = a.astype(dtype, copy=False)
        else:
            a = a.astype(dtype, copy=False)
        out[name] = np.ascontiguousarray(a)
    return replace(data, x=out)


def _resize_to(
    a: np.ndarray, want: tuple[int | None, ...], name: str, data_name: str
) -> np.ndarray:
    dims = [int(d) for d in want if d is not None]
    if len(dims) == 3 and dims[0] == 1:
        return resize_bilinear(a, dims[1], dims[2])[:, None]
    if len(dims) == 2:
        return resize_bilinear(a, dims[0], dims[1])
    if len(dims) == 1 and math.isqrt(dims[0]) ** 2 == dims[0]:
        s = math.isqrt(dims[0])
        return resize_bilinear(a, s, s).reshape(a.shape[0], dims[0])
    raise InputError(
        f"{data_name}: {a.shape[1:]} images cannot be resized to model input "
        f"'{name}' of shape {_fmt((None, *want))}"
    )


def fit_targets(
    data: Dataset, loss: str, target_shape: tuple[int | None, ...], classes: int | None
) -> Dataset:
    """Check the targets: class indices in ``[0, classes)`` for cross-entropy, else arrays of
    the output's per-sample shape (in [0, 1] for bce)."""
    if data.y is None:
        raise InputError(f"{data.name}: no labels ('y'); train on it by distillation "
                         f"(onnx-ssl ssl ... --distill) instead")
    y = np.asarray(data.y)
    if y.ndim == 0 or y.shape[0] == 0:
        raise InputError(f"{data.name}: no samples")
    if loss == "cross-entropy":
        if y.ndim != 1:
            if y.ndim == 2 and y.shape[1] == 1:
                y = y[:, 0]
            else:
                raise InputError(
                    f"{data.name}: labels must be one class index per sample, got shape {y.shape}"
                )
        if np.issubdtype(y.dtype, np.floating):
            if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                raise InputError(f"{data.name}: labels must be integer class indices")
        elif not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"{data.name}: labels must be integer class indices, got {y.dtype}")
        yi = y.astype(np.int64)
        lo, hi = int(np.min(yi)), int(np.max(yi))
        if lo < 0 or (classes is not None and hi >= classes):
            raise InputError(
                f"{data.name}: labels out of range: found {lo}..{hi} but the model "
                f"has {classes} classes (0..{(classes or 0) - 1})"
            )
        return replace(data, y=yi)
    want = target_shape[1:]
    yf = y.astype(np.float32)
    if tuple(yf.shape[1:]) != tuple(want) and None not in want:
        if int(np.prod(yf.shape[1:], dtype=np.int64)) == _numel(want):
            yf = yf.reshape((yf.shape[0], *want))  # type: ignore[arg-type]
        else:
            raise InputError(
                f"{data.name}: targets of shape {yf.shape[1:]} do not fit the "
                f"model output of shape {_fmt(target_shape)}"
            )
    if not np.all(np.isfinite(yf)):
        raise InputError(f"{data.name}: targets contain NaN or infinite values")
    ylo, yhi = float(np.min(yf)), float(np.max(yf))
    if loss == "bce" and (ylo < 0 or yhi > 1):
        raise InputError(f"{data.name}: bce targets must lie in [0, 1], found {ylo:g}..{yhi:g}")
    return replace(data, y=yf)


def _squeezed(shape: Sequence[int | None]) -> tuple[int | None, ...]:
    return tuple(d for d in shape if d != 1)


def _numel(shape: Sequence[int | None]) -> int:
    return int(np.prod([d or 0 for d in shape], dtype=np.int64))


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"
