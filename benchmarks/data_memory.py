"""Data memory: peak RSS per process of a run on a CIFAR-sized dataset against digits.

    python benchmarks/data_memory.py                 # the three runs below, 2 rounds each
    python benchmarks/data_memory.py --no-npz        # without the float32 .npz run

It writes a CIFAR-sized local dataset the way the hub stores CIFAR-10: one
parquet file of 50,000 random 32x32 RGB images, PNG-encoded (datasets' Image
feature), with labels 0..9. Then it runs, one after the other, ``python -m fl.cli
run`` (as a user types it; a fresh data cache, so the first run decodes the file)
with 10 clients (IID), all training in each of 2 rounds, 1 local epoch, FedAvg:

``digits``   the quickstart's data (1,797 8x8 images as float32), model cnn;
``parquet``  the CIFAR-sized parquet (``dataset.name=local``): decoded once into the
             data cache as uint8, memory-mapped; a client reads its own rows and
             each batch becomes float32 on the device; model lenet;
``npz``      the same 50,000 images as a float32 .npz (``dataset.name=npz``, what
             the loader did for every dataset before: the whole array in every
             process, 614 MB), model lenet.

Then, for each dataset, one fresh process reads it from the same data cache and
trains the model on the 10 clients one after another, as a Ray worker that serves
every client would (``probe``): its RSS after loading and after each client shows
what grows with the clients and what with the dataset.

Every process of a run (found by an environment marker every child inherits, and
as descendants of this process, read from /proc every 0.2 s) is sampled for its
resident set (RSS); the JSON lists each process's peak with its command line and
the largest peak per kind: ``ray worker`` (Ray's worker processes, where the
ClientApps of the simulated clients run), ``data check`` (the
child of ``bonsai run`` that decodes and partitions the data before Flower
starts), ``bonsai`` (the command itself), Flower and Ray's own processes. Results
go to benchmarks/results/data-memory-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from fl.proctree import descendants, marked  # noqa: E402

MARK = "BONSAI_DATA_MEMORY_MARK"
PAGE = os.sysconf("SC_PAGE_SIZE")
IMAGES, SHAPE, CLASSES = 50_000, (32, 32, 3), 10
MIB = 2**20


# --- data ---------------------------------------------------------------------------------
def write_parquet(path: Path, seed: int = 0) -> None:
    """CIFAR-10's hub layout: ``img`` (PNG bytes, 32x32 RGB) and ``label``."""
    import io

    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (IMAGES, *SHAPE), dtype=np.uint8)
    encoded = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        encoded.append({"bytes": buf.getvalue(), "path": None})
    labels = (np.arange(IMAGES) % CLASSES).astype(np.int64)
    rng.shuffle(labels)
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"img": encoded, "label": labels.tolist()}).cast_column(
        "img", datasets.Image())
    ds.to_parquet(str(path))
    np.savez(path.with_suffix(".npz"), x=(images.transpose(0, 3, 1, 2) / 255).astype(np.float32),
             y=labels)


# --- sampling -----------------------------------------------------------------------------
def _pids(mark: str) -> set[int]:
    """The run's processes: those carrying the mark, and every descendant of this one
    (Ray's agents rewrite the memory /proc/PID/environ shows; benchmarks/scale.py)."""
    return set(descendants(os.getpid())) | set(marked(mark, key=MARK))


def _title(pid: int) -> str:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    return raw.decode(errors="replace")[:120]


def kind_of(title: str) -> str:
    if "default_worker.py" in title or title.startswith("ray::"):
        return "ray worker"  # the processes Ray runs the ClientApps in
    if "check_data_child" in title:  # also the old name, _check_data_child
        return "data check"
    if " fl.cli " in f" {title} ":
        return "bonsai"
    for name in ("flower-superlink", "flower-superexec", "flwr-serverapp", "flwr-simulation",
                 "flwr"):
        if name in title:
            return name
    if "raylet" in title or "gcs_server" in title or "/ray/" in title:
        return "ray system"
    return "other"


class Sampler(threading.Thread):
    """Peak RSS of every process of the run, by PID, with its most telling title."""

    def __init__(self, mark: str, interval: float = 0.2):
        super().__init__(daemon=True)
        self.mark, self.interval = mark, interval
        self.stop = threading.Event()
        self.peak: dict[int, int] = {}
        self.title: dict[int, str] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in _pids(self.mark):
                try:
                    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
                    title = _title(pid)
                except (OSError, ValueError, IndexError):
                    continue
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
                # the latest non-empty title: a forked child first shows its parent's, and
                # an exiting process none
                if title:
                    self.title[pid] = title
            self.stop.wait(self.interval)

    def summary(self) -> dict[str, Any]:
        procs = sorted(({"pid": p, "kind": kind_of(self.title.get(p, "")),
                         "title": self.title.get(p, ""), "peak_rss_mib": round(r / MIB, 1)}
                        for p, r in self.peak.items()), key=lambda d: -d["peak_rss_mib"])
        by_kind: dict[str, float] = {}
        for d in procs:
            by_kind[d["kind"]] = max(by_kind.get(d["kind"], 0.0), d["peak_rss_mib"])
        workers = [d["peak_rss_mib"] for d in procs if d["kind"] == "ray worker"]
        return {"max_peak_rss_mib_by_kind": by_kind, "ray_workers": len(workers),
                "ray_worker_peak_rss_mib": workers, "processes": procs}


