"""Drive Flower's simulation runtime for one run, and leave nothing behind.

``flwr run`` talks to a SuperLink; left to itself it starts a shared one on
fixed ports that outlives the run. Here every run gets its own: a private
FLWR_HOME, a SuperLink on free loopback ports started as our child (so we know
its PID), a private Ray temp dir, and a teardown that ends the SuperLink and
every process it spawned (SuperExec, the simulation, Ray) by PID, also on
failure or Ctrl-C.

The teardown runs to its end whatever signals arrive (:mod:`fl.interrupts`: a
second Ctrl-C makes it SIGKILL at once instead of abandoning it), and a
:class:`Watchdog` process ends the same trees and removes the temp dirs when
this process dies without a teardown, even by SIGKILL (:mod:`fl.watchdog`).
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Self

from fl import interrupts
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


class TeardownFailure(RuntimeFailure):
    """Processes a teardown ended survived SIGKILL (hung in the kernel); the message
    names them."""

    def __init__(self, pids: Sequence[int]):
        def name(pid: int) -> str:
            try:
                return Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                return "gone"

        listed = ", ".join(f"{p} ({name(p)})" for p in pids)
        super().__init__(f"{len(pids)} process(es) did not stop: {listed}; end them with "
                         f"`kill -9 {' '.join(map(str, pids))}`")
        self.pids = list(pids)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- process trees -----------------------------------------------------------
class Proc(NamedTuple):
    """One process as /proc/PID/stat shows it."""

    ppid: int
    sid: int  #: session id
    start: int  #: start time, clock ticks since boot (with the PID: an identity)
    state: str  #: "Z": a zombie


def proc_table() -> dict[int, Proc]:
    """pid -> :class:`Proc` for every process we can read."""
    table: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = Proc(int(fields[1]), int(fields[3]), int(fields[19]), fields[0])
    return table


def descendants(root: int) -> list[int]:
    """``root``'s descendants, plus every process in a session that one of them leads.

    Ray and Flower's SuperExec start children in new sessions; walking both the
    parent links and those sessions finds them all, by PID, never by name.
    """
    table = proc_table()
    found: set[int] = set()
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, proc in table.items():
            if proc.ppid == pid and child not in found:
                found.add(child)
                frontier.append(child)
    sessions = {table[p].sid for p in found | {root} if p in table and table[p].sid == p}
    for pid, proc in table.items():
        if proc.sid in sessions and pid not in found and pid != os.getpid():
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
            if needle in env.split(b"\0") and alive(int(entry)):
                found.append(int(entry))
    return sorted(found)


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None if it is gone: with the PID,
    an identity that a reused PID cannot fake."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def terminate_tree(root: int, grace: float = 5.0, marker: str | None = None) -> list[int]:
    """SIGTERM ``root``, its descendants and the processes carrying ``marker``; SIGKILL
    whatever is still alive after ``grace`` seconds, rescanning until none is left
    (Ray's raylet restarts its agents while it shuts down). Returns the PIDs that
    would not die (none, unless a process hangs in the kernel)."""
    return terminate_trees([root], grace, marker)


def terminate_trees(roots: Sequence[int], grace: float = 5.0,
                    marker: str | None = None) -> list[int]:
    """:func:`terminate_tree` for several trees together: one grace period for
    all of them instead of one per process. A root that already exited still has its
    session searched (its children were started in it). The grace ends early once
    a second Ctrl-C or SIGTERM came (:func:`fl.interrupts.hurried`)."""

    def members() -> set[int]:
        found: set[int] = set()
        for root in roots:
            found.add(root)
            found.update(descendants(root))
        if marker:
            found.update(marked(marker))
        # children of an exited root: re-parented, but still in the root's session
        found.update(pid for pid, proc in proc_table().items() if proc.sid in set(roots))
        found.discard(os.getpid())
        return {p for p in found if alive(p)}

    termed: set[int] = set()
    deadline = time.monotonic() + grace
    while ((live := members()) and time.monotonic() < deadline
           and not interrupts.hurried()):
        _send(live - termed, signal.SIGTERM)
        termed |= live
        time.sleep(0.1)
    return sorted(kill_until_quiet(members))


def _send(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_until_quiet(members: Callable[[], set[int]], timeout: float = 10.0) -> set[int]:
    """SIGKILL ``members()`` until two scans 0.1 s apart find none: one empty scan
    can fall in the instant a dying parent's last child is being created. Returns
    the members still alive after ``timeout`` s (none, unless one hangs in the kernel)."""
    deadline = time.monotonic() + timeout
    quiet = 0
    live: set[int] = set()
    while quiet < 2 and time.monotonic() < deadline:
        live = members()
        _send(live, signal.SIGKILL)
        quiet = 0 if live else quiet + 1
        time.sleep(0.1)
    return set() if quiet >= 2 else {p for p in live if alive(p)}


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

    def end(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL our descendants started since construction, reap our dead children,
        and leave the subreaper setting as it was. Returns the PIDs that would not die."""
        if not self.enabled:
            return []
        me = os.getpid()
        left = kill_until_quiet(lambda: {p for p in descendants(me)
                                         if p not in self.before and alive(p)}, timeout)
        for pid, proc in proc_table().items():
            if proc.ppid == me and pid not in self.before:
                try:  # a zombie we adopted: no Popen will ever wait for it
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if not self.was_subreaper:
            _prctl(PR_SET_CHILD_SUBREAPER, 0)
        return sorted(left)


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


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


# --- the watchdog ---------------------------------------------------------------
WATCHDOG_LOG = "watchdog.log"


class Watchdog:
    """A watcher process that ends our process trees and removes our temp dirs when
    this process dies without a teardown, even by SIGKILL (:mod:`fl.watchdog` is
    its side, and says why it is built this way).

    Start it before the processes it guards, :meth:`watch` their roots, and
    :meth:`close` it after the teardown ended them: it then exits without acting.
    """

    def __init__(self, marker: str | None, remove: Sequence[str | Path] = (),
                 log: str | Path | None = None):
        # without the marker: no teardown of ours takes the watcher for a straggler
        env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
        self.proc: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "fl.watchdog", str(os.getpid()), marker or "",
             str(log or ""), *map(str, remove)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent, env=env, start_new_session=True)

    def watch(self, pids: Iterable[int]) -> None:
        """Have the watcher end these processes' trees if we die."""
        ids = [f"{pid}:{st}" for pid in pids if (st := start_time(pid)) is not None]
        if ids:
            self._send("watch " + " ".join(ids))

    def close(self) -> None:
        """The trees were ended: let the watcher exit without acting. A second call
        does nothing."""
        if self.proc is None:
            return
        self._send("done")
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def _send(self, line: str) -> None:
        if self.proc is None or self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # the watcher is gone (killed by hand): nothing to tell
            pass


