"""Datasets read with Hugging Face ``datasets``, decoded once into the data cache.

Two sources, one loader: ``dataset.name=hf`` reads a hub dataset by name through
flwr-datasets' ``FederatedDataset`` (needs the network, or the dataset in the
Hugging Face cache), and ``dataset.name=local`` reads ``dataset.path`` offline
with the same builders (FLOWER.md, "flwr-datasets"):

==============  ==============================================================
``parquet``     a ``.parquet`` file, or a folder of them (``train-*``/``test-*``
``csv``         file names name the splits, as in a hub repository); likewise
``json``        ``.csv``, ``.json``/``.jsonl`` and ``.arrow`` files
``arrow``
``imagefolder`` a folder with one sub-folder of images per class
``disk``        a folder written by ``datasets.save_to_disk`` (``Dataset`` or
                ``DatasetDict``), read with ``datasets.load_from_disk``
``auto``        from the file's suffix; a folder with ``dataset_dict.json`` or
                ``state.json`` is ``disk``, any other folder is left to
                ``datasets.load_dataset(folder)`` (a hub snapshot from ``hf
                download``, with its README's configs, reads this way)
==============  ==============================================================

The columns come from ``dataset.image_column`` / ``text_column`` /
``label_column`` / ``partition_column`` or are detected (:data:`IMAGE_COLUMNS`,
...). Images (a ``datasets.Image`` column) are decoded with Pillow into uint8
(N, C, H, W) (grayscale: C = 1, anything else RGB); text (``x``: windows of one
length, ``y``: the next character, LEAF's layout) into int64 ids over LEAF's
vocabulary (fl.text); a text column without a label column is cut into LEAF's
80-character windows. Labels are integers or a ``ClassLabel`` (its class count
is the model's); client ids (any type) become int64 codes in sorted id order.

The source's ``train`` split is the training pool and its ``test`` split the
test set; a source with no test split gives ``dataset.test_fraction`` of its
rows (stratified by label, with a fixed seed: every seed of a study evaluates
on the same examples, as with a dataset's own test split). The entry
(fl.datacache.cached_files) holds ``x_train``, ``y_train``, ``ids_train``,
``x_test``, ``y_test`` as memory-mapped .npy files and, for images, the
per-channel mean and std of the pool (in [0, 1] units).

Why one module of this length: it is one pipeline, a source to its cache entry (open,
find the columns, decode, write, split), run only inside :func:`load_table`; the stages
are private steps sharing the source's name in messages (:func:`where`), and fl.data
uses only ``load_table`` and ``where``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl import datacache, text
from fl.config import DatasetConfig
from fl.data import channel_stats
from fl.userdata import DataError, check_labels

__all__ = ["IMAGE_COLUMNS", "LABEL_COLUMNS", "PARTITION_COLUMNS", "TEXT_COLUMNS", "Table",
           "load_table", "resolve_format", "source_key", "where"]

IMAGE_COLUMNS = ("img", "image")
TEXT_COLUMNS = ("x", "text")
LABEL_COLUMNS = ("label", "fine_label", "labels", "character", "y")
PARTITION_COLUMNS = ("writer_id", "character_id", "client_id", "user_id", "speaker_id")
#: seed of the stratified test split of a source without a test split
TEST_SPLIT_SEED = 0
_SUFFIX_FORMAT = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json",
                  ".arrow": "arrow"}
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_CHUNK = 2048  # rows decoded at a time

_log = logging.getLogger("fl.sources")


@dataclass(frozen=True)
class Table:
    """A decoded source: the pool and test arrays (memory-mapped), what they are, and
    the cache key they were stored under."""

    x_train: np.ndarray
    y_train: np.ndarray
    ids_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray
    kind: str  #: "image" (uint8) or "text" (int64 ids)
    num_classes: int
    declared_classes: bool  #: the class count comes from a ClassLabel or the vocabulary
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    columns: tuple[str, ...]  #: every column of the source's train split
    id_column: str | None
    key: dict[str, Any]


def where(d: DatasetConfig) -> str:
    """The config key and value that name the source in messages."""
    return f"dataset.hf_name: {d.hf_name!r}" if d.name == "hf" else f"dataset.path: {d.path!r}"


def resolve_format(path: Path, fmt: str) -> str:
    """The format of ``dataset.path`` (``auto`` decided here; see the module table);
    ``folder`` for a folder ``datasets.load_dataset`` reads by itself."""
    if fmt != "auto":
        return fmt
    if path.is_file():
        found = _SUFFIX_FORMAT.get(path.suffix.lower())
        if found is None:
            known = ", ".join(sorted(set(_SUFFIX_FORMAT.values())))
            raise DataError(f"dataset.format: cannot tell the format of {str(path)!r} from its "
                            f"suffix; set it (allowed: {known})")
        return found
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "disk"
    return "folder"


def _missing(d: DatasetConfig) -> DataError:
    hint = ""
    if d.hf_name:
        hint = (f"; it should hold a local copy of {d.hf_name} (README, 'Benchmark datasets'): "
                f"hf download {d.hf_name} --repo-type dataset --local-dir {d.path}, or read the "
                "hub with --set dataset.name=hf")
    return DataError(f"dataset.path: {d.path!r} does not exist{hint}")


def source_key(d: DatasetConfig) -> dict[str, Any]:
    """What the decoded arrays of ``d`` depend on: the loading keys, the files' content
    (local) and the library versions. Raises DataError when ``dataset.path`` is missing."""
    fields = ("name", "path", "format", "hf_name", "image_column", "text_column",
              "label_column", "partition_column", "test_fraction")
    key: dict[str, Any] = {"dataset": {f: getattr(d, f) for f in fields},
                           "split_seed": TEST_SPLIT_SEED,
                           **datacache.versions("datasets", "flwr-datasets", "pillow", "numpy",
                                                "scikit-learn")}
    if d.name == "local":
        p = Path(d.path).expanduser()
        if not p.exists():
            raise _missing(d)
        try:
            key["files"] = datacache.tree_fingerprint(p)
        except OSError as e:
            raise DataError(f"dataset.path: {d.path!r} cannot be read ({e.strerror or e})"
                            ) from None
    return key


def load_table(d: DatasetConfig) -> Table:
    """The decoded arrays of ``d`` (a ``local`` or ``hf`` dataset), from the data cache
    or decoded into it. Raises DataError (one line) for a source that cannot be read
    or decoded: missing file, undetectable or missing column, undecodable image,
    string or negative labels, a character outside the vocabulary."""
    key = source_key(d)
    arrays, meta = datacache.cached_files("table", key, lambda folder: _build(d, folder))
    y_all = np.concatenate([arrays["y_train"], arrays["y_test"]])
    check_labels(y_all, where(d), meta["num_classes"] if meta["declared_classes"] else None)
    num_classes = meta["num_classes"] or int(y_all.max()) + 1
    stats = meta.get("mean"), meta.get("std")
    return Table(
        x_train=arrays["x_train"], y_train=np.array(arrays["y_train"]),
        ids_train=np.array(arrays["ids_train"]) if "ids_train" in arrays else None,
        x_test=arrays["x_test"], y_test=np.array(arrays["y_test"]), kind=meta["kind"],
        num_classes=num_classes, declared_classes=meta["declared_classes"],
        mean=tuple(stats[0]) if stats[0] else None, std=tuple(stats[1]) if stats[1] else None,
        columns=tuple(meta["columns"]), id_column=meta["id_column"], key=key)


# --- opening a source ----------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or info logs from datasets while Bonsai decodes."""
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _hub_error(d: DatasetConfig, e: BaseException) -> DataError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return DataError(
        f"dataset.hf_name: {d.hf_name!r} cannot be loaded from the Hugging Face hub "
        f"({type(e).__name__}: {first}){' (HF_HUB_OFFLINE is set)' if offline else ''}; "
        f"offline, use a local copy: hf download {d.hf_name} --repo-type dataset --local-dir "
        "DIR, then --set dataset.name=local --set dataset.path=DIR")


