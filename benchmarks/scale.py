"""Scale: seconds per round and peak memory of Bonsai against plain Flower FedAvg.

    python benchmarks/scale.py                        # 10, 100, 1000 clients, 3 rounds
    python benchmarks/scale.py --sizes 10 100 --rounds 5 --repeat 3
    python benchmarks/scale.py --mode cohort --clients 1000 --repeat 2

``--mode cohort`` runs Bonsai in cohort mode (``simulation.cohort_size``: a few
worker SuperNodes, by default one per CPU core, each training its share of the
round's clients from one message; server/cohorts.py) beside plain Flower (one
client per message, as always) and beside a single process that trains the
same clients one by one with a plain PyTorch loop, averages and evaluates
(benchmarks/plain_loop.py: the compute floor without vectorisation; training
on one thread as each simulated client), alternating, and writes
benchmarks/results/scale-cohort-cpu.json with the ratios Bonsai / plain Flower
and Bonsai / loop. Bonsai's bytes are still
counted per client; its records add the packed messages' bytes. Beside the
seconds per round it measures the CPU seconds per round summed over every
process of the run (user + system, from /proc, between the ends of round 1 and
of the last round): the work a round costs, which other load on a shared
machine disturbs far less than the wall time.

For each federation size N it runs, one after the other on this machine,
(a) ``bonsai run`` as a subprocess, as a user types it (the data split and
partitions prepared into a fresh data cache, a private SuperLink, ``flwr run``,
Bonsai's ServerApp/ClientApp, FedAvg with seeded sampling; the ``bonsai``
process itself is measured too) and (b) a minimal plain-Flower app
(benchmarks/plain_flower: Flower's own FedAvg, a plain PyTorch loop) on a
private SuperLink of its own, with the
same model (Bonsai's ``cnn``), data, client count, clients per round
(min(N, --sampled)), local epochs, batch size and Ray resources (1 CPU per
client). Both evaluate the global model on the same-size central test split
after every round.

Data ("digits-sized"): scikit-learn's 8x8 digit images repeated until there
are 180 examples per client (at N = 10 that is the real digits set; at N = 1000,
180,000 images, 46 MB as float32). The per-client work is then the same at
every size (about 144 training examples per client, as with 10 clients on the
real digits), so the 1000-client run measures the cost of the population, not
of bigger clients. Repeated images carry no new information: this measures
speed and memory, not accuracy.

Measured per run: seconds of each round (Bonsai: the ``seconds`` of its round
records; plain Flower: time between the end of successive evaluations, the
same span), steady-state seconds per round (mean of rounds 2..R: round 1 also
warms the Ray actors), wall seconds of the whole run, and peak memory of every
process the run started (SuperLink, SuperExec, ServerApp, simulation, Ray's
GCS/raylet, its agents and its workers; found by an environment marker every
child inherits and as descendants of this process, sampled from /proc every
0.2 s): the peak of the summed RSS (what
the issue asks; shared pages count once per process) and of the summed PSS
(shared pages split; closer to the real footprint). Results go to
benchmarks/results/scale-cpu.json with the machine, versions and ratios
Bonsai / plain Flower. With ``--repeat K`` each size runs the two systems K
times, alternating (load that drifts hits both); seconds per round is then the
median and memory the maximum over the runs, and every run is kept in the JSON
with the machine's 1-minute load average before and after it. Bonsai's runs
also record ``discovery_seconds`` (from its summary.json): the query that asks
every node its partition id before round 1, which plain Flower's random node
sampling does not need.

Why one module of this length: one benchmark whose systems are measured by the same
sampler and summarised the same way (memory and CPU seconds from /proc, the same round
spans), which is what makes the ratios fair; the plain-Flower app and the plain loop
it compares with are in benchmarks/plain_flower/ and benchmarks/plain_loop.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fl.config import build  # noqa: E402
from fl.proctree import descendants, marked  # noqa: E402
from fl.results import read_rounds  # noqa: E402
from fl.runtime import CONNECTION, SimulationRuntime, flower_bin, toml_value  # noqa: E402

PLAIN_APP = ROOT / "benchmarks" / "plain_flower"
EXAMPLES_PER_CLIENT = 180
MARK = "BONSAI_SCALE_MARK"
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- data ------------------------------------------------------------------------
def make_data(num_clients: int, path: Path) -> int:
    """Digits repeated to EXAMPLES_PER_CLIENT * num_clients images, as an .npz."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    total = EXAMPLES_PER_CLIENT * num_clients
    reps = math.ceil(total / len(y))
    x, y = np.tile(x, (reps, 1, 1, 1))[:total], np.tile(y, reps)[:total]
    np.savez(path, x=x, y=y)
    return total