# --- the runtime --------------------------------------------------------------
class ProcessContext:
    """A context manager over ``start()`` and ``close()``: ``close`` runs on every
    exit, also when ``start`` fails half-way (what it started is ended).

    When an interrupt is on its way and ``close`` finds survivors, the interrupt
    goes on, carrying their account (:func:`fl.interrupts.stopped`).
    """

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException as e:
            self._close_after(e)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._close_after(exc)

    def _close_after(self, exc: BaseException | None) -> None:
        try:
            self.close()
        except TeardownFailure as failure:
            if isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt(str(failure)) from failure
            raise


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
        self.watchdog: Watchdog | None = None
        self.orphans: Orphans | None = None
        self.closed = False
        self.app = self.home / "app"  #: the Flower app folder given to `flwr run`

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        write_app(self.app)
        self.watchdog = Watchdog(self.marker, [self.home, self.ray_tmp],
                                 self.log_dir / WATCHDOG_LOG)
        self.orphans = Orphans()  # after the watchdog: its end leaves the watcher alone
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
        self.watchdog.watch([self.superlink.pid])
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
        if self.watchdog is not None:
            self.watchdog.watch([proc.pid])
        return proc

    def close(self, grace: float = 5.0) -> None:
        """End every process this runtime started (SIGTERM, SIGKILL after ``grace``
        s), then remove its temp dirs and stop the watchdog. A second call does
        nothing. Signals do not cut it short (:func:`fl.interrupts.teardown`);
        raises TeardownFailure when a process survived.

        Ray takes seconds to act on SIGTERM; ``grace=0`` kills at once, for when
        the run's results are already on disk.
        """
        if self.closed:
            return
        self.closed = True
        with interrupts.teardown():
            left = self._end(grace)
        if left:
            raise TeardownFailure(left)

    def _end(self, grace: float) -> list[int]:
        procs = [*self.children, *([self.superlink] if self.superlink else [])]
        # an unreaped root's PID (returncode None) cannot have been reused
        roots = [p.pid for p in procs if p.returncode is None]
        left = set(terminate_trees(roots, grace, self.marker))
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                left.add(proc.pid)
        self.children, self.superlink = [], None
        if self.orphans is not None:
            left.update(self.orphans.end())
            self.orphans = None
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        return sorted(left)


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
