"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console

from fl.catalog import CatalogError, resolve
from fl.config import ConfigError, ExperimentConfig, from_flat, load, to_flat
from fl.procgroup import RuntimeFailure
from fl.progress import human_bytes
from fl.scaleout import address_problem, reachable_problem, resolve_address

USAGE_ERROR = 2


def fail(lines: list[str] | str, code: int = USAGE_ERROR) -> int:
    """Print ``bonsai: error: ...`` lines to stderr and return ``code``."""
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"bonsai: error: {line}", file=sys.stderr)
    return code


#: what `bonsai run` and `bonsai deploy ...` run when no file is given (a shipped name)
DEFAULT_EXPERIMENT = "quickstart"


def load_or_fail(path: str | None, overrides: list[str]) -> ExperimentConfig | int:
    """The validated config of a file or shipped name (fl.catalog), or the exit code
    after printing every problem."""
    try:
        return load(resolve(path) if path is not None else None, overrides)
    except CatalogError as e:
        return fail(str(e))
    except ConfigError as e:
        return fail(e.problems)


def add_ray_address(p: argparse.ArgumentParser) -> None:
    """The ``--ray-address`` option of ``bonsai run`` and ``bonsai sweep``."""
    p.add_argument("--ray-address", metavar="HOST:PORT", default=None,
                   help="join this Ray cluster (its head's address, as `ray start --head` "
                        "prints it) instead of starting a private Ray; default: $RAY_ADDRESS. "
                        "Run bonsai on a machine of the cluster")


def ray_address(flag: str | None, console: Console) -> str | None | int:
    """The Ray cluster a simulation joins (``--ray-address``, else ``RAY_ADDRESS``), None
    for a private Ray, or the exit code after one line naming the problem: a malformed
    address, or nothing answering at it (checked before anything starts)."""
    address, source = resolve_address(flag)
    if address is None:
        return None
    problem = address_problem(address, source) or reachable_problem(address, source)
    if problem:
        return fail(problem)
    console.print(f"joining the Ray cluster at {address}"
                  + (f" (from {source})" if source != "--ray-address" else ""), soft_wrap=True)
    return address


def check_data_child(partitions: bool = True) -> None:
    """Child-process entry of :func:`check_data`: ``{id: flat config}`` as JSON on stdin;
    ``{"problems": {id: [problem, ...]}, "clients": {id: count}}`` as the last line of
    stdout (the count of each natural partition asked for with ``num_clients=0``)."""
    from fl.data import client_count
    from fl.study import check_partitions

    configs = {cid: from_flat(flat) for cid, flat in json.loads(sys.stdin.read()).items()}
    bad = check_partitions(configs, partitions)
    clients = {cid: client_count(c) for cid, c in configs.items()
               if partitions and cid not in bad and c.partition.num_clients == 0}
    print(json.dumps({"problems": bad, "clients": clients}))


def check_data(configs: Mapping[str, ExperimentConfig],
               partitions: bool = True) -> dict[str, list[str]]:
    """Check every config's data and model and build its dataset split and partitions
    into the data cache (fl.datacache) before anything runs: ``{id: problems}`` for the
    configs whose data is unusable or whose split cannot be made
    (fl.study.check_partitions; ``partitions=False``: the datasets and models only).
    A natural partition asked for with ``partition.num_clients=0`` (every id) gets
    its count written into its config here, before anything starts.

    Runs in a short-lived child process: ``bonsai run`` and ``bonsai sweep`` live as
    long as their runs and should not keep torch, scikit-learn and flwr-datasets
    resident (the simulations' processes then only read the cache).
    """
    if not configs:
        return {}
    proc = subprocess.run(
        [sys.executable, "-c", "from fl.cli.common import check_data_child; "
         f"check_data_child({bool(partitions)})"],
        input=json.dumps({cid: to_flat(c) for cid, c in configs.items()}),
        capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeFailure("checking the data splits failed:\n" + proc.stderr[-3000:])
    found = json.loads(lines[-1])
    for cid, count in found["clients"].items():
        configs[cid].partition.num_clients = int(count)
    return found["problems"]


def print_summary(console: Console, s: dict[str, Any], seconds: float) -> None:
    """The one-line summary of a finished run and where its results are."""
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