# --- memory sampling ----------------------------------------------------------------
def _run_pids(mark: str) -> set[int]:
    """The processes of the run being measured: those carrying the mark, and every
    descendant of this process (the run's processes are its only children then).

    The mark alone misses some: Ray's dashboard and runtime-env agents (about 190
    MB together) rewrite their process title over the memory that
    /proc/PID/environ shows, after which the mark cannot be read there; sampled by
    mark only, they dropped out of some runs and not others.
    """
    return set(descendants(os.getpid())) | set(marked(mark, key=MARK))


def _mem(pid: int, with_pss: bool = True) -> tuple[str, int, int] | None:
    """(command name, RSS bytes, PSS bytes) of ``pid`` (``with_pss`` False: RSS in PSS's
    place; reading smaps_rollup walks the process's page tables)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        pss = rss
        try:
            for line in (Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                         if with_pss else ()):
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
        return comm, rss, pss
    except (OSError, ValueError, IndexError):
        return None


TICK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int | None:
    """User + system CPU ticks of ``pid`` so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


class MemorySampler(threading.Thread):
    """Samples the summed RSS/PSS of the run's processes (:func:`_run_pids`); keeps the peaks.

    Also the CPU seconds they have used so far (user + system, summed over every
    process seen, a process's last sample kept after it ends) on ``perf_counter``'s
    clock (CLOCK_MONOTONIC: the same in every process on Linux), and, when ``watch``
    is a glob of a rounds.jsonl, the time each new round record appeared.

    PSS is read at every ``pss_every``-th sample only: read for every process of a
    run five times a second, it took a large share of a core from the run being
    measured, which slows a run that keeps both cores busy more than one that leaves a
    core idle."""

    def __init__(self, mark: str, interval: float = 0.2, watch: str = "", pss_every: int = 5):
        super().__init__(daemon=True)
        self.mark, self.interval, self.watch = mark, interval, watch
        self.pss_every = pss_every
        self.ticks: dict[int, int] = {}
        self.cpu_timeline: list[tuple[float, float]] = []
        self.record_times: list[float] = []
        self._old = set(Path("/").glob(watch.lstrip("/"))) if watch else set()
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.peak_breakdown: dict[str, int] = {}
        self.peak_procs = 0
        self.timeline: list[tuple[float, int]] = []
        self.t0 = time.perf_counter()

    def run(self) -> None:
        samples = 0
        while not self.stop.is_set():
            with_pss = samples % self.pss_every == 0
            samples += 1
            pids = _run_pids(self.mark)
            for p in pids:
                if (t := _cpu_ticks(p)) is not None:
                    self.ticks[p] = t
            now = time.perf_counter()
            self.cpu_timeline.append((now, sum(self.ticks.values()) / TICK))
            if self.watch:
                for f in set(Path("/").glob(self.watch.lstrip("/"))) - self._old:
                    lines = f.read_text().count("\n")
                    self.record_times += [now] * (lines - len(self.record_times))
            mems = [m for p in pids if (m := _mem(p, with_pss))]
            rss, pss = sum(m[1] for m in mems), sum(m[2] for m in mems)
            self.timeline.append((round(time.perf_counter() - self.t0, 2), rss))
            if rss > self.peak_rss:
                self.peak_rss, self.peak_procs = rss, len(mems)
                br: dict[str, int] = {}
                for comm, r, _ in mems:
                    br[comm] = br.get(comm, 0) + r
                self.peak_breakdown = br
            if with_pss:
                self.peak_pss = max(self.peak_pss, pss)
            self.stop.wait(self.interval)


