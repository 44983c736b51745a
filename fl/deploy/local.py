"""A whole Flower deployment on loopback, for one run: SuperLink with TLS and node
authentication, N SuperNodes each with its own data, registration of their keys,
``flwr run``; everything ended by PID afterwards, also on failure or Ctrl-C, and
by a watchdog process when ``bonsai`` itself is killed.

This is the real deployment path (separate processes talking HTTPS on
127.0.0.1), not the simulation runtime: what works here works across machines
with the same commands and other host names (README, Deployment).

Why one module of this length: one command's federation (``bonsai deploy local``):
the process set (start, readiness, pause, resume and restart of a node, close), its
planning from a data folder and the run on it, all over one node list and log folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fl.config import ExperimentConfig
from fl.data import check_model_fit
from fl.deploy.keys import KeySet, check_node_key, check_superlink_tls, make_keys
from fl.deploy.processes import (
    DeployError,
    SuperLinkSpec,
    SuperNodeSpec,
    connection_toml,
    register_node,
    superlink_command,
    supernode_command,
    wait_node,
    wait_superlink,
)
from fl.flowerapp import write_app, write_run_config
from fl.node import DATA_PATH, DEVICE, METRICS_PATH, PARTITION_ID, THREADS
from fl.nodedata import node_data
from fl.procgroup import ProcessContext, ProcessGroup, RuntimeFailure
from fl.proctree import MARKER_ENV
from fl.progress import watch
from fl.results import RUN_CONFIG_TOML, SUMMARY_JSON
from fl.rundir import prepare_run_dir
from fl.runtime import FLOWER_ENV, flower_bin, free_port
from fl.simulation import wait_run
from fl.userdata import DataError
from fl.watchdog import WATCHDOG_LOG

__all__ = ["LocalFederation", "LocalNode", "existing_keys", "node_sources", "plan_local",
           "run_local"]

CONNECTION = "bonsai-local"
#: Flower 1.42: a session counts as online for 2 x 30 s after its last heartbeat
RELEASE_SECONDS = 60.0
RESTART_RETRY_SECONDS = 3.0


@dataclass
class LocalNode:
    """One SuperNode of a loopback federation.

    ``register=False`` starts it with a key the SuperLink does not know (it is
    refused: what an intruder sees).
    """

    name: str
    data_path: str
    partition_id: int
    device: str | None = None
    threads: int | None = None
    register: bool = True
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    node_id: int | None = None  #: set once connected
    refused: bool = False

    def node_config(self, metrics_path: Path | None) -> dict[str, Any]:
        cfg: dict[str, Any] = {PARTITION_ID: self.partition_id,
                               DATA_PATH: str(Path(self.data_path).resolve())}
        if self.device:
            cfg[DEVICE] = self.device
        if self.threads:
            cfg[THREADS] = self.threads
        if metrics_path is not None:
            cfg[METRICS_PATH] = str(metrics_path)
        cfg.update(self.extra_config)
        return cfg


def existing_keys(keys_dir: str | Path, names: Sequence[str]) -> KeySet:
    """A ``bonsai deploy keys`` folder with valid TLS files and a key for every node."""
    ks = KeySet(Path(keys_dir), tuple(names))
    check_superlink_tls(ks.ca_cert, ks.superlink_cert, ks.superlink_key)
    missing = [n for n in names if not ks.node_key(n).is_file()]
    if missing:
        raise DeployError(f"--keys: {str(keys_dir)!r} has no key for {', '.join(missing)} "
                          f"(create them with `bonsai deploy keys --nodes {len(names)}`)")
    for n in names:
        check_node_key(ks.node_key(n))
    return ks


class LocalFederation(ProcessContext):
    """SuperLink + SuperNodes on 127.0.0.1 with TLS and node auth; a context manager.

    >>> with LocalFederation(run_dir, nodes) as fed:
    ...     proc = fed.flwr_run(run_config_toml)
    ...     refused = fed.wait_nodes()

    Parameters
    ----------
    log_dir:
        Where the processes' logs go (``superlink.log``, ``nodes/NAME.log``) and
        the nodes' own per-round metrics (``nodes/NAME.jsonl``).
    nodes:
        The SuperNodes to start.
    keys_dir:
        Existing ``bonsai deploy keys`` folder; None makes fresh keys in a
        private temporary folder.
    insecure:
        No TLS and no node auth (for debugging only).
    """

    def __init__(self, log_dir: str | Path, nodes: Sequence[LocalNode],
                 keys_dir: str | Path | None = None, insecure: bool = False,
                 startup_timeout: float = 90.0):
        self.log_dir = Path(log_dir)
        self.nodes = list(nodes)
        self.insecure = insecure
        self.startup_timeout = startup_timeout
        self.home = Path(tempfile.mkdtemp(prefix="bonsai-deploy-"))
        self.keys_dir = Path(keys_dir) if keys_dir else self.home / "keys"
        self.port = free_port()
        self.marker = uuid.uuid4().hex
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home), MARKER_ENV: self.marker}
        self.procs = ProcessGroup(env, self.marker, remove=[self.home],
                                  log=self.log_dir / WATCHDOG_LOG)
        self.address = f"127.0.0.1:{self.port}"
        self.keys: KeySet | None = None
        self._paused: set[str] = set()
        self._lock = threading.Lock()  # restart_node (a thread, maybe) against close
        self._closing = False

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.insecure:
            names = [n.name for n in self.nodes]
            if (self.keys_dir / "ca.crt").exists():
                self.keys = existing_keys(self.keys_dir, names)
            else:
                self.keys = make_keys(self.keys_dir, ["127.0.0.1"], names)
                check_superlink_tls(self.keys.ca_cert, self.keys.superlink_cert,
                                    self.keys.superlink_key)
        ca = str(self.keys.ca_cert) if self.keys else None
        (self.home / "config.toml").write_text(
            connection_toml(CONNECTION, self.address, ca, insecure=self.insecure))
        spec = SuperLinkSpec(
            host="127.0.0.1", port=self.port, insecure=self.insecure, ca_cert=ca,
            cert=str(self.keys.superlink_cert) if self.keys else None,
            key=str(self.keys.superlink_key) if self.keys else None,
        )
        sl = self.procs.start("superlink", superlink_command(spec),
                              self.log_dir / "superlink.log")
        wait_superlink(sl, self.address, ca, self.log_dir / "superlink.log",
                       self.startup_timeout)
        if self.keys:  # `flwr supernode register` per key, all at once
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda n: register_node(self.keys.node_pub(n.name), CONNECTION,
                                                      self.procs.env, name=n.name),
                              [n for n in self.nodes if n.register]))
        for node in self.nodes:
            self._start_node(node)

    def wait_nodes(self) -> list[LocalNode]:
        """Wait until every SuperNode connected or was refused; return the refused ones.

        Call it after :meth:`flwr_run` to overlap the nodes' start with the ServerApp's
        (the server's discovery waits for the nodes anyway).
        """
        for node in self.nodes:
            log = self.log_dir / "nodes" / f"{node.name}.log"
            node.node_id = wait_node(self.procs.procs[node.name], log, self.startup_timeout)
            node.refused = node.node_id is None
        return [n for n in self.nodes if n.refused]

    def _start_node(self, node: LocalNode) -> None:
        spec = SuperNodeSpec(
            superlink=self.address, insecure=self.insecure,
            root_cert=str(self.keys.ca_cert) if self.keys else None,
            auth_key=str(self.keys.node_key(node.name)) if self.keys else None,
            port=free_port(), node_config=node.node_config(
                (self.log_dir / "nodes" / f"{node.name}.jsonl").resolve()),
        )
        env = {}
        if node.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only node really sees no GPU
        if node.threads:
            env["OMP_NUM_THREADS"] = str(node.threads)
        self.procs.start(node.name, supernode_command(spec),
                         self.log_dir / "nodes" / f"{node.name}.log", env=env)

    @property
    def connected(self) -> list[LocalNode]:
        return [n for n in self.nodes if not n.refused]

    def flwr_run(self, run_config_toml: Path, log_name: str = "flower.log") -> subprocess.Popen:
        """Start ``flwr run APP bonsai-local --stream --run-config FILE``."""
        app = write_app(self.home / "app")
        return self.procs.start(
            "flwr-run", [flower_bin("flwr"), "run", str(app), CONNECTION, "--stream",
                         "--run-config", str(run_config_toml)],
            self.log_dir / log_name, cwd=str(app))

    def kill_node(self, name: str) -> None:
        """Crash one SuperNode (SIGKILL, with its ClientApp processes)."""
        self._paused.discard(name)
        self.procs.kill(name)

    def pause_node(self, name: str) -> None:
        """Stall one SuperNode: SIGSTOP to its process group (the SuperNode and the
        ClientApp it may be running), as a device that freezes or loses power to its
        CPU; no heartbeat, no polling, no reply until :meth:`resume_node`."""
        self._node(name)
        os.killpg(self.procs.procs[name].pid, signal.SIGSTOP)
        self._paused.add(name)

    def resume_node(self, name: str) -> None:
        """SIGCONT to a node :meth:`pause_node` stopped: it goes on where it stood."""
        self._node(name)
        os.killpg(self.procs.procs[name].pid, signal.SIGCONT)
        self._paused.discard(name)

    def restart_node(self, name: str, timeout: float | None = None) -> int | None:
        """Start a SuperNode again after it died (:meth:`kill_node`, a crash): the same
        key, data and node config, a fresh local API port. Returns its node id once it
        connected (None when the SuperLink refused it).

        Flower 1.42 activates an authenticated node under the id its key was
        registered with, so the node comes back with its old id; but the SuperLink
        refuses to activate an id whose last session still counts as online, until
        that session's heartbeat lapses (two 30 s heartbeat intervals after the last
        one): the SuperNode then exits with code 305, "Failed to activate SuperNode",
        as an unregistered one does. Until then the start is retried every few
        seconds, within ``timeout`` (default: the startup timeout plus those 60 s).
        """
        node = self._node(name)
        old = self.procs.procs[name]
        if old.poll() is None:
            raise DeployError(f"{name} is still running (pid {old.pid}); it restarts after "
                              "it died")
        log = self.log_dir / "nodes" / f"{name}.log"
        deadline = time.monotonic() + (timeout or self.startup_timeout + RELEASE_SECONDS)
        while True:
            since = log.stat().st_size if log.exists() else 0
            with self._lock:
                if self._closing:
                    raise DeployError(f"{name}: the federation is closing; not restarted")
                self._start_node(node)
                proc = self.procs.procs[name]
            node.node_id = wait_node(proc, log, max(1.0, deadline - time.monotonic()),
                                     since=since)
            if node.node_id is not None or time.monotonic() >= deadline:
                node.refused = node.node_id is None
                return node.node_id
            proc.wait(timeout=10)  # refused: the old session is still online
            time.sleep(RESTART_RETRY_SECONDS)

    def _node(self, name: str) -> LocalNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise DeployError(f"no node named {name!r} in this federation "
                          f"({', '.join(n.name for n in self.nodes)})")

    def close(self, grace: float = 5.0) -> None:
        """End every process by PID (flwr run, nodes, SuperLink; SIGKILL after ``grace``
        s), then remove the temp dir (:meth:`fl.procgroup.ProcessGroup.close`). Paused nodes are
        resumed first, so that they can end on SIGTERM. A second call does nothing."""
        with self._lock:  # no restart_node starts a process after this
            self._closing = True
        for name in list(self._paused):
            try:
                self.resume_node(name)
            except ProcessLookupError:
                self._paused.discard(name)
        self.procs.close(grace)


# --- local --------------------------------------------------------------------------------
def node_sources(data_dir: str | Path, n: int) -> list[Path]:
    """The first ``n`` node data sources in ``data_dir`` (.npz files and image folders)."""
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise DataError(f"--data: {str(d)!r} is not a folder (expected one .npz file or image "
                        "folder per node)")
    found = sorted(p for p in d.iterdir()
                   if (p.is_file() and p.suffix == ".npz") or
                   (p.is_dir() and not p.name.startswith(".")))
    if len(found) < n:
        raise DataError(f"--data: {str(d)!r} holds {len(found)} node data sources (.npz files "
                        f"or image folders); --nodes {n} needs {n}")
    return found[:n]


def plan_local(cfg: ExperimentConfig, data_dir: str | Path, n: int,
               device: str | None = None, threads: int | None = None) -> list[LocalNode]:
    """The nodes of ``bonsai deploy local``, each one's data checked against the model."""
    if n < 1:
        raise DeployError(f"--nodes: got {n}; allowed: >= 1")
    if threads is not None and threads < 1:
        raise DeployError(f"--threads: got {threads}; allowed: >= 1")
    nodes = [LocalNode(f"node-{i}", str(p.resolve()), i, device=device, threads=threads)
             for i, p in enumerate(node_sources(data_dir, n))]
    for node in nodes:
        nd = node_data(cfg, node.node_config(None))  # raises DataError naming the path
        check_model_fit(cfg.model, nd.input_shape, nd.num_classes,
                        f"data-path: {node.data_path!r}")
    return nodes


