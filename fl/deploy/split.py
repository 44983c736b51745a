"""``bonsai deploy split``: one node's data file per partition of an experiment's dataset.

What a loopback federation (``bonsai deploy local``) or a real one needs when the
data is central today: each partition of the experiment's split, with the
partitioner and seed of the simulation, as ``node-i.npz``: ``x`` as stored (float32,
uint8 images, int64 token ids), ``y``, the global ``num_classes`` (for nodes that
lack the highest classes) and, when the experiment normalises, the pool's
per-channel ``mean`` and ``std`` (so every node scales its batches as the
simulation's clients do: fl.nodedata.local_node_data).
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
    tf = fd.train.transform
    stats = ({"mean": np.asarray(tf.mean, np.float64), "std": np.asarray(tf.std, np.float64)}
             if tf.mean is not None and tf.std is not None else {})
    for i in range(len(fd.partitions)):
        a = fd.client(i)
        p = out / f"node-{i}.npz"
        np.savez_compressed(p, x=a.x.numpy(), y=a.y.numpy(), num_classes=np.int64(fd.num_classes),
                            **stats)
        paths.append(p)
    return paths