def cpu_at(sampler: MemorySampler, t: float) -> float:
    """CPU seconds the run had used at time ``t`` (the last sample at or before it)."""
    before = [c for when, c in sampler.cpu_timeline if when <= t]
    return before[-1] if before else 0.0


def _measure(fn, mark: str, watch: str = "") -> tuple[Any, MemorySampler, float]:
    os.environ[MARK] = mark
    sampler = MemorySampler(mark, watch=watch)
    sampler.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        os.environ.pop(MARK, None)
    return out, sampler, wall


# --- the two systems ------------------------------------------------------------------
def run_bonsai(n: int, data: Path, work: Path, a: argparse.Namespace,
               cohort: bool = False) -> dict[str, Any]:
    """``bonsai run`` as a user types it (a subprocess, so its own memory counts too)."""
    import yaml

    name = f"scale-{n}-{uuid.uuid4().hex[:8]}"
    study = {
        "name": name, "seed": 0, "rounds": a.rounds, "model": "cnn",
        "output_dir": str(work), "dataset.name": "npz", "dataset.path": str(data),
        "dataset.test_fraction": 0.2, "partition.kind": "iid", "partition.num_clients": n,
        "strategy.name": "fedavg", "strategy.fraction_train": min(1.0, a.sampled / n),
        "strategy.min_train_clients": 2, "train.local_epochs": a.epochs,
        "train.batch_size": 16, "train.lr": 0.05, "train.momentum": 0.9,
        "resources.client_cpus": 1,
    }
    if cohort:
        study.update({"simulation.cohort_size": a.cohort_size,
                      "simulation.workers": a.workers})
    build(study)  # a bad setting fails here, not in the subprocess
    cfg_file = work / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(study))
    proc = subprocess.run([sys.executable, "-m", "fl.cli", "run", str(cfg_file), "--quiet"],
                          cwd=str(ROOT), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bonsai run (N={n}) failed (exit {proc.returncode}):\n"
                           + proc.stderr[-3000:])
    (run_dir,) = [p for p in work.iterdir() if p.is_dir() and p.name.startswith(name)]
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [r for r in read_rounds(run_dir) if r["round"] > 0]
    out = {"seconds": [r["seconds"] for r in rounds],
           # asking every node its partition id before round 1 (plain Flower samples
           # node ids at random and needs no such query); cohort mode: every worker its index
           "discovery_seconds": summary["discovery_seconds"]}
    if cohort:
        out["cohorts"] = summary["cohorts"]
        out["bytes_per_round"] = {  # per client (the protocol's) and as packed on the way
            k: rounds[-1][k] for k in ("bytes_down", "bytes_up", "packed_bytes_down",
                                       "packed_bytes_up")}
    return out


def run_bonsai_cohort(n: int, data: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """``bonsai run`` in cohort mode: the same experiment on ``--workers`` worker nodes."""
    return run_bonsai(n, data, work, a, cohort=True)


def run_loop(n: int, data: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """benchmarks/plain_loop.py: the same clients trained one by one in one process."""
    times = work / f"loop-{n}-times.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plain_loop.py"), "--data", str(data),
         "--clients", str(n), "--sampled", str(a.sampled), "--rounds", str(a.rounds),
         "--epochs", str(a.epochs), "--threads", "1", "--out", str(times)],
        cwd=str(ROOT), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"plain loop (N={n}) failed (exit {proc.returncode}):\n"
                           + proc.stderr[-3000:])
    data = json.loads(times.read_text())
    return {"seconds": data["round_seconds"], "ends": data["ends"]}


