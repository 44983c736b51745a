"""The benchmark studies' cells run on local copies of the hub's layouts, and bad local
data stops ``bonsai`` with one line before Flower starts.

Each slow test takes one real cell of a shipped study (simulations/, issue 13),
points it at a small local dataset with the hub's schema (tests/hubdata.py) and
shrinks it (2 rounds, a few clients, 1 local epoch), then runs it with ``bonsai
run`` as a user would: a real Flower simulation through Ray. Five runs of about 50 s
each on the 2-core test machine: one per study, and the CIFAR-10 ResNet cell on both an
image folder and a ``datasets.save_to_disk`` folder (csv against parquet is read by the
same loader in tests/test_data_sources.py).
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import hubdata
import numpy as np
import pytest
import yaml
from processes import bonsai, wait_gone

from fl.results import read_rounds
from fl.study import expand, load_study

ROOT = Path(__file__).resolve().parent.parent
TINY = {"rounds": 2, "train.local_epochs": 1, "strategy.round_timeout": 300.0,
        "pruning.schedule_rounds": 2, "pruning.mask_every": 1}


def run_cell(tmp_path: Path, study: str, cell: str, **overrides) -> tuple[Path, dict]:
    """``bonsai run`` of cell ``cell`` of simulations/``study`` with ``overrides``."""
    (found,) = [c for c in expand(load_study(ROOT / "simulations" / study)) if c.id == cell]
    values = {k: v for k, v in found.values.items() if k not in ("run_dir", "output_dir")}
    values.update(TINY)
    values.update(overrides)
    values["output_dir"] = str(tmp_path / "out")
    f = tmp_path / "cell.yaml"
    f.write_text(f"# bonsai run {f}\n" + yaml.safe_dump(values))
    mark = uuid.uuid4().hex
    proc = bonsai(["run", str(f), "--quiet"], mark)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert not (left := wait_gone(mark)), left
    (run_dir,) = (tmp_path / "out").iterdir()
    return run_dir, json.loads((run_dir / "config.json").read_text())


def check_rounds(run_dir: Path, clients: int) -> list[dict]:
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients"] == clients and r["bytes_up"] > 0 for r in rounds[1:])
    assert all(math.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0 for r in rounds)
    return rounds


@pytest.mark.slow
def test_cifar10_study_cell_on_a_hub_layout_parquet_folder(tmp_path):
    """NIID-Bench's cell (lenet, reflect-padded crops, flips) with AutoFLIP+FedLD on a
    folder of train-/test- parquet files of PNG-encoded 32x32 images: the lenet is
    shrunk physically to half its units, and the removed ones are zero in the final
    model."""
    import torch

    from fl.models import build_model
    from fl.pruning import count_flops, groups_for, structure_from_json, structured_mask

    data = hubdata.cifar10(tmp_path / "cifar10", train=90, test=30)
    run_dir, config = run_cell(tmp_path, "cifar10_dir05_lenet.yaml",
                               "strategy=autoflip+fedld,seed=0", **{
                                   "dataset.path": str(data), "partition.num_clients": 3,
                                   "partition.min_size": 5, "strategy.min_train_clients": 3,
                                   "train.batch_size": 16,
                                   "pruning.schedule_rounds": 1})  # final targets at once
    assert config["model"] == "lenet" and config["train"]["augment_pad_mode"] == "reflect"
    assert config["strategy"]["aggregation"] == "fedld"
    rounds = check_rounds(run_dir, 3)
    full_flops = count_flops(build_model("lenet", (3, 32, 32), 10), (3, 32, 32))
    assert all(r["flops_per_example"] < full_flops for r in rounds[1:])
    assert rounds[2]["density"] < 0.3  # half the units, then half the weights left
    kept = dict(k.split(":") for k in rounds[2]["kept_units"].split())
    assert kept == {"conv1": "3/6", "conv2": "8/16", "fc1": "60/120", "fc2": "42/84"}
    state = torch.load(run_dir / "final_model.pt", weights_only=True)
    structure = structure_from_json((run_dir / "structure.json").read_text())
    masks = structured_mask(groups_for("lenet", (3, 32, 32), 10), structure, state,
                            strict=False)
    for name, m in masks.items():
        assert torch.count_nonzero(state[name][~m]) == 0, name


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["image_folder", "save_to_disk"])
def test_resnet18_study_cell_on_an_image_folder_or_a_saved_dataset(tmp_path, layout):
    """Reddi et al.'s cell (resnet18_gn, normalised, crops and flips, inner Dirichlet)
    with FedAvg on an image folder of one sub-folder per class, and on a folder written
    by ``datasets.save_to_disk`` (a DatasetDict with train and test splits)."""
    if layout == "image_folder":
        data = hubdata.image_folder(tmp_path / "imgs", classes=2, per_class=10, size=16)
    else:
        data = hubdata.saved_to_disk(tmp_path / "disk", train=20, test=8)
    run_dir, _ = run_cell(tmp_path, "cifar10_dir01_resnet18gn.yaml", "strategy=fedavg,seed=0",
                          **{"dataset.path": str(data), "partition.num_clients": 2,
                             "strategy.min_train_clients": 2, "strategy.fraction_train": 1.0})
    check_rounds(run_dir, 2)


@pytest.mark.slow
def test_femnist_study_cell_one_client_per_writer(tmp_path):
    data = hubdata.femnist(tmp_path / "femnist" / "train.parquet", writers=4, per_writer=15)
    run_dir, config = run_cell(tmp_path, "femnist_writers_cnnleaf.yaml",
                               "strategy=fedprox,seed=0", **{
                                   "dataset.path": str(data.parent), "partition.num_clients": 4,
                                   "strategy.min_train_clients": 4,
                                   "strategy.fraction_train": 1.0})
    assert config["partition"]["kind"] == "natural"
    check_rounds(run_dir, 4)


@pytest.mark.slow
def test_shakespeare_study_cell_one_client_per_role(tmp_path):
    data = hubdata.shakespeare(tmp_path / "shakespeare" / "shakespeare.csv", roles=3,
                               per_role=40)
    run_dir, config = run_cell(tmp_path, "shakespeare_roles_charlstm.yaml",
                               "strategy=fedld,seed=0", **{
                                   "dataset.path": str(data.parent), "partition.num_clients": 3,
                                   "strategy.min_train_clients": 3,
                                   "strategy.fraction_train": 1.0, "train.batch_size": 16})
    assert config["model"] == "char_lstm"
    check_rounds(run_dir, 3)


# --- bad data: one line, exit 2, nothing started ---------------------------------------------
def one_error(proc, *needles: str) -> str:
    out, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.startswith("bonsai: error: ")]
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_bad_local_data_stops_run_and_validate_before_flower(tmp_path):
    import datasets

    data = hubdata.femnist(tmp_path / "femnist.parquet", writers=3, per_writer=6)
    out = tmp_path / "out"
    mark = uuid.uuid4().hex
    common = ["--set", "dataset.name=local", "--set", f"dataset.path={data}", "--set",
              "model=cnn_leaf", "--set", f"output_dir={out}"]
    one_error(bonsai(["run", "quickstart", "--quiet", *common, "--set",
                      "dataset.label_column=label"], mark),
              "dataset.label_column: got 'label'",
              "has columns ['image', 'writer_id', 'hsf_id', 'character']")
    assert not out.exists() and not wait_gone(mark)
    images = [hubdata.png(a) for a in np.zeros((4, 8, 8), np.uint8)]
    strings = tmp_path / "strings.parquet"
    datasets.Dataset.from_dict({"image": images, "label": list("abab")}).cast_column(
        "image", datasets.Image()).to_parquet(str(strings))
    one_error(bonsai(["validate", "quickstart", "--set", "dataset.name=local", "--set",
                      f"dataset.path={strings}"], mark),
              "dataset.label_column 'label' holds strings ('a', 'b', 'a', ...)")
    one_error(bonsai(["run", "quickstart", "--quiet", *common, "--set",
                      "partition.kind=natural", "--set", "partition.num_clients=5"], mark),
              "partition.num_clients: got 5; the natural split of this dataset has 3 clients")
    one_error(bonsai(["run", "quickstart", "--quiet", *common, "--set",
                      "partition.kind=iid", "--set", "partition.num_clients=20"], mark),
              "partition.num_clients: got 20; the training pool has 14 examples, so client 14")
    broken = tmp_path / "broken.parquet"
    images[1] = {"bytes": b"\x89PNG but cut short", "path": None}
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}).cast_column(
        "image", datasets.Image()).to_parquet(str(broken))
    one_error(bonsai(["validate", "quickstart", "--set", "dataset.name=local", "--set",
                      f"dataset.path={broken}"], mark),
              "column 'image': row 1 is not a decodable image")
    assert not out.exists() and not wait_gone(mark)