@contextlib.contextmanager
def _open(d: DatasetConfig) -> Iterator[dict[str, Any]]:
    """The source's splits ``{"train": Dataset, "test": Dataset (if any)}``. Local
    files are converted to Arrow in a temporary cache removed afterwards (the decoded
    arrays are what Bonsai keeps)."""
    import datasets
    from flwr_datasets import FederatedDataset

    if d.name == "hf":
        fds = FederatedDataset(dataset=d.hf_name, partitioners={"train": 1}, shuffle=False)
        yield _splits(fds, d)
        return
    path = Path(d.path).expanduser()
    fmt = resolve_format(path, d.format)
    if fmt == "disk":
        try:
            obj = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DataError(f"{where(d)} is not a folder written by datasets' save_to_disk "
                            f"({type(e).__name__}: {str(e)[:120]})") from None
        if isinstance(obj, datasets.Dataset):
            yield {"train": obj}
            return
        yield _dict_splits(dict(obj), d)
        return
    with tempfile.TemporaryDirectory(prefix="bonsai-hf-") as cache:
        if fmt == "folder":
            builder, kw = str(path), {}
        elif fmt == "imagefolder":
            builder, kw = "imagefolder", {"data_dir": str(path)}
        elif path.is_file():
            builder, kw = fmt, {"data_files": {"train": str(path)}}
        else:
            builder, kw = fmt, {"data_dir": str(path)}
        fds = FederatedDataset(dataset=builder, partitioners={"train": 1}, shuffle=False,
                               cache_dir=cache, **kw)
        yield _splits(fds, d)


