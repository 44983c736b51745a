"""A study one cell at a time against N cells at a time, on this machine.

    python benchmarks/sweep_parallel.py [--study smoke_study] [--parallel 2] [--set KEY=VALUE ...]

Runs the study twice as a user types it, into fresh folders under WORK (a temporary
folder, or ``--work``):

    bonsai sweep WORK/seq.yaml --quiet                 (the study, output_dir WORK/seq)
    bonsai sweep WORK/par.yaml --quiet --parallel 2    (output_dir WORK/par)

and reads what they wrote: the wall time of each sweep (their ratio is the speed-up),
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
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a key in every cell (both sweeps)")
    ap.add_argument("--work", type=Path, default=None, help="keep the sweeps' folders here")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: "
                    "benchmarks/results/sweep-parallel-cpu.json)")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="bonsai-sweep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(Path(resolve(args.study, "study file")).read_text())
    runs: dict[str, dict[str, Any]] = {}
    for name, extra in (("sequential", []), ("parallel", ["--parallel", str(args.parallel)])):
        study = work / f"{name}.yaml"
        study.write_text(yaml.safe_dump({**data, "output_dir": str(work / name)},
                                        sort_keys=False))
        runs[name] = sweep(study, extra, args.overrides)
        runs[name]["cells"] = rounds_of(work / name / data["name"])

    seq, par = runs["sequential"], runs["parallel"]
    same = {c: seq["cells"][c]["accuracy"] == par["cells"][c]["accuracy"]
            for c in seq["cells"]}
    from fl.study import cell_dir_name

    def overheads(run: dict[str, Any]) -> list[float]:
        return [s - run["cells"][cell_dir_name(cid)]["round_seconds"]
                for cid, s in run["cell_seconds"].items()]

    per_cell = statistics.mean(seq["cell_seconds"].values())
    overhead = statistics.mean(overheads(seq))
    record = {
        "benchmark": "sweep_parallel",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(torch.device("cpu")),
        "versions": {p: installed(p) for p in ("flwr", "ray", "torch")},
        "study": args.study, "overrides": args.overrides, "parallel": args.parallel,
        "cells": len(seq["cells"]),
        "sequential": seq, "parallel_run": par,
        "speedup": round(seq["wall_seconds"] / par["wall_seconds"], 3),
        "per_cell_seconds": round(per_cell, 2),  # one at a time
        "per_cell_overhead_seconds": round(overhead, 2),
        "overhead_fraction": round(overhead / per_cell, 3),
        "parallel_per_cell_seconds": round(statistics.mean(par["cell_seconds"].values()), 2),
        "parallel_per_cell_overhead_seconds": round(statistics.mean(overheads(par)), 2),
        "same_accuracies": all(same.values()),
        "work": str(work),
    }
    print(json.dumps({k: record[k] for k in (
        "cells", "speedup", "per_cell_seconds", "per_cell_overhead_seconds", "overhead_fraction",
        "parallel_per_cell_seconds", "parallel_per_cell_overhead_seconds", "same_accuracies")},
        indent=1))
    print(f"load average before/after: sequential {seq['load_average_before']} / "
          f"{seq['load_average_after']}, parallel {par['load_average_before']} / "
          f"{par['load_average_after']}")
    append_record(record, "sweep-parallel", torch.device("cpu"), args.out)
    if not record["same_accuracies"]:
        sys.exit(f"the sweeps disagree: {same}")


if __name__ == "__main__":
    main()
