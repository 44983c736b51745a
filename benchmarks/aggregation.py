"""Time and memory of the FedLD principal gradient (Gram form) against the weighted mean.

Usage::

    python benchmarks/aggregation.py --threads 1            # full grid, a few minutes
    python benchmarks/aggregation.py --threads 1 --quick    # d = 1M, m in {5, 12}, ~20 s

Three implementations of one parameter tensor's aggregate, m client updates of d float32
entries each (rows of one m x d tensor, as decoded replies would be):

- ``mean``: :func:`fl.aggregate.weighted_mean` (FedAvg), the baseline of every ratio;
- ``gram``: :func:`fl.aggregate.principal_gradient`, docs/ALGORITHMS.md §2.3 in Gram form;
- ``loop``: the per-client projection-and-rescale form that materialises every direction u_j
  (:func:`fl.aggregate.principal_gradient_loop`, which the tests check too). It is
  skipped where one call is estimated to take more than about a minute.

One subprocess per (m, d) builds the inputs once. Memory: each method's first full-size
call, with the peak resident set (VmHWM in /proc/self/status) reset to the current one just
before (``/proc/self/clear_refs``), gives its peak extra memory; glibc runs with a fixed mmap
threshold so freed blocks go back to the system between methods. It is printed beside the
bytes each method allocates by construction (analytic). Timing: then the methods run
interleaved (round-robin, so drifting load from other processes hits all of them), and the
median is reported, with the ratio to the weighted mean both of medians and per round. The
outputs are checked against a float64 evaluation where that fits in memory.

Use ``--threads 1`` on a shared machine: with more OpenMP threads than idle cores, every
parallel region waits for a descheduled thread and the timings measure the scheduler.

Results go to benchmarks/results/aggregation-cpu.json (``--quick``: aggregation-cpu-quick.json)
with the machine, torch version and every sample.

Why one module of this length: the driver and the worker it starts once per (m, d)
(this file again, with ``--worker``) are one script, so what the worker measures and
what the driver estimates and checks of it (analytic bytes, the loop form's expected
time) stay side by side.
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
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("mean", "gram", "loop")
K_PROPORTION = 0.8
# Above this estimated time per call the loop form is skipped (the brief's "about a minute").
LOOP_LIMIT_SECONDS = 60.0


# ----------------------------------------------------------------------------- worker side


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _make_inputs(m: int, d: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    # Correlated like real updates (a shared drift plus client noise), float32.
    matrix = torch.empty(m, d).uniform_(-1.0, 1.0, generator=generator)
    drift = torch.empty(d).uniform_(-1.0, 1.0, generator=generator)
    for i in range(m):
        matrix[i].add_(drift, alpha=0.5 + i / m)
    del drift
    return list(matrix)


def _callables(rows):
    from fl.aggregate import principal_gradient, principal_gradient_loop, weighted_mean

    weights = [float(100 + i) for i in range(len(rows))]  # example counts
    named = [{"w": row} for row in rows]
    return {
        "mean": lambda: weighted_mean(named, weights)["w"],
        "gram": lambda: principal_gradient(rows, k_proportion=K_PROPORTION),
        "loop": lambda: principal_gradient_loop(rows, k_proportion=K_PROPORTION),
    }


def _worker(m: int, d: int, methods: list[str], repeats: dict[str, int]) -> dict:
    import torch

    # One call each on a small input first, so one-time library set-up (BLAS and LAPACK
    # workspaces, lazy imports) counts neither as time nor as the method's memory.
    small = _callables(_make_inputs(m, 4096, seed=1))
    for name in methods:
        small[name]()
    rows = _make_inputs(m, d, seed=m * 7919 + d)
    functions = _callables(rows)
    memory: dict[str, dict] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name in methods:  # first full-size call: peak memory, and the output for the checks
        reset = _reset_peak()
        baseline = _status_kib("VmRSS") if reset else _status_kib("VmHWM")
        outputs[name] = functions[name]()
        growth = max(0, _status_kib("VmHWM") - baseline) * 1024
        memory[name] = {"peak_extra_bytes": growth, "hwm_reset": reset}
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for round_index in range(max(repeats.values())):
        for name in methods:  # round-robin: drifting load from other processes hits all
            if round_index < repeats[name]:
                start = time.perf_counter()
                functions[name]()
                samples[name].append(time.perf_counter() - start)
    check: dict[str, float] = {}
    if m * d <= 150_000_000:  # a float64 reference costs 8 m d bytes more
        from fl.aggregate import principal_gradient

        reference = principal_gradient([row.double() for row in rows], K_PROPORTION)
        scale = float(reference.abs().max().clamp(min=1e-30))
        for name in ("gram", "loop"):
            if name in outputs:
                error = float((outputs[name].double() - reference).abs().max()) / scale
                check[f"{name}_vs_float64_max_rel"] = error
    return {"samples": samples, "memory": memory, "check": check}


# ----------------------------------------------------------------------------- driver side


def _analytic_bytes(method: str, m: int, d: int) -> int:
    """Bytes each implementation allocates beyond its inputs (float32 updates)."""
    from fl.aggregate import BLOCK_COLUMNS

    if method == "mean":
        return 4 * d  # the float32 accumulator, returned as the result
    if method == "gram":
        return 8 * m * min(d, BLOCK_COLUMNS) + 4 * d  # one float64 block + the result
    # stacked float32 copy + its float64 copy (alive together) + one direction + the result
    return 4 * m * d + 8 * m * d + 4 * d + 4 * d


def _loop_estimate_seconds(m: int, d: int, mean_seconds: float) -> float:
    """Two passes over the m x d matrix per kept direction plus the float64 Gram copy; the
    factor is fitted loosely (upwards) to single-thread runs on a 2-core EPYC."""
    k = max(1, math.floor(m * K_PROPORTION))
    return mean_seconds * (4 * k + 12)


def _calibrate_mean() -> float:
    """Seconds per input entry of the weighted mean (m = 4, d = 1M), to plan the grid."""
    rows = _make_inputs(4, 1_000_000, seed=0)
    mean = _callables(rows)["mean"]
    mean()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        mean()
        times.append(time.perf_counter() - start)
    return min(times) / (4 * 1_000_000)


def _run_worker(args: list[str], timeout: float, threads: int | None) -> dict:
    threading = [] if threads is None else ["--threads", str(threads)]
    # A fixed mmap threshold makes glibc return every freed block of 128 KiB or more to the
    # system at once, so one method's freed memory does not hide the next one's peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    completed = subprocess.run(
        [sys.executable, __file__, *threading, "--worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in load],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="d = 1M only, fewer repeats")
    parser.add_argument("--output", type=Path, default=None, help="JSON path")
    parser.add_argument("--clients", type=str, default=None, help="comma-separated m values")
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated d values")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in the workers (default: torch's own choice); on a shared machine "
        "1 avoids OpenMP threads waiting on descheduled peers",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    if args.worker:
        m, d = int(args.worker[1]), int(args.worker[2])
        result = _worker(m, d, args.worker[4].split(","), json.loads(args.worker[3]))
        print(json.dumps(result))
        return 0

    sizes = [1_000_000] if args.quick else [1_000_000, 11_000_000]
    clients = [5, 12] if args.quick else [5, 12, 100]
    if args.sizes:
        sizes = [int(float(x)) for x in args.sizes.split(",")]
    if args.clients:
        clients = [int(x) for x in args.clients.split(",")]
    output = args.output or ROOT / "benchmarks" / "results" / (
        "aggregation-cpu-quick.json" if args.quick else "aggregation-cpu.json"
    )
    machine = _machine()
    started = time.perf_counter()
    print(
        f"{machine['cpu']}, {machine['usable_cpus']} usable CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), load average {machine['load_average_at_start']}"
    )
    seconds_per_entry = _calibrate_mean()
    cases = []
    for d in sizes:
        for m in clients:
            estimate = _loop_estimate_seconds(m, d, seconds_per_entry * m * d)
            methods = ["mean", "gram"]
            skipped = None
            if estimate <= (LOOP_LIMIT_SECONDS / 4 if args.quick else LOOP_LIMIT_SECONDS):
                methods.append("loop")
            else:
                skipped = f"loop form skipped: estimated {estimate:.0f} s per call"
            base = 5 if m * d <= 20_000_000 else 3 if m * d <= 200_000_000 else 2
            base = args.repeats or base
            repeats = {"mean": base, "gram": base, "loop": 1 if estimate > 2.0 else base}
            repeats = {name: repeats[name] for name in methods}
            load_before = [round(x, 2) for x in os.getloadavg()]
            result = _run_worker(
                ["case", str(m), str(d), json.dumps(repeats), ",".join(methods)],
                timeout=600,
                threads=args.threads,
            )
            case = {
                "m": m,
                "d": d,
                "load_average_before": load_before,
                "methods": {},
                **result["check"],
            }
            if skipped:
                case["note"] = skipped
            mean_samples = result["samples"]["mean"]
            mean_median = statistics.median(mean_samples)
            for name in METHODS:
                entry: dict = {"analytic_extra_bytes": _analytic_bytes(name, m, d)}
                if name in methods:
                    own = result["samples"][name]
                    entry.update(
                        median_seconds=statistics.median(own),
                        samples_seconds=own,
                        ratio_to_mean=statistics.median(own) / mean_median,
                        # per round (the methods ran back to back): robust to load drift
                        paired_ratio_to_mean=statistics.median(
                            t / b for t, b in zip(own, mean_samples, strict=False)
                        ),
                        measured_peak_extra_bytes=result["memory"][name]["peak_extra_bytes"],
                        hwm_reset=result["memory"][name]["hwm_reset"],
                    )
                else:
                    entry["skipped"] = skipped
                case["methods"][name] = entry
            cases.append(case)
            _print_row(case)
    elapsed = time.perf_counter() - started
    try:
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    record = {
        "benchmark": "aggregation",
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "k_proportion": K_PROPORTION,
        "dtype": "float32",
        "threads": args.threads if args.threads is not None else machine["torch_threads"],
        "machine": machine,
        "elapsed_seconds": round(elapsed, 1),
        "cases": cases,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"wrote {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output} "
        f"in {elapsed:.0f} s"
    )
    return 0


_HEADER_PRINTED = False


def _print_row(case: dict) -> None:
    global _HEADER_PRINTED
    if not _HEADER_PRINTED:
        print(
            f"{'m':>4} {'d':>11} {'method':>6} {'median s':>9} {'x mean':>7} "
            f"{'peak MiB':>9} {'analytic MiB':>12}"
        )
        _HEADER_PRINTED = True
    for name, entry in case["methods"].items():
        if "median_seconds" not in entry:
            print(f"{case['m']:>4} {case['d']:>11,} {name:>6} {entry['skipped']}")
            continue
        measured = entry.get("measured_peak_extra_bytes")
        measured_text = f"{measured / 2**20:9.1f}" if measured is not None else f"{'-':>9}"
        print(
            f"{case['m']:>4} {case['d']:>11,} {name:>6} {entry['median_seconds']:9.3f} "
            f"{entry['ratio_to_mean']:7.2f} {measured_text} "
            f"{entry['analytic_extra_bytes'] / 2**20:12.1f}"
        )
    checks = [
        f"{name} {case[f'{name}_vs_float64_max_rel']:.1e}"
        for name in ("gram", "loop")
        if f"{name}_vs_float64_max_rel" in case
    ]
    if checks:
        print(f"{'':>17} max relative error against a float64 evaluation: {', '.join(checks)}")


if __name__ == "__main__":
    sys.exit(main())
