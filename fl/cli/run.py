"""``bonsai run FILE [--set KEY=VALUE ...] [--ray-address HOST:PORT]``: one experiment in
Flower's simulation runtime (a private Ray, or an existing Ray cluster it joins), with a
live per-round table, a results folder, and nothing it started left running afterwards."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from fl import interrupts
from fl.cli.common import (
    DEFAULT_EXPERIMENT,
    add_ray_address,
    check_data,
    fail,
    load_or_fail,
    print_summary,
    ray_address,
)
from fl.procgroup import RuntimeFailure
from fl.rundir import RunDirError, check_resume, check_run_dir
from fl.scaleout import RayTarget
from fl.simulation import run_simulation
from fl.tracking import missing_packages


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
    add_ray_address(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_or_fail(args.file, args.overrides)
    if isinstance(cfg, int):
        return cfg
    if missing := missing_packages(cfg):  # a tracker's pip extra (fl.tracking)
        return fail(missing)
    console = Console()
    if cfg.resume and not args.resume:
        return fail("resume: got True; continue a run with `bonsai run FILE --resume "
                    "RESULTS_DIR` instead of setting resume")
    address = ray_address(args.ray_address, console)
    if isinstance(address, int):
        return address
    t0 = time.perf_counter()
    try:  # the data first: unusable data or a partition that cannot be made stops here;
        # a natural partition of every id gets its client count (the config says 0)
        with console.status("preparing the dataset split and partitions"):
            problems = check_data({"run": cfg}).get("run")
    except RuntimeFailure as e:
        return fail(str(e), code=1)
    if problems:
        return fail(problems)
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
    try:
        summary = run_simulation(cfg, console, live=not args.quiet,
                                 ray=RayTarget(address=address))
    except RunDirError as e:
        return fail(str(e))
    except KeyboardInterrupt as e:
        where = f"; partial results in {cfg.run_dir}" if cfg.run_dir else ""
        return fail(f"interrupted; {interrupts.stopped(e)}{where}", code=130)
    except RuntimeFailure as e:
        return fail(str(e), code=1)
    print_summary(console, summary, time.perf_counter() - t0)
    return 0
