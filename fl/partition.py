"""The seeded split of a dataset into a training pool and a test set, and the pool's
partition across clients by flwr-datasets' partitioners.

Both work on row indices only: the partitioners see a small table of ``label``,
``idx`` and, for natural partitions, ``id``, and a partition is a sorted array of
pool rows (fl.data reads the examples; fl.datacache keeps the indices).
"""

from __future__ import annotations

import math

import numpy as np

from fl.config import PartitionConfig
from fl.userdata import DataError


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
    command resolves 0 to the count before the run: :func:`fl.data.client_count`). Raises
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