def run_plain(n: int, data: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    times = work / f"plain-{n}-times.json"
    run_config = work / f"plain-{n}.toml"
    rc = {"num-server-rounds": a.rounds, "fraction-train": min(1.0, a.sampled / n),
          "local-epochs": a.epochs, "batch-size": 16, "lr": 0.05, "momentum": 0.9,
          "test-fraction": 0.2, "seed": 0, "data-path": str(data), "times-path": str(times)}
    run_config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in rc.items()))
    fed = f"num-supernodes={n} client-resources-num-cpus=1 client-resources-num-gpus=0.0"
    log_dir = work / f"plain-{n}"
    with SimulationRuntime(log_dir) as rt:
        proc = rt.procs.start(
            "flwr-run", [flower_bin("flwr"), "run", str(PLAIN_APP), CONNECTION, "--stream",
                         "--run-config", str(run_config), "--federation-config", fed],
            log_dir / "flower.log", env={"PYTHONPATH": str(ROOT)}, cwd=str(PLAIN_APP))
        rc_ = proc.wait()
    if not times.exists():
        tail = (log_dir / "flower.log").read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"plain Flower run (N={n}) failed (exit {rc_}):\n" + "\n".join(tail))
    data = json.loads(times.read_text())
    return {"seconds": data["round_seconds"], "ends": data["ends"]}


def _cpu_per_round(ends: list[float], sampler: MemorySampler) -> float | None:
    """CPU seconds of all the run's processes per steady round: from the end of round 1
    to the end of the last round (``ends[r]``: when round r ended, ``ends[0]`` the
    initial evaluation), over the rounds in between."""
    if len(ends) < 3:
        return None
    return round((cpu_at(sampler, ends[-1]) - cpu_at(sampler, ends[1])) / (len(ends) - 2), 3)


