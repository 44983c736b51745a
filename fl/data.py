"""Datasets and their federated partitions.

A dataset is loaded once as arrays, split into a training pool and a held-out
centralized test split, and the pool is partitioned across clients with
flwr-datasets' partitioners. The partitioners only see labels and client ids (a
small table of ``label``, ``idx`` and, for natural partitions, ``id``): a
partition is a set of row indices into the pool, so nothing is copied per
client until that client's rows are read.

Datasets: ``digits`` (scikit-learn's bundled 8x8 real images, offline),
``synthetic`` (the FedProx Synthetic(alpha, beta) generator, Li et al., MLSys
2020), ``npz`` (a local file with ``x``/``y`` arrays; what a deployed node
brings), ``local`` (parquet / csv / json / arrow files, an image folder or a
``save_to_disk`` folder, read with Hugging Face ``datasets``; fl.sources) and
``hf`` (a hub dataset by name through flwr-datasets; needs the network once).
These three are float32 in memory (digits, synthetic, npz) with a seeded
stratified test split; ``local`` and ``hf`` are decoded once into the data cache
as uint8 images or int64 token ids, memory-mapped, and a client reads only its
own rows (fl.datacache.read_rows), so a simulated client's memory does not grow
with the dataset. Scaling, normalisation and augmentation happen per batch on
the training device (:class:`fl.transforms.BatchTransform`, carried by
:class:`Arrays`).

Checks on every dataset a user brings (an .npz, a node's folder, local files,
a hub dataset), made before anything starts (``bonsai run``/``sweep``/``validate``
run :func:`prepare` in a child process; ``bonsai deploy`` checks node data):

- the file is an .npz of plain arrays whose declared shapes match its bytes;
  local files exist, can be read, and have the columns the keys name or
  detection finds (fl.sources; images decodable and of one size, labels integer
  or a ClassLabel, text in LEAF's vocabulary);
- ``x`` holds real numbers that are finite as float32 (NaN, inf, or values beyond
  float32's range are counted and the first one's index is named);
- ``x`` of shape (N, H, W) is read as one-channel images (N, 1, H, W);
- labels are integers 0..C-1 with every class 0..C-1 present at least once in
  the dataset (train and test together), so one stray label of 100000 among
  0..9 is an error, not a 100001-class model; a node's own file may lack
  classes when its class count is declared (the experiment's dataset,
  ``--num-classes``, or a ``num_classes`` scalar in the .npz), and so may a
  dataset whose label column is a ClassLabel;
- every client of the partition gets at least one example;
- normalisation and augmentation are asked of images only;
- the experiment's model can take the examples (:func:`fl.models.check_model_input`;
  token ids only for text models).
"""

from __future__ import annotations

import dataclasses
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl import datacache
from fl.config import (
    DatasetConfig,
    ExperimentConfig,
    PartitionConfig,
    TrainConfig,
    requires_image,
    requires_tokens,
)
from fl.models import check_model_input
from fl.node import DATA_PATH, NUM_CLASSES, NUM_PARTITIONS, PARTITION_ID
from fl.transforms import IDENTITY, BatchTransform


