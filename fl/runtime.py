"""Drive Flower's simulation runtime for one run, and leave nothing behind.

``flwr run`` talks to a SuperLink; left to itself it starts a shared one on
fixed ports that outlives the run. Here every run gets its own: a private
FLWR_HOME, a SuperLink on free loopback ports started as our child (so we know
its PID), a private Ray temp dir, and a teardown that ends the SuperLink and
every process it spawned (SuperExec, the simulation, Ray) by PID, also on
failure or Ctrl-C.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from fl.flowerapp import write_app

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
CONNECTION = "bonsai"
MARKER_ENV = "BONSAI_RUNTIME_ID"


class RuntimeFailure(RuntimeError):
    """The Flower runtime could not be started or the run failed."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- process trees -----------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) for every process we can read."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), int(fields[3]))
    return table


def descendants(root: int) -> list[int]:
    """``root``'s descendants, plus every process in a session that one of them leads.

    Ray and Flower's SuperExec start children in new sessions; walking both the
    parent links and those sessions finds them all, by PID, never by name.
    """
    table = _proc_table()
    found: set[int] = set()
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, (ppid, _) in table.items():
            if ppid == pid and child not in found:
                found.add(child)
                frontier.append(child)
    sessions = {table[p][1] for p in found | {root} if p in table and table[p][1] == p}
    for pid, (_, sid) in table.items():
        if sid in sessions and pid not in found and pid != os.getpid():
            found.add(pid)
    found.discard(root)
    return sorted(found)


def marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``BONSAI_RUNTIME_ID=marker``.

    Every process a runtime starts inherits that variable, so this finds the
    ones that escaped the parent chain (a daemon re-parented to init), by PID.
    """
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0") and _alive(int(entry)):
                found.append(int(entry))
    return sorted(found)


def terminate_tree(root: int, grace: float = 5.0, marker: str | None = None) -> None:
    """SIGTERM ``root``, its descendants and the processes carrying ``marker``; SIGKILL
    whatever is still alive after ``grace`` seconds, rescanning until none is left
    (Ray's raylet restarts its agents while it shuts down)."""
    terminate_trees([root], grace, marker)


def terminate_trees(roots: Sequence[int], grace: float = 5.0, marker: str | None = None) -> None:
    """:func:`terminate_tree` for several trees together: one grace period for
    all of them instead of one per process. A root that already exited still has its
    session searched (its children were started in it)."""

    def members() -> set[int]:
        found: set[int] = set()
        for root in roots:
            found.add(root)
            found.update(descendants(root))
        if marker:
            found.update(marked(marker))
        # children of an exited root: re-parented, but still in the root's session
        found.update(pid for pid, (_, sid) in _proc_table().items() if sid in set(roots))
        found.discard(os.getpid())
        return {p for p in found if _alive(p)}

    def send(pids: set[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    termed: set[int] = set()
    deadline = time.monotonic() + grace
    while (alive := members()) and time.monotonic() < deadline:
        send(alive - termed, signal.SIGTERM)
        termed |= alive
        time.sleep(0.1)
    _kill_until_quiet(members)


def _kill_until_quiet(members: Callable[[], set[int]], timeout: float = 10.0) -> None:
    """SIGKILL ``members()`` until two scans 0.1 s apart find none: one empty scan
    can fall in the instant a dying parent's last child is being created."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        alive = members()
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        quiet = 0 if alive else quiet + 1
        time.sleep(0.1)


class Orphans:
    """Keep what our children leave behind inside our own process tree, and end it.

    Linux hands an orphan to init, out of reach of a walk down from our PIDs, and
    the environment marker does not always find it: Ray's dashboard and runtime-env
    agents, orphaned when their raylet dies first, rewrite their process title over
    the memory that /proc/PID/environ shows (seen after Ctrl-C: both alive, none of
    our variables readable; tests/test_simulation.py catches them). Made a child
    subreaper (``prctl`` PR_SET_CHILD_SUBREAPER), this process inherits such
    orphans instead, so :meth:`end` can kill every descendant that appeared since
    :meth:`__init__` and reap the ones that became our children. Linux only;
    elsewhere a no-op.
    """

    def __init__(self) -> None:
        self.was_subreaper = _prctl(PR_GET_CHILD_SUBREAPER) == 1
        self.enabled = self.was_subreaper or _prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
        self.before = set(descendants(os.getpid()))

    def end(self, timeout: float = 10.0) -> None:
        """SIGKILL our descendants started since construction, reap our dead children,
        and leave the subreaper setting as it was."""
        if not self.enabled:
            return
        me = os.getpid()
        _kill_until_quiet(lambda: {p for p in descendants(me)
                                   if p not in self.before and _alive(p)}, timeout)
        for pid, (ppid, _) in _proc_table().items():
            if ppid == me and pid not in self.before:
                try:  # a zombie we adopted: no Popen will ever wait for it
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if not self.was_subreaper:
            _prctl(PR_SET_CHILD_SUBREAPER, 0)


PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # <linux/prctl.h>


def _prctl(option: int, arg: int = 0) -> int:
    """``prctl(option, arg)``; PR_GET_* options return the value read. -1 where
    unavailable (not Linux)."""
    if not sys.platform.startswith("linux"):
        return -1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return -1
    if option == PR_GET_CHILD_SUBREAPER:
        value = ctypes.c_int(0)
        return value.value if libc.prctl(option, ctypes.byref(value), 0, 0, 0) == 0 else -1
    return libc.prctl(option, arg, 0, 0, 0)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


# --- the runtime --------------------------------------------------------------
class ProcessContext:
    """A context manager over ``start()`` and ``close()``: ``close`` runs on every
    exit, also when ``start`` fails half-way (what it started is ended)."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SimulationRuntime(ProcessContext):
    """A private SuperLink (simulation mode) for one run; a context manager.

    >>> with SimulationRuntime(log_dir) as rt:
    ...     proc = rt.flwr_run(run_config, federation_config)
    """

    def __init__(self, log_dir: str | Path, startup_timeout: float = 60.0):
        self.log_dir = Path(log_dir)
        self.startup_timeout = startup_timeout
        self.home = Path(tempfile.mkdtemp(prefix="bonsai-flwr-"))
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="bray-"))  # short: Ray's socket paths
        self.port = free_port()
        self.control_port = free_port()
        self.superlink: subprocess.Popen | None = None
        self.children: list[subprocess.Popen] = []
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home),
                    "RAY_TMPDIR": str(self.ray_tmp), MARKER_ENV: self.marker}
        self.orphans = Orphans()
        self.app = self.home / "app"  #: the Flower app folder given to `flwr run`

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        write_app(self.app)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        log = open(self.log_dir / "superlink.log", "ab")  # noqa: SIM115 - owned by Popen
        self.superlink = subprocess.Popen(
            [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--control-api-address", f"127.0.0.1:{self.control_port}",
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.superlink is not None
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
        fed = " ".join(f"{k}={_toml_value(v)}" for k, v in federation.items())
        log = open(self.log_dir / log_name, "ab")  # noqa: SIM115 - owned by Popen
        proc = subprocess.Popen(
            [_bin("flwr"), "run", str(self.app), CONNECTION, "--stream",
             "--run-config", str(run_config_toml), "--federation-config", fed],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=str(self.app), start_new_session=True,
        )
        log.close()
        self.children.append(proc)
        return proc

    def close(self, grace: float = 5.0) -> None:
        """End every process this runtime started (SIGTERM, SIGKILL after ``grace``
        s), then remove its temp dirs. A second call does nothing.

        Ray takes seconds to act on SIGTERM; ``grace=0`` kills at once, for when
        the run's results are already on disk.
        """
        for proc in self.children:
            if proc.poll() is None:
                terminate_tree(proc.pid, grace, marker=self.marker)
            proc.wait(timeout=10)
        self.children = []
        if self.superlink is not None:
            terminate_tree(self.superlink.pid, grace, marker=self.marker)
            try:
                self.superlink.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.superlink.kill()
                self.superlink.wait(timeout=5)
            self.superlink = None
        self.orphans.end()
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (no PATH surprises)."""
    cand = Path(sys.executable).parent / name
    found = str(cand) if cand.exists() else shutil.which(name)
    if not found:
        raise RuntimeFailure(f"`{name}` not found: is flwr[simulation] installed?")
    return found


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)