def _splits(fds: Any, d: DatasetConfig) -> dict[str, Any]:
    try:
        train = fds.load_split("train")
    except DataError:
        raise
    except ValueError as e:
        if d.name == "hf" and "split" not in str(e).lower():
            raise _hub_error(d, e) from None
        raise DataError(f"{where(d)} has no 'train' split ({str(e)[:160]}); name its files "
                        "train-*/test-* or give one file") from None
    except FileNotFoundError as e:
        if d.name == "hf":
            raise _hub_error(d, e) from None
        raise DataError(f"{where(d)} holds no data files datasets can read (parquet, csv, json, "
                        f"arrow, or images in class folders): {str(e)[:160]}") from None
    except Exception as e:  # noqa: BLE001 - any failure to read a source is one line
        if d.name == "hf":
            raise _hub_error(d, e) from None
        raise DataError(f"{where(d)} cannot be read ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:160]})") from None
    out = {"train": train}
    with contextlib.suppress(ValueError, KeyError):  # no test split: one is drawn from train
        out["test"] = fds.load_split("test")
    return out


def _dict_splits(splits: dict[str, Any], d: DatasetConfig) -> dict[str, Any]:
    if "train" not in splits:
        if len(splits) != 1:
            raise DataError(f"{where(d)} has splits {sorted(splits)} and none is 'train'")
        return {"train": next(iter(splits.values()))}
    return {k: v for k, v in splits.items() if k in ("train", "test")}


# --- columns -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Columns:
    x: str
    kind: str  # image | text
    label: str | None  # None: a text column cut into windows
    ids: str | None


def _is_image(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Image)


