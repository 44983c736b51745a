"""A real Ray cluster on this machine for the tests: a head and worker nodes, each
``ray start ... --block`` run as our child in a session of its own, so every process of
the cluster (GCS, raylets, agents, the workers of actors) is in a session one of our
``ray start`` processes leads, found by PID, never by name.

Never ``ray stop``: it ends every Ray on the machine by name, other people's test
clusters too. :meth:`LoopbackCluster.close` ends our sessions' processes by PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from processes import MARK_ENV

from fl.proctree import alive, proc_table, start_time, terminate_trees
from fl.runtime import free_port

#: the process title of a Flower simulation's actor on a Ray node
ACTOR_TITLE = "ray::ClientAppActor"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


class LoopbackCluster:
    """``nodes`` Ray nodes of ``cpus`` CPUs each on 127.0.0.1, each with its own temp dir
    under ``root``; a context manager (``close`` ends them all and checks it)."""

    def __init__(self, root: Path, nodes: int = 2, cpus: int = 1, timeout: float = 120.0):
        self.root = Path(tempfile.mkdtemp(prefix="rc-", dir=root))  # short: socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes, self.cpus, self.timeout = nodes, cpus, timeout
        self.procs: list[subprocess.Popen] = []
        # no test mark in the cluster: the tests tell Bonsai's processes by it
        self.env = {k: v for k, v in os.environ.items() if k not in (MARK_ENV, "RAY_ADDRESS")}
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"

    def __enter__(self) -> LoopbackCluster:
        try:
            self._start("head", ["--head", "--port", str(self.port), "--include-dashboard",
                                 "false", "--ray-client-server-port", str(free_port())])
            for i in range(1, self.nodes):
                self._start(f"worker{i}", ["--address", self.address])
            self.wait_nodes()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, name: str, args: list[str]) -> None:
        tmp = self.root / name
        tmp.mkdir()
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - owned by Popen
        self.procs.append(subprocess.Popen(
            ["ray", "start", *args, "--num-cpus", str(self.cpus), "--node-ip-address",
             "127.0.0.1", "--disable-usage-stats", "--dashboard-agent-listen-port",
             str(free_port()), "--temp-dir", str(tmp), "--block"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True))
        log.close()
        deadline = time.monotonic() + self.timeout
        while b"Ray runtime started" not in (self.root / f"{name}.log").read_bytes():
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({name}) failed:\n"
                                   + (self.root / f"{name}.log").read_text()[-3000:])
            time.sleep(0.3)

    def wait_nodes(self) -> None:
        """Until a raylet of every node runs (its node id on its command line)."""
        deadline = time.monotonic() + self.timeout
        while len(self.node_ids()) < self.nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.node_ids())} of {self.nodes} raylets")
            time.sleep(0.3)

    # --- what the cluster is made of ----------------------------------------------------
    def members(self) -> list[int]:
        """Every live process of the cluster: those in the sessions our ``ray start``s
        lead (all of Ray's daemons and workers stay in them)."""
        sessions = {p.pid for p in self.procs}
        return sorted(pid for pid, proc in proc_table().items()
                      if proc.sid in sessions and proc.state != "Z")

    def daemons(self) -> dict[int, int]:
        """The GCS and the raylets, pid -> start time (with the PID, an identity)."""
        return {p: st for p in self.members()
                if ("gcs_server" in (c := cmdline(p)) or "/raylet/raylet " in c)
                and (st := start_time(p)) is not None}

    def node_ids(self) -> dict[int, str]:
        """raylet pid -> its node id (hex)."""
        out = {}
        for p in self.members():
            c = cmdline(p)
            if "/raylet/raylet " in c and "--node_id=" in c:
                out[p] = c.split("--node_id=", 1)[1].split()[0]
        return out

    def actors(self) -> list[int]:
        """The cluster's workers that hold a Flower simulation's actor."""
        return [p for p in self.members() if cmdline(p).startswith(ACTOR_TITLE)]

    def close(self) -> list[int]:
        """End every process of the cluster by PID (SIGTERM, SIGKILL after 10 s), remove
        the temp dirs; the PIDs that survived (none expected)."""
        left = terminate_trees([p.pid for p in self.procs], grace=10.0)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                left.append(p.pid)
        left += [p for p in self.members() if alive(p)]
        shutil.rmtree(self.root, ignore_errors=True)
        return sorted(set(left))


def gcs_answers(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False
