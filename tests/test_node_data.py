"""A deployed node's own data (fl.nodedata.node_data, fl.userdata.load_local): its .npz or image
folder, never a partition, checked against the experiment's model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import digits_cfg, write_npz

from fl.config import load
from fl.nodedata import node_data
from fl.userdata import DataError

ROOT = Path(__file__).resolve().parent.parent


# --- node-local data ------------------------------------------------------------------------
def test_node_reads_its_own_npz_not_a_partition(tmp_path):
    x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
    y = np.array([0, 1, 2, 3, 4, 5, 6])
    p = write_npz(tmp_path / "mine.npz", x, y)
    node = node_data(digits_cfg(), {"data-path": str(p), "partition-id": 4})
    assert node.partition_id == 4 and len(node.data) == 7
    assert torch.equal(node.data.x, torch.from_numpy(x)) and node.data.y.tolist() == y.tolist()
    assert node.input_shape == (1, 8, 8) and node.num_classes == 10  # digits' 10 classes


def test_node_data_errors_name_the_path(tmp_path):
    cfg = digits_cfg()
    with pytest.raises(DataError, match="data-path: .* does not exist"):
        node_data(cfg, {"data-path": str(tmp_path / "nope.npz")})
    wrong = write_npz(tmp_path / "rgb.npz", np.zeros((3, 3, 8, 8), np.float32), np.zeros(3, int))
    with pytest.raises(DataError, match=r"shape \(3, 8, 8\).*takes \(1, 8, 8\)"):
        node_data(cfg, {"data-path": str(wrong)})
    big = write_npz(tmp_path / "big.npz", np.zeros((2, 1, 8, 8), np.float32), np.array([0, 12]))
    with pytest.raises(DataError, match="label 12"):
        node_data(cfg, {"data-path": str(big)})
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="data-path"):
        node_data(cfg, {"data-path": str(tmp_path / "junk.npz")})


def test_class_count_when_the_server_dataset_is_not_here(tmp_path):
    cfg = load(None, ["dataset.name=npz", f"dataset.path={tmp_path / 'server.npz'}",
                      "model=mlp"])
    p = write_npz(tmp_path / "n.npz", np.zeros((2, 5), np.float32), np.array([0, 1]),
             num_classes=np.int64(4))
    assert node_data(cfg, {"data-path": str(p)}).num_classes == 4  # from the file
    assert node_data(cfg, {"data-path": str(p), "num-classes": 6}).num_classes == 6


def test_image_folder(tmp_path):
    from PIL import Image

    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            a = np.full((8, 8), 40 * (label + i), dtype=np.uint8)
            Image.fromarray(a, mode="L").save(tmp_path / "imgs" / name / f"{i}.png")
    cfg = digits_cfg()
    node = node_data(cfg, {"data-path": str(tmp_path / "imgs")})
    assert node.data.y.tolist() == [0, 0, 1, 1]
    assert node.data.x.shape == (4, 1, 8, 8)
    assert torch.allclose(node.data.x[3, 0, 0, 0], torch.tensor(80 / 255))