def _is_string(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _columns(d: DatasetConfig, ds: Any) -> _Columns:
    names = list(ds.column_names)
    feats = ds.features
    shown = f"{where(d)} has columns {names}"
    for k in ("image_column", "text_column", "label_column", "partition_column"):
        v = getattr(d, k)
        if v and v not in names:
            raise DataError(f"dataset.{k}: got {v!r}; {shown}")
    if d.image_column and d.text_column:
        raise DataError(f"dataset.image_column and dataset.text_column: got both "
                        f"({d.image_column!r}, {d.text_column!r}); a dataset has one input column")
    if d.image_column:
        if not _is_image(feats[d.image_column]):
            raise DataError(f"dataset.image_column: column {d.image_column!r} of {where(d)} "
                            f"holds {feats[d.image_column]}, not images (a datasets.Image "
                            "column); numeric arrays go in an .npz (dataset.name=npz)")
        x, kind = d.image_column, "image"
    elif d.text_column:
        if not _is_string(feats[d.text_column]):
            raise DataError(f"dataset.text_column: column {d.text_column!r} of {where(d)} "
                            f"holds {feats[d.text_column]}, not text")
        x, kind = d.text_column, "text"
    else:
        images = [n for n in names if _is_image(feats[n])]
        texts = [n for n in TEXT_COLUMNS if n in names and _is_string(feats[n])]
        preferred = [n for n in IMAGE_COLUMNS if n in images]
        if preferred or len(images) == 1:
            x, kind = (preferred or images)[0], "image"
        elif texts:
            x, kind = texts[0], "text"
        else:
            raise DataError(f"{shown}; found no image column (a datasets.Image column, e.g. "
                            f"{' or '.join(IMAGE_COLUMNS)}) and no text column ("
                            f"{' or '.join(TEXT_COLUMNS)}); name one with dataset.image_column "
                            "or dataset.text_column")
    label = d.label_column or next((n for n in LABEL_COLUMNS if n in names and n != x), None)
    if label is None and kind == "image":
        raise DataError(f"{shown}; found no label column ({', '.join(LABEL_COLUMNS)}); name it "
                        "with dataset.label_column")
    ids = d.partition_column or next((n for n in PARTITION_COLUMNS if n in names), None)
    return _Columns(x, kind, label, ids)


# --- decoding --------------------------------------------------------------------------
def _column(ds: Any, col: str, what: str) -> Any:
    """One column as a pyarrow ChunkedArray; a missing value is an error."""
    arr = ds.with_format("arrow")[col]
    if arr.null_count:
        first = next(i for i, v in enumerate(arr.is_null().to_pylist()) if v)
        raise DataError(f"{what}: row {first} has no value ({arr.null_count} rows in all)")
    return arr


def _labels(ds: Any, col: str, kind: str, what: str) -> tuple[np.ndarray, int | None]:
    """Integer labels and the declared class count (ClassLabel, or the vocabulary)."""
    import datasets
    import pyarrow as pa

    feature = ds.features[col]
    arr = _column(ds, col, what)
    if isinstance(feature, datasets.ClassLabel):
        return arr.to_numpy().astype(np.int64), feature.num_classes
    typ = arr.type
    if kind == "text" and (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        step = 64 * _CHUNK
        try:  # a chunk at a time: the hub's Shakespeare has 4 million labels
            y = np.concatenate([text.encode_labels(arr.slice(s, step).to_pylist(), what, s)
                                for s in range(0, len(arr), step)])
        except ValueError as e:
            raise DataError(str(e)) from None
        return y, len(text.LEAF_VOCABULARY)
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ):
        y = arr.to_numpy().astype(np.int64)
        if kind == "text":
            return y, len(text.LEAF_VOCABULARY)
        return y, None
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        sample = ", ".join(repr(v) for v in arr.slice(0, 3).to_pylist())
        raise DataError(f"{what} holds strings ({sample}, ...); expected integer class ids "
                        "0..C-1 or a datasets.ClassLabel column (ds.class_encode_column(...) "
                        "makes one)")
    raise DataError(f"{what} holds {typ} values; expected integer class ids 0..C-1")


def _ids(ds: Any, col: str, what: str) -> np.ndarray:
    values = _column(ds, col, what).to_numpy(zero_copy_only=False)
    try:
        _, codes = np.unique(values, return_inverse=True)
    except TypeError:  # mixed types: order by their text
        _, codes = np.unique(values.astype(str), return_inverse=True)
    return codes.astype(np.int64).reshape(-1)


def _pil(item: Any, row: int, what: str) -> Any:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(item, dict) and item.get("bytes") is not None:
            im = Image.open(io.BytesIO(item["bytes"]))
        elif isinstance(item, dict) and item.get("path"):
            im = Image.open(item["path"])
        else:
            raise DataError(f"{what}: row {row} holds no image")
        im.load()
        return im
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{what}: row {row} is not a decodable image ({type(e).__name__})"
                        ) from None


