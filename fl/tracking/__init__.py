"""Experiment tracking: TensorBoard, Weights & Biases and MLflow from any run, sweep or
deployment (the ``tracking`` section of an experiment file).

The ServerApp starts the configured trackers (:func:`start_trackers`) and hands them
to the run's :class:`fl.results.RunRecorder`, which passes on every round's record
as it is written and the summary and artifacts at the end: the trackers hang off
the round loop's records, and no strategy knows about them. Each tracker is an
optional pip extra; :func:`missing_packages` is the pre-run check that names it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from fl.tracking.base import TRACKING_JSON, RunInfo, Tracker, Trackers, numeric, read_ids

if TYPE_CHECKING:
    from fl.config import ExperimentConfig

__all__ = ["EXTRAS", "TRACKING_JSON", "RunInfo", "Tracker", "Trackers", "cell_choices",
           "make_trackers", "missing_packages", "numeric", "read_ids", "run_info",
           "start_trackers"]

#: tracker -> (the key that turns it on, the module it needs = its pip extra, its name)
EXTRAS = {
    "tensorboard": ("tracking.tensorboard", "tensorboard", "TensorBoard"),
    "wandb": ("tracking.wandb_project", "wandb", "Weights & Biases"),
    "mlflow": ("tracking.mlflow_uri", "mlflow", "MLflow"),
}


def missing_packages(cfg: ExperimentConfig) -> list[str]:
    """One line per tracker ``cfg`` turns on whose package is not installed, naming the
    pip extra (checked before a run starts: exit 2, nothing started)."""
    problems = []
    for name in cfg.tracking.enabled():
        key, module, label = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            problems.append(f"{key}: {label} needs the {module} package, which is not "
                            f"installed: pip install 'bonsai-fl[{module}]' (in a checkout: "
                            f"pip install -e '.[{module}]'; all trackers: the tracking extra)")
    return problems


def cell_choices(cell: str) -> tuple[tuple[str, str], ...]:
    """``"strategy=fedavg,seed=0"`` (a sweep cell's id) -> its (axis, choice) pairs."""
    pairs = []
    for part in filter(None, (p.strip() for p in cell.split(","))):
        axis, _, choice = part.partition("=")
        pairs.append((axis, choice))
    return tuple(pairs)


def run_info(cfg: ExperimentConfig, run_dir: Path, resume_round: int | None) -> RunInfo:
    """What the trackers know of this run: the flat config without the tracking section
    (where a run is reported is not a hyper-parameter), its name, group and choices."""
    from fl.config import to_flat

    config = {k: v for k, v in to_flat(cfg).items() if not k.startswith("tracking.")}
    return RunInfo(run_dir=Path(run_dir), name=cfg.tracking.cell or Path(run_dir).name,
                   config=config, group=cfg.tracking.group,
                   choices=cell_choices(cfg.tracking.cell), resume_round=resume_round)


def make_trackers(cfg: ExperimentConfig) -> list[Tracker]:
    """The trackers ``cfg`` turns on (nothing is imported or opened yet)."""
    from fl.config import tag_list

    t = cfg.tracking
    out: list[Tracker] = []
    for name in t.enabled():
        if name == "tensorboard":
            from fl.tracking.tensorboard import TensorBoardTracker
            out.append(TensorBoardTracker(t.tensorboard_dir))
        elif name == "wandb":
            from fl.tracking.wandb import WandbTracker
            out.append(WandbTracker(t.wandb_project, t.wandb_entity, t.wandb_mode,
                                    tag_list(t)))
        elif name == "mlflow":
            from fl.tracking.mlflow import MlflowTracker
            out.append(MlflowTracker(t.mlflow_uri, t.mlflow_experiment or cfg.name))
    return out


def start_trackers(cfg: ExperimentConfig, run_dir: Path,
                   resume_round: int | None = None) -> Trackers:
    """Start every tracker ``cfg`` turns on for the run in ``run_dir`` (continuing the
    tracker runs of ``tracking.json`` after ``resume_round``); one that fails to start
    is warned about and left out."""
    trackers = Trackers(make_trackers(cfg))
    if trackers:
        trackers.start(run_info(cfg, run_dir, resume_round))
    return trackers