def _summary(run: dict[str, Any], sampler: MemorySampler, wall: float) -> dict[str, Any]:
    seconds = run["seconds"]
    steady = seconds[1:] or seconds
    ends = run.get("ends") or sampler.record_times
    return {
        "cpu_seconds_per_round": _cpu_per_round(ends, sampler),
        "round_seconds": [round(s, 3) for s in seconds],
        **({"discovery_seconds": run["discovery_seconds"]} if "discovery_seconds" in run else {}),
        **{k: run[k] for k in ("cohorts", "bytes_per_round") if k in run},
        "seconds_per_round": round(sum(steady) / len(steady), 3),
        "wall_seconds": round(wall, 1),
        "peak_rss_bytes": sampler.peak_rss,
        "peak_rss_gib": round(sampler.peak_rss / 2**30, 3),
        "peak_pss_bytes": sampler.peak_pss,
        "peak_pss_gib": round(sampler.peak_pss / 2**30, 3),
        "processes_at_peak": sampler.peak_procs,
        "rss_at_peak_by_command_mib": {k: round(v / 2**20, 1) for k, v in
                                       sorted(sampler.peak_breakdown.items(),
                                              key=lambda kv: -kv[1])},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["scale", "cohort"], default="scale",
                   help="scale: Bonsai vs plain Flower at each size; cohort: Bonsai in cohort "
                        "mode vs plain Flower vs a single-process loop")
    p.add_argument("--sizes", "--clients", dest="sizes", type=int, nargs="+", default=None,
                   help="federation sizes (default: 10 100 1000; cohort mode: 1000)")
    p.add_argument("--cohort-size", type=int, default=64,
                   help="cohort mode: simulation.cohort_size")
    p.add_argument("--threads", type=int, default=1,
                   help="cohort mode: OMP_NUM_THREADS of every process (0 = leave unset)")
    p.add_argument("--workers", type=int, default=0,
                   help="cohort mode: simulation.workers (0 = bonsai run's hardware default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sampled", type=int, default=100, help="clients per round (at most)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs")
    p.add_argument("--systems", nargs="+", default=None,
                   choices=["bonsai", "plain", "loop"],
                   help="default: bonsai plain (cohort mode: bonsai plain loop)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per system and size, alternating; seconds per round is their "
                        "median, memory their maximum")
    p.add_argument("--out", default=None, help="default: benchmarks/results/scale-cpu.json "
                   "(cohort mode: scale-cohort-cpu.json)")
    a = p.parse_args()
    cohort = a.mode == "cohort"
    a.sizes = a.sizes or ([1000] if cohort else [10, 100, 1000])
    a.systems = a.systems or (["bonsai", "plain", "loop"] if cohort else ["bonsai", "plain"])
    a.out = a.out or str(ROOT / "benchmarks" / "results" /
                         ("scale-cohort-cpu.json" if cohort else "scale-cpu.json"))
    if cohort and a.threads:
        # every process computes on --threads threads (the simulated clients and workers
        # do anyway): the servers' evaluations with torch's default of one thread per core
        # oversubscribe a shared machine, and their seconds then vary 5-fold from run to run
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    for k, v in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                 "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
        os.environ.setdefault(k, v)
    # both apps import the project (the plain one for the same cnn), installed or not
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    import flwr
    import torch

    result: dict[str, Any] = {
        "benchmark": "benchmarks/scale.py", "argv": sys.argv[1:],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "flwr": flwr.__version__},
        "setup": {"model": "cnn", "data": f"digits repeated, {EXAMPLES_PER_CLIENT} per client, "
                  "80% train pool / 20% central test", "partition": "iid",
                  "local_epochs": a.epochs, "batch_size": 16, "rounds": a.rounds,
                  "client_cpus": 1, "clients_per_round": f"min(N, {a.sampled})",
                  "repeat": a.repeat},
        "mode": a.mode,
        **({"omp_num_threads": os.environ.get("OMP_NUM_THREADS")} if cohort else {}),
        **({"cohort": {"bonsai": f"simulation.cohort_size={a.cohort_size}, "
                                 f"simulation.workers={a.workers or 'auto'} (bonsai run's "
                                 "hardware default: one per CPU core)",
                       "plain": "one client per message (plain Flower as always)",
                       "loop": "benchmarks/plain_loop.py: one process, the clients one by one "
                               "on 1 thread, FedAvg, central evaluation with torch's default "
                               "threads (as the ServerApps)"}} if cohort else {}),
        "sizes": {},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bonsai-scale-") as tmp:
        work = Path(tmp)
        # a fresh data cache: each size's first Bonsai run computes the split and
        # partitions (before the federation starts), later repeats read them
        os.environ["BONSAI_CACHE_DIR"] = str(work / "data-cache")
        for n in a.sizes:
            data = work / f"digits-{n}.npz"
            total = make_data(n, data)
            entry: dict[str, Any] = {"clients": n, "sampled_per_round": min(n, a.sampled),
                                     "examples": total}
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in a.systems}
            for rep in range(a.repeat):  # alternate the systems: load drifts hit both
                for system in a.systems:
                    fn = {"bonsai": run_bonsai_cohort if cohort else run_bonsai,
                          "plain": run_plain, "loop": run_loop}[system]
                    print(f"N={n}: {system} (run {rep + 1}/{a.repeat}) ...", flush=True)
                    load = os.getloadavg()[0]
                    watch = (str(work / f"scale-{n}-*" / "rounds.jsonl")
                             if system == "bonsai" else "")
                    try:
                        measured, sampler, wall = _measure(
                            lambda fn=fn, n=n, data=data: fn(n, data, work, a),
                            uuid.uuid4().hex, watch)
                    except Exception as e:  # record and go on with the next measurement
                        runs[system].append({"error": str(e)[-2000:]})
                        print(f"  failed: {str(e)[:500]}", flush=True)
                        continue
                    s = _summary(measured, sampler, wall)
                    s["load_average_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                    runs[system].append(s)
                    print(f"  {s['seconds_per_round']:.2f} s/round, "
                          f"{s['cpu_seconds_per_round']} CPU s/round (rounds "
                          f"{s['round_seconds']}), peak RSS {s['peak_rss_gib']:.2f} GiB, PSS "
                          f"{s['peak_pss_gib']:.2f} GiB, wall {s['wall_seconds']:.0f} s"
                          + (f" (discovery {s['discovery_seconds']:.1f} s)"
                             if "discovery_seconds" in s else "")
                          + f", load {s['load_average_1min']}", flush=True)
            for system, rs in runs.items():
                ok = [r for r in rs if "error" not in r]
                if not ok:
                    entry[system] = {"runs": rs}
                    continue
                entry[system] = {
                    "seconds_per_round": round(statistics.median(
                        r["seconds_per_round"] for r in ok), 3),
                    **({"cpu_seconds_per_round": round(statistics.median(
                        r["cpu_seconds_per_round"] for r in ok), 3)}
                       if all(r.get("cpu_seconds_per_round") for r in ok) else {}),
                    "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok),
                    "peak_rss_gib": max(r["peak_rss_gib"] for r in ok),
                    "peak_pss_bytes": max(r["peak_pss_bytes"] for r in ok),
                    "peak_pss_gib": max(r["peak_pss_gib"] for r in ok),
                    "wall_seconds": round(statistics.median(r["wall_seconds"] for r in ok), 1),
                    **({"discovery_seconds": round(statistics.median(
                        r["discovery_seconds"] for r in ok), 2)}
                       if all("discovery_seconds" in r for r in ok) else {}),
                    "runs": rs,
                }
            b, f = entry.get("bonsai", {}), entry.get("plain", {})
            loop = entry.get("loop", {})
            if cohort and "seconds_per_round" in b:
                entry["ratios_seconds_per_round"] = {
                    **({"plain_over_bonsai": round(f["seconds_per_round"]
                                                   / b["seconds_per_round"], 3)}
                       if "seconds_per_round" in f else {}),
                    **({"bonsai_over_loop": round(b["seconds_per_round"]
                                                  / loop["seconds_per_round"], 3)}
                       if "seconds_per_round" in loop else {}),
                    "targets": "plain_over_bonsai >= 2, bonsai_over_loop <= 1.3",
                }
                if "cpu_seconds_per_round" in b:
                    entry["ratios_cpu_seconds_per_round"] = {
                        f"{o}_over_bonsai" if o == "plain" else f"bonsai_over_{o}":
                        round(x / y, 3) for o, x, y in (
                            ("plain", f.get("cpu_seconds_per_round"),
                             b["cpu_seconds_per_round"]),
                            ("loop", b["cpu_seconds_per_round"],
                             loop.get("cpu_seconds_per_round")))
                        if x and y}
                # how noisy: each system's per-run seconds per round and the load around them
                entry["spread"] = {
                    s: {"seconds_per_round": [r["seconds_per_round"] for r in entry[s]["runs"]
                                              if "seconds_per_round" in r],
                        "cpu_seconds_per_round": [r.get("cpu_seconds_per_round")
                                                  for r in entry[s]["runs"]
                                                  if "seconds_per_round" in r],
                        "load_average_1min": [r["load_average_1min"] for r in entry[s]["runs"]
                                              if "load_average_1min" in r]}
                    for s in a.systems if s in entry}
                print(f"  ratios: {entry['ratios_seconds_per_round']}, CPU: "
                      f"{entry.get('ratios_cpu_seconds_per_round')}", flush=True)
            if "seconds_per_round" in b and "seconds_per_round" in f:
                entry["ratio_bonsai_over_plain"] = {
                    "seconds_per_round": round(b["seconds_per_round"] / f["seconds_per_round"], 3),
                    "peak_rss": round(b["peak_rss_bytes"] / f["peak_rss_bytes"], 3),
                    "peak_pss": round(b["peak_pss_bytes"] / f["peak_pss_bytes"], 3),
                }
                r = entry["ratio_bonsai_over_plain"]
                print(f"  Bonsai / plain Flower: time {r['seconds_per_round']:.2f}, "
                      f"RSS {r['peak_rss']:.2f}, PSS {r['peak_pss']:.2f}"
                      + ("" if cohort else " (target <= 1.10)"),
                      flush=True)
            result["sizes"][str(n)] = entry
            out.write_text(json.dumps(result, indent=2) + "\n")  # after every size
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
