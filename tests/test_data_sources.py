"""Local datasets read with Hugging Face ``datasets`` (fl.sources), their memory-mapped
cache entries, natural-id partitions, the per-batch transform (fl.transforms) and the
text encoding (fl.text). The files are small copies of the hub's schemas
(tests/hubdata.py); every expectation is computed here with numpy or by hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hubdata
import numpy as np
import pytest
import torch

from fl import config as c
from fl import data as D
from fl import datacache, sources
from fl.partition import partition_indices
from fl.text import LEAF_VOCABULARY, encode, encode_labels, windows
from fl.transforms import IDENTITY, BatchTransform
from fl.userdata import DataError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One copy of each layout, shared by the tests of this module (decoding is what
    costs; each test reads the same cache entries)."""
    t = tmp_path_factory.mktemp("hub")
    return {
        "cifar": hubdata.cifar10(t / "cifar10", train=60, test=20),
        "femnist": hubdata.femnist(t / "femnist.parquet", writers=4, per_writer=12),
        "shakespeare": hubdata.shakespeare(t / "shakespeare.csv", roles=3, per_role=30),
        "shakespeare_parquet": hubdata.shakespeare(t / "sp.parquet", roles=3, per_role=30),
        "folder": hubdata.image_folder(t / "imgs", classes=3, per_class=8),
        "disk": hubdata.saved_to_disk(t / "disk", train=40, test=12, classes=4),
    }


def cfg(path: Path, *overrides: str) -> c.ExperimentConfig:
    return c.load(None, ["dataset.name=local", f"dataset.path={path}", "model=mlp",
                         "partition.kind=iid", "partition.num_clients=3", *overrides])


# --- sources and the memory-mapped cache ---------------------------------------------------
def test_cifar_parquet_is_uint8_memmapped_and_the_clients_batch_is_float(files):
    conf = cfg(files["cifar"], "model=lenet", "dataset.normalize=true")
    D.prepare(conf)
    fd = D.load_federated(conf)
    assert fd.input_shape == (3, 32, 32) and fd.num_classes == 10
    assert (len(fd.train), len(fd.test)) == (60, 20)  # the files' own train/test splits
    assert isinstance(fd.pool, np.memmap) and fd.pool.dtype == np.uint8
    assert fd.train.x.dtype == torch.uint8 and str(fd.pool.filename).endswith("x_train.npy")
    table = sources.load_table(conf.dataset)
    assert all(isinstance(a, np.memmap) for a in (table.x_train, table.x_test))
    client = fd.client(1)
    assert client.x.dtype == torch.uint8 and not isinstance(client.x.numpy(), np.memmap)
    assert torch.equal(client.x, torch.from_numpy(np.asarray(fd.pool[fd.partitions[1]])))
    batch = client.transform(client.x[:5], None, train=False)
    assert batch.dtype == torch.float32
    # the images are the files' own: decode row 0 of the train parquet with Pillow
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    row0 = pq.read_table(files["cifar"] / "train-00000-of-00001.parquet").to_pylist()[0]
    want = np.asarray(Image.open(io.BytesIO(row0["img"]["bytes"]))).transpose(2, 0, 1)
    assert np.array_equal(table.x_train[0], want) and int(table.y_train[0]) == row0["label"]