@dataclass(frozen=True)
class Arrays:
    """Examples as tensors: ``x`` (N, *input_shape) as stored (float32, uint8 images or
    int64 token ids), ``y`` int64 (N,), and the ``transform`` that makes a batch of
    ``x`` the model's input (fl.train and fl.cohort apply it per batch)."""

    x: torch.Tensor
    y: torch.Tensor
    transform: BatchTransform = IDENTITY

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class FederatedData:
    """A training pool, its client partitions (row indices) and the test split.

    ``pool``: the memory-mapped array behind ``train.x`` (local and hf datasets); a
    client's rows are then read through a mapping of their own
    (:func:`fl.datacache.read_rows`)."""

    train: Arrays
    test: Arrays
    partitions: tuple[np.ndarray, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    pool: np.ndarray | None = None

    def client(self, partition_id: int) -> Arrays:
        """The examples of client ``partition_id`` (in memory)."""
        if not 0 <= partition_id < len(self.partitions):
            raise ValueError(
                f"partition-id: got {partition_id}; allowed: 0..{len(self.partitions) - 1}"
            )
        rows = self.partitions[partition_id]
        idx = torch.from_numpy(rows)
        x = (torch.from_numpy(datacache.read_rows(self.pool, rows)) if self.pool is not None
             else self.train.x[idx])
        return Arrays(x, self.train.y[idx], self.train.transform)


class DataError(ValueError):
    """A dataset that cannot be loaded or does not fit the config."""


# --- loaders -----------------------------------------------------------------
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, (N, 1, 8, 8) in [0, 1] (kept in the data cache:
    importing scikit-learn costs every process about 140 MB)."""

    def load() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        d = load_digits()
        return {"images": (d.images / 16.0).astype(np.float32), "y": d.target.astype(np.int64)}

    e = datacache.cached("digits", datacache.versions("scikit-learn"), load)
    # the channel axis as a view, added after loading: the pool and test arrays then
    # get the strides they always had (with one channel, conv2d's numerics depend on
    # that axis's stride; the published digits results were made with these)
    return e["images"][:, None, :, :], e["y"]


def synthetic(
    alpha: float, beta: float, devices: int, samples: int, seed: int, dim: int = 60,
    classes: int = 10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedProx's Synthetic(alpha, beta) generator (Li et al., MLSys 2020, sec. 5.1).

    Device k draws u_k ~ N(0, alpha), B_k ~ N(0, beta); its model W_k, b_k ~
    N(u_k, 1) and its inputs x ~ N(v_k, Sigma) with v_k ~ N(B_k, 1) and
    Sigma = diag(j^-1.2); labels y = argmax softmax(W_k x + b_k). Device sizes
    follow a power law (lognormal), as in the paper. Returns (x, y, device).
    """
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4.0, 2.0, devices) + 50
    sizes = np.maximum(1, np.round(sizes / sizes.sum() * samples)).astype(np.int64)
    sigma = np.arange(1, dim + 1, dtype=np.float64) ** -1.2
    xs, ys, ds = [], [], []
    for k, n in enumerate(sizes):
        u, b_mean = rng.normal(0, np.sqrt(alpha)), rng.normal(0, np.sqrt(beta))
        w = rng.normal(u, 1.0, (dim, classes))
        b = rng.normal(u, 1.0, classes)
        v = rng.normal(b_mean, 1.0, dim)
        x = rng.normal(v, np.sqrt(sigma), (n, dim))
        ys.append(np.argmax(x @ w + b, axis=1))
        xs.append(x)
        ds.append(np.full(n, k))
    return (np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64),
            np.concatenate(ds).astype(np.int64))


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


def _example_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
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


