"""The edge path end to end, measured: node keys, a federation of CPU-only nodes on one
thread each, the final model exported to ONNX and checked in onnxruntime, and an int8
model.

    python benchmarks/edge.py [--nodes 3] [--experiment quickstart] [--set KEY=VALUE ...]

Runs these commands as a user types them (``bonsai`` subprocesses; WORK is a fresh
temporary folder, or ``--work``):

    bonsai deploy keys --out WORK/keys --nodes 3
    bonsai deploy split quickstart --out WORK/data --set partition.num_clients=3
    bonsai deploy local quickstart --nodes 3 --data WORK/data --keys WORK/keys \\
        --threads 1 --device cpu --quiet --set output_dir=WORK/results --set rounds=8 ...
    bonsai export WORK/results/RUN --format onnx --quantize int8

then reads what they wrote: each node's own per-round log (``nodes/NAME.jsonl``:
train seconds and the ClientApp's peak resident memory), ``summary.json`` and the
export report (``model.onnx.json``), and appends one record to
benchmarks/results/edge-cpu.json (the README's edge figures come from there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from kernels import append_record, machine  # noqa: E402  (benchmarks/kernels.py)

#: the run: a short AutoFLIP run of the quickstart that reaches its pruning targets
DEFAULT_SET = ["rounds=8", "pruning.schedule_rounds=6"]


def bonsai(args: list[str], log: list[dict[str, Any]]) -> str:
    """Run ``bonsai ARGS`` (this checkout's code), record the command line and its
    seconds, return stdout; stop on failure with its stderr."""
    cmd = [sys.executable, "-m", "fl.cli", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log.append({"command": shlex.join(["bonsai", *args]),
                "seconds": round(time.perf_counter() - t, 2)})
    print(f"$ {log[-1]['command']}  ({log[-1]['seconds']} s)", flush=True)
    if proc.returncode != 0:
        sys.exit(f"failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def node_figures(run_dir: Path) -> dict[str, Any]:
    """Per node: every round it logged, and the medians/peaks over its train rounds."""
    out = {}
    for f in sorted((run_dir / "nodes").glob("*.jsonl")):
        lines = [json.loads(s) for s in f.read_text().splitlines() if s.strip()]
        train = [r for r in lines if r["message"] == "train"]
        out[f.stem] = {
            "partition_id": lines[0]["partition-id"] if lines else None,
            "examples": lines[0]["num-examples"] if lines else None,
            "threads": sorted({r["threads"] for r in lines}),
            "train_rounds": len(train),
            "median_train_seconds": round(statistics.median(
                r["train-seconds"] for r in train), 4) if train else None,
            "median_handler_seconds": round(statistics.median(
                r["handler-seconds"] for r in train), 4) if train else None,
            "max_peak_memory_mb": max((r["peak-memory-mb"] for r in lines), default=None),
            "rounds": [{"round": r["round"], "message": r["message"],
                        "train_seconds": round(r["train-seconds"], 4),
                        "handler_seconds": r["handler-seconds"],
                        "peak_memory_mb": r["peak-memory-mb"]} for r in lines],
        }
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--experiment", default="quickstart")
    p.add_argument("--set", dest="overrides", action="append", default=None,
                   metavar="KEY=VALUE", help=f"experiment overrides (default: {DEFAULT_SET})")
    p.add_argument("--calibration", type=int, default=128)
    p.add_argument("--work", type=Path, default=None, help="folder for keys, data, results "
                   "(default: a fresh temporary folder, kept)")
    p.add_argument("--out", type=Path, default=None, help="JSON file to append to")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="bonsai-edge-"))
    overrides = a.overrides if a.overrides is not None else DEFAULT_SET
    sets = [x for o in overrides for x in ("--set", o)]
    n = a.nodes
    log: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bonsai(["deploy", "keys", "--out", str(work / "keys"), "--nodes", str(n)], log)
    bonsai(["deploy", "split", a.experiment, "--out", str(work / "data"),
            "--set", f"partition.num_clients={n}", *sets], log)
    out = bonsai(["deploy", "local", a.experiment, "--nodes", str(n), "--data",
                  str(work / "data"), "--keys", str(work / "keys"), "--threads", "1",
                  "--device", "cpu", "--quiet", "--set", f"output_dir={work / 'results'}",
                  *sets], log)
    (run_dir,) = [Path(line.split(":", 1)[1].strip()) for line in out.splitlines()
                  if line.startswith("results:")]
    bonsai(["export", str(run_dir), "--format", "onnx", "--quantize", "int8",
            "--calibration", str(a.calibration), "--runs", "200"], log)
    summary = json.loads((run_dir / "summary.json").read_text())
    export = json.loads((run_dir / "model.onnx.json").read_text())
    rounds = [json.loads(s) for s in (run_dir / "rounds.jsonl").read_text().splitlines()]
    record = {
        "benchmark": "edge",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(torch.device("cpu")),
        "versions": {k: _version(k) for k in ("flwr", "onnx", "onnxruntime", "torch")},
        "experiment": a.experiment, "overrides": overrides, "nodes": n,
        "commands": log,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "run": {"final_accuracy": summary["final_accuracy"],
                "rounds": summary["rounds"], "wall_seconds": summary.get("wall_seconds"),
                "round_seconds": [r["seconds"] for r in rounds],
                "kept_units": rounds[-1].get("kept_units"),
                "density": rounds[-1].get("density")},
        "node_figures": node_figures(run_dir),
        "export": {k: export[k] for k in (
            "format", "structured", "params", "full_params", "file_bytes", "flops",
            "full_flops", "latency_by_runtime", "threads", "test_examples",
            "equal_predictions", "max_abs_logit_diff", "accuracy")},
        "int8": {k: export["int8"][k] for k in (
            "file_bytes", "latency_ms", "accuracy", "float_accuracy", "accuracy_drop",
            "equal_to_float", "settings")},
        "work": str(work),
    }
    e, q = record["export"], record["int8"]
    print(f"final accuracy {100 * summary['final_accuracy']:.2f}% after {summary['rounds']} "
          f"rounds; {record['run']['kept_units']}")
    for name, f in record["node_figures"].items():
        print(f"{name}: median train {f['median_train_seconds']} s/round, peak memory "
              f"{f['max_peak_memory_mb']} MB, threads {f['threads']}")
    print(f"ONNX {e['file_bytes']} B, {e['params']} params; latency "
          f"{e['latency_by_runtime']} ms; accuracy {100 * e['accuracy']:.2f}%")
    print(f"int8 {q['file_bytes']} B; latency {q['latency_ms']} ms; accuracy "
          f"{100 * q['accuracy']:.2f}% (drop {100 * q['accuracy_drop']:.2f} points)")
    append_record(record, "edge", torch.device("cpu"), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