def _write_images(ds: Any, col: str, path: Path, what: str) -> None:
    import datasets

    n = len(ds)
    if n == 0:
        np.save(path, np.zeros((0, 1, 1, 1), dtype=np.uint8))
        return
    raw = ds.select_columns([col]).cast_column(col, datasets.Image(decode=False))
    first = _pil(raw[0][col], 0, what)
    mode = "L" if first.mode in _GRAY_MODES else "RGB"
    w, h = first.size
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                    shape=(n, 1 if mode == "L" else 3, h, w))
    row = 0
    for batch in raw.iter(batch_size=_CHUNK):
        for item in batch[col]:
            im = _pil(item, row, what)
            if im.size != (w, h):
                raise DataError(f"{what}: row {row} is {im.size[0]}x{im.size[1]}; row 0 is "
                                f"{w}x{h} (resize the images to one size)")
            a = np.asarray(im.convert(mode), dtype=np.uint8)
            out[row] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            row += 1
    out.flush()
    del out


def _write_texts(ds: Any, col: str, path: Path, what: str) -> None:
    arr = _column(ds, col, what)
    n = len(arr)
    if n == 0:
        np.save(path, np.zeros((0, text.SEQ_LENGTH), dtype=np.int64))
        return
    first = text.encode([arr[0].as_py()], what)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(n, first.shape[1]))
    for start in range(0, n, 8 * _CHUNK):
        chunk = arr.slice(start, 8 * _CHUNK).to_pylist()
        try:
            ids = text.encode(chunk, what, first_row=start)
        except ValueError as e:
            raise DataError(str(e)) from None
        if ids.shape[1] != out.shape[1]:
            raise DataError(f"{what}: rows hold texts of different lengths ({out.shape[1]} "
                            f"characters in row 0, {ids.shape[1]} from row {start})")
        out[start:start + len(ids)] = ids
    out.flush()
    del out


def _write_windows(ds: Any, cols: _Columns, folder: Path, stem: str, what: str) -> int:
    """A text column without labels: LEAF's windows of every row (fl.text.windows)."""
    arr = _column(ds, cols.x, what)
    ids = _ids(ds, cols.ids, f"dataset.partition_column {cols.ids!r}") if cols.ids else None
    lengths = np.fromiter((max(0, len(t.as_py()) - text.SEQ_LENGTH) for t in arr), np.int64,
                          len(arr))
    n = int(lengths.sum())
    x = np.lib.format.open_memmap(folder / f"x_{stem}.npy", mode="w+", dtype=np.int64,
                                  shape=(n, text.SEQ_LENGTH))
    y = np.empty(n, dtype=np.int64)
    out_ids = np.empty(n, dtype=np.int64)
    at = 0
    for row, t in enumerate(arr):
        try:
            wx, wy = text.windows(t.as_py())
        except ValueError as e:
            raise DataError(f"{what}: row {row}: {e}") from None
        x[at:at + len(wy)] = wx
        y[at:at + len(wy)] = wy
        out_ids[at:at + len(wy)] = ids[row] if ids is not None else 0
        at += len(wy)
    x.flush()
    del x
    np.save(folder / f"y_{stem}.npy", y)
    if ids is not None:
        np.save(folder / f"ids_{stem}.npy", out_ids)
    return n