def channel_stats(x: np.ndarray, scale: float = 1.0) -> tuple[tuple[float, ...],
                                                              tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of images ``x`` (N, C, H, W)
    times ``scale``, in float64, read a chunk at a time (``x`` may be memory-mapped)."""
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"x: expected images (N, C, H, W) with N > 0, got shape {x.shape}")
    n, c = x.shape[:2]
    rows = max(1, (1 << 24) // max(1, math.prod(x.shape[1:])))  # about 16M values at a time
    total, squares = np.zeros(c), np.zeros(c)
    for start in range(0, n, rows):
        chunk = np.asarray(x[start:start + rows], dtype=np.float64) * scale
        total += chunk.sum(axis=(0, 2, 3))
        squares += np.square(chunk).sum(axis=(0, 2, 3))
    count = n * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# --- split and partition ------------------------------------------------------
def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Sorted row indices (pool, test) of a split stratified by label (when every class
    has two examples and each side can hold one of every class; otherwise random),
    seeded. Raises DataError when the examples are too few to split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    counts = np.bincount(y)
    classes = int((counts > 0).sum())
    n_test = math.ceil(test_fraction * len(y))
    stratify = counts[counts > 0].min() >= 2 and min(n_test, len(y) - n_test) >= classes
    try:
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                  stratify=y if stratify else None)
    except ValueError as e:
        raise DataError(f"dataset.test_fraction: got {test_fraction}; {len(y)} examples cannot "
                        f"be split into a training pool and a test set ({e})") from None
    return np.sort(tr), np.sort(te)


def make_partitioner(cfg: PartitionConfig, seed: int, pool_size: int | None = None):
    """The flwr-datasets partitioner for ``cfg`` (seeded). It reads the columns ``label``
    and, for ``natural``, ``id``. ``inner_dirichlet`` needs ``pool_size`` (its clients
    get equal shares of the pool)."""
    from flwr_datasets import partitioner as fp

    n = cfg.num_clients
    if cfg.kind == "iid":
        return fp.IidPartitioner(n)  # contiguous chunks of the seeded-shuffled pool
    if cfg.kind == "dirichlet":
        return fp.DirichletPartitioner(n, "label", cfg.alpha, min_partition_size=cfg.min_size,
                                       self_balancing=False, shuffle=True, seed=seed)
    if cfg.kind == "pathological":
        return fp.PathologicalPartitioner(n, "label", cfg.classes_per_client,
                                          class_assignment_mode="first-deterministic",
                                          shuffle=True, seed=seed)
    if cfg.kind == "shard":
        return fp.ShardPartitioner(n, "label", num_shards_per_partition=cfg.shards_per_client,
                                   shuffle=True, seed=seed)
    if cfg.kind == "inner_dirichlet":
        if pool_size is None:
            raise ValueError("pool_size: inner_dirichlet needs the pool's size")
        base, extra = divmod(pool_size, n)
        sizes = [base + (i < extra) for i in range(n)]
        return fp.InnerDirichletPartitioner(sizes, "label", cfg.alpha, shuffle=True, seed=seed)
    if cfg.kind in ("linear", "square", "exponential"):  # sizes grow with the client id
        cls = {"linear": fp.LinearPartitioner, "square": fp.SquarePartitioner,
               "exponential": fp.ExponentialPartitioner}[cfg.kind]
        return cls(n)
    if cfg.kind == "natural":
        return fp.NaturalIdPartitioner("id")
    raise ValueError(f"partition.kind: unknown value {cfg.kind!r}")


def partition_indices(
    labels: np.ndarray, cfg: PartitionConfig, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Row indices of each client's examples, computed by a flwr-datasets partitioner.

    ``natural``: one client per distinct value of ``groups`` (sorted); with fewer
    ``cfg.num_clients`` than ids, a seeded sample of the ids; with 0, every id (the
    command resolves 0 to the count before the run: :func:`client_count`). Raises
    DataError when the
    partition cannot be made or leaves a client without examples.
    """
    from datasets import Dataset

    n = cfg.num_clients
    if n > len(labels) and cfg.kind != "natural":
        raise DataError(f"partition.num_clients: got {n}; the training pool has {len(labels)} "
                        f"examples, so client {len(labels)} and later would get none")
    cols = {"label": labels.tolist(), "idx": np.arange(len(labels)).tolist()}
    if cfg.kind == "natural":
        if groups is None:
            raise DataError("partition.kind: got 'natural'; this dataset has no client ids")
        cols["id"] = groups.tolist()
    part = make_partitioner(cfg, seed, pool_size=len(labels))
    part.dataset = Dataset.from_dict(cols)
    chosen = list(range(n))
    if cfg.kind == "natural":
        ids = part.num_partitions
        if n == 0:
            n, chosen = ids, list(range(ids))
        if n > ids:
            raise DataError(f"partition.num_clients: got {n}; the natural split of this dataset "
                            f"has {ids} clients (allowed: 1..{ids}; fewer than {ids}: a seeded "
                            "sample of the ids)")
        if n < ids:
            chosen = np.sort(np.random.default_rng(seed).choice(ids, n, replace=False)).tolist()
    try:
        parts = [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64))
                 for i in chosen]
    # e.g. Dirichlet cannot satisfy min_partition_size (ValueError); shards or sizes that
    # round to nothing fail inside flwr-datasets with other types
    except (ValueError, IndexError, ZeroDivisionError) as e:
        raise DataError(f"partition: {e or type(e).__name__} (kind={cfg.kind}, num_clients={n}, "
                        f"alpha={cfg.alpha}, min_size={cfg.min_size}, {len(labels)} "
                        "examples in the pool)") from None
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(f"partition: client {empty[0]} gets no examples ({len(empty)} of {n} "
                        f"clients get none; kind={cfg.kind}, num_clients={n}, {len(labels)} "
                        "examples in the pool); use fewer clients or another partition")
    return tuple(parts)


