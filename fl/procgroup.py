"""A group of child processes that start together and end together, whatever happens.

Everything Bonsai starts (a simulation's SuperLink and ``flwr run``, a loopback
federation's SuperLink and SuperNodes, a foreground Flower command) is a
:class:`ProcessGroup`: each process in its own session with the run's environment
marker, a :class:`~fl.watchdog.Watchdog` that ends the group if this process dies,
and one teardown (:meth:`ProcessGroup.close`) that ends every tree by PID
(:func:`fl.proctree.terminate_trees`), the orphans adopted meanwhile, removes the
group's temporary folders and is not cut short by further signals
(:func:`fl.interrupts.teardown`).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from fl import interrupts
from fl.proctree import Orphans, terminate_tree, terminate_trees
from fl.watchdog import Watchdog

__all__ = ["ProcessContext", "ProcessGroup", "RuntimeFailure", "TeardownFailure"]


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


class ProcessGroup:
    """Child processes started with one environment and ended together by PID: what a
    simulation runtime, a loopback federation and a foreground Flower command each own.

    From the first :meth:`start` a :class:`~fl.watchdog.Watchdog` guards them: if
    this process dies without :meth:`close`, even by SIGKILL, it ends them and
    removes the ``remove`` folders (which :meth:`close` removes too); ``log``
    is where it reports that.
    """

    def __init__(self, env: Mapping[str, str], marker: str | None = None,
                 remove: Sequence[str | Path] = (), log: str | Path | None = None):
        self.env = dict(env)
        self.marker = marker
        self.remove = [Path(p) for p in remove]
        self.watchdog_log = log
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.watchdog: Watchdog | None = None
        self.orphans: Orphans | None = None
        self.closed = False

    def start(self, name: str, cmd: Sequence[str], log: Path | None,
              env: Mapping[str, str] | None = None, cwd: str | None = None) -> subprocess.Popen:
        """Start ``cmd`` as ``name``, its output into ``log`` (None: our stdout/stderr).
        A process started earlier under the same name and still running stays in
        the group (ended by :meth:`close`), under ``name@pid``."""
        if self.watchdog is None:
            self.watchdog = Watchdog(self.marker, self.remove, self.watchdog_log)
            self.orphans = Orphans()  # after the watchdog: its end leaves the watcher alone
        out = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            self.logs[name] = log
            out = open(log, "ab")  # noqa: SIM115 - closed below, the child keeps its copy
        try:
            proc = subprocess.Popen(list(cmd), env={**self.env, **(env or {})}, stdout=out,
                                    stderr=subprocess.STDOUT if out else None,
                                    stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
        finally:
            if out is not None:
                out.close()
        earlier = self.procs.get(name)
        if earlier is not None and earlier.poll() is None:  # still ours to end: keep it
            self.procs[f"{name}@{earlier.pid}"] = earlier
        self.procs[name] = proc
        self.watchdog.watch([proc.pid])
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL one process and its descendants at once (a crash, not a shutdown)."""
        proc = self.procs[name]
        terminate_tree(proc.pid, grace=0.0)
        proc.wait(timeout=10)

    def close(self, grace: float = 5.0) -> None:
        """End every process and all they spawned at once (SIGTERM, then SIGKILL after
        ``grace`` s), plus any straggler that carries the marker; remove the
        ``remove`` folders and stop the watchdog. A second call does nothing (the
        PIDs may belong to other processes by then). Signals do not cut it short
        (:func:`fl.interrupts.teardown`); raises TeardownFailure when a process
        survived."""
        if self.closed:
            return
        self.closed = True
        with interrupts.teardown():
            left = self._end(grace)
        if left:
            raise TeardownFailure(left)

    def _end(self, grace: float) -> list[int]:
        # an unreaped root's PID (returncode None) cannot have been reused
        roots = [p.pid for p in self.procs.values() if p.returncode is None]
        left = set(terminate_trees(roots, grace, self.marker))
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                left.add(proc.pid)
        if self.orphans is not None:
            left.update(self.orphans.end())
        for folder in self.remove:
            shutil.rmtree(folder, ignore_errors=True)
        if self.watchdog is not None:
            self.watchdog.close()
        return sorted(left)
