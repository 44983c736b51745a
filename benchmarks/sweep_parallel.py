"""A study one cell at a time against N cells at a time, on this machine.

    python benchmarks/sweep_parallel.py [--study smoke_study] [--parallel 2] [--repeat 2]
                                        [--set KEY=VALUE ...]

Runs the study as a user types it, one cell at a time and N at a time, ``--repeat``
times each in the order A B B A A B ... (so a drift of the machine's load hits both
alike), each into a fresh folder under WORK (a temporary folder, or ``--work``):

    bonsai sweep WORK/1/sequential.yaml --quiet                (output_dir WORK/1/sequential)
    bonsai sweep WORK/1/parallel.yaml --quiet --parallel 2     (output_dir WORK/1/parallel)

and reads what they wrote: the wall time of each sweep (the speed-up is the ratio of
the fastest of each kind: other people's work only ever adds time, and of the medians),
each cell's seconds as the sweep printed them and the seconds its rounds took
(``rounds.jsonl``); a cell's overhead is the difference: starting the SuperLink, Flower
and Ray, discovering the nodes, writing results and the teardown. It checks that both
sweeps gave every cell the same per-round accuracies, and appends one record (with the
load average before and after each sweep: other people's work on a shared machine
slows both, unevenly) to benchmarks/results/sweep-parallel-cpu.json, where the README's
figure comes from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import append_record, installed, machine  # noqa: E402

from fl.catalog import resolve  # noqa: E402
from fl.results import read_rounds  # noqa: E402

#: "cell 3/6: ID" then "  done in 61.4 s" (one at a time) or "  cell 3 done in 61.4 s"
_START = re.compile(r"^cell (\d+)/\d+: (.+)$")
_DONE = re.compile(r"^\s+(?:cell (\d+) )?done in ([\d.]+) s")


def sweep(study: Path, extra: list[str], overrides: list[str]) -> dict[str, Any]:
    """Run ``bonsai sweep STUDY --quiet EXTRA``; its wall seconds, each cell's seconds as
    printed, the load average before and after."""
    cmd = [sys.executable, "-m", "fl.cli", "sweep", str(study), "--quiet", *extra,
           *[a for s in overrides for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    load_before = list(os.getloadavg())
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    print(f"$ {shlex.join(['bonsai', *cmd[3:]])}  ({seconds:.1f} s)", flush=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    ids: dict[int, str] = {}
    cells: dict[str, float] = {}
    last = None
    for line in proc.stdout.splitlines():
        if m := _START.match(line):
            ids[int(m[1])] = m[2]
            last = int(m[1])
        elif m := _DONE.match(line):
            cells[ids[int(m[1]) if m[1] else last]] = float(m[2])
    return {"command": shlex.join(["bonsai", *cmd[3:]]), "wall_seconds": round(seconds, 2),
            "cell_seconds": cells, "load_average_before": load_before,
            "load_average_after": list(os.getloadavg())}


def rounds_of(study_dir: Path) -> dict[str, dict[str, Any]]:
    """cell folder -> per-round accuracies and the seconds of all its rounds."""
    out = {}
    for d in sorted(p for p in study_dir.iterdir() if p.is_dir()):
        rounds = read_rounds(d)
        out[d.name] = {"accuracy": [r["accuracy"] for r in rounds],
                       "round_seconds": round(sum(r.get("seconds", 0.0) for r in rounds), 3)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="smoke_study", help="a study file or shipped name")
    ap.add_argument("--parallel", type=int, default=2, help="cells at a time (default 2)")
    ap.add_argument("--repeat", type=int, default=2, help="sweeps of each kind (default 2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a key in every cell (both sweeps)")
    ap.add_argument("--work", type=Path, default=None, help="keep the sweeps' folders here")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: "
                    "benchmarks/results/sweep-parallel-cpu.json)")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="bonsai-sweep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(Path(resolve(args.study, "study file")).read_text())
    runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "parallel": []}
    kinds = {"sequential": [], "parallel": ["--parallel", str(args.parallel)]}
    for i in range(args.repeat):
        order = ["sequential", "parallel"] if i % 2 == 0 else ["parallel", "sequential"]
        for name in order:
            folder = work / str(i + 1)
            folder.mkdir(parents=True, exist_ok=True)
            study = folder / f"{name}.yaml"
            study.write_text(yaml.safe_dump({**data, "output_dir": str(folder / name)},
                                            sort_keys=False))
            run = sweep(study, kinds[name], args.overrides)
            run["cells"] = rounds_of(folder / name / data["name"])
            runs[name].append(run)

    from fl.study import cell_dir_name

    first = runs["sequential"][0]["cells"]
    same = all(run["cells"][c]["accuracy"] == first[c]["accuracy"]
               for kind in runs.values() for run in kind for c in first)

    def walls(kind: str) -> list[float]:
        return [r["wall_seconds"] for r in runs[kind]]

    def cell_figures(kind: str) -> tuple[float, float]:
        """Mean seconds per cell as printed, and mean overhead (those minus its rounds)."""
        secs, over = [], []
        for run in runs[kind]:
            for cid, sec in run["cell_seconds"].items():
                secs.append(sec)
                over.append(sec - run["cells"][cell_dir_name(cid)]["round_seconds"])
        return statistics.mean(secs), statistics.mean(over)

    per_cell, overhead = cell_figures("sequential")
    par_cell, par_overhead = cell_figures("parallel")
    record = {
        "benchmark": "sweep_parallel",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(torch.device("cpu")),
        "versions": {p: installed(p) for p in ("flwr", "ray", "torch")},
        "study": args.study, "overrides": args.overrides, "parallel": args.parallel,
        "repeat": args.repeat, "cells": len(first),
        "sequential_runs": runs["sequential"], "parallel_runs": runs["parallel"],
        "sequential_seconds": walls("sequential"), "parallel_seconds": walls("parallel"),
        "speedup": round(min(walls("sequential")) / min(walls("parallel")), 3),
        "speedup_median": round(statistics.median(walls("sequential"))
                                / statistics.median(walls("parallel")), 3),
        "per_cell_seconds": round(per_cell, 2),  # one at a time
        "per_cell_overhead_seconds": round(overhead, 2),
        "overhead_fraction": round(overhead / per_cell, 3),
        "parallel_per_cell_seconds": round(par_cell, 2),
        "parallel_per_cell_overhead_seconds": round(par_overhead, 2),
        "same_accuracies": same,
        "work": str(work),
    }
    print(json.dumps({k: record[k] for k in (
        "cells", "sequential_seconds", "parallel_seconds", "speedup", "speedup_median",
        "per_cell_seconds", "per_cell_overhead_seconds", "overhead_fraction",
        "parallel_per_cell_seconds", "parallel_per_cell_overhead_seconds",
        "same_accuracies")}, indent=1))
    for kind, rs in runs.items():
        print(f"load average (1, 5, 15 min) before each {kind} sweep: "
              + "; ".join(str([round(x, 1) for x in r["load_average_before"]]) for r in rs))
    append_record(record, "sweep-parallel", torch.device("cpu"), args.out)
    if not same:
        sys.exit("the sweeps disagree on some cell's per-round accuracies")


if __name__ == "__main__":
    main()
