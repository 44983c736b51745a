"""Drive Flower's simulation runtime for one run, and leave nothing behind.

``flwr run`` talks to a SuperLink; left to itself it starts a shared one on
fixed ports that outlives the run. Here every run gets its own: a private
FLWR_HOME, a SuperLink on free loopback ports started as our child (so we know
its PID), a private Ray temp dir, and a teardown that ends the SuperLink and
every process it spawned (SuperExec, the simulation, Ray) by PID, also on
failure or Ctrl-C.

On an existing Ray cluster (:class:`fl.scaleout.RayTarget` with an address) the
simulation's driver joins it through ``RAY_ADDRESS`` and starts no Ray processes of its
own; the cluster's raylets start the workers of our actors, which are neither our
descendants nor carry our environment marker, so the same teardown ends only what we
started and never the cluster: Ray ends a job's actors when its driver dies (within a
second on loopback; tests/test_ray_cluster.py checks it, also after SIGINT).

The teardown runs to its end whatever signals arrive (:mod:`fl.interrupts`: a
second Ctrl-C makes it SIGKILL at once instead of abandoning it), and a
:class:`Watchdog` process ends the same trees and removes the temp dirs when
this process dies without a teardown, even by SIGKILL (:mod:`fl.watchdog`); both come
with the :class:`fl.procgroup.ProcessGroup` the runtime starts its processes in.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl.flowerapp import write_app
from fl.procgroup import ProcessContext, ProcessGroup, RuntimeFailure
from fl.proctree import MARKER_ENV
from fl.scaleout import RayTarget
from fl.watchdog import WATCHDOG_LOG

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
CONNECTION = "bonsai"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimulationRuntime(ProcessContext):
    """A private SuperLink (simulation mode) for one run; a context manager.

    >>> with SimulationRuntime(log_dir) as rt:
    ...     proc = rt.flwr_run(run_config, federation_config)
    """

    def __init__(self, log_dir: str | Path, startup_timeout: float = 60.0,
                 ray: RayTarget | None = None):
        self.log_dir = Path(log_dir)
        self.startup_timeout = startup_timeout
        #: where the simulation's Ray runs (default: the cluster RAY_ADDRESS names, else
        #: a private one); on a cluster the teardown ends our driver, and Ray its actors
        self.ray = ray if ray is not None else RayTarget.from_env()
        self.home = Path(tempfile.mkdtemp(prefix="bonsai-flwr-"))
        # a private Ray's temp dir (short: Ray's socket paths); a cluster has its own
        self.ray_tmp = (None if self.ray.joins_cluster
                        else Path(tempfile.mkdtemp(prefix="bray-")))
        self.port = free_port()
        self.control_port = free_port()
        self.marker = uuid.uuid4().hex
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home), MARKER_ENV: self.marker}
        if self.ray_tmp is not None:
            env["RAY_TMPDIR"] = str(self.ray_tmp)
        self.env = self.ray.environment(env)
        folders = [self.home, *([self.ray_tmp] if self.ray_tmp is not None else [])]
        self.procs = ProcessGroup(self.env, self.marker, remove=folders,
                                  log=self.log_dir / WATCHDOG_LOG)
        self.superlink: subprocess.Popen | None = None
        self.app = self.home / "app"  #: the Flower app folder given to `flwr run`

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        write_app(self.app)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.superlink = self.procs.start(
            "superlink",
            [flower_bin("flower-superlink"), "--insecure", "--simulation",
             "--isolation", "subprocess", "--control-api-address", f"127.0.0.1:{self.control_port}",
             "--host", "127.0.0.1", "--port", str(self.port)],
            self.log_dir / "superlink.log")
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.superlink is not None  # started by start()
            if self.superlink.poll() is not None:
                raise RuntimeFailure(
                    f"flower-superlink exited with code {self.superlink.returncode}; see "
                    f"{self.log_dir / 'superlink.log'}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=0.5).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeFailure(f"flower-superlink did not start within {self.startup_timeout:.0f} s")

    def flwr_run(self, run_config_toml: Path, federation: Mapping[str, Any],
                 log_name: str = "flower.log") -> subprocess.Popen:
        """Start ``flwr run APP bonsai --stream`` with the given run and federation config."""
        fed = " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())
        return self.procs.start(
            "flwr-run", [flower_bin("flwr"), "run", str(self.app), CONNECTION, "--stream",
                         "--run-config", str(run_config_toml), "--federation-config", fed],
            self.log_dir / log_name, cwd=str(self.app))

    def close(self, grace: float = 5.0) -> None:
        """End every process this runtime started (SIGTERM, SIGKILL after ``grace``
        s), then remove its temp dirs and stop the watchdog (:meth:`ProcessGroup.close`:
        a second call does nothing, signals do not cut it short, TeardownFailure
        names a process that survived).

        Ray takes seconds to act on SIGTERM; ``grace=0`` kills at once, for when
        the run's results are already on disk.
        """
        self.procs.close(grace)


def flower_bin(name: str) -> str:
    """A console script of this interpreter's environment (no PATH surprises)."""
    cand = Path(sys.executable).parent / name
    found = str(cand) if cand.exists() else shutil.which(name)
    if not found:
        raise RuntimeFailure(f"`{name}` not found: is flwr[simulation] installed?")
    return found


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)
