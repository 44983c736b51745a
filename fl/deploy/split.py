"""``bonsai deploy split``: one node's data file per partition of an experiment's dataset.

What a loopback federation (``bonsai deploy local``) or a real one needs when the
data is central today: each partition of the experiment's split, with the
partitioner and seed of the simulation, as ``node-i.npz`` (``x``, ``y`` and the
global ``num_classes``, for nodes that lack the highest classes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl.config import ExperimentConfig
from fl.data import load_federated, prepare

__all__ = ["write_split"]


def write_split(cfg: ExperimentConfig, out: str | Path) -> list[Path]:
    """Check ``cfg``'s data and model (fl.data.prepare, DataError), then write one
    ``node-i.npz`` per partition into ``out``; return their paths."""
    prepare(cfg)
    fd = load_federated(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(fd.partitions)):
        a = fd.client(i)
        p = out / f"node-{i}.npz"
        np.savez_compressed(p, x=a.x.numpy(), y=a.y.numpy(), num_classes=np.int64(fd.num_classes))
        paths.append(p)
    return paths
