"""Process trees by PID: find what a process started (also across new sessions and
through orphaning), signal it, and make sure it is gone. Never by name.

Flower's SuperLink, its SuperExec, the simulation and Ray start their children
in new sessions; Ray's agents even rewrite their process title over the memory
/proc/PID/environ shows. So a tree is found three ways: the parent links down
from a root (:func:`descendants`), the sessions those processes lead, and an
environment marker every child inherits (:func:`marked`); :class:`Orphans`
keeps what is orphaned inside our own tree (a child subreaper).
:mod:`fl.runtime` and :mod:`fl.deploy.processes` end their runs with
:func:`terminate_trees`; :mod:`fl.watchdog` uses the same scans.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from fl import interrupts

__all__ = ["MARKER_ENV", "Orphans", "Proc", "alive", "descendants", "kill_until_quiet",
           "marked", "prctl", "proc_table", "start_time", "terminate_tree", "terminate_trees"]

#: every process a runtime starts inherits BONSAI_RUNTIME_ID=<marker>
MARKER_ENV = "BONSAI_RUNTIME_ID"


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


def marked(marker: str, key: str = MARKER_ENV) -> list[int]:
    """Live processes whose environment carries ``key=marker`` (default:
    ``BONSAI_RUNTIME_ID``), this one excepted.

    Every process a runtime starts inherits that variable, so this finds the
    ones that escaped the parent chain (a daemon re-parented to init), by PID.
    """
    needle = f"{key}={marker}".encode()
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
        self.was_subreaper = prctl(PR_GET_CHILD_SUBREAPER) == 1
        self.enabled = self.was_subreaper or prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
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
            prctl(PR_SET_CHILD_SUBREAPER, 0)
        return sorted(left)


PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # <linux/prctl.h>


def prctl(option: int, arg: int = 0) -> int:
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
