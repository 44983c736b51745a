"""``bonsai run FILE [--set KEY=VALUE ...]``: one experiment in Flower's simulation
runtime (Ray), with a live per-round table, a results folder, and nothing left
running afterwards."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from fl import interrupts
from fl.cli.common import DEFAULT_EXPERIMENT, check_data, fail, load_or_fail
from fl.config import FIELDS, ExperimentConfig, config_differences, to_flat, to_json
from fl.flowerapp import write_run_config
from fl.progress import human_bytes, watch
from fl.results import (
    CONFIG_JSON,
    ROUNDS_CSV,
    ROUNDS_JSONL,
    RUN_CONFIG_TOML,
    STOPPING,
    SUMMARY_JSON,
    read_run_config,
)
from fl.runtime import RuntimeFailure, SimulationRuntime


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment in Flower's simulation runtime")
    p.add_argument("file", nargs="?", default=DEFAULT_EXPERIMENT,
                   help=f"an experiment file, or the name of a shipped one (default: "
                        f"{DEFAULT_EXPERIMENT}; `bonsai init DIR` copies them)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set rounds=20 --set partition.alpha=0.1")
    p.add_argument("--quiet", action="store_true", help="no live table")
    p.add_argument("--resume", metavar="RESULTS_DIR", default=None,
                   help="continue an interrupted run from its last checkpoint (same file and "
                        "--set overrides)")
    p.set_defaults(func=run)


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
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(1, (cpus or 1) // cfg.resources.client_cpus)
    gpus = visible_gpus() if cfg.resources.device != "cpu" else 0
    if cfg.resources.client_gpus > 0 and gpus:
        n = min(n, max(1, gpus * math.floor(1 / cfg.resources.client_gpus + 1e-9)))
    return max(1, min(n, cfg.partition.num_clients))


class RunDirError(ValueError):
    """The run's folder cannot be made (one line; a user error, exit code 2)."""


def writable_problem(folder: Path, key: str, shown: str) -> str | None:
    """Why a folder cannot be created at or under ``folder``, or None. Probes the
    nearest existing ancestor with a temporary folder it removes at once (permission
    bits do not tell: root ignores them, a read-only mount does not show in them)."""
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return f"{key}: {shown!r}: {str(anc)!r} is a file, not a folder"
    try:
        tempfile.TemporaryDirectory(dir=anc, prefix=".bonsai-probe-").cleanup()
    except OSError as e:
        return f"{key}: {shown!r} cannot be written ({e.strerror or type(e).__name__} in " \
               f"{str(anc)!r})"
    return None


def check_run_dir(cfg: ExperimentConfig, file: str = "FILE") -> str | None:
    """Why ``cfg``'s run cannot start a new results folder, as one line, or None.

    Without ``run_dir``: OUTPUT_DIR must be (or be creatable as) a writable folder.
    With ``run_dir`` (``--set run_dir=DIR``): DIR must be new or an empty folder; a
    Bonsai run folder of the same config is to be continued with ``--resume``, and
    any other non-empty folder is refused, so no run's config.json is overwritten and
    no rounds.jsonl gets another run's rounds appended. Creates nothing.
    """
    if not cfg.run_dir:
        out = Path(cfg.output_dir).expanduser()
        return writable_problem(out.resolve(), "output_dir", cfg.output_dir)
    d = Path(cfg.run_dir).expanduser().resolve()
    if d.exists() and not d.is_dir():
        return f"run_dir: {str(d)!r} is a file, not a folder"
    if d.is_dir() and any(d.iterdir()):
        old = read_run_config(d)
        if old is None or not set(old) & set(FIELDS):
            return (f"run_dir: {str(d)!r} is not empty and holds no Bonsai run; give a new "
                    "or empty folder")
        diffs = config_differences(old, to_flat(cfg))
        if diffs:
            return (f"run_dir: {str(d)!r} holds another run ({'; '.join(diffs[:2])}); give a "
                    "new or empty folder")
        if (d / SUMMARY_JSON).exists():
            return f"run_dir: {str(d)!r} already holds a finished run of this config"
        return (f"run_dir: {str(d)!r} holds an unfinished run of this config; continue it "
                f"with `bonsai run {file} --resume {d}`")
    return writable_problem(d, "run_dir", cfg.run_dir)


def prepare_run_dir(cfg: ExperimentConfig) -> Path:
    """Create OUTPUT_DIR/NAME-TIMESTAMP (absolute) and pin it in the config.

    Raises RunDirError when the folder cannot be created."""
    if not cfg.run_dir:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.output_dir).expanduser().resolve() / f"{cfg.name}-{stamp}"
        path, i = base, 1
        while path.exists():
            path, i = base.with_name(f"{base.name}-{i}"), i + 1
        cfg.run_dir = str(path)
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    if (run_dir / SUMMARY_JSON).exists() and not cfg.resume:
        raise RunDirError(f"run_dir: {str(run_dir)!r} already holds a finished run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"run_dir: {str(run_dir)!r} cannot be created "
                          f"({e.strerror or type(e).__name__})") from None
    cfg.run_dir = str(run_dir)
    return run_dir