def _source_key(dcfg: DatasetConfig, seed: int) -> dict[str, Any]:
    """What the pool/test split of ``dcfg`` depends on (the data cache's key)."""
    fields = {f: getattr(dcfg, f) for f in _LOAD_FIELDS}
    key: dict[str, Any] = {"dataset": fields, "seed": seed,
                           **datacache.versions("numpy", "scikit-learn")}
    if dcfg.name == "npz":
        try:
            key["file"] = datacache.file_fingerprint(dcfg.path)
        except OSError:
            raise DataError(f"dataset.path: {dcfg.path!r} does not exist") from None
    return key


#: the dataset keys the bundled/npz split depends on (normalize, the columns and the
#: format do not change it: the cache entries made before those keys stay valid)
_LOAD_FIELDS = ("name", "path", "hf_name", "test_fraction", "synthetic_alpha", "synthetic_beta",
                "synthetic_devices", "synthetic_samples")


@dataclass(frozen=True)
class _Split:
    """A dataset's pool and test split, and what the partitions and transform need."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    groups: np.ndarray | None  #: client id per pool row (natural partitions)
    key: dict[str, Any]  #: the data cache key of the split
    num_classes: int
    mapped: bool  #: local/hf: memory-mapped, pool rows in source order
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None  #: pool mean/std (images)
    no_ids: str  #: why there are no client ids (the message), when groups is None


def _split_arrays(dcfg: DatasetConfig, seed: int) -> _Split:
    """The pool and test split of ``dcfg``. The row indices of the split (bundled, npz) or
    the decoded arrays (local, hf) come from the data cache."""
    if dcfg.name in ("local", "hf"):
        from fl import sources  # datasets and pyarrow only when a source is decoded

        t = sources.load_table(dcfg)
        no_ids = (f"{sources.where(dcfg)} has no client-id column (columns {list(t.columns)}); "
                  "name it with dataset.partition_column")
        return _Split(t.x_train, t.y_train, t.x_test, t.y_test, t.ids_train, t.key,
                      t.num_classes, True, (t.mean, t.std) if t.mean and t.std else None,
                      no_ids)
    key = _source_key(dcfg, seed)
    groups = None
    if dcfg.name == "digits":
        x, y = _digits()
    elif dcfg.name == "synthetic":
        x, y, groups = synthetic(dcfg.synthetic_alpha, dcfg.synthetic_beta,
                                 dcfg.synthetic_devices, dcfg.synthetic_samples, seed)
    else:
        x, y = load_npz(dcfg.path)
        check_labels(y, _source(dcfg))

    def split() -> dict[str, np.ndarray]:
        tr, te = stratified_split(y, dcfg.test_fraction, seed)
        # shuffle the pool with the seed so that order-based partitioners are seeded too
        return {"train": tr[np.random.default_rng(seed).permutation(len(tr))], "test": te}

    rows = datacache.cached("split", key, split)
    tr, te = rows["train"], rows["test"]
    groups = groups[tr] if groups is not None else None
    train_y, test_y = y[tr], y[te]
    return _Split(x[tr], train_y, x[te], test_y, groups, key,
                  int(max(train_y.max(), test_y.max()) + 1), False, None,
                  f"{_source(dcfg)} has no client ids")


def _partitions(s: _Split, pcfg: PartitionConfig, seed: int) -> tuple[np.ndarray, ...]:
    """The clients' pool rows (cached). A memory-mapped pool is in source order: the
    partitioners see it shuffled by the seed, as the bundled pools are."""
    if pcfg.kind == "natural" and s.groups is None:
        raise DataError(f"partition.kind: got 'natural'; {s.no_ids}")
    pkey = {"split": s.key, "seed": seed,
            "partition": {f: getattr(pcfg, f) for f in PartitionConfig.__dataclass_fields__},
            **datacache.versions("flwr-datasets", "datasets")}

    def compute() -> dict[str, np.ndarray]:
        labels, groups = s.train_y, s.groups
        order = np.random.default_rng(seed).permutation(len(labels)) if s.mapped else None
        if order is not None:
            labels, groups = labels[order], groups[order] if groups is not None else None
        parts = partition_indices(labels, pcfg, seed, groups)
        if order is not None:
            parts = tuple(np.sort(order[p]) for p in parts)
        return datacache.pack_parts(parts)

    return datacache.unpack_parts(datacache.cached("partition", pkey, compute))


def _images(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3


def _make_transform(s: _Split, dcfg: DatasetConfig, tcfg: TrainConfig) -> BatchTransform:
    """The batch transform of ``s`` for the keys; DataError for a key that does not
    apply to these examples (normalisation or augmentation of non-images, reflect
    padding wider than the image)."""
    shape = tuple(s.train_x.shape[1:])
    src = _source(dcfg)
    asked = {"dataset.normalize": dcfg.normalize,
             "train.augment_crop_padding": tcfg.augment_crop_padding,
             "train.augment_flip": tcfg.augment_flip}
    if not _images(shape) or s.train_x.dtype == np.int64:
        for key, value in asked.items():
            if value:
                raise DataError(f"{key}: got {value!r}; {src} holds examples of shape {shape}, "
                                "not images (normalisation and augmentation are for images)")
    pad = tcfg.augment_crop_padding
    if pad and tcfg.augment_pad_mode == "reflect" and pad >= min(shape[1:]):
        raise DataError(f"train.augment_crop_padding: got {pad}; reflect padding needs less "
                        f"than the image size ({shape[1]}x{shape[2]} in {src})")
    divisor = 255.0 if s.train_x.dtype == np.uint8 else None
    mean = std = None
    if dcfg.normalize:
        stats = s.stats
        if stats is None:  # float images (digits, npz): computed once, cached with the split
            stats = _float_stats(s)
        mean = stats[0]
        std = tuple(v if v > 1e-6 else 1.0 for v in stats[1])  # a constant channel stays 0
    return BatchTransform(divisor=divisor, mean=mean, std=std, crop_padding=pad,
                          pad_mode=tcfg.augment_pad_mode, flip=tcfg.augment_flip)


def _float_stats(s: _Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    e = datacache.cached("stats", {"split": s.key},
                         lambda: dict(zip(("mean", "std"), map(np.asarray,
                                                                channel_stats(s.train_x)))))
    return tuple(float(v) for v in e["mean"]), tuple(float(v) for v in e["std"])


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def _augment_fields(t: TrainConfig) -> tuple:
    return (t.augment_crop_padding, t.augment_pad_mode, t.augment_flip)


@lru_cache(maxsize=2)  # one dataset per process: data is cached, never client state
def _load_cached(ds: tuple, part: tuple, seed: int, augment: tuple) -> FederatedData:
    dcfg, pcfg = DatasetConfig(*ds), PartitionConfig(*part)
    s = _split_arrays(dcfg, seed)
    tf = _make_transform(s, dcfg, _train_config(augment))
    parts = _partitions(s, pcfg, seed)
    return FederatedData(
        train=Arrays(_tensor(s.train_x), _tensor(s.train_y), tf),
        test=Arrays(_tensor(s.test_x), _tensor(s.test_y), tf),
        partitions=parts,
        input_shape=tuple(s.train_x.shape[1:]),
        num_classes=s.num_classes,
        pool=s.train_x if s.mapped else None,
    )


def _train_config(augment: tuple) -> TrainConfig:
    pad, mode, flip = augment
    return TrainConfig(augment_crop_padding=pad, augment_pad_mode=mode, augment_flip=flip)


def _fields(obj: Any) -> tuple:
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))


def load_federated(cfg: ExperimentConfig) -> FederatedData:
    """Load ``cfg.dataset``, split off the test set and partition the rest (cached)."""
    return _load_cached(_fields(cfg.dataset), _fields(cfg.partition), cfg.seed,
                        _augment_fields(cfg.train))


def _source(d: DatasetConfig) -> str:
    """The config key and value that name ``d``'s data in messages."""
    if d.name in ("npz", "local"):
        return f"dataset.path: {d.path!r}"
    if d.name == "hf":
        return f"dataset.hf_name: {d.hf_name!r}"
    return f"dataset.name: {d.name!r}"


