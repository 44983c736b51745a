"""``bonsai sweep STUDY.yaml [--set KEY=VALUE ...] [--dry-run] [--parallel N]
[--ray-address HOST:PORT]``: run a study's cells (each a Flower simulation on Ray), one
after another or N at once, skipping finished ones."""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

from rich.console import Console

from fl import interrupts
from fl.catalog import CatalogError, resolve
from fl.cli.common import add_ray_address, check_data, fail, ray_address
from fl.procgroup import RuntimeFailure
from fl.rundir import writable_problem
from fl.scaleout import (
    PARALLEL_ON_CLUSTER,
    RayTarget,
    local_shares,
    machine_resources,
    resolve_address,
)
from fl.study import (
    StudyError,
    cell_status,
    expand,
    load_study,
    stale_cells,
    summarize_problems,
    validate_cells,
)
from fl.sweep import run_study, run_study_parallel


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a study (a grid of experiments), resumable")
    p.add_argument("file", help="a study file, or the name of a shipped one (e.g. smoke_study)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an experiment key in every cell, e.g. --set rounds=2")
    p.add_argument("--dry-run", action="store_true",
                   help="list every cell with its status (or config problem); run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-data-check", action="store_true",
                   help="skip building every cell's partitions before running")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run N cells at once on this machine, each with its own SuperLink "
                        "and 1/N of its CPUs and GPUs (default 1; on a Ray cluster: 1)")
    add_ray_address(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.parallel < 1:
        return fail(f"--parallel: got {args.parallel}; allowed: >= 1")
    address, source = resolve_address(args.ray_address)
    if address and args.parallel > 1 and not args.dry_run:
        return fail(f"--parallel: got {args.parallel} with {source} {address}; "
                    f"{PARALLEL_ON_CLUSTER}")
    try:
        study = load_study(resolve(args.file, "study file"), args.overrides)
        cells = expand(study)
    except CatalogError as e:
        return fail(str(e))
    except StudyError as e:
        return fail(e.problems)
    problem = writable_problem(study.dir, "output_dir", study.output_dir)
    if problem:
        return fail(problem)
    configs, bad = validate_cells(cells)
    console = Console()
    address = None if args.dry_run else ray_address(args.ray_address, console)
    if isinstance(address, int):
        return address
    if not args.no_data_check:
        try:
            with console.status(f"building the data splits of {len(configs)} cells"):
                bad.update(check_data(configs))
        except RuntimeFailure as e:
            return fail(str(e), code=1)
        configs = {cid: c for cid, c in configs.items() if cid not in bad}
    stale = stale_cells(configs)
    if args.dry_run:
        console.print(f"{study.name}: {len(cells)} cells in {study.dir}", soft_wrap=True)
        counts: dict[str, int] = {}
        for i, cell in enumerate(cells, 1):
            why = bad.get(cell.id) or stale.get(cell.id) or []
            status = ("invalid" if cell.id in bad else "stale" if cell.id in stale
                      else cell_status(study.dir / cell.dir_name))
            counts[status] = counts.get(status, 0) + 1
            console.print(f"{i:>4} {status:<8} {cell.id}" + (f"  {'; '.join(why)}" if why else ""),
                          soft_wrap=True, markup=False, highlight=False)
        console.print(", ".join(f"{n} {s}" for s, n in counts.items()), soft_wrap=True)
        return 2 if bad or stale else 0
    if bad:
        return fail(summarize_problems(bad) + [
            f"{len(bad)} of {len(cells)} cells are invalid; nothing was run "
            f"(`bonsai sweep {args.file} --dry-run` lists every cell)"])
    if stale:
        return fail([f"cell {cid}: finished with another config ({'; '.join(d[:3])})"
                     for cid, d in list(stale.items())[:5]] + [
            f"{len(stale)} finished cell(s) differ from the study file; nothing was run: "
            f"delete their folders in {study.dir} or give the study a new name"])
    todo = sum(cell_status(Path(c.run_dir)) != "done" for c in configs.values())
    slots = min(args.parallel, max(1, todo))
    interrupts.install()
    from fl.simulation import run_simulation

    console.print(f"study {study.name}: {len(cells)} cells -> {study.dir}", soft_wrap=True)
    t0 = time.perf_counter()
    try:
        if slots > 1:
            targets = local_shares(slots, *machine_resources())
            _say_shares(console, targets, configs)
            res = run_study_parallel(study, cells, configs, targets, console,
                                     live=not args.quiet)
        else:
            runner = functools.partial(run_simulation, ray=RayTarget(address=address))
            res = run_study(study, cells, configs, runner, console, live=not args.quiet)
    except KeyboardInterrupt as e:
        return fail(f"interrupted; {interrupts.stopped(e)}; finished cells are kept in "
                    f"{study.dir}; rerun `bonsai sweep {args.file}` to continue", code=130)
    console.print(
        f"[bold]study {study.name}[/bold] in {time.perf_counter() - t0:.1f} s: ran "
        f"{len(res.ran)}, skipped {len(res.skipped)} finished earlier, failed {len(res.failed)}",
        soft_wrap=True)
    console.print(f"results: {study.dir}\nreport: bonsai report {study.dir}", soft_wrap=True)
    if res.failed:
        return fail([f"cell {cid} failed: {why}" for cid, why in res.failed.items()]
                    + ["rerun the same command to retry the failed cells"], code=1)
    return 0


def _say_shares(console: Console, targets: list[RayTarget], configs: dict) -> None:
    """One line on how the cells share the machine, and one more when a cell's clients
    need more CPUs than a share has (its Ray then gets what one client needs, and the
    cells together ask for more CPUs than the machine has)."""
    share = targets[0].num_cpus or 1
    console.print(f"{len(targets)} cells at a time, each on {targets[0].describe()}",
                  soft_wrap=True)
    need = max(c.resources.client_cpus for c in configs.values())
    if need > share:
        console.print(f"[yellow]note[/yellow]: resources.client_cpus={need} is more than a "
                      f"share ({share}); those cells' Ray get {need} CPUs, so the cells "
                      "together ask for more than this machine has", soft_wrap=True)
