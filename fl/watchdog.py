"""The watcher process behind :class:`Watchdog`: when the ``bonsai``
process dies without its teardown (SIGKILL, a crash, a closed terminal), it ends
the process trees that process started and removes their temporary folders.

    python -m fl.watchdog PARENT_PID MARKER LOG [FOLDER ...]

Why a process, and why this one:

- A parent-death signal (``PR_SET_PDEATHSIG``) would have to be set inside
  every process, and Flower and Ray start most of them (SuperExec, the
  simulation, Ray's daemons, in new sessions); we start only the roots. A
  watcher needs nothing from them.
- It learns of its parent's death from a pipe (its stdin): the parent holds the
  only write end (pipes are not inheritable, every child is started with
  ``close_fds``), so the kernel closes it when the parent dies, however it dies.
  End of file without a ``done`` line is that death: no polling of the parent,
  no race with a reused PID.
- Linux hands an orphan to init (or the nearest child subreaper), where no walk
  down from our roots finds it, and Ray's agents cannot be found by the
  environment marker either (:class:`fl.proctree.Orphans`). The watcher is not
  their ancestor, so it cannot be their subreaper; it keeps a record instead:
  every :data:`SCAN_SECONDS` it walks the trees of the roots it was given
  (descendants, and the sessions they lead) and remembers each process by PID
  and start time. Ray's agents live under their raylet for the whole run before
  anything can orphan them, so they are on record when it matters; a process
  that appears and is orphaned within one scan, without the marker, is the one
  gap.
- To end them it first stops them all (SIGSTOP) and rescans until no new
  process appears: a stopped process cannot fork, exit (orphaning its children)
  or be restarted by its parent, so the set it collects is complete; then
  SIGKILL to all of them. Nothing is left to save at that point: the run's
  parent is gone, and checkpoints are written atomically.

It ends, by PID and never by name: the processes on record that are still the
same processes (PID and start time), their descendants, the processes in the
sessions they lead, and every process carrying the runtime's ``BONSAI_RUNTIME_ID``
marker. Then it removes the folders it was given, appends one line to LOG (if
its folder exists) and exits. It runs in its own session, so a Ctrl-C in the
terminal does not reach it, and without the marker, so no teardown takes it
for a straggler.

Its stdin protocol, one line each: ``watch PID:START ...`` (roots to guard) and
``done`` (the parent ended everything itself: exit without acting).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from fl.proctree import MARKER_ENV, kill_until_quiet, marked, proc_table, start_time

SCAN_SECONDS = 0.5

Ids = dict[int, int]  #: pid -> start time



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


def members(known: Mapping[int, int], marker: str | None = None) -> Ids:
    """The live processes of the trees of ``known`` (pid -> start time): those of
    ``known`` that are still the same processes, their descendants, the processes
    in sessions they lead, and those carrying ``marker``.

    A session whose leader is gone stays ours while it has members: the kernel
    does not hand out a PID that still names a session.
    """
    table = proc_table()
    found = {p for p, st in known.items() if p in table and table[p].start == st}
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    frontier = list(found)
    while frontier:
        for child in children.get(frontier.pop(), ()):
            if child not in found:
                found.add(child)
                frontier.append(child)
    leaders = {p for p in found if table[p].sid == p} | {p for p in known if p not in table}
    found.update(p for p, proc in table.items() if proc.sid in leaders)
    if marker:
        found.update(marked(marker))
    found.discard(os.getpid())
    return {p: table[p].start for p in found if p in table and table[p].state != "Z"}


def record(stdin: int) -> Ids | None:
    """Read the parent's lines and keep a record of its trees until it says ``done``
    (None) or dies (end of file: the record)."""
    roots: Ids = {}
    seen: Ids = {}
    pending = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], SCAN_SECONDS)
        if ready:
            chunk = os.read(stdin, 65536)
            if not chunk:
                return {**seen, **roots}
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                word, *ids = line.decode(errors="replace").split() or [""]
                if word == "done":
                    return None
                if word == "watch":
                    roots.update(_parse(ids))
        if roots:  # the roots' pids stay for their sessions; the rest only while alive
            seen = members({**seen, **roots})


def _parse(words: Sequence[str]) -> Ids:
    ids = {}
    for word in words:
        pid, _, start = word.partition(":")
        if pid.isdigit() and start.isdigit():
            ids[int(pid)] = int(start)
    return ids


def end(known: Mapping[int, int], marker: str | None,
        timeout: float = 10.0) -> tuple[int, list[int]]:
    """Stop (SIGSTOP) the trees of ``known`` and the processes carrying ``marker``
    until no new one appears, then SIGKILL them all; (how many were ended, the
    PIDs still alive after ``timeout`` s)."""
    stopped: Ids = {}
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        new = {p: st for p, st in members({**known, **stopped}, marker).items()
               if p not in stopped}
        _signal(new, signal.SIGSTOP)
        stopped.update(new)
        quiet = 0 if new else quiet + 1
        time.sleep(0.05)
    _signal(stopped, signal.SIGKILL)
    left = kill_until_quiet(lambda: set(members({**known, **stopped}, marker)),
                            max(1.0, deadline - time.monotonic()))
    return len(stopped), sorted(left)


def _signal(pids: Mapping[int, int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _log(path: str, text: str) -> None:
    if path and Path(path).parent.is_dir():
        with open(path, "a") as f:
            f.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {text}\n")


def main(argv: Sequence[str]) -> int:
    parent, marker, log, *folders = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its own session already; belt and braces
    try:
        known = record(sys.stdin.fileno())
        if known is None:
            return 0
        t0 = time.monotonic()
        n, left = end(known, marker or None)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        gone = sum(not os.path.exists(f) for f in folders)
        _log(log, f"bonsai (PID {parent}) ended without its teardown: the watchdog killed "
                  f"{n} processes and removed {gone} of {len(folders)} temporary folders in "
                  f"{time.monotonic() - t0:.1f} s"
                  + (f"; still alive: {' '.join(map(str, left))}" if left else ""))
        return 1 if left else 0
    except Exception:
        _log(log, "watchdog failed:\n" + traceback.format_exc())
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
