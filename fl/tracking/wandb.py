"""Weights & Biases (pip extra ``wandb``): one W&B run per Bonsai run.

The config is the run's config (nested as in the experiment file, plus a sweep
cell's choices under ``cell``), the round is the step of every ``log``, the summary
fills the run summary, and the final model and ``structure.json`` are one artifact
of type ``model``. A sweep's cells share a group (the study's name) and carry their
choices as tags (``AXIS=CHOICE``). The run id is kept in the run folder's
``tracking.json``: ``bonsai run --resume`` continues the same W&B run.

Offline runs are written under ``$WANDB_DIR`` when it is set, else under the run
folder (``RUN_DIR/wandb/offline-run-*``); ``wandb sync`` uploads them later. The
console is not captured (Flower owns the ServerApp's output).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl.dotted import nest
from fl.tracking.base import RunInfo, new_run_id, numeric, read_ids, write_ids

__all__ = ["WandbTracker"]

#: W&B's longest tag
TAG_MAX = 64


class WandbTracker:
    """A W&B run in ``project`` (and ``entity``), ``mode`` online or offline."""

    name = "wandb"

    def __init__(self, project: str, entity: str = "", mode: str = "online",
                 tags: Sequence[str] = ()):
        self.project, self.entity, self.mode, self.tags = project, entity, mode, list(tags)
        self.run: Any = None
        self.location = ""

    def start(self, run: RunInfo) -> None:
        import wandb

        where = {"project": self.project, "entity": self.entity}
        old = read_ids(run.run_dir).get(self.name, {})
        same_place = all(old.get(k) == v for k, v in where.items())
        run_id = old.get("run_id") if run.resumed and same_place else None
        run_id = run_id or new_run_id()
        write_ids(run.run_dir, self.name, {"run_id": run_id, **where})
        config = nest(dict(run.config))
        if run.choices:
            config["cell"] = dict(run.choices)
        tags = self.tags + [f"{axis}={choice}"[:TAG_MAX] for axis, choice in run.choices]
        self.run = wandb.init(
            project=self.project, entity=self.entity or None, mode=self.mode, id=run_id,
            resume="allow", name=run.name, group=run.group or None, tags=tags or None,
            config=config, dir=None if os.environ.get("WANDB_DIR") else str(run.run_dir),
            settings=wandb.Settings(console="off"))
        where = self.run.url if self.mode == "online" else Path(self.run.dir).parent
        self.location = f"{self.mode} run {run_id} of project {self.project}: {where}"

    def log_round(self, record: Mapping[str, Any]) -> None:
        self.run.log(numeric(record), step=int(record["round"]))

    def finish(self, summary: Mapping[str, Any], artifacts: Sequence[Path]) -> None:
        import wandb

        self.run.summary.update({k: v for k, v in summary.items()
                                 if isinstance(v, (int, float, str)) and v is not None})
        if artifacts:
            art = wandb.Artifact(f"model-{self.run.id}", type="model",
                                 description="final global model and its structure")
            for path in artifacts:
                art.add_file(str(path))
            self.run.log_artifact(art)
        self.run.finish()
