"""Per-round checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the round it completed, the global model, the strategy's
state (masks, guidance, server momentum, ...) and the running totals of the
round records. It is written atomically (temporary file, then rename) after
each round's record, so an interrupted run always has a consistent one.
Client sampling and client batches are pure functions of (seed, round), so no
random-generator state needs saving.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupted, or from another run."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    config: str = ""  #: the run's resolved config (JSON), to refuse a different one


def save(run_dir: str | Path, ckpt: Checkpoint) -> None:
    """Write ``run_dir/checkpoint.pt`` atomically."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": FORMAT, "round": ckpt.round, "arrays": ckpt.arrays,
                "strategy": ckpt.strategy, "counters": ckpt.counters, "config": ckpt.config},
               tmp)
    os.replace(tmp, path)


def load(run_dir: str | Path, config_json: str | None = None) -> Checkpoint:
    """Read and check ``run_dir/checkpoint.pt``; CheckpointError says what is wrong."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"--resume: {str(run_dir)!r} has no {CHECKPOINT} to resume from")
    try:
        data = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # torch raises many types on a damaged file
        raise CheckpointError(
            f"--resume: {str(path)!r} is corrupted ({type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("round"), int) or not isinstance(data.get("arrays"), dict):
        raise CheckpointError(f"--resume: {str(path)!r} is not a Bonsai checkpoint (format "
                              f"{FORMAT})")
    if config_json is not None and _comparable(data.get("config", "")) != _comparable(config_json):
        raise CheckpointError(
            f"--resume: {str(run_dir)!r} was made with a different config; resume with the "
            "same experiment file and --set overrides (see its config.json)")
    return Checkpoint(data["round"], data["arrays"], data.get("strategy", {}),
                      data.get("counters", {}), data.get("config", ""))


def _comparable(config_json: str) -> dict[str, Any]:
    import json

    try:
        cfg = json.loads(config_json)
    except json.JSONDecodeError:
        return {"unreadable": config_json}
    cfg.pop("resume", None)
    cfg.pop("run_dir", None)
    return cfg
