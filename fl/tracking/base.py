"""One interface for the experiment trackers and a fan-out that keeps them harmless.

A :class:`Tracker` is told about a run three times: :meth:`~Tracker.start` (the
resolved config as hyper-parameters), :meth:`~Tracker.log_round` (every round's
record as metrics, the round as the step) and :meth:`~Tracker.finish` (the
summary, and the final model and ``structure.json`` as artifacts). The round loop
talks to :class:`Trackers`, which calls each one and catches whatever it raises:
the first failure of a tracker logs one warning and turns that tracker off for the
rest of the run, so training never dies because of logging (pfl-research hangs its
callbacks off the loop the same way; no strategy knows about them).

Nothing here imports a tracker's library: each module (``tensorboard``, ``wandb``,
``mlflow``) imports its own when it starts.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fl.dotted import flatten
from fl.files import atomic_write_json

__all__ = ["TRACKING_JSON", "RunInfo", "Tracker", "Trackers", "numeric", "read_ids",
           "new_run_id", "write_ids"]

#: the run folder's record of the tracker runs it logs to (what ``--resume`` continues)
TRACKING_JSON = "tracking.json"

_log = logging.getLogger("fl.tracking")


@dataclass(frozen=True)
class RunInfo:
    """What every tracker knows of the run it logs.

    ``name`` is what the tracker's UI shows (a sweep cell's id, else the run folder's
    name), ``group`` gathers related runs (a sweep: the study's name), ``choices`` are a
    sweep cell's (axis, choice) pairs, and ``resume_round`` is the checkpoint round a
    resumed run continues after (None: a new run).
    """

    run_dir: Path
    name: str
    config: Mapping[str, Any]
    group: str = ""
    choices: tuple[tuple[str, str], ...] = ()
    resume_round: int | None = None

    @property
    def resumed(self) -> bool:
        return self.resume_round is not None


class Tracker(Protocol):
    """An experiment tracker the round loop writes to (through :class:`Trackers`)."""

    #: short name in messages: ``tensorboard``, ``wandb``, ``mlflow``
    name: str
    #: where the run is, once started (a folder, a run id and URL): for the server's log
    location: str

    def start(self, run: RunInfo) -> None:
        """Open (or, resuming, continue) the tracker's run and log the config."""

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Log one round's record; ``record["round"]`` is the step."""

    def finish(self, summary: Mapping[str, Any], artifacts: Sequence[Path]) -> None:
        """Log the summary and the artifact files, and close the run."""


class Trackers:
    """Every configured tracker behind one object; a tracker that raises is warned about
    once and left out from then on. Empty (no tracker) costs nothing."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self._on: list[Tracker] = list(trackers)
        self.failed: dict[str, str] = {}  # tracker name -> what went wrong (its warning)

    @property
    def names(self) -> list[str]:
        """The trackers still logging."""
        return [t.name for t in self._on]

    @property
    def locations(self) -> dict[str, str]:
        """Tracker name -> where its run is, for the trackers still logging."""
        return {t.name: t.location for t in self._on}

    def __bool__(self) -> bool:
        return bool(self._on)

    def start(self, run: RunInfo) -> None:
        for t in list(self._on):
            self._call(t, "start", lambda t=t: t.start(run))

    def log_round(self, record: Mapping[str, Any]) -> None:
        for t in list(self._on):
            self._call(t, f"logging round {record.get('round')}",
                       lambda t=t: t.log_round(record))

    def finish(self, summary: Mapping[str, Any], artifacts: Sequence[Path] = ()) -> None:
        """Close every tracker's run; afterwards the fan-out is empty."""
        present = [Path(a) for a in artifacts if Path(a).is_file()]
        for t in list(self._on):
            self._call(t, "finish", lambda t=t: t.finish(summary, present))
        self._on.clear()

    def _call(self, tracker: Tracker, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure of a tracker, by design
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            self.failed[tracker.name] = why
            self._on.remove(tracker)
            _log.warning("tracking: %s failed at %s (%s); %s is off for the rest of this "
                         "run (the results folder is complete)", tracker.name, what,
                         why[:300], tracker.name)


def numeric(record: Mapping[str, Any], skip: Sequence[str] = ("round",)) -> dict[str, float]:
    """The numbers of a record as metrics: nested mappings flattened to dotted keys;
    booleans, strings, lists and ``skip`` left out (the round is the step, not a metric)."""
    out: dict[str, float] = {}
    for key, value in flatten(record).items():
        if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = float(value)
    return out


def read_ids(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The tracker runs recorded in the run folder's ``tracking.json`` (empty when
    there is none or it is unreadable: a new tracker run is then started)."""
    try:
        data = json.loads((Path(run_dir) / TRACKING_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) \
        else {}


def write_ids(run_dir: Path, tracker: str, entry: Mapping[str, Any]) -> None:
    """Record ``tracker``'s run (its id and where it lives) in ``tracking.json``."""
    data = read_ids(run_dir)
    data[tracker] = dict(entry)
    atomic_write_json(Path(run_dir) / TRACKING_JSON, data)


def new_run_id(length: int = 8) -> str:
    """A fresh run id of lowercase letters and digits (W&B's own form)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))
