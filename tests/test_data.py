"""Datasets and partitions: sizes, seeds, label skew, local files."""

import numpy as np
import pytest

from fl import config as c
from fl.data import load_federated, synthetic
from fl.partition import partition_indices
from fl.userdata import DataError, load_npz


def fed(*overrides):
    return load_federated(c.load(None, list(overrides)))


def test_digits_split_and_partition_cover_the_pool_once():
    fd = fed()
    assert fd.input_shape == (1, 8, 8) and fd.num_classes == 10
    assert len(fd.train) + len(fd.test) == 1797
    assert len(fd.test) == 360  # 20% stratified, rounded up by scikit-learn
    allidx = np.concatenate(fd.partitions)
    assert len(allidx) == len(fd.train) and len(np.unique(allidx)) == len(fd.train)
    assert min(len(p) for p in fd.partitions) >= 2
    x = fd.train.x
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_same_seed_same_partitions_other_seed_differs():
    a, b = fed("seed=1"), fed("seed=1")
    assert all(np.array_equal(p, q) for p, q in zip(a.partitions, b.partitions))
    d = fed("seed=2")
    assert not all(np.array_equal(p, q) for p, q in zip(a.partitions, d.partitions))


def _label_entropy(fd):
    ent = []
    for p in fd.partitions:
        counts = np.bincount(fd.train.y[p].numpy(), minlength=10)
        q = counts[counts > 0] / counts.sum()
        ent.append(-(q * np.log(q)).sum())
    return float(np.mean(ent))


def test_dirichlet_skew_grows_as_alpha_falls():
    iid = _label_entropy(fed("partition.kind=iid"))
    mild = _label_entropy(fed("partition.alpha=100"))
    skew = _label_entropy(fed("partition.alpha=0.1"))
    assert iid > 2.2 and mild > 2.1  # ln(10) = 2.30 is perfectly balanced
    assert skew < mild - 0.7


def test_pathological_gives_k_classes_each():
    fd = fed("partition.kind=pathological", "partition.classes_per_client=2")
    for p in fd.partitions:
        assert len(np.unique(fd.train.y[p].numpy())) <= 2


def test_shard_partition_sizes():
    fd = fed("partition.kind=shard", "partition.shards_per_client=2")
    sizes = {len(p) for p in fd.partitions}
    assert max(sizes) - min(sizes) <= 1 or len(sizes) == 1


def test_synthetic_generator_is_seeded_and_natural_split_matches_devices():
    x1, y1, d1 = synthetic(1.0, 1.0, 5, 500, seed=0)
    x2, y2, d2 = synthetic(1.0, 1.0, 5, 500, seed=0)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape[1] == 60 and set(np.unique(d1)) <= set(range(5))
    fd = fed("dataset.name=synthetic", "model=mlp", "partition.kind=natural",
             "partition.num_clients=30")
    assert len(fd.partitions) == 30 and fd.input_shape == (60,)


def test_npz_local_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "node.npz"
    np.savez(path, x=rng.random((120, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 3, 120))
    fd = fed("dataset.name=npz", f"dataset.path={path}", "partition.num_clients=3",
             "partition.kind=iid")
    assert fd.input_shape == (1, 8, 8) and fd.num_classes == 3 and len(fd.test) == 24
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 4)), labels=np.zeros(3))
    with pytest.raises(DataError, match="no array"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")


def test_partition_client_out_of_range():
    fd = fed()
    with pytest.raises(ValueError, match="partition-id: got 10"):
        fd.client(10)


def test_partition_indices_natural_count_mismatch():
    labels = np.zeros(10, dtype=np.int64)
    cfg = c.PartitionConfig(kind="natural", num_clients=3)
    with pytest.raises(DataError, match="natural split of this dataset has 2"):
        partition_indices(labels, cfg, 0, groups=np.array([0] * 5 + [1] * 5))
