"""``bonsai run FILE [--set KEY=VALUE ...]``: one experiment in Flower's simulation
runtime (Ray), with a live per-round table, a results folder, and nothing left
running afterwards."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from fl import interrupts
from fl.cli.common import DEFAULT_EXPERIMENT, check_data, fail, load_or_fail
from fl.config import ExperimentConfig, to_json
from fl.flowerapp import write_run_config
from fl.progress import human_bytes, watch
from fl.results import STOPPING, SUMMARY_JSON
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
    """Flower's federation settings for this experiment (SuperNodes and their resources)."""
    return {
        "num-supernodes": cfg.partition.num_clients,
        "client-resources-num-cpus": cfg.resources.client_cpus,
        "client-resources-num-gpus": cfg.resources.client_gpus,
    }


def prepare_run_dir(cfg: ExperimentConfig) -> Path:
    """Create OUTPUT_DIR/NAME-TIMESTAMP (absolute) and pin it in the config."""
    if not cfg.run_dir:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.output_dir).expanduser().resolve() / f"{cfg.name}-{stamp}"
        path, i = base, 1
        while path.exists():
            path, i = base.with_name(f"{base.name}-{i}"), i + 1
        cfg.run_dir = str(path)
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    if (run_dir / SUMMARY_JSON).exists() and not cfg.resume:
        raise RuntimeFailure(f"run_dir: {str(run_dir)!r} already holds a finished run")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    return run_dir


def run_simulation(cfg: ExperimentConfig, console: Console | None = None,
                   live: bool = True) -> dict[str, Any]:
    """Run ``cfg`` through ``flwr run`` on a private SuperLink; return its summary.

    Raises RuntimeFailure when the run does not produce a summary.
    """
    console = console or Console()
    run_dir = prepare_run_dir(cfg)
    run_config = write_run_config(cfg, run_dir / "run_config.toml")
    (run_dir / STOPPING).unlink(missing_ok=True)  # from an interrupted run being resumed
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
    """Point ``cfg`` at ``run_dir`` to resume it; the problem as one line, or None."""
    from fl.checkpoint import CheckpointError  # torch: imported only to resume
    from fl.checkpoint import load as load_checkpoint

    if (run_dir / SUMMARY_JSON).exists():
        return f"--resume: {str(run_dir)!r} holds a finished run; nothing to resume"
    cfg.run_dir, cfg.resume = str(run_dir.expanduser().resolve()), True
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
    console.print(f"results: {s.get('run_dir')}", soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    cfg = load_or_fail(args.file, args.overrides)
    if isinstance(cfg, int):
        return cfg
    if args.resume:
        problem = check_resume(cfg, Path(args.resume))
        if problem:
            return fail(problem)
    console = Console()
    interrupts.install()  # Ctrl-C and SIGTERM end the run cleanly; a second one hurries
    t0 = time.perf_counter()
    try:  # the split first: a partition that cannot be made stops here, exit 2
        with console.status("preparing the dataset split and partitions"):
            problems = check_data({"run": cfg}).get("run")
        if problems:
            return fail(problems)
        summary = run_simulation(cfg, console, live=not args.quiet)
    except KeyboardInterrupt as e:
        where = f"; partial results in {cfg.run_dir}" if cfg.run_dir else ""
        return fail(f"interrupted; {interrupts.stopped(e)}{where}", code=130)
    except RuntimeFailure as e:
        return fail(str(e), code=1)
    _print_summary(console, summary, time.perf_counter() - t0)
    return 0