def check_model_fit(model: str, input_shape: tuple[int, ...], num_classes: int,
                    source: str, tokens: bool | None = None) -> None:
    """Raise DataError (one line) when ``model`` cannot take examples of ``input_shape``
    (from ``source``, named in the message) or would be too large for them. ``tokens``:
    whether the examples are token ids (None: not known, not checked)."""
    if tokens is not None and tokens != requires_tokens(model):
        raise DataError(
            f"model: {model!r} takes token ids (text); {source} holds real-valued examples"
            if not tokens else
            f"model: {model!r} takes real-valued inputs; {source} holds token ids (text): "
            "use model=char_lstm")
    if requires_image(model) and len(input_shape) != 3:
        raise DataError(f"model: {model!r} takes images (channels, height, width); {source} "
                        f"holds examples of shape {tuple(input_shape)} (use model=mlp, or store "
                        "x as (N, C, H, W) or (N, H, W))")
    try:
        check_model_input(model, input_shape, num_classes)
    except ValueError as e:
        raise DataError(f"{e}; the examples come from {source}") from None


def _holds_tokens(a: Arrays) -> bool:
    return a.x.dtype == torch.int64


def client_count(cfg: ExperimentConfig) -> int:
    """How many clients ``cfg``'s partition makes: ``partition.num_clients``, or, for
    ``natural`` with 0, the number of ids in the data (building the partition)."""
    if cfg.partition.num_clients:
        return cfg.partition.num_clients
    return len(load_federated(cfg).partitions)


