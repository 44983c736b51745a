"""The on-disk data cache: computed once, read everywhere else, never stale, and what it
saves (a process that reads it imports neither scikit-learn nor flwr-datasets)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl import config as c
from fl import data as D
from fl import datacache

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(datacache.ENV, str(tmp_path / "cache"))
    D.clear_loaded()
    yield tmp_path / "cache"
    D.clear_loaded()


def test_cached_computes_once_and_reads_back_exactly(cache):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(5, dtype=np.int64), "b": np.linspace(0, 1, 7).astype(np.float32)}

    first = datacache.cached("t", {"x": 1}, compute)
    second = datacache.cached("t", {"x": 1}, compute)
    assert len(calls) == 1
    assert set(second) == {"a", "b"}
    for k in first:
        assert second[k].dtype == first[k].dtype and np.array_equal(second[k], first[k])
    datacache.cached("t", {"x": 2}, compute)  # another key: another entry
    assert len(calls) == 2 and len(list(cache.glob("t-*.npz"))) == 2


def test_unreadable_entry_is_computed_again(cache, caplog):
    datacache.cached("t", {"x": 1}, lambda: {"a": np.arange(3)})
    (entry,) = cache.glob("t-*.npz")
    entry.write_bytes(b"torn write")
    with caplog.at_level(logging.WARNING, logger="fl.datacache"):
        again = datacache.cached("t", {"x": 1}, lambda: {"a": np.arange(3) + 1})
    assert again["a"].tolist() == [1, 2, 3] and "unreadable" in caplog.text
    assert datacache.cached("t", {"x": 1}, lambda: {"a": np.zeros(1)})["a"].tolist() == [1, 2, 3]


def test_cache_off_and_unwritable(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(datacache.ENV, "off")
    assert datacache.cache_dir() is None
    calls = []
    for _ in range(2):
        datacache.cached("t", {}, lambda: calls.append(1) or {"a": np.arange(2)})
    assert len(calls) == 2
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(datacache.ENV, str(blocker / "cache"))
    monkeypatch.setattr(datacache, "_warned_unwritable", False)
    with caplog.at_level(logging.WARNING, logger="fl.datacache"):
        out = datacache.cached("t", {}, lambda: {"a": np.arange(2)})
    assert out["a"].tolist() == [0, 1] and "cannot write" in caplog.text


@pytest.mark.parametrize("overrides", [
    ["partition.kind=dirichlet", "partition.alpha=0.3", "partition.num_clients=7"],
    ["dataset.name=synthetic", "partition.kind=natural", "partition.num_clients=30",
     "model=mlp"],
    ["partition.kind=pathological", "partition.num_clients=5", "seed=3"],
])
def test_cached_split_and_partitions_equal_a_fresh_computation(cache, monkeypatch, overrides):
    cfg = c.load(None, overrides)
    monkeypatch.setenv(datacache.ENV, "off")
    fresh = D.load_federated(cfg)
    D.clear_loaded()
    monkeypatch.setenv(datacache.ENV, str(cache))
    D.load_federated(cfg)  # computes and stores
    D.clear_loaded()
    read = D.load_federated(cfg)  # reads
    assert len(list(cache.glob("partition-*.npz"))) == 1
    for a, b in ((fresh.train, read.train), (fresh.test, read.test)):
        assert a.x.equal(b.x) and a.y.equal(b.y)
        # strides too: with one image channel, conv2d's float results depend on them
        assert a.x.stride() == b.x.stride()
    assert len(fresh.partitions) == len(read.partitions)
    assert all(np.array_equal(p, q) for p, q in zip(fresh.partitions, read.partitions))
    assert read.input_shape == fresh.input_shape and read.num_classes == fresh.num_classes


def test_rewritten_npz_file_gets_a_new_split(cache, tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((60, 4), dtype=np.float32), y=np.repeat(np.arange(3), 20))
    cfg = c.load(None, ["dataset.name=npz", f"dataset.path={path}", "model=mlp",
                        "partition.kind=iid", "partition.num_clients=3"])
    before = D.load_test(cfg).test.x.clone()
    np.savez(path, x=rng.random((60, 4), dtype=np.float32) + 5, y=np.repeat(np.arange(3), 20))
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock says
    D.clear_loaded()
    after = D.load_test(cfg).test.x
    assert float(after.min()) >= 5 > float(before.max())
    assert len(list(cache.glob("split-*.npz"))) == 2


def test_npz_replaced_with_the_same_size_and_mtime_gets_a_new_split(cache, tmp_path,
                                                                    monkeypatch):
    """The key is the file's content (SHA-256), not its size and modification time: a
    file copied over with its times preserved must not reuse the old split."""
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((60, 4), dtype=np.float32), y=np.repeat(np.arange(3), 20))
    st = path.stat()
    cfg = c.load(None, ["dataset.name=npz", f"dataset.path={path}", "model=mlp",
                        "partition.kind=dirichlet", "partition.alpha=0.5",
                        "partition.num_clients=3", "partition.min_size=1"])
    D.prepare(cfg)
    # other labels and features, the same byte count, the same times to the nanosecond
    np.savez(path, x=rng.random((60, 4), dtype=np.float32) + 5, y=np.tile(np.arange(3), 20))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    D.clear_loaded()  # a new process (every `bonsai run` is one)
    D.prepare(cfg)
    assert len(list(cache.glob("split-*.npz"))) == 2
    assert len(list(cache.glob("partition-*.npz"))) == 2
    D.clear_loaded()
    cached = D.load_federated(cfg)
    monkeypatch.setenv(datacache.ENV, "off")
    D.clear_loaded()
    fresh = D.load_federated(cfg)  # computed from the new file, no cache
    for a, b in ((fresh.train, cached.train), (fresh.test, cached.test)):
        assert a.x.equal(b.x) and a.y.equal(b.y)
    assert all(np.array_equal(p, q) for p, q in zip(fresh.partitions, cached.partitions,
                                                    strict=True))
    assert float(cached.test.x.min()) >= 5


def test_file_fingerprint_is_the_content_hash(tmp_path):
    import hashlib

    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    fp = datacache.file_fingerprint(path)
    assert fp == {"path": str(path.resolve()), "size": 3000,
                  "sha256": hashlib.sha256(b"abc" * 1000).hexdigest()}


def test_a_process_that_reads_the_cache_imports_neither_sklearn_nor_flwr_datasets(cache):
    """What the cache is for: simulated clients (Ray actors) stay ~210 MB smaller."""
    cfg = c.load(None, ["partition.num_clients=9"])
    D.prepare(cfg)
    code = (
        "import sys\n"
        "from fl import config as c, data as D, nodedata\n"
        "cfg = c.load(None, ['partition.num_clients=9'])\n"
        "node = nodedata.node_data(cfg, {'partition-id': 4, 'num-partitions': 9})\n"
        "print(len(node.data), D.load_test(cfg).test.x.shape[0])\n"
        "heavy = [m for m in ('sklearn', 'datasets', 'flwr_datasets', 'pyarrow', 'scipy')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, datacache.ENV: str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    fd = D.load_federated(cfg)
    assert out.stdout.split() == [str(len(fd.partitions[4])), str(len(fd.test))]