def run_simulation(cfg: ExperimentConfig, console: Console | None = None,
                   live: bool = True) -> dict[str, Any]:
    """Run ``cfg`` through ``flwr run`` on a private SuperLink; return its summary.

    Raises RuntimeFailure when the run does not produce a summary.
    """
    console = console or Console()
    run_dir = prepare_run_dir(cfg)
    run_config = write_run_config(cfg, run_dir / RUN_CONFIG_TOML)
    (run_dir / STOPPING).unlink(missing_ok=True)  # from an interrupted run being resumed
    if not cfg.resume:  # a run restarted at round 1 (stopped before it) starts new records
        for name in (ROUNDS_JSONL, ROUNDS_CSV):
            (run_dir / name).unlink(missing_ok=True)
    summary_path = run_dir / SUMMARY_JSON
    with SimulationRuntime(run_dir) as rt:
        try:
            proc = rt.flwr_run(run_config, federation_config(cfg))
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


def check_resume(cfg: ExperimentConfig, run_dir: Path) -> str | None:
    """Point ``cfg`` at ``run_dir`` to resume it; the problem as one line, or None.

    ``output_dir`` is taken from the run's own config (it only said where the folder
    was made), so resuming needs the same experiment file and ``--set`` overrides but
    not the original ``--set output_dir``. A run stopped before its first round ended
    has no checkpoint: it is started again from round 1 in the same folder (``cfg.resume``
    is then False), provided the folder's config is the same.
    """
    from fl.checkpoint import CHECKPOINT, CheckpointError  # torch: imported only to resume
    from fl.checkpoint import load as load_checkpoint

    run_dir = run_dir.expanduser().resolve()
    if not run_dir.is_dir():
        return f"--resume: {str(run_dir)!r} is not a folder"
    if (run_dir / SUMMARY_JSON).exists():
        return f"--resume: {str(run_dir)!r} holds a finished run; nothing to resume"
    old = read_run_config(run_dir)
    if old is not None and not set(old) & set(FIELDS):
        old = None  # not a config of ours
    if old is not None and isinstance(old.get("output_dir"), str):
        cfg.output_dir = old["output_dir"]
    cfg.run_dir, cfg.resume = str(run_dir), True
    if not (run_dir / CHECKPOINT).exists():
        if old is None:
            return (f"--resume: {str(run_dir)!r} has no {CHECKPOINT} and is not a Bonsai run "
                    f"folder (no readable {CONFIG_JSON} or {RUN_CONFIG_TOML})")
        diffs = config_differences(old, to_flat(cfg))
        if diffs:
            return (f"--resume: {str(run_dir)!r} was made with a different config "
                    f"({'; '.join(diffs[:2])}); resume with the same experiment file and "
                    "--set overrides")
        cfg.resume = False  # stopped before round 1 ended: nothing to load, start it again
        return None
    try:
        ckpt = load_checkpoint(run_dir, to_json(cfg))
    except CheckpointError as e:
        return str(e)
    if ckpt.round >= cfg.rounds:
        return f"--resume: the checkpoint is at round {ckpt.round}, rounds={cfg.rounds}"
    return None


def _print_summary(console: Console, s: dict[str, Any], seconds: float) -> None:
    acc = s.get("final_accuracy")
    console.print()
    console.print(
        f"[bold]done[/bold] in {seconds:.1f} s: {s.get('rounds')} rounds of "
        f"{s.get('strategy')}, final accuracy {100 * acc:.2f}% (best "
        f"{100 * s['best_accuracy']:.2f}% at round {s['best_round']}), "
        f"{human_bytes(s.get('total_bytes_down', 0))} down, "
        f"{human_bytes(s.get('total_bytes_up', 0))} up", soft_wrap=True
    )
    cohorts = s.get("cohorts")
    if isinstance(cohorts, dict):
        console.print(f"cohort mode: {cohorts.get('workers')} workers; bytes counted per "
                      "client (packed: "
                      f"{human_bytes(s.get('total_packed_bytes_down', 0))} down, "
                      f"{human_bytes(s.get('total_packed_bytes_up', 0))} up)", soft_wrap=True)
    console.print(f"results: {s.get('run_dir')}", soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    cfg = load_or_fail(args.file, args.overrides)
    if isinstance(cfg, int):
        return cfg
    console = Console()
    if cfg.resume and not args.resume:
        return fail("resume: got True; continue a run with `bonsai run FILE --resume "
                    "RESULTS_DIR` instead of setting resume")
    if args.resume:
        problem = check_resume(cfg, Path(args.resume))
        if problem:
            return fail(problem)
        if not cfg.resume:
            console.print(f"{cfg.run_dir} stopped before round 1 ended (no checkpoint): "
                          "running it again from round 1", soft_wrap=True)
    else:
        problem = check_run_dir(cfg, args.file)
        if problem:
            return fail(problem)
    interrupts.install()  # Ctrl-C and SIGTERM end the run cleanly; a second one hurries
    t0 = time.perf_counter()
    try:  # the split first: a partition that cannot be made stops here, exit 2
        with console.status("preparing the dataset split and partitions"):
            problems = check_data({"run": cfg}).get("run")
        if problems:
            return fail(problems)
        summary = run_simulation(cfg, console, live=not args.quiet)
    except RunDirError as e:
        return fail(str(e))
    except KeyboardInterrupt as e:
        where = f"; partial results in {cfg.run_dir}" if cfg.run_dir else ""
        return fail(f"interrupted; {interrupts.stopped(e)}{where}", code=130)
    except RuntimeFailure as e:
        return fail(str(e), code=1)
    _print_summary(console, summary, time.perf_counter() - t0)
    return 0