def test_normalisation_statistics_are_the_pools_per_channel_mean_and_std(files):
    conf = cfg(files["cifar"], "model=lenet", "dataset.normalize=true")
    table = sources.load_table(conf.dataset)
    pool = np.asarray(table.x_train, dtype=np.float64) / 255
    assert np.allclose(table.mean, pool.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(table.std, pool.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    fd = D.load_federated(conf)
    xb = fd.test.x[:7]
    got = fd.test.transform(xb, None, train=False)
    want = (xb.double() / 255 - torch.tensor(table.mean).view(1, 3, 1, 1)) / torch.tensor(
        table.std).view(1, 3, 1, 1)
    assert torch.allclose(got.double(), want, atol=1e-5)
    # float images (digits): the same statistics, computed from the float pool
    mean, std = D.channel_stats(np.asarray(D.load_federated(c.load(None, [])).train.x))
    digits = np.asarray(D.load_federated(c.load(None, [])).train.x, dtype=np.float64)
    assert np.allclose(mean, digits.mean(axis=(0, 2, 3)), atol=1e-12)
    assert np.allclose(std, digits.std(axis=(0, 2, 3)), atol=1e-12)
    normed = D.load_federated(c.load(None, ["dataset.normalize=true"])).train
    assert normed.transform.mean == pytest.approx(mean) and normed.transform.divisor is None


def test_datacache_folder_entries_are_built_once_and_read_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setenv(datacache.ENV, str(tmp_path / "cache"))
    calls = []

    def build(folder: Path) -> dict:
        calls.append(folder)
        np.save(folder / "a.npy", np.arange(12, dtype=np.uint8).reshape(4, 3))
        return {"n": 4}

    arrays, meta = datacache.cached_files("t", {"k": 1}, build)
    again, meta2 = datacache.cached_files("t", {"k": 1}, build)
    assert len(calls) == 1 and meta == meta2 == {"n": 4}
    assert isinstance(again["a"], np.memmap) and again["a"].tolist() == arrays["a"].tolist()
    rows = datacache.read_rows(again["a"], np.array([3, 1]))
    assert type(rows) is np.ndarray and rows.tolist() == [[9, 10, 11], [3, 4, 5]]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        f"t-{datacache.key_digest('t', {'k': 1})[1][:32]}"]
    monkeypatch.setenv(datacache.ENV, "off")  # a temporary folder, removed at exit
    off, _ = datacache.cached_files("t", {"k": 1}, build)
    assert len(calls) == 2 and isinstance(off["a"], np.memmap)


def test_a_process_that_reads_a_decoded_dataset_imports_neither_datasets_nor_pyarrow(files):
    conf = cfg(files["femnist"], "model=cnn_leaf", "partition.kind=natural",
               "partition.num_clients=4")
    D.prepare(conf)
    overrides = [f"dataset.path={files['femnist']}", "dataset.name=local", "model=cnn_leaf",
                 "partition.kind=natural", "partition.num_clients=4"]
    code = (
        "import sys\n"
        "from fl import config as c, data as D, nodedata\n"
        f"cfg = c.load(None, {overrides!r})\n"
        "node = nodedata.node_data(cfg, {'partition-id': 2, 'num-partitions': 4})\n"
        "print(len(node.data), str(node.data.x.dtype))\n"
        "heavy = [m for m in ('sklearn', 'datasets', 'flwr_datasets', 'pyarrow', 'PIL')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(len(D.load_federated(conf).partitions[2])), "torch.uint8"]


# --- natural ids -----------------------------------------------------------------------------
def test_femnist_by_writer_one_client_per_writer(files):
    conf = cfg(files["femnist"], "model=cnn_leaf", "partition.kind=natural",
               "partition.num_clients=4")
    fd = D.load_federated(conf)
    table = sources.load_table(conf.dataset)
    assert fd.input_shape == (1, 28, 28) and fd.num_classes == 6 and table.id_column == "writer_id"
    assert len(fd.train) + len(fd.test) == 48
    ids = table.ids_train
    writers = [set(ids[p].tolist()) for p in fd.partitions]
    assert all(len(w) == 1 for w in writers)
    assert [w.pop() for w in writers] == sorted(set(ids.tolist()))  # sorted id order
    assert sorted(np.concatenate(fd.partitions).tolist()) == list(range(len(fd.train)))
    # fewer clients: a seeded sample of the writers, each whole
    two = partition_indices(table.y_train, c.PartitionConfig(kind="natural", num_clients=2),
                          5, ids)
    again = partition_indices(table.y_train, c.PartitionConfig(kind="natural", num_clients=2),
                            5, ids)
    assert all(np.array_equal(a, b) for a, b in zip(two, again))
    for p in two:
        (w,) = set(ids[p].tolist())
        assert np.array_equal(p, np.flatnonzero(ids == w))
    seeds = {tuple(sorted({int(ids[p[0]]) for p in partition_indices(
        table.y_train, c.PartitionConfig(kind="natural", num_clients=2), s, ids)}))
        for s in range(8)}
    assert len(seeds) > 1  # other seeds, other writers
    with pytest.raises(DataError, match=r"num_clients: got 5; the natural split of this "
                                          r"dataset has 4 clients \(allowed: 1..4"):
        D.load_federated(cfg(files["femnist"], "model=cnn_leaf", "partition.kind=natural",
                             "partition.num_clients=5"))


def test_natural_partition_needs_an_id_column(files):
    with pytest.raises(DataError, match=r"partition.kind: got 'natural'; dataset.path: .* has "
                                          r"no client-id column \(columns \['img', 'label'\]\)"):
        D.load_federated(cfg(files["cifar"], "model=lenet", "partition.kind=natural"))


# --- text --------------------------------------------------------------------------------
def test_leaf_vocabulary_and_windows():
    assert len(LEAF_VOCABULARY) == 80 and len(set(LEAF_VOCABULARY)) == 80
    assert LEAF_VOCABULARY.startswith('\n !"&') and LEAF_VOCABULARY.endswith("xyz}")
    assert encode(["ab", "}\n"]).tolist() == [[LEAF_VOCABULARY.index("a"),
                                              LEAF_VOCABULARY.index("b")], [79, 0]]
    assert encode_labels(["a", " "]).tolist() == [53, 1]
    x, y = windows("abcdef", length=3)
    ids = [LEAF_VOCABULARY.index(ch) for ch in "abcdef"]
    assert x.tolist() == [ids[0:3], ids[1:4], ids[2:5]] and y.tolist() == ids[3:6]
    assert windows("ab", length=3)[0].shape == (0, 3)
    with pytest.raises(ValueError, match=r"character '@' \(row 1, position 2\) is not in LEAF"):
        encode(["abc", "ab@"])
    with pytest.raises(ValueError, match="different lengths"):
        encode(["abc", "ab"])


@pytest.mark.parametrize("which", ["shakespeare", "shakespeare_parquet"])
def test_shakespeare_windows_by_role(files, which):
    conf = cfg(files[which], "model=char_lstm", "partition.kind=natural",
               "partition.num_clients=3")
    D.prepare(conf)
    fd = D.load_federated(conf)
    rows = hubdata.shakespeare_rows(roles=3, per_role=30)
    assert fd.input_shape == (80,) and fd.num_classes == 80 and fd.train.x.dtype == torch.int64
    assert fd.train.transform == IDENTITY
    # every stored window is the encoding of one of the file's x, its label that row's y
    want = {tuple(encode([x])[0].tolist()): int(encode_labels([y])[0])
            for x, y in zip(rows["x"], rows["y"])}
    for xi, yi in zip(fd.train.x.tolist(), fd.train.y.tolist()):
        assert want[tuple(xi)] == yi
    assert len(fd.partitions) == 3 and len(fd.train) + len(fd.test) == 90


def test_image_folder_and_save_to_disk(files):
    fd = D.load_federated(cfg(files["folder"], "model=cnn"))
    assert fd.input_shape == (3, 16, 16) and fd.num_classes == 3
    assert len(fd.train) + len(fd.test) == 24
    disk = D.load_federated(cfg(files["disk"], "model=cnn"))
    assert disk.num_classes == 4 and (len(disk.train), len(disk.test)) == (40, 12)
    assert sources.resolve_format(files["disk"], "auto") == "disk"
    # a save_to_disk folder's .arrow file, read as arrow with the format given
    (arrow,) = (files["disk"] / "train").glob("*.arrow")
    one = sources.load_table(cfg(arrow, "dataset.format=arrow").dataset)
    assert one.num_classes == 4 and len(one.y_train) + len(one.y_test) == 40


def test_a_client_without_examples_is_refused(monkeypatch):
    from flwr_datasets.partitioner import IidPartitioner

    original = IidPartitioner.load_partition

    def one_empty(self, partition_id):  # what a partitioner may leave: a client with no rows
        ds = original(self, partition_id)
        return ds.select([]) if partition_id == 2 else ds

    monkeypatch.setattr(IidPartitioner, "load_partition", one_empty)
    with pytest.raises(DataError, match=r"partition: client 2 gets no examples \(1 of 4 "
                                          r"clients get none; kind=iid, num_clients=4, 40"):
        partition_indices(np.arange(40) % 4, c.PartitionConfig(kind="iid", num_clients=4), 0)


def test_partition_kinds_of_flwr_datasets_on_digits():
    inner = D.load_federated(c.load(None, ["partition.kind=inner_dirichlet",
                                           "partition.alpha=0.3"]))
    sizes = [len(p) for p in inner.partitions]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(inner.train)
    linear = D.load_federated(c.load(None, ["partition.kind=linear", "partition.num_clients=4"]))
    sizes = [len(p) for p in linear.partitions]
    assert sizes == sorted(sizes) and sizes[3] > 3 * sizes[0]


# --- the batch transform ------------------------------------------------------------------
def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)


def test_identity_passes_float_data_unchanged():
    x = torch.randn(4, 1, 8, 8)
    assert IDENTITY(x, None, train=True) is x and IDENTITY.generator(3) is None


def test_augmentation_is_seeded_per_batch_seed():
    tf = BatchTransform(divisor=255.0, crop_padding=2, flip=True)
    x = _images()
    a = tf(x, tf.generator(7), train=True)
    b = tf(x, tf.generator(7), train=True)
    other = tf(x, tf.generator(8), train=True)
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert torch.equal(tf(x, None, train=False), x.float() / 255)  # evaluation: no draws


def test_flip_and_crop_do_what_they_say():
    x = _images()
    xf = x.float() / 255
    flip = BatchTransform(divisor=255.0, flip=True)
    draw = flip.draw(len(x), flip.generator(1))
    out = flip.apply(x, draw)
    assert 0 < int(draw.flips.sum()) < len(x)
    for i in range(len(x)):
        want = xf[i].flip(-1) if draw.flips[i] else xf[i]
        assert torch.equal(out[i], want)
    for mode in ("zeros", "reflect"):
        crop = BatchTransform(divisor=255.0, crop_padding=3, pad_mode=mode)
        draw = crop.draw(len(x), crop.generator(2))
        out = crop.apply(x, draw)
        padded = np.pad(xf.numpy(), ((0, 0), (0, 0), (3, 3), (3, 3)),
                        mode="constant" if mode == "zeros" else "reflect")
        for i, (r, col) in enumerate(draw.offsets.tolist()):
            assert 0 <= r <= 6 and 0 <= col <= 6
            assert np.array_equal(out[i].numpy(), padded[i, :, r:r + 8, col:col + 8])


def test_training_with_augmentation_reproduces_per_seed():
    from fl.models import build_model
    from fl.train import train

    tf = BatchTransform(divisor=255.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        crop_padding=2, flip=True)
    data = D.Arrays(_images(24), torch.arange(24) % 4, tf)
    cfg_ = c.TrainConfig(local_epochs=1, batch_size=8, lr=0.05)
    states = []
    for seed in (3, 3, 4):
        m = build_model("cnn", (3, 8, 8), 4, seed=0)
        train(m, data, cfg_, seed=seed, device=torch.device("cpu"))
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_cohort_vectorised_path_applies_each_clients_transform():
    """The vectorised cohort draws each client's augmentation from its own generator in
    its own batch order: the same states as fl.train one client at a time (within
    test_cohort's measured float32 tolerance)."""
    from kernel_checks import assert_close
    from test_cohort import STATE_ATOL, STATE_RTOL

    from fl.cohort import train_cohort
    from fl.models import build_model
    from fl.train import train

    tf = BatchTransform(divisor=255.0, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25),
                        crop_padding=2, pad_mode="reflect", flip=True)
    datas = [D.Arrays(_images(n, seed=n), torch.arange(n) % 5, tf) for n in (9, 20, 16)]
    model = build_model("cnn", (3, 8, 8), 5, seed=0)
    states = [build_model("cnn", (3, 8, 8), 5, seed=k).state_dict() for k in (1, 2, 3)]
    cfg_ = c.TrainConfig(local_epochs=2, batch_size=8, lr=0.05, momentum=0.9)
    seeds = [21, 22, 23]
    got = train_cohort(model, states, datas, cfg_, seeds=seeds, device="cpu",
                       mode="vectorised")
    for k, client in enumerate(got):
        m = build_model("cnn", (3, 8, 8), 5)
        m.load_state_dict(states[k])
        res = train(m, datas[k], cfg_, seed=seeds[k], device=torch.device("cpu"))
        assert client.result.steps == res.steps
        for n, t in m.state_dict().items():
            if t.is_floating_point():
                assert_close(client.state[n], t, STATE_ATOL["sgd"], STATE_RTOL, f"{k} {n}")