def _write_split(ds: Any, cols: _Columns, folder: Path, stem: str, d: DatasetConfig
                 ) -> int | None:
    """x_STEM, y_STEM (and ids_STEM) of one split; returns the declared class count."""
    what = f"{where(d)} (split {stem if stem != 'all' else 'train'})"
    if len(ds) == 0:
        raise DataError(f"{what} holds no examples")
    if cols.label is None:  # raw text: windows
        _write_windows(ds, cols, folder, stem, f"{what}, column {cols.x!r}")
        return len(text.LEAF_VOCABULARY)
    y, declared = _labels(ds, cols.label, cols.kind,
                          f"{what}: dataset.label_column {cols.label!r}")
    np.save(folder / f"y_{stem}.npy", y)
    if cols.ids:
        np.save(folder / f"ids_{stem}.npy",
                _ids(ds, cols.ids, f"{what}: dataset.partition_column {cols.ids!r}"))
    writer = _write_images if cols.kind == "image" else _write_texts
    writer(ds, cols.x, folder / f"x_{stem}.npy", f"{what}, column {cols.x!r}")
    return declared


def _gather(src: Path, rows: np.ndarray, dst: Path) -> None:
    """``src[rows]`` into the .npy file ``dst``, a chunk at a time."""
    a = np.load(src, mmap_mode="r")
    out = np.lib.format.open_memmap(dst, mode="w+", dtype=a.dtype, shape=(len(rows), *a.shape[1:]))
    step = max(1, (64 << 20) // max(1, a[0].nbytes))  # about 64 MB at a time
    for s in range(0, len(rows), step):
        out[s:s + step] = a[rows[s:s + step]]
    out.flush()
    del out, a


def _build(d: DatasetConfig, folder: Path) -> dict[str, Any]:
    """Decode the source of ``d`` into ``folder`` (a cache entry being written)."""
    from fl.partition import stratified_split

    with _quiet(), _open(d) as splits:
        train, test = splits["train"], splits.get("test")
        cols = _columns(d, train)
        if test is not None:
            missing = [c for c in (cols.x, cols.label) if c and c not in test.column_names]
            if missing:
                raise DataError(f"{where(d)}: the test split has no column(s) {missing}; it has "
                                f"{list(test.column_names)}")
        declared = _write_split(train, cols, folder, "all", d)
        if test is not None:
            declared_test = _write_split(test, dataclasses.replace(cols, ids=None), folder,
                                         "test", d)
            declared = declared if declared is not None else declared_test
            for name in ("x", "y", "ids"):
                if (folder / f"{name}_all.npy").exists():
                    os.replace(folder / f"{name}_all.npy", folder / f"{name}_train.npy")
        columns = list(train.column_names)
    if test is None:  # draw the test split from the training rows
        y = np.load(folder / "y_all.npy")
        tr, te = stratified_split(y, d.test_fraction, TEST_SPLIT_SEED)
        for name in ("x", "y", "ids"):
            src = folder / f"{name}_all.npy"
            if src.exists():
                _gather(src, tr, folder / f"{name}_train.npy")
                if name != "ids":
                    _gather(src, te, folder / f"{name}_test.npy")
                src.unlink()
    y_all = np.concatenate([np.load(folder / "y_train.npy"), np.load(folder / "y_test.npy")])
    meta: dict[str, Any] = {
        "kind": cols.kind, "declared_classes": declared is not None,
        "num_classes": int(declared) if declared is not None else
        (int(y_all.max()) + 1 if len(y_all) else 0),
        "columns": columns, "id_column": cols.ids,
        "x_column": cols.x, "label_column": cols.label,
    }
    if cols.kind == "image":
        mean, std = channel_stats(np.load(folder / "x_train.npy", mmap_mode="r"), 1 / 255)
        meta["mean"], meta["std"] = list(mean), list(std)
    _log.info("decoded %s: %d examples", where(d), len(y_all))
    return meta