def prepare(cfg: ExperimentConfig) -> None:
    """Check ``cfg``'s data and model, and store the dataset split and partitions in the
    data cache (fl.datacache), so that the simulation's processes only read them.

    Raises DataError (one line) when the data is not usable (see the module
    docstring: file, columns, finite values, labels), does not fit the model, the
    preprocessing keys do not apply to it, or the partition cannot be made (e.g.
    Dirichlet(0.1) cannot give every client ``partition.min_size`` examples).
    """
    fd = load_federated(cfg)
    check_model_fit(cfg.model, fd.input_shape, fd.num_classes, _source(cfg.dataset),
                    _holds_tokens(fd.train))


def check_dataset(cfg: ExperimentConfig) -> None:
    """Check ``cfg.dataset`` (file, values, labels) and the model on it, without
    partitioning: what a deployed server evaluates on, and ``bonsai validate``'s check
    of a study's datasets. Raises DataError (one line)."""
    ed = load_test(cfg)
    check_model_fit(cfg.model, ed.input_shape, ed.num_classes, _source(cfg.dataset),
                    _holds_tokens(ed.test))


@dataclass(frozen=True)
class NodeData:
    """What one node trains on: its id in the population order and its examples."""

    partition_id: int
    data: Arrays
    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class EvalData:
    """The centralized test split and the model's input shape and class count."""

    test: Arrays
    input_shape: tuple[int, ...]
    num_classes: int


@lru_cache(maxsize=2)
def _load_test_cached(ds: tuple, seed: int, augment: tuple) -> EvalData:
    dcfg = DatasetConfig(*ds)
    s = _split_arrays(dcfg, seed)
    tf = _make_transform(s, dcfg, _train_config(augment))
    return EvalData(Arrays(_tensor(s.test_x), _tensor(s.test_y), tf),
                    tuple(s.train_x.shape[1:]), s.num_classes)


def load_test(cfg: ExperimentConfig) -> EvalData:
    """The server's test split of ``cfg.dataset`` without partitioning the pool (cached).

    The same split as :func:`load_federated`'s ``test`` (same seed); what a
    deployed server evaluates on, where the nodes bring their own data.
    """
    return _load_test_cached(_fields(cfg.dataset), cfg.seed, _augment_fields(cfg.train))


