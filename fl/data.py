"""Datasets and their federated partitions.

A dataset is loaded once into memory as ``(x, y)`` tensors, split into a
training pool and a held-out centralized test split (stratified, seeded), and
the pool is partitioned across clients with flwr-datasets' partitioners. The
partitioners only see a two-column table (``label``, ``idx``): a partition is a
set of row indices into the in-memory arrays, so nothing is copied per client.

Datasets: ``digits`` (scikit-learn's bundled 8x8 real images, offline),
``synthetic`` (the FedProx Synthetic(alpha, beta) generator, Li et al., MLSys
2020), ``npz`` (a local file with ``x``/``y`` arrays; what a deployed node
brings) and ``hf`` (any Hugging Face dataset through flwr-datasets; needs the
network).

Checks on every dataset a user brings (an .npz, a node's folder, a Hugging Face
split), made before anything starts (``bonsai run``/``sweep``/``validate`` run
:func:`prepare` in a child process; ``bonsai deploy`` checks node data):

- the file is an .npz of plain arrays whose declared shapes match its bytes;
- ``x`` holds real numbers that are finite as float32 (NaN, inf, or values beyond
  float32's range are counted and the first one's index is named);
- ``x`` of shape (N, H, W) is read as one-channel images (N, 1, H, W);
- labels are integers 0..C-1 with every class 0..C-1 present at least once in
  the dataset (train and test together), so one stray label of 100000 among
  0..9 is an error, not a 100001-class model; a node's own file may lack
  classes when its class count is declared (the experiment's dataset,
  ``--num-classes``, or a ``num_classes`` scalar in the .npz);
- the experiment's model can take the examples (:func:`fl.models.check_model_input`).
"""

from __future__ import annotations

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
from fl.config import DatasetConfig, ExperimentConfig, PartitionConfig, requires_image
from fl.models import check_model_input
from fl.node import DATA_PATH, NUM_CLASSES, NUM_PARTITIONS, PARTITION_ID


@dataclass(frozen=True)
class Arrays:
    """Examples as tensors: ``x`` float32 (N, *input_shape), ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class FederatedData:
    """A training pool, its client partitions (row indices) and the test split."""

    train: Arrays
    test: Arrays
    partitions: tuple[np.ndarray, ...]
    input_shape: tuple[int, ...]
    num_classes: int

    def client(self, partition_id: int) -> Arrays:
        """The examples of client ``partition_id``."""
        if not 0 <= partition_id < len(self.partitions):
            raise ValueError(
                f"partition-id: got {partition_id}; allowed: 0..{len(self.partitions) - 1}"
            )
        idx = torch.from_numpy(self.partitions[partition_id])
        return Arrays(self.train.x[idx], self.train.y[idx])


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


def load_npz(path: str | Path, key: str = "dataset.path") -> tuple[np.ndarray, np.ndarray]:
    """An .npz file with ``x`` (N, ...) real numbers and ``y`` (N,) integer labels.

    ``x`` comes back as finite float32 (N, H, W becomes N, 1, H, W), ``y`` as int64;
    labels are checked by the caller (:func:`check_labels`). Raises DataError (one
    line, naming ``key`` and the file) for anything else.
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
    with np.errstate(over="ignore"):  # values beyond float32's range become inf: reported
        x = x.astype(np.float32)
    check_finite(x, where)
    return _as_examples(x), y.astype(np.int64)


