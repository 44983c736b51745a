"""TensorBoard: event files written with torch's ``SummaryWriter`` (pip extra
``tensorboard``).

Scalars take the record's keys as tags and the round as the step; the config goes
to the HParams dashboard (with a sweep cell's choices as ``cell.AXIS``) and, as JSON,
to the text dashboard; the summary is ``summary/KEY`` scalars and text. TensorBoard
keeps no files, so the final model stays in the run folder beside the events.
A resumed run appends a new event file with ``purge_step`` = the first round it
redoes: TensorBoard then hides what the interrupted run logged from that round on
(a run started again in its folder purges from round 0).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl.tracking.base import RunInfo, numeric

__all__ = ["TensorBoardTracker", "event_dir"]

#: the event folder inside the run folder when tracking.tensorboard_dir is empty
DEFAULT_SUBDIR = "tensorboard"
#: scalars the HParams dashboard shows beside each run's hyper-parameters
HPARAM_METRICS = ("accuracy", "loss")


def event_dir(folder: str, run: RunInfo) -> Path:
    """Where a run's event files go: RUN_DIR/tensorboard by default, else a subfolder of
    ``folder`` per run (``folder/GROUP/RUN`` in a sweep), so that ``tensorboard --logdir
    FOLDER`` lists the runs side by side."""
    if not folder:
        return run.run_dir / DEFAULT_SUBDIR
    base = Path(folder)
    return (base / run.group if run.group else base) / run.run_dir.name


class TensorBoardTracker:
    """Event files for TensorBoard (``folder``: tracking.tensorboard_dir, '' = default)."""

    name = "tensorboard"

    def __init__(self, folder: str = ""):
        self.folder = folder
        self.writer: Any = None
        self.dir: Path | None = None
        self.last_step = 0
        self.location = ""

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.dir = event_dir(self.folder, run)
        purge = run.resume_round + 1 if run.resume_round is not None else 0
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge)
        self.location = str(self.dir)
        if run.resumed:  # the hyper-parameters are in the first event file already
            return
        hp = {**run.config, **{f"cell.{axis}": choice for axis, choice in run.choices}}
        for summary in hparams(hp, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", _json_block(run.config))
        self.writer.flush()

    def log_round(self, record: Mapping[str, Any]) -> None:
        step = int(record["round"])
        for key, value in numeric(record).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.last_step = step
        self.writer.flush()  # a TensorBoard watching the folder sees each round as it ends

    def finish(self, summary: Mapping[str, Any], artifacts: Sequence[Path]) -> None:
        for key, value in numeric(summary, skip=()).items():
            self.writer.add_scalar(f"summary/{key}", value, global_step=self.last_step)
        self.writer.add_text("summary", _json_block(summary), global_step=self.last_step)
        self.writer.close()


def _json_block(data: Mapping[str, Any]) -> str:
    """``data`` as an indented JSON code block (TensorBoard renders text as markdown)."""
    text = json.dumps(dict(data), indent=2, default=str)
    return "\n".join("    " + line for line in text.splitlines())
