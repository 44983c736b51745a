"""What the benchmark scripts share: side-by-side timing and the records they append.

Every speed figure the project quotes is a ratio of two implementations timed
round-robin in one process (:func:`interleaved`), so load on a shared host hits
both alike; every run appends a record tagged with the machine and versions
(:func:`machine`) to a JSON list under benchmarks/results/ (:func:`append_record`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fl.kernels import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["append_record", "installed", "interleaved", "machine", "sync"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calls_per_sample(fn: Callable[[], object], device: torch.device, target: float) -> int:
    """How many back-to-back calls make one timed sample last about ``target`` seconds.

    1 on CPU. On a GPU one call of a small step is a few microseconds, less than the
    synchronisation around it, so a sample times a batch of calls (queued as a
    training loop queues them) and divides.
    """
    if device.type != "cuda":
        return 1
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - start
    return max(1, min(1000, int(target / max(once, 1e-7))))


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    warmup: int = 2,
    target: float = 2e-3,
) -> dict[str, dict[str, float]]:
    """Min and median seconds per call of each function, run round-robin so load drifts
    hit all alike.

    Ratios are taken of the minima: on a shared host other processes only ever add
    time, so the minimum is the least noisy estimate of a function's own cost.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {name: _calls_per_sample(fn, device, target) for name, fn in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / calls[name])
    return {
        k: {"min": min(v), "median": statistics.median(v), "calls_per_sample": calls[k]}
        for k, v in times.items()
    }


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": installed("triton"),
        "triton_loaded": HAS_TRITON,  # False without a GPU or the interpreter
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    return info


def installed(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def append_record(record: dict, kind: str, device: torch.device, out: Path | None) -> Path:
    """Append ``record`` to the JSON list in ``out``, by default
    benchmarks/results/<kind>-<cpu or the card's name>.json."""
    slug = "cpu" if device.type == "cpu" else record["machine"]["device"].lower().replace(" ", "-")
    out = out or ROOT / "benchmarks" / "results" / f"{kind}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(out.read_text()) if out.exists() else []
    history.append(record)
    out.write_text(json.dumps(history, indent=1) + "\n")
    print(f"# appended to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return out
