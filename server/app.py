"""Bonsai's ServerApp: read the experiment config, discover the federation, run
the strategy's rounds with centralized evaluation, write the results folder."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fl import contract
from fl.checkpoint import load as load_checkpoint
from fl.config import ExperimentConfig, from_flat, to_json
from fl.data import load_test
from fl.models import build_model
from fl.results import STOPPING, RunRecorder
from fl.tracking import start_trackers
from fl.train import evaluate, pick_device, spare_cores
from server.cohorts import CohortGrid
from server.guard import NodeGuard
from server.guidance_check import GuidanceCheck
from server.population import FederationError, Membership, discover, discover_workers
from server.rounds import run_rounds
from strategies import build_strategy

app = ServerApp()


def run_dir_for(cfg: ExperimentConfig) -> Path:
    """``run_dir`` when set (``bonsai run`` sets it), else OUTPUT_DIR/NAME-TIMESTAMP."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output_dir).resolve() / f"{cfg.name}-{stamp}"


def stop_flag() -> threading.Event:
    """An event set once Flower starts shutting this process down (its SIGINT/SIGTERM
    handler runs the exit handlers while the ServerApp's thread goes on)."""
    event = threading.Event()
    try:
        from flwr.supercore.exit import add_exit_handler
    except ImportError:  # pragma: no cover - an older or newer Flower layout
        return event
    add_exit_handler(event.set, run_before_force_exit=True)
    return event


