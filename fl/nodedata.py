"""What one node trains on (:func:`node_data`): in simulation its partition of the
configured dataset; deployed, its own file or folder (``data-path`` in the node
config), checked against the experiment's model without loading the experiment's
dataset when that cannot be done cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl.config import ExperimentConfig, requires_image
from fl.data import Arrays, load_federated
from fl.node import DATA_PATH, NUM_CLASSES, NUM_PARTITIONS, PARTITION_ID
from fl.transforms import BatchTransform
from fl.userdata import DataError, check_labels, example_shape, load_local


@dataclass(frozen=True)
class NodeData:
    """What one node trains on: its id in the population order and its examples."""

    partition_id: int
    data: Arrays
    input_shape: tuple[int, ...]
    num_classes: int


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


#: (input_shape, num_classes) of the bundled datasets, known without loading them
DIGITS_INFO = ((1, 8, 8), 10)
SYNTHETIC_INFO = ((60,), 10)  # synthetic(): dim=60, classes=10


def _expected(cfg: ExperimentConfig) -> tuple[tuple[int, ...], int] | None:
    """(input_shape, num_classes) of the experiment's model when this machine can tell
    cheaply (a bundled dataset, or the experiment's .npz is here), else None.

    Runs in every ClientApp call of a deployed node, so it never imports
    scikit-learn or splits a dataset.
    """
    d = cfg.dataset
    if d.name == "digits":
        return DIGITS_INFO
    if d.name == "synthetic":
        return SYNTHETIC_INFO
    p = Path(d.path).expanduser()
    if d.name == "npz" and p.is_file():
        try:
            with np.load(p, mmap_mode="r", allow_pickle=False) as f:
                return (example_shape(tuple(int(s) for s in f["x"].shape[1:])),
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
