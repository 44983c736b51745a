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

The parts of this job that stand alone have their own modules: fl.userdata reads and
checks the files users bring (and defines :class:`~fl.userdata.DataError`),
fl.partition splits and partitions row indices, and fl.nodedata gives one node its
examples (a simulated client's partition or a deployed node's own file).

Why one module of this length: it is the one path from the ``dataset.*``,
``partition.*`` and augmentation keys to the tensors a process trains and evaluates
on (bundled loaders, the cached split, the batch transform, the per-process cache),
with the checks of that path's result that ``prepare`` and ``check_dataset`` make.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
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
from fl.partition import partition_indices, stratified_split
from fl.transforms import IDENTITY, BatchTransform
from fl.userdata import DataError, check_labels, load_npz


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


def clear_loaded() -> None:
    """Forget the datasets this process has loaded (:func:`load_federated`,
    :func:`load_test`), as a new process starts; the data cache on disk stays."""
    _load_cached.cache_clear()
    _load_test_cached.cache_clear()