def run_experiment(grid: Grid, cfg: ExperimentConfig,
                   stop: threading.Event | None = None) -> dict:
    """Run one experiment on ``grid`` and return its summary.

    The round loop stops without recording the open round once ``stop`` is set or
    ``bonsai run`` has written STOPPING into the results folder (it does so before
    it ends the run's processes, Ctrl-C included): that round's clients were
    stopped with it, so its failed replies must not become the checkpoint.
    """
    t0 = time.perf_counter()
    recorder = RunRecorder(run_dir_for(cfg))
    config_json = to_json(cfg)
    resume_from = None
    if cfg.resume:
        resume_from = load_checkpoint(recorder.dir, config_json)
        recorder.truncate(resume_from.round)
    else:
        recorder.write_config(config_json)
    log(20, "results folder: %s", recorder.dir)
    # TensorBoard / W&B / MLflow get each record as the recorder writes it (fl.tracking)
    recorder.trackers = start_trackers(cfg, recorder.dir,
                                       resume_from.round if resume_from else None)
    for name, where in recorder.trackers.locations.items():
        log(20, "tracking: %s -> %s", name, where)
    fd = load_test(cfg)  # the test split only: nodes bring or hold their own data
    model = build_model(cfg.model, fd.input_shape, fd.num_classes, seed=cfg.seed)
    device = pick_device(cfg.resources.device)
    threads = spare_cores()  # cores torch leaves idle (OMP_NUM_THREADS=1): evaluate on them

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, fd.test, device, threads=threads)
        model.to("cpu")
        return {"accuracy": acc, "loss": loss}

    strategy = build_strategy(cfg, model.state_dict(), fd.input_shape, fd.num_classes)
    t_discover = time.perf_counter()  # one query per node: seconds at 1000 simulated nodes
    cohorts: CohortGrid | None = None
    members: Membership | None = None
    extra: dict = {}
    if cfg.simulation.cohort_size:  # a few workers train the clients (server/cohorts.py)
        workers = discover_workers(grid, cfg.simulation.workers or None,
                                   cfg.strategy.round_timeout)
        grid = cohorts = CohortGrid(grid, workers, cfg.partition.num_clients,
                                     sticky=strategy.clients_keep_state())
        strategy.set_population(cohorts.clients())
    else:
        if cfg.partition.num_clients == 0:  # `bonsai run` resolves it before Flower starts
            raise FederationError("partition.num_clients: got 0 (one client per id); "
                                  "`bonsai run` counts the ids first; with `flwr run`, set "
                                  "the count and --federation-config num-supernodes to it")
        members = discover(grid, cfg.partition.num_clients, cfg.strategy.round_timeout)
        strategy.set_population(members.order)
    discovery_seconds = time.perf_counter() - t_discover
    # a node that crashed must not leave Flower's sampler waiting forever, and a message
    # must not outlive its round (deployment)
    grid = NodeGuard(grid, cfg.strategy.min_train_clients, cfg.strategy.round_timeout)

    def rejoin(server_round: int) -> None:  # a node back under a new id (no node auth)
        if members is not None and members.refresh(grid, cfg.strategy.round_timeout):
            strategy.set_population(members.order)

    train_config = ConfigRecord({contract.MARGIN_LAMBDA: cfg.objective.margin_lambda})
    guidance_check = None
    if cfg.diagnostics.guidance_every:
        guidance_check = GuidanceCheck(cfg.model, fd.input_shape, fd.num_classes, fd.test,
                                       cfg.diagnostics.guidance_every,
                                       cfg.diagnostics.guidance_units, cfg.seed, recorder.dir)
        if resume_from is not None:
            guidance_check.truncate(resume_from.round)
    final = run_rounds(grid, strategy, ArrayRecord(model.state_dict()), cfg.rounds,
                       train_config, evaluate_fn, recorder, cfg.strategy.round_timeout,
                       decompose_every=cfg.diagnostics.decomposition_every,
                       resume_from=resume_from, config_json=config_json,
                       stopping=lambda: (stop is not None and stop.is_set())
                       or (recorder.dir / STOPPING).exists(),
                       on_round_start=rejoin if members is not None else None,
                       partition_of=members.partition_id if members is not None
                       else (lambda n: n),  # cohort mode: the pseudo node id is the partition
                       guidance_check=guidance_check, cohorts=cohorts,
                       overlap=cfg.simulation.overlaps_evaluation(device.type))
    if cohorts is not None:
        extra = cohort_summary(cfg, cohorts, recorder.rounds)
    torch.save(final.to_torch_state_dict(), recorder.dir / "final_model.pt")
    structure = strategy.structure_json()
    if structure is not None:
        (recorder.dir / "structure.json").write_text(structure + "\n")
    return recorder.write_summary({"strategy": cfg.strategy.name, "model": cfg.model,
                                   "dataset": cfg.dataset.name,
                                   "wall_seconds": round(time.perf_counter() - t0, 2),
                                   "discovery_seconds": round(discovery_seconds, 2),
                                   "run_dir": str(recorder.dir), **extra},
                                  artifacts=[recorder.dir / "final_model.pt",
                                             recorder.dir / "structure.json"])


def cohort_summary(cfg: ExperimentConfig, cohorts: CohortGrid,
                   rounds: list[dict]) -> dict:
    """What summary.json says about a cohort-mode run: its workers and what the bytes
    mean (per client, as one client per message sends them), and the packed totals."""
    return {
        "cohorts": {"cohort_size": cfg.simulation.cohort_size,
                    "workers": len(cohorts.workers), "mode": cfg.simulation.cohort_mode},
        "bytes_counted": "per client, as the one-client-per-message protocol sends them "
                         "(what a deployment pays); packed_bytes_*: the packed messages",
        "total_packed_bytes_down": sum(r.get("packed_bytes_down", 0) for r in rounds),
        "total_packed_bytes_up": sum(r.get("packed_bytes_up", 0) for r in rounds),
    }


#: seconds between the simulation grid's polls for replies: Flower's InMemoryGrid
#: sleeps 0.1 s between polls, so replies wait 0.05 s on average in each exchange of
#: a round of ~3 s (cohort mode); a poll only reads the in-memory link state
REPLY_POLL_SECONDS = 0.01


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls: the experiment config is the run config."""
    if isinstance(grid, InMemoryGrid):  # a simulation (deployment: Flower's HttpGrid)
        grid.pull_interval = REPLY_POLL_SECONDS
    run_experiment(grid, from_flat(context.run_config), stop=stop_flag())