def node_data(cfg: ExperimentConfig, node_config: Mapping[str, Any]) -> NodeData:
    """This node's examples.

    Simulation: its partition of the configured dataset (``partition-id`` and
    ``num-partitions`` in the node config). Deployment: the node's own file or
    folder named by ``data-path`` (see :func:`local_node_data`), no partitioning.
    """
    pid = int(node_config.get(PARTITION_ID, 0))
    if node_config.get(DATA_PATH):
        return local_node_data(cfg, str(node_config[DATA_PATH]), pid,
                               node_config.get(NUM_CLASSES))
    parts = int(node_config.get(NUM_PARTITIONS, cfg.partition.num_clients))
    if parts != cfg.partition.num_clients:
        raise DataError(f"partition.num_clients: the experiment has {cfg.partition.num_clients} "
                        f"clients but the federation has {parts} SuperNodes")
    fd = load_federated(cfg)
    return NodeData(pid, fd.client(pid), fd.input_shape, fd.num_classes)


# --- node-local data (deployment) ---------------------------------------------------------
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


#: (input_shape, num_classes) of the bundled datasets, known without loading them
_DIGITS_INFO = ((1, 8, 8), 10)
_SYNTHETIC_INFO = ((60,), 10)  # synthetic(): dim=60, classes=10


def _expected(cfg: ExperimentConfig) -> tuple[tuple[int, ...], int] | None:
    """(input_shape, num_classes) of the experiment's model when this machine can tell
    cheaply (a bundled dataset, or the experiment's .npz is here), else None.

    Runs in every ClientApp call of a deployed node, so it never imports
    scikit-learn or splits a dataset.
    """
    d = cfg.dataset
    if d.name == "digits":
        return _DIGITS_INFO
    if d.name == "synthetic":
        return _SYNTHETIC_INFO
    p = Path(d.path).expanduser()
    if d.name == "npz" and p.is_file():
        try:
            with np.load(p, mmap_mode="r", allow_pickle=False) as f:
                return (_example_shape(tuple(int(s) for s in f["x"].shape[1:])),
                        int(np.max(f["y"])) + 1)
        except (OSError, ValueError, KeyError):
            return None
    return None


def local_node_data(cfg: ExperimentConfig, path: str, partition_id: int = 0,
                    num_classes: Any = None) -> NodeData:
    """A deployed node's examples from its own ``path``, checked against the model.

    The model's input shape and class count come from the experiment's dataset
    when this machine can load it (the server's test data: bundled digits,
    synthetic, or an .npz present here); otherwise from ``num_classes`` (node
    config), the file's own ``num_classes``, or its largest label + 1 (then every
    class 0..largest must have an example: a stray label is reported).

    Raises
    ------
    DataError
        A missing or unreadable path, or examples whose shape or labels do not
        fit the experiment's model; the message names ``data-path``.
    """
    local = load_local(path)
    x, y, file_classes = local.x, local.y, local.num_classes
    if len(y) == 0:
        raise DataError(f"data-path: {path!r} holds no examples")
    shape = tuple(int(s) for s in x.shape[1:])
    expected = _expected(cfg)
    if expected is not None:
        want_shape, classes = expected
        if shape != tuple(want_shape):
            raise DataError(
                f"data-path: {path!r} holds examples of shape {shape}; the experiment's model "
                f"{cfg.model!r} takes {tuple(want_shape)} (the shape of dataset.name="
                f"{cfg.dataset.name!r})")
    else:
        if requires_image(cfg.model) and len(shape) != 3:
            raise DataError(f"data-path: {path!r} holds examples of shape {shape}; model "
                            f"{cfg.model!r} takes images (channels, height, width)")
        if file_classes is None and num_classes in (None, ""):
            # nothing declares the class count: infer it, and refuse a stray label
            check_labels(y, f"data-path: {path!r}")
        classes = file_classes if file_classes is not None else int(y.max()) + 1
    if num_classes not in (None, ""):
        classes = int(num_classes)
    if int(y.max()) >= classes:
        raise DataError(f"data-path: {path!r} has label {int(y.max())}; the experiment's model "
                        f"has {classes} classes (labels 0..{classes - 1})")
    images = len(shape) == 3 and x.dtype != np.int64
    transform = BatchTransform(
        divisor=255.0 if x.dtype == np.uint8 else None, mean=local.mean, std=local.std,
        crop_padding=cfg.train.augment_crop_padding if images else 0,
        pad_mode=cfg.train.augment_pad_mode, flip=cfg.train.augment_flip and images)
    return NodeData(partition_id, Arrays(torch.from_numpy(x), torch.from_numpy(y), transform),
                    shape, classes)
