"""The data users bring, read and checked: ``.npz`` files, image folders and a deployed
node's own file or folder (with the ``num_classes`` and per-channel ``mean``/``std``
that ``bonsai deploy split`` writes), and the value checks every dataset passes
(finite float32 values, labels 0..C-1). The full list of the checks a dataset
passes before a run is in fl/data.py's docstring.

Everything here raises :class:`DataError`, one line naming the key and the file; the
other data modules (fl.data, fl.partition, fl.nodedata, fl.sources) raise it too.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """A dataset that cannot be loaded or does not fit the config."""


def _human(n: float) -> str:
    """Bytes in decimal units (a message, not the progress table: no rich here)."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    while n >= 1000 and len(units) > 1:
        n, units = n / 1000, units[1:]
    return f"{n:.0f} {units[0]}" if units[0] == "B" else f"{n:.1f} {units[0]}"


def _check_declared(f: Any, name: str, where: str) -> None:
    """The shape and dtype an .npy member declares must fit the bytes it holds (a crafted
    header of a few bytes must not make numpy allocate terabytes)."""
    member = f.zip.getinfo(f"{name}.npy")
    with f.zip.open(member) as fp:
        version = np.lib.format.read_magic(fp)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(fp)
        left = member.file_size - fp.tell()
    if dtype.hasobject:
        raise DataError(f"{where}: {name} holds Python objects; expected numbers (Bonsai "
                        "never unpickles data)")
    need = math.prod(shape) * dtype.itemsize
    if need > left:
        raise DataError(f"{where}: {name} declares shape {tuple(shape)} {dtype} "
                        f"({_human(need)}) but the file holds {_human(left)} of it (truncated "
                        "or damaged)")