def _hf(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test splits of a Hugging Face image dataset (needs the network)."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    fds = FederatedDataset(dataset=name, partitioners={"train": IidPartitioner(1)})

    def to_arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        cols = ds.column_names
        img = next((c for c in ("img", "image", "pixels", "x") if c in cols), None)
        lab = next((c for c in ("label", "fine_label", "character", "y") if c in cols), None)
        if img is None or lab is None:
            raise DataError(f"dataset.hf_name: {name!r} has columns {cols}; expected an image "
                            "column (img/image) and a label column (label)")
        x = np.stack([np.asarray(v, dtype=np.float32) for v in ds[img]]) / 255.0
        x = x[:, None] if x.ndim == 3 else np.transpose(x, (0, 3, 1, 2))
        return x.astype(np.float32), np.asarray(ds[lab], dtype=np.int64)

    xtr, ytr = to_arrays(fds.load_split("train"))
    xte, yte = to_arrays(fds.load_split("test"))
    return xtr, ytr, xte, yte


# --- split and partition ------------------------------------------------------
def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    counts = np.bincount(y)
    strat = y if counts[counts > 0].min() >= 2 else None
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(te)


def make_partitioner(cfg: PartitionConfig, seed: int):
    """The flwr-datasets partitioner for ``cfg`` (seeded)."""
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
    if cfg.kind == "natural":
        return fp.NaturalIdPartitioner("device")
    raise ValueError(f"partition.kind: unknown value {cfg.kind!r}")


def partition_indices(
    labels: np.ndarray, cfg: PartitionConfig, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Row indices of each client's examples, computed by a flwr-datasets partitioner."""
    from datasets import Dataset

    cols = {"label": labels.tolist(), "idx": np.arange(len(labels)).tolist()}
    if groups is not None:
        cols["device"] = groups.tolist()
    part = make_partitioner(cfg, seed)
    part.dataset = Dataset.from_dict(cols)
    if cfg.kind == "natural" and part.num_partitions != cfg.num_clients:
        raise DataError(f"partition.num_clients: got {cfg.num_clients}; the natural split of "
                        f"this dataset has {part.num_partitions} clients")
    try:
        parts = [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64))
                 for i in range(cfg.num_clients)]
    except ValueError as e:  # e.g. Dirichlet cannot satisfy min_partition_size
        raise DataError(f"partition: {e} (kind={cfg.kind}, num_clients={cfg.num_clients}, "
                        f"alpha={cfg.alpha}, min_size={cfg.min_size}, {len(labels)} "
                        "examples in the pool)") from None
    return tuple(parts)


def _source_key(dcfg: DatasetConfig, seed: int) -> dict[str, Any]:
    """What the pool/test split of ``dcfg`` depends on (the data cache's key)."""
    fields = {f: getattr(dcfg, f) for f in DatasetConfig.__dataclass_fields__}
    key: dict[str, Any] = {"dataset": fields, "seed": seed,
                           **datacache.versions("numpy", "scikit-learn")}
    if dcfg.name == "npz":
        try:
            key["file"] = datacache.file_fingerprint(dcfg.path)
        except OSError:
            raise DataError(f"dataset.path: {dcfg.path!r} does not exist") from None
    if dcfg.name == "hf":
        key.update(datacache.versions("flwr-datasets", "datasets"))
    return key


def _split_arrays(dcfg: DatasetConfig, seed: int) -> tuple[Any, ...]:
    """(train_x, train_y, test_x, test_y, groups-or-None, split key): the pool and the
    test split. The row indices of the split come from the data cache."""
    key = _source_key(dcfg, seed)
    if dcfg.name == "hf":
        e = datacache.cached("hf", key, lambda: dict(zip(("xtr", "ytr", "xte", "yte"),
                                                         _hf(dcfg.hf_name))))
        check_labels(np.concatenate([e["ytr"], e["yte"]]), _source(dcfg))
        return e["xtr"], e["ytr"], e["xte"], e["yte"], None, key
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
        tr, te = _stratified_split(y, dcfg.test_fraction, seed)
        # shuffle the pool with the seed so that order-based partitioners are seeded too
        return {"train": tr[np.random.default_rng(seed).permutation(len(tr))], "test": te}

    rows = datacache.cached("split", key, split)
    tr, te = rows["train"], rows["test"]
    groups = groups[tr] if groups is not None else None
    return x[tr], y[tr], x[te], y[te], groups, key


@lru_cache(maxsize=2)  # one dataset per process: data is cached, never client state
def _load_cached(ds: tuple, part: tuple, seed: int) -> FederatedData:
    pcfg = PartitionConfig(*part)
    train_x, train_y, test_x, test_y, groups, key = _split_arrays(DatasetConfig(*ds), seed)
    num_classes = int(max(train_y.max(), test_y.max()) + 1)
    pkey = {"split": key, "partition": {f: getattr(pcfg, f) for f in
                                        PartitionConfig.__dataclass_fields__},
            **datacache.versions("flwr-datasets", "datasets")}
    parts = datacache.unpack_parts(datacache.cached(
        "partition", pkey,
        lambda: datacache.pack_parts(partition_indices(train_y, pcfg, seed, groups))))
    return FederatedData(
        train=Arrays(torch.from_numpy(train_x), torch.from_numpy(train_y)),
        test=Arrays(torch.from_numpy(test_x), torch.from_numpy(test_y)),
        partitions=parts,
        input_shape=tuple(train_x.shape[1:]),
        num_classes=num_classes,
    )


