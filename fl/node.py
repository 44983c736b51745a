"""What a SuperNode tells its ClientApp about itself, and what the client measures.

A deployed SuperNode is started with ``--node-config "key=value ..."``; the
ClientApp receives it as ``context.node_config``. The keys are defined here,
once, and read by :func:`fl.nodedata.node_data` (which examples) and by
:class:`EdgeProfile` (which device, how many threads, where to log):

==================  =========================================================
``partition-id``    the node's place in the population order (simulation: its
                    partition of the central dataset)
``num-partitions``  simulation only: how many partitions the dataset is cut in
``data-path``       deployment: this node's own ``.npz`` (``x``, ``y``) or image
                    folder (one sub-folder per class); no partitioning
``num-classes``     deployment, optional: classes of the global model when the
                    node cannot derive them (see :func:`fl.nodedata.node_data`)
``device``          ``cpu`` | ``cuda`` | ``auto``: overrides ``resources.device``
``threads``         CPU threads of the local training (``torch.set_num_threads``)
``metrics-path``    optional node-local JSON-lines file: one line per round with
                    the node's train seconds and peak memory
==================  =========================================================

:class:`PeakMemory` measures the peak resident memory of the ClientApp process
over a block (Linux: the kernel's high-water mark, reset at the start of the
block via ``/proc/self/clear_refs``), and the peak CUDA memory when on a GPU.
"""

from __future__ import annotations

import json
import os
import re
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DATA_PATH",
    "DEVICE",
    "METRICS_PATH",
    "NUM_CLASSES",
    "NUM_PARTITIONS",
    "PEAK_CUDA_MEMORY_MB",
    "PARTITION_ID",
    "THREADS",
    "EdgeProfile",
    "PeakMemory",
]

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
NUM_CLASSES = "num-classes"
DEVICE = "device"
THREADS = "threads"
METRICS_PATH = "metrics-path"
#: reply metric next to fl.contract.PEAK_MEMORY_MB when the node trains on CUDA
PEAK_CUDA_MEMORY_MB = "peak-cuda-memory-mb"
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EdgeProfile:
    """A node's compute profile: device and CPU threads, plus an optional local log.

    Parameters
    ----------
    device:
        ``cpu``, ``cuda`` or ``auto``; ``None`` keeps the experiment's
        ``resources.device``.
    threads:
        ``torch.set_num_threads`` for this node; ``None`` keeps the experiment's
        ``resources.client_cpus``.
    metrics_path:
        Append one JSON line per training round here (on the node), or ``None``.
    """

    device: str | None = None
    threads: int | None = None
    metrics_path: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> EdgeProfile:
        """Read and check the profile keys of a node config."""
        device = node_config.get(DEVICE)
        if device is not None and str(device) not in DEVICES:
            raise ValueError(f"node config {DEVICE}: got {device!r}; allowed: "
                             f"{', '.join(DEVICES)}")
        threads = node_config.get(THREADS)
        if threads is not None:
            try:
                threads = int(threads)
            except (TypeError, ValueError):
                threads = -1
            if threads < 1:
                raise ValueError(f"node config {THREADS}: got {node_config.get(THREADS)!r}; "
                                 "allowed: an integer >= 1")
        path = node_config.get(METRICS_PATH)
        return cls(str(device) if device is not None else None, threads,
                   str(path) if path else None)

    def device_or(self, default: str) -> str:
        """This node's device preference, else ``default`` (the experiment's)."""
        return self.device or default

    def apply_threads(self, default: int) -> int:
        """Limit torch's intra-op threads to this node's share; return the number set."""
        n = self.threads or default
        torch.set_num_threads(n)
        return n

    def record(self, entry: Mapping[str, Any]) -> None:
        """Append ``entry`` (plus a timestamp) to the node-local metrics file, if any."""
        if not self.metrics_path:
            return
        p = Path(self.metrics_path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")


def _vm_hwm_mb() -> float | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


class PeakMemory:
    """Peak memory of this process over a ``with`` block, in MB.

    ``rss_mb``: the peak resident set size (CPU memory, what an edge device runs
    out of). On Linux the kernel's high-water mark is reset when the block
    starts, so the value belongs to the block; elsewhere it is the process
    peak since start (``ru_maxrss``). ``cuda_mb``: peak CUDA memory allocated by
    torch during the block (0 without CUDA).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.rss_mb = 0.0
        self.cuda_mb = 0.0

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        hwm = _vm_hwm_mb()
        if hwm is None:  # not Linux: ru_maxrss is KB on Linux, bytes on macOS
            scale = 1024 * 1024 if os.uname().sysname == "Darwin" else 1024
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
        self.rss_mb = round(hwm, 2)
        if self.device.type == "cuda":
            self.cuda_mb = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 2)
