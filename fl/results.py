"""Per-round records, the run summary, and the files a user plots.

A run directory holds:
  config.json    the resolved experiment config
  rounds.jsonl   one JSON object per round, appended and flushed as it ends
  rounds.csv     the same records as a table (rewritten each round)
  summary.json   final and best accuracy, totals, wall time

The recorder also passes every round's record, the summary and the artifacts on to
the run's experiment trackers (fl.tracking) as it writes them.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl.files import atomic_file, atomic_write_json, atomic_write_text
from fl.tracking.base import Trackers

ROUNDS_JSONL = "rounds.jsonl"
ROUNDS_CSV = "rounds.csv"
SUMMARY_JSON = "summary.json"
CONFIG_JSON = "config.json"
#: the Flower run config ``bonsai run`` writes into the results folder before Flower starts
RUN_CONFIG_TOML = "run_config.toml"
#: written by ``bonsai run`` into the results folder before it stops the run's
#: processes: the server records no round after it (server/rounds.py)
STOPPING = "STOPPING"


class RunRecorder:
    """Writes the records of one run as they happen (nothing lost on a crash), and hands
    them to ``trackers`` (fl.tracking; none by default) as it goes."""

    def __init__(self, run_dir: str | Path, trackers: Trackers | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        self.trackers = trackers if trackers is not None else Trackers()

    def truncate(self, last_round: int) -> None:
        """Keep the records up to ``last_round`` (resuming from its checkpoint); the
        trackers have them already."""
        self.rounds = [r for r in read_rounds(self.dir) if r.get("round", 0) <= last_round]
        (self.dir / ROUNDS_JSONL).unlink(missing_ok=True)
        kept, self.rounds = self.rounds, []
        for r in kept:
            self._write_round(r)

    def write_config(self, config_json: str) -> None:
        atomic_write_text(self.dir / CONFIG_JSON, config_json + "\n")

    def add_round(self, record: Mapping[str, Any]) -> None:
        """Append one round: a line of rounds.jsonl (flushed), the whole CSV, and the
        record to the trackers."""
        self._write_round(record)
        self.trackers.log_round(self.rounds[-1])

    def _write_round(self, record: Mapping[str, Any]) -> None:
        rec = dict(record)
        self.rounds.append(rec)
        with open(self.dir / ROUNDS_JSONL, "a") as f:
            f.write(json.dumps(rec, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        columns: list[str] = []
        for r in self.rounds:
            columns += [k for k in r if k not in columns]
        with atomic_file(self.dir / ROUNDS_CSV, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(self.rounds)

    def write_summary(self, extra: Mapping[str, Any] | None = None,
                      artifacts: Sequence[str | Path] = ()) -> dict[str, Any]:
        """Summarise the rounds so far into summary.json and return it.

        The trackers get the summary and ``artifacts`` (files) first: summary.json is
        the run's last act (``bonsai run`` ends the processes once it exists)."""
        summary = summarize(self.rounds)
        summary.update(extra or {})
        self.trackers.finish(summary, [Path(a) for a in artifacts])
        atomic_write_json(self.dir / SUMMARY_JSON, summary)
        return summary


def summarize(rounds: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Final and best accuracy, totals of bytes and seconds over the trained rounds."""
    trained = [r for r in rounds if r.get("round", 0) > 0]
    if not rounds:
        return {"rounds": 0}
    acc = [r["accuracy"] for r in rounds if "accuracy" in r]
    last = rounds[-1]
    return {
        "rounds": len(trained),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "best_accuracy": max(acc) if acc else None,
        "best_round": rounds[acc.index(max(acc))]["round"] if acc else None,
        # round 0 holds AutoFLIP's exploration: it counts in every total
        "total_bytes_down": sum(r.get("bytes_down", 0) for r in rounds),
        "total_bytes_up": sum(r.get("bytes_up", 0) for r in rounds),
        "total_bytes": sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rounds),
        "total_train_flops": sum(r.get("train_flops", 0) for r in rounds),
        "bytes_saved": last.get("bytes_saved"),
        "train_seconds": sum(r.get("seconds", 0.0) for r in trained),
    }


def read_rounds(run_dir: str | Path) -> list[dict[str, Any]]:
    """The round records of a run directory (tolerates a half-written last line)."""
    path = Path(run_dir) / ROUNDS_JSONL
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _flat(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The flat config (dotted keys) a Bonsai run folder was made with: its
    ``config.json`` (written by the server), else its ``run_config.toml`` (written
    by ``bonsai run`` before Flower starts); None when it holds neither readable."""
    import tomllib

    d = Path(run_dir)
    for name, parse in ((CONFIG_JSON, json.loads), (RUN_CONFIG_TOML, tomllib.loads)):
        try:
            data = parse((d / name).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(data, Mapping):
            return _flat(data)
    return None