def load_federated(cfg: ExperimentConfig) -> FederatedData:
    """Load ``cfg.dataset``, split off the test set and partition the rest (cached)."""
    d, p = cfg.dataset, cfg.partition
    return _load_cached(
        tuple(getattr(d, f) for f in DatasetConfig.__dataclass_fields__),
        tuple(getattr(p, f) for f in PartitionConfig.__dataclass_fields__),
        cfg.seed,
    )


def _source(d: DatasetConfig) -> str:
    """The config key and value that name ``d``'s data in messages."""
    if d.name == "npz":
        return f"dataset.path: {d.path!r}"
    if d.name == "hf":
        return f"dataset.hf_name: {d.hf_name!r}"
    return f"dataset.name: {d.name!r}"


def check_model_fit(model: str, input_shape: tuple[int, ...], num_classes: int,
                    source: str) -> None:
    """Raise DataError (one line) when ``model`` cannot take examples of ``input_shape``
    (from ``source``, named in the message) or would be too large for them."""
    if requires_image(model) and len(input_shape) != 3:
        raise DataError(f"model: {model!r} takes images (channels, height, width); {source} "
                        f"holds examples of shape {tuple(input_shape)} (use model=mlp, or store "
                        "x as (N, C, H, W) or (N, H, W))")
    try:
        check_model_input(model, input_shape, num_classes)
    except ValueError as e:
        raise DataError(f"{e}; the examples come from {source}") from None


def prepare(cfg: ExperimentConfig) -> None:
    """Check ``cfg``'s data and model, and store the dataset split and partitions in the
    data cache (fl.datacache), so that the simulation's processes only read them.

    Raises DataError (one line) when the data is not usable (see the module
    docstring: file, finite values, labels), does not fit the model, or the
    partition cannot be made (e.g. Dirichlet(0.1) cannot give every client
    ``partition.min_size`` examples).
    """
    fd = load_federated(cfg)
    check_model_fit(cfg.model, fd.input_shape, fd.num_classes, _source(cfg.dataset))


def check_dataset(cfg: ExperimentConfig) -> None:
    """Check ``cfg.dataset`` (file, values, labels) and the model on it, without
    partitioning: what a deployed server evaluates on, and ``bonsai validate``'s check
    of a study's datasets. Raises DataError (one line)."""
    ed = load_test(cfg)
    check_model_fit(cfg.model, ed.input_shape, ed.num_classes, _source(cfg.dataset))


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
def _load_test_cached(ds: tuple, seed: int) -> EvalData:
    train_x, train_y, test_x, test_y, _, _ = _split_arrays(DatasetConfig(*ds), seed)
    return EvalData(Arrays(torch.from_numpy(test_x), torch.from_numpy(test_y)),
                    tuple(train_x.shape[1:]), int(max(train_y.max(), test_y.max()) + 1))


def load_test(cfg: ExperimentConfig) -> EvalData:
    """The server's test split of ``cfg.dataset`` without partitioning the pool (cached).

    The same split as :func:`load_federated`'s ``test`` (same seed); what a
    deployed server evaluates on, where the nodes bring their own data.
    """
    d = cfg.dataset
    return _load_test_cached(tuple(getattr(d, f) for f in DatasetConfig.__dataclass_fields__),
                             cfg.seed)


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


def load_local(path: str | Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    """A node's own examples: ``(x, y, num_classes-or-None)`` from an .npz or image folder.

    An .npz may carry a scalar ``num_classes`` (``bonsai deploy split`` writes
    it) for nodes that lack the highest classes; an image folder's class count
    is its number of sub-folders.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        x, y = load_image_folder(p)
        return x, y, len([d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")])
    if not p.exists():
        raise DataError(f"data-path: {str(p)!r} does not exist")
    x, y = load_npz(p, key="data-path")
    where = f"data-path: {str(p)!r}"
    with np.load(p, allow_pickle=False) as f:
        if "num_classes" not in f.files:
            return x, y, None
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
    return x, y, n


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
    x, y, file_classes = load_local(path)
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
    return NodeData(partition_id, Arrays(torch.from_numpy(x), torch.from_numpy(y)), shape,
                    classes)