# --- bad data: one line each ----------------------------------------------------------------
def test_bad_data_is_one_line(tmp_path, files):
    import datasets

    def fails(conf, *needles):
        with pytest.raises(DataError) as e:
            D.prepare(conf)
        line = str(e.value)
        assert "\n" not in line and all(n in line for n in needles), line

    fails(cfg(files["cifar"], "model=lenet", "dataset.label_column=fine_label"),
          "dataset.label_column: got 'fine_label'", "has columns ['img', 'label']")
    plain = tmp_path / "plain.parquet"
    datasets.Dataset.from_dict({"a": [1, 2], "b": [0, 1]}).to_parquet(str(plain))
    fails(cfg(plain), "has columns ['a', 'b']", "found no image column",
          "dataset.image_column or dataset.text_column")
    rng = np.random.default_rng(0)
    images = [hubdata.png(a) for a in rng.integers(0, 255, (4, 8, 8, 3), np.uint8)]
    strings = tmp_path / "strings.parquet"
    datasets.Dataset.from_dict({"img": images, "label": ["cat", "dog", "cat", "dog"]}).cast_column(
        "img", datasets.Image()).to_parquet(str(strings))
    fails(cfg(strings, "model=cnn"), "dataset.label_column 'label' holds strings ('cat', 'dog'")
    broken = tmp_path / "broken.parquet"
    images[2] = {"bytes": b"not an image", "path": None}
    datasets.Dataset.from_dict({"img": images, "label": [0, 1, 0, 1]}).cast_column(
        "img", datasets.Image()).to_parquet(str(broken))
    fails(cfg(broken, "model=cnn"), "(split train), column 'img': row 2 is not a decodable image")
    fails(cfg(files["cifar"], "model=lenet", "partition.num_clients=61"),
          "partition.num_clients: got 61; the training pool has 60 examples, so client 60")
    fails(cfg(files["cifar"], "model=lenet", "partition.kind=shard", "partition.num_clients=40"),
          "partition: ", "kind=shard, num_clients=40")
    fails(cfg(files["shakespeare"], "model=lenet"), "model: 'lenet' takes real-valued inputs")
    fails(cfg(files["shakespeare"], "model=mlp"), "model: 'mlp' takes real-valued inputs",
          "holds token ids")
    fails(cfg(files["shakespeare"], "model=char_lstm", "train.augment_flip=true"),
          "train.augment_flip: got True", "not images")
    fails(cfg(tmp_path / "nope"), "does not exist")