# --- one process serving every client -------------------------------------------------------
PROBE = """
import json, sys, torch
from fl import config as c, data as D
from fl.models import build_model
from fl.train import train
def rss():
    return round(int(open('/proc/self/statm').read().split()[1]) * PAGE / 2**20, 1)
cfg = c.load(None, json.loads(sys.argv[1]))
out = {"after_import": rss()}
fd = D.load_federated(cfg)
out["after_load"] = rss()
model = build_model(cfg.model, fd.input_shape, fd.num_classes, seed=0)
out["after_each_client"] = []
for pid in range(len(fd.partitions)):
    train(model, fd.client(pid), cfg.train, seed=pid, device=torch.device("cpu"))
    out["after_each_client"].append(rss())
print(json.dumps(out))
""".replace("PAGE", str(PAGE))


def probe(overrides: list[str], env: dict[str, str]) -> dict[str, Any]:
    """RSS (MiB) of one process that loads the data and trains every client in turn."""
    base = ["rounds=2", "strategy.name=fedavg", "partition.kind=iid",
            "partition.num_clients=10", "train.local_epochs=1"]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(base + overrides)],
                          cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError("probe failed:\n" + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- runs ---------------------------------------------------------------------------------
def run(name: str, overrides: list[str], work: Path, env: dict[str, str]) -> dict[str, Any]:
    mark = uuid.uuid4().hex
    sampler = Sampler(mark)
    sampler.start()
    t0 = time.perf_counter()
    args = [sys.executable, "-m", "fl.cli", "run", "quickstart", "--quiet",
            "--set", f"output_dir={work / name}", "--set", "rounds=2",
            "--set", "strategy.name=fedavg", "--set", "partition.kind=iid",
            "--set", "partition.num_clients=10", "--set", "strategy.min_train_clients=10",
            "--set", "train.local_epochs=1", *[a for o in overrides for a in ("--set", o)]]
    try:
        proc = subprocess.run(args, cwd=ROOT, env={**env, MARK: mark}, capture_output=True,
                              text=True)
    finally:
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: bonsai run failed (exit {proc.returncode}):\n"
                           + proc.stderr[-3000:])
    (run_dir,) = (work / name).iterdir()
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return {"overrides": overrides, "wall_seconds": round(wall, 1),
            "accuracy": [r["accuracy"] for r in rounds], **sampler.summary()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-npz", action="store_true", help="skip the float32 .npz run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        "data-memory-cpu.json"))
    a = p.parse_args()
    import torch

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(q for q in (str(ROOT), os.environ.get("PYTHONPATH", ""))
                                         if q)}
    result: dict[str, Any] = {
        "benchmark": "benchmarks/data_memory.py", "argv": sys.argv[1:],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
                    "python": platform.python_version(), "torch": torch.__version__},
        "setup": {"images": IMAGES, "image_shape": [3, 32, 32], "classes": CLASSES,
                  "encoding": "PNG in parquet (datasets Image feature), random pixels",
                  "clients": 10, "partition": "iid", "rounds": 2, "local_epochs": 1,
                  "strategy": "fedavg", "test_fraction": 0.2,
                  "pool_bytes_uint8": int(IMAGES * 0.8) * 3 * 32 * 32,
                  "pool_bytes_float32": int(IMAGES * 0.8) * 3 * 32 * 32 * 4},
        "runs": {},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bonsai-data-memory-") as tmp:
        work = Path(tmp)
        env["FLWR_HOME"] = str(work / "flwr-home")
        env["BONSAI_CACHE_DIR"] = str(work / "data-cache")  # fresh: the first run decodes
        data = work / "cifar-sized.parquet"
        t0 = time.perf_counter()
        write_parquet(data)
        result["setup"]["parquet_mb"] = round(data.stat().st_size / 1e6, 1)
        result["setup"]["write_seconds"] = round(time.perf_counter() - t0, 1)
        plans = [("digits", []),
                 ("parquet", ["dataset.name=local", f"dataset.path={data}", "model=lenet"])]
        if not a.no_npz:
            plans.append(("npz", ["dataset.name=npz", f"dataset.path={data.with_suffix('.npz')}",
                                  "model=lenet"]))
        for name, overrides in plans:
            print(f"{name} ...", flush=True)
            r = run(name, overrides, work, env)
            r["one_process_rss_mib"] = probe(overrides, env)
            r["overrides"] = [o.replace(str(work), "TMP") for o in r["overrides"]]
            result["runs"][name] = r
            print(f"  {r['wall_seconds']:.0f} s; peak RSS by kind (MiB): "
                  f"{r['max_peak_rss_mib_by_kind']}; one process: "
                  f"{r['one_process_rss_mib']}", flush=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    runs = result["runs"]
    worker = {k: max(v["ray_worker_peak_rss_mib"], default=0.0) for k, v in runs.items()}
    result["ray_worker_peak_rss_mib"] = worker
    result["ray_worker_over_digits_mib"] = {k: round(v - worker["digits"], 1)
                                            for k, v in worker.items()}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"largest Ray worker peak RSS (MiB): {worker}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
