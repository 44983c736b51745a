"""One experiment in Flower's simulation runtime, start to summary.

:func:`run_simulation` prepares the results folder (fl.rundir), writes the
run-config TOML, starts a private SuperLink (fl.runtime.SimulationRuntime), runs
``flwr run`` with the federation this experiment needs (on a private Ray, a share of
this machine or an existing Ray cluster: fl.scaleout), shows the live table
(fl.progress) and returns the ServerApp's summary; the runtime ends every process
on the way out, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fl.config import ExperimentConfig
from fl.flowerapp import write_run_config
from fl.procgroup import RuntimeFailure
from fl.progress import watch
from fl.results import ROUNDS_CSV, ROUNDS_JSONL, RUN_CONFIG_TOML, STOPPING, SUMMARY_JSON
from fl.rundir import prepare_run_dir
from fl.runtime import SimulationRuntime
from fl.scaleout import RayTarget, machine_resources

__all__ = ["cohort_workers", "federation_config", "run_simulation", "visible_gpus", "wait_run"]


def federation_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Flower's federation settings for this experiment (SuperNodes and their resources):
    one SuperNode per client, or in cohort mode (``simulation.cohort_size``) one per
    worker (:func:`cohort_workers`)."""
    return {
        "num-supernodes": (cohort_workers(cfg) if cfg.simulation.cohort_size
                           else cfg.partition.num_clients),
        "client-resources-num-cpus": cfg.resources.client_cpus,
        "client-resources-num-gpus": cfg.resources.client_gpus,
    }


def visible_gpus() -> int:
    """CUDA devices this process may use, without importing torch: CUDA_VISIBLE_DEVICES
    when set, else the NVIDIA driver's device list."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d.strip() for d in env.split(",") if d.strip()]
        return len(ids) if ids and not ids[0].startswith("-") else 0
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def cohort_workers(cfg: ExperimentConfig) -> int:
    """Worker SuperNodes of a cohort-mode simulation: ``simulation.workers`` when set,
    else from the hardware: as many as run at once, i.e. one per ``resources.client_cpus``
    CPU cores this process may use (what a local Ray cluster offers), and with
    ``resources.client_gpus`` > 0 on a GPU machine 1/client_gpus per card (0.25: four
    workers share a card) when that is fewer; at most one per client."""
    if cfg.simulation.workers:
        return cfg.simulation.workers
    n = max(1, machine_resources()[0] // cfg.resources.client_cpus)
    gpus = visible_gpus() if cfg.resources.device != "cpu" else 0
    if cfg.resources.client_gpus > 0 and gpus:
        n = min(n, max(1, gpus * math.floor(1 / cfg.resources.client_gpus + 1e-9)))
    return max(1, min(n, cfg.partition.num_clients))


def run_simulation(cfg: ExperimentConfig, console: Console | None = None,
                   live: bool = True, ray: RayTarget | None = None) -> dict[str, Any]:
    """Run ``cfg`` through ``flwr run`` on a private SuperLink; return its summary.

    ``ray``: where the simulation's Ray runs (fl.scaleout; default: the cluster
    ``RAY_ADDRESS`` names, else a private Ray of the whole machine). Raises
    RuntimeFailure when the run does not produce a summary.
    """
    ray = ray if ray is not None else RayTarget.from_env()
    console = console or Console()
    run_dir = prepare_run_dir(cfg)
    run_config = write_run_config(cfg, run_dir / RUN_CONFIG_TOML)
    (run_dir / STOPPING).unlink(missing_ok=True)  # from an interrupted run being resumed
    if not cfg.resume:  # a run restarted at round 1 (stopped before it) starts new records
        for name in (ROUNDS_JSONL, ROUNDS_CSV):
            (run_dir / name).unlink(missing_ok=True)
    summary_path = run_dir / SUMMARY_JSON
    try:
        with SimulationRuntime(run_dir, ray=ray) as rt:
            try:
                proc = rt.flwr_run(run_config, ray.federation(federation_config(cfg)))
                if live:
                    watch(run_dir, cfg.rounds,
                          lambda: proc.poll() is None and not summary_path.exists(), console)
                rc = wait_run(proc, summary_path)
                if rc is None:  # all is saved: what is left is Flower's and Ray's shutdown
                    rt.close(grace=0.0)
            except BaseException:
                # before the processes are ended: the server then records no further
                # round, since the replies of the open one fail with the clients
                (run_dir / STOPPING).touch()
                raise
    except BaseException:
        # also when stopped while the SuperLink was still starting (no round yet)
        (run_dir / STOPPING).touch()
        raise
    if not summary_path.exists():
        tail = (run_dir / "flower.log").read_text(errors="replace").splitlines()[-25:]
        raise RuntimeFailure(
            f"the run ended (flwr exit code {rc}) without a summary; last lines of "
            f"{run_dir / 'flower.log'}:\n" + "\n".join(tail)
        )
    return json.loads(summary_path.read_text())


def wait_run(proc: subprocess.Popen, summary_path: Path, poll: float = 0.1) -> int | None:
    """Wait until ``flwr run`` exits or the ServerApp has written ``summary_path``, its
    last act; return the exit code, or None when the summary came first.

    After the summary Flower still spends seconds ending the run and shutting Ray
    down; the caller then ends those processes at once instead.
    """
    while proc.poll() is None:
        if summary_path.exists():
            return None
        time.sleep(poll)
    return proc.returncode
