"""MLflow (pip extra ``mlflow``): one MLflow run per Bonsai run, through ``MlflowClient``.

The flat config becomes the run's params, every round's numbers its metrics (the
round is the step), the summary ``summary/KEY`` metrics and a ``summary.json``
artifact, and the final model and ``structure.json`` artifacts. A sweep's cells
carry the study (``bonsai.group``), the cell id (``bonsai.cell``) and each choice
(``cell.AXIS``) as tags, in one experiment named after the study, so MLflow's
compare view lines them up. The run id is kept in the run folder's
``tracking.json``: ``bonsai run --resume`` continues the same MLflow run.

A server URI is checked with one TCP connection (5 s) before anything else: MLflow's
client retries a refused connection for minutes, which would stall the first
round. For a ``sqlite:///`` store, a new experiment keeps its artifacts in
``mlruns/`` beside the database file (what ``mlflow ui`` run from that folder
expects); the process's own folder would be a temporary one.
"""

from __future__ import annotations

import socket
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fl.tracking.base import RunInfo, numeric, read_ids, write_ids

__all__ = ["MlflowTracker", "artifact_location"]

#: seconds the reachability check of a tracking server may take
CONNECT_TIMEOUT = 5.0
#: MLflow's limits per log_batch call, and on a param value's length
MAX_PARAMS, MAX_METRICS, MAX_PARAM_CHARS = 100, 1000, 6000


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a ``sqlite:///`` store keeps artifacts (``mlruns/``
    beside the database); None elsewhere (the store or server decides)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.is_absolute():
            return (db.parent / "mlruns").as_uri()
    return None


def check_reachable(uri: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise ConnectionError when an http(s) tracking server cannot be connected to."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach {uri}: {e.strerror or e}") from None


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MlflowTracker:
    """An MLflow run at tracking URI ``uri`` in experiment ``experiment``."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.client: Any = None
        self.run_id = ""
        self.last_step = 0
        self.location = ""

    def start(self, run: RunInfo) -> None:
        check_reachable(self.uri)
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            exp_id = self.client.create_experiment(self.experiment,
                                                   artifact_location=artifact_location(self.uri))
        elif exp.lifecycle_stage == "deleted":
            raise RuntimeError(f"experiment {self.experiment!r} was deleted; restore it "
                               "(mlflow experiments restore) or name another one")
        else:
            exp_id = exp.experiment_id
        where = {"uri": self.uri, "experiment_id": exp_id}
        old = read_ids(run.run_dir).get(self.name, {})
        if run.resumed and old.get("run_id") and all(old.get(k) == v for k, v in where.items()):
            try:
                self.client.update_run(old["run_id"], status="RUNNING")
                self.run_id = old["run_id"]
                self.last_step = run.resume_round or 0
            except MlflowException:
                self.run_id = ""  # gone from the store: a new run below
        if not self.run_id:
            tags = {"bonsai.run_dir": str(run.run_dir), "bonsai.group": run.group,
                    "bonsai.cell": ",".join(f"{a}={c}" for a, c in run.choices),
                    **{f"cell.{axis}": choice for axis, choice in run.choices}}
            created = self.client.create_run(exp_id, run_name=run.name,
                                             tags={k: v for k, v in tags.items() if v})
            self.run_id = created.info.run_id
            params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in run.config.items()]
            for chunk in _chunks(params, MAX_PARAMS):
                self.client.log_batch(self.run_id, params=chunk)
        write_ids(run.run_dir, self.name, {"run_id": self.run_id, **where})
        self.location = f"run {self.run_id} of experiment {self.experiment!r} at {self.uri}"

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for chunk in _chunks(batch, MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_round(self, record: Mapping[str, Any]) -> None:
        self.last_step = int(record["round"])
        self._log(numeric(record), self.last_step)

    def finish(self, summary: Mapping[str, Any], artifacts: Sequence[Path]) -> None:
        self._log({f"summary/{k}": v for k, v in numeric(summary, skip=()).items()},
                  self.last_step)
        self.client.log_dict(self.run_id, dict(summary), "summary.json")
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")