def check_finite(x: np.ndarray, where: str) -> None:
    """Raise DataError naming how many values of ``x`` are NaN or infinite, and the first."""
    rows = max(1, (1 << 24) // max(1, math.prod(x.shape[1:])))  # about 16M values at a time
    count, first = 0, None
    for start in range(0, len(x), rows):
        bad = ~np.isfinite(x[start:start + rows])
        n = int(bad.sum())
        if n and first is None:
            idx = np.unravel_index(int(np.argmax(bad)), bad.shape)
            first = (start + int(idx[0]), *(int(i) for i in idx[1:]))
        count += n
    if count:
        raise DataError(f"{where}: x holds {count} non-finite value{'s' * (count > 1)} (NaN, "
                        f"inf, or beyond float32's range); the first at index {first}")


def check_labels(y: np.ndarray, where: str, num_classes: int | None = None) -> None:
    """Labels must be 0..C-1. With ``num_classes`` declared, C is that number; otherwise
    C = largest label + 1 and every class 0..C-1 must have an example, so a stray label
    far above the others is reported instead of silently widening the model."""
    if len(y) == 0:
        raise DataError(f"{where}: holds no examples")
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise DataError(f"{where}: label {low} (example {int(np.argmin(y))}) is negative; "
                        "labels must be 0..C-1")
    if num_classes is not None:
        if high >= num_classes:
            raise DataError(f"{where}: label {high} (example {int(np.argmax(y))}) is not below "
                            f"the {num_classes} declared classes (labels 0..{num_classes - 1})")
        return
    labels = np.unique(y)  # sorted
    missing = high + 1 - len(labels)
    if missing:
        gaps = np.flatnonzero(labels != np.arange(len(labels)))
        first = int(gaps[0]) if len(gaps) else len(labels)
        raise DataError(
            f"{where}: labels must be 0..C-1 with every class present; the largest label is "
            f"{high} (example {int(np.argmax(y))}) but {missing} of the classes 0..{high} have "
            f"no example (class {first} is the first); fix the stray label(s) or relabel")


def _as_examples(x: np.ndarray) -> np.ndarray:
    """(N, H, W) is one-channel images: (N, 1, H, W); other shapes are kept."""
    return x[:, None] if x.ndim == 3 else x


def example_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one example after :func:`_as_examples` (``shape`` excludes N)."""
    return (1, *shape) if len(shape) == 2 else tuple(shape)


def load_npz(path: str | Path, key: str = "dataset.path",
             keep_stored: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An .npz file with ``x`` (N, ...) real numbers and ``y`` (N,) integer labels.

    ``x`` comes back as finite float32 (N, H, W becomes N, 1, H, W), ``y`` as int64;
    with ``keep_stored``, uint8 images and int64 token ids stay as they are (what
    ``bonsai deploy split`` writes for such datasets; the batch transform scales
    them). Labels are checked by the caller (:func:`check_labels`). Raises DataError
    (one line, naming ``key`` and the file) for anything else.
    """
    p = Path(path)
    where = f"{key}: {str(p)!r}"
    if not p.is_file():
        raise DataError(f"{where} does not exist")
    try:
        f = np.load(p, allow_pickle=False)
    except ValueError as e:
        pickled = "pickled" in str(e)
        raise DataError(f"{where} is not an .npz file of plain arrays ("
                        + ("it holds pickled Python objects, which Bonsai never loads; "
                           if pickled else "") + "write it with numpy.savez(path, x=..., y=...))"
                        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{where} is not a readable .npz file of plain arrays "
                        f"({type(e).__name__}); write it with numpy.savez(path, x=..., y=...)"
                        ) from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise DataError(f"{where} is a single .npy array; expected an .npz file of plain "
                        "arrays x and y (numpy.savez(path, x=..., y=...))")
    with f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise DataError(f"{where} has no array(s) {sorted(missing)}; found {f.files}")
        try:
            for name in ("x", "y"):
                _check_declared(f, name, where)
            x, y = f["x"], f["y"]
        except DataError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{where}: cannot read its arrays ({type(e).__name__}: "
                            f"{str(e)[:120]})") from None
        except MemoryError:
            raise DataError(f"{where}: its arrays do not fit in this machine's memory") from None
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{where}: x must be (N, ...) and y (N,), got {x.shape} and {y.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
            or x.dtype == bool):
        raise DataError(f"{where}: x has dtype {x.dtype}; expected real numbers")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{where}: y must hold non-negative integer labels")
    if keep_stored and x.dtype in (np.uint8, np.int64):
        return _as_examples(x), y.astype(np.int64)
    with np.errstate(over="ignore"):  # values beyond float32's range become inf: reported
        x = x.astype(np.float32)
    check_finite(x, where)
    return _as_examples(x), y.astype(np.int64)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm")


def load_image_folder(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An image folder: one sub-folder per class (sorted names -> labels 0, 1, ...).

    Images are read with Pillow, scaled to [0, 1] and laid out (C, H, W); all
    must have the same size and mode (grayscale -> 1 channel, else RGB).
    """
    from PIL import Image

    root = Path(path)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"data-path: {str(root)!r} has no class sub-folders (expected "
                        "DIR/CLASS/IMAGE files)")
    xs, ys, shape = [], [], None
    for label, d in enumerate(classes):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(f) as im:
                im = im.convert("L") if im.mode in ("L", "1", "I;16", "I", "F") else \
                    im.convert("RGB")
                a = np.asarray(im, dtype=np.float32) / 255.0
            a = a[None] if a.ndim == 2 else np.transpose(a, (2, 0, 1))
            if shape is None:
                shape = a.shape
            elif a.shape != shape:
                raise DataError(f"data-path: {str(f)!r} has shape {a.shape}; the other images "
                                f"have {shape} (resize them to one size)")
            xs.append(a)
            ys.append(label)
    if not xs:
        raise DataError(f"data-path: {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


@dataclass(frozen=True)
class LocalData:
    """A node's own examples as stored, its class count when declared, and the
    per-channel statistics ``bonsai deploy split`` wrote (the pool's: every node
    normalises as the simulation does)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _stats_of(f: Any, where: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if "mean" not in f.files or "std" not in f.files:
        return None, None
    for name in ("mean", "std"):
        _check_declared(f, name, where)
    mean, std = np.asarray(f["mean"], np.float64), np.asarray(f["std"], np.float64)
    if mean.ndim != 1 or mean.shape != std.shape or not np.isfinite(mean).all() \
            or not (std > 0).all():
        raise DataError(f"{where}: mean and std must be one finite value per channel, std > 0")
    return tuple(map(float, mean)), tuple(map(float, std))


def load_local(path: str | Path) -> LocalData:
    """A node's own examples from an .npz or image folder.

    An .npz may carry a scalar ``num_classes`` (``bonsai deploy split`` writes
    it) for nodes that lack the highest classes, and ``mean``/``std`` per channel
    (written for datasets the experiment normalises); uint8 images and int64 token
    ids stay as stored. An image folder's class count is its number of sub-folders.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        x, y = load_image_folder(p)
        return LocalData(x, y, len([d for d in p.iterdir()
                                    if d.is_dir() and not d.name.startswith(".")]))
    if not p.exists():
        raise DataError(f"data-path: {str(p)!r} does not exist")
    x, y = load_npz(p, key="data-path", keep_stored=True)
    where = f"data-path: {str(p)!r}"
    with np.load(p, allow_pickle=False) as f:
        mean, std = _stats_of(f, where)
        if "num_classes" not in f.files:
            return LocalData(x, y, None, mean, std)
        try:
            _check_declared(f, "num_classes", where)
            n = f["num_classes"]
        except DataError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{where}: cannot read num_classes ({type(e).__name__})") from None
    if n.size != 1 or not np.issubdtype(n.dtype, np.integer) or int(n.reshape(())) < 1:
        raise DataError(f"{where}: num_classes must be one integer >= 1, got shape "
                        f"{n.shape} {n.dtype}")
    n = int(n.reshape(()))
    if len(y):
        check_labels(y, where, n)
    return LocalData(x, y, n, mean, std)