def test_hub_dataset_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    conf = c.load(None, ["dataset.name=hf", "dataset.hf_name=uoft-cs/cifar10", "model=lenet"])
    with pytest.raises(DataError) as e:
        D.check_dataset(conf)
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith("dataset.hf_name: 'uoft-cs/cifar10' cannot be loaded from the "
                           "Hugging Face hub") and "HF_HUB_OFFLINE is set" in line
    assert "--set dataset.name=local --set dataset.path=DIR" in line


def test_deploy_split_nodes_scale_and_normalise_as_the_simulation_does(files, tmp_path):
    """`bonsai deploy split` of uint8 images with normalisation: each node's file keeps
    uint8 and the pool's statistics, so a node's batches are the simulation client's."""
    from fl.data import load_federated
    from fl.deploy.split import write_split
    from fl.nodedata import node_data

    exp = cfg(files["cifar"], "model=cnn", "dataset.normalize=true")
    paths = write_split(exp, tmp_path / "nodes")
    sim = load_federated(exp)
    node = node_data(exp, {"data-path": str(paths[1]), "partition-id": 1})
    assert node.data.x.dtype == torch.uint8
    assert node.data.transform == sim.client(1).transform  # divisor 255, the pool's mean/std
    xs, xn = sim.client(1).x, node.data.x
    assert torch.equal(xs, xn)
    t = node.data.transform
    assert torch.equal(t(xn, None, train=False), sim.client(1).transform(xs, None, train=False))
    assert t(xn, None, train=False).dtype == torch.float32


def test_natural_partition_of_every_id_is_counted_before_the_run(files):
    """partition.num_clients=0 with kind=natural: one client per writer, counted from the
    data by the pre-run check (in its child process) and written into the config."""
    from fl.cli.common import check_data

    exp = cfg(files["femnist"], "model=cnn", "partition.kind=natural", "partition.num_clients=0",
              "strategy.min_train_clients=1")
    assert check_data({"run": exp}) == {}
    assert exp.partition.num_clients == 4  # the four writers of the file
    with pytest.raises(c.ConfigError, match="0, one client per id of the data, needs "
                                            "partition.kind=natural"):
        cfg(files["femnist"], "model=cnn", "partition.num_clients=0")
