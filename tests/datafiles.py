"""Small data files and configs the tests write (test helpers, not part of the library)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl.config import ExperimentConfig, load


def digits_cfg(*extra: str) -> ExperimentConfig:
    """The digits experiment with a cnn and two clients, plus ``extra`` overrides."""
    return load(None, ["dataset.name=digits", "model=cnn", "partition.num_clients=2", *extra])


def write_npz(path: Path, x: np.ndarray, y: np.ndarray, **extra: object) -> Path:
    """An .npz with ``x``, ``y`` and any ``extra`` arrays; returns its path."""
    np.savez(path, x=x, y=y, **extra)
    return path