def run_local(cfg: ExperimentConfig, nodes: list[LocalNode], console: Console | None = None,
              live: bool = True, keys_dir: str | None = None, insecure: bool = False,
              on_poll: Callable[[LocalFederation, Path], None] | None = None) -> dict[str, Any]:
    """Run ``cfg`` on a loopback federation of ``nodes``; return the run's summary.

    ``on_poll(federation, run_dir)`` is called while the run is going (tests use
    it to crash a node mid-run). Raises RuntimeFailure when no summary appears.
    """
    console = console or Console()
    run_dir = prepare_run_dir(cfg)
    run_config = write_run_config(cfg, run_dir / RUN_CONFIG_TOML)
    summary_path = run_dir / SUMMARY_JSON
    with LocalFederation(run_dir, nodes, keys_dir=keys_dir, insecure=insecure) as fed:
        proc = fed.flwr_run(run_config)
        for node in fed.wait_nodes():
            console.print(f"[yellow]{node.name} was refused by the SuperLink (its key is not "
                          f"registered); going on without it[/yellow]")

        def running() -> bool:
            if on_poll is not None:
                on_poll(fed, run_dir)
            return proc.poll() is None and not summary_path.exists()

        if live:
            watch(run_dir, cfg.rounds, running, console)
        else:
            while running():
                time.sleep(0.25)
        rc = wait_run(proc, summary_path)
        if rc is None:  # all is saved: what is left is Flower's shutdown
            fed.close(grace=0.0)
    if not summary_path.exists():
        tail = (run_dir / "flower.log").read_text(errors="replace").splitlines()[-25:]
        raise RuntimeFailure(
            f"the run ended (flwr exit code {rc}) without a summary; last lines of "
            f"{run_dir / 'flower.log'}:\n" + "\n".join(tail))
    summary = json.loads(summary_path.read_text())
    summary["nodes"] = {n.name: ("refused" if n.refused else n.node_id) for n in nodes}
    return summary
