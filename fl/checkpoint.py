"""Per-round checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the round it completed, the global model, the strategy's
state (masks, guidance, server momentum, ...) and the running totals of the
round records. It is written atomically (temporary file, then rename) after
each round's record, so an interrupted run always has a consistent one.
Client sampling and client batches are pure functions of (seed, round), so no
random-generator state needs saving.

A checkpoint is read with ``torch.load(weights_only=True)``: PyTorch's restricted
unpickler builds tensors and plain containers only, so a crafted file cannot run
code on ``--resume``. What is saved is therefore plain too (:func:`check_plain`
refuses anything else on save): tensors, dicts, lists, str, int, float, bool
and None. Strategies convert their own objects (Flower's ArrayRecord, numpy
arrays, tuples) to those in ``state_dict`` and back in ``load_state_dict``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl.files import atomic_file

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, unsafe, or from another run."""


#: the leaf types a checkpoint may hold besides tensors (exact types: a numpy float64 is a
#: float subclass that ``weights_only=True`` refuses to load)
PLAIN = (str, int, float, bool, type(None))


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first value in ``obj`` that is not a tensor, a
    str/int/float/bool/None, or a dict (str or int keys) or list of those.

    Tuples and sets are refused too, although PyTorch would load them: keeping to
    dicts and lists makes what is saved exactly what comes back.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in PLAIN:
        return
    if type(obj) in (dict, OrderedDict):  # both load back under weights_only
        for key, value in obj.items():
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; a checkpoint "
                                "holds str or int keys only")
            check_plain(value, f"{where}[{key!r}]")
        return
    if type(obj) is list:
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be "
                    "saved in a checkpoint (tensors, dicts, lists, str, int, float, bool and "
                    "None only: convert it in the strategy's state_dict)")


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    config: str = ""  #: the run's resolved config (JSON), to refuse a different one


def save(run_dir: str | Path, ckpt: Checkpoint) -> None:
    """Write ``run_dir/checkpoint.pt`` atomically; TypeError (nothing written) when the
    checkpoint holds something :func:`load` could not read back (:func:`check_plain`)."""
    path = Path(run_dir) / CHECKPOINT
    data = {"format": FORMAT, "round": ckpt.round, "arrays": dict(ckpt.arrays),
            "strategy": dict(ckpt.strategy), "counters": dict(ckpt.counters),
            "config": ckpt.config}
    check_plain(data)
    with atomic_file(path, "wb") as f:
        torch.save(data, f)


def load(run_dir: str | Path, config_json: str | None = None,
         flag: str = "--resume") -> Checkpoint:
    """Read and check ``run_dir/checkpoint.pt``; CheckpointError says what is wrong, as one
    line starting with ``flag`` (the option that named the folder).

    The file is read with ``weights_only=True``: a file that would build anything but
    tensors and plain containers (a crafted pickle) is refused before any of it runs.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{flag}: {str(run_dir)!r} has no {CHECKPOINT} to resume from")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: one line only
            warnings.simplefilter("ignore")
            data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - torch raises many types on a damaged or unsafe file
        raise CheckpointError(
            f"{flag}: {str(path)!r} is not a valid, safe Bonsai checkpoint (damaged, or it "
            "holds objects other than tensors and plain values); refused without running "
            "anything in it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("round"), int) or not isinstance(data.get("arrays"), Mapping) or not all(
            isinstance(v, torch.Tensor) for v in data["arrays"].values()) or not isinstance(
            data.get("strategy", {}), Mapping) or not isinstance(data.get("counters", {}),
                                                                 Mapping):
        raise CheckpointError(f"{flag}: {str(path)!r} is not a Bonsai checkpoint (format "
                              f"{FORMAT})")
    if config_json is not None and _comparable(data.get("config", "")) != _comparable(config_json):
        raise CheckpointError(
            f"{flag}: {str(run_dir)!r} was made with a different config; resume with the "
            "same experiment file and --set overrides (see its config.json)")
    return Checkpoint(data["round"], dict(data["arrays"]), dict(data.get("strategy", {})),
                      dict(data.get("counters", {})), str(data.get("config", "")))


def _comparable(config_json: str) -> dict[str, Any]:
    import json

    try:
        cfg = json.loads(config_json)
    except (json.JSONDecodeError, TypeError):
        return {"unreadable": config_json}
    if not isinstance(cfg, dict):
        return {"unreadable": config_json}
    cfg.pop("resume", None)
    cfg.pop("run_dir", None)
    cfg.pop("tracking", None)  # where a run is reported may change on resume (fl.config)
    return cfg
