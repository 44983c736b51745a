"""One study cell in a child process, for ``bonsai sweep --parallel N`` (fl/sweep.py).

Why a process per cell and not a thread: a simulation's teardown rests on state that
belongs to the whole process. The child subreaper (:class:`fl.proctree.Orphans`) ends
every descendant of the process that appeared since its run began, which in a shared
process would include the other cells' SuperLinks and Rays; the signal handling
(:mod:`fl.interrupts`) and the watchdog (:mod:`fl.watchdog`) watch one process too. A
child of its own gets all of it exactly as ``bonsai run`` has it, and a cell that fails
or hangs cannot touch the others.

The protocol: the parent writes one JSON line on the child's stdin (the cell's flat
config and its :class:`fl.scaleout.RayTarget`) and keeps the pipe open; end of file
means the parent died (even by SIGKILL), and the child then stops its run as on SIGTERM.
The parent stops a cell with SIGINT (a second one hurries its teardown, as in
``bonsai run``). The child's output goes to a file the parent owns; its last
``bonsai: error:`` line says why a cell failed. Exit codes: 0 done, 1 failed, 130
interrupted.

    python -m fl.cellproc   (started by :class:`CellProcess`, never by hand)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from fl.config import ExperimentConfig, to_flat
from fl.scaleout import RayTarget

__all__ = ["INTERRUPTED", "CellProcess", "main"]

_ERROR = "bonsai: error: "
INTERRUPTED = 130  #: exit code of a cell that was stopped (as `bonsai run`'s)


class CellProcess:
    """A running cell: ``python -m fl.cellproc`` in its own session (a terminal's Ctrl-C
    reaches only ``bonsai sweep``, which stops its cells itself)."""

    def __init__(self, cfg: ExperimentConfig, ray: RayTarget):
        self.run_dir = Path(cfg.run_dir)
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - read in outcome()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fl.cellproc"], stdin=subprocess.PIPE, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.interrupts = 0
        spec = {"config": to_flat(cfg), "ray": ray.to_json()}
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(spec).encode() + b"\n")
            self.proc.stdin.flush()  # stays open: its end of file tells the child we died
        except OSError:  # the child died at once; poll() and outcome() say so
            pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def interrupt(self) -> None:
        """SIGINT: the first stops the cell's run, the second hurries its teardown."""
        if self.proc.poll() is None:
            self.interrupts += 1
            try:
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (a cell that did not stop): its watchdog ends what its run started."""
        if self.proc.poll() is None:
            self.proc.kill()

    def outcome(self) -> str:
        """What the cell said last: its error line (failed or interrupted), else the last
        line it printed."""
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").splitlines()
        errors = [ln[len(_ERROR):] for ln in lines if ln.startswith(_ERROR)]
        if errors:
            return errors[-1]
        tail = [ln.strip() for ln in lines if ln.strip()]
        return tail[-1] if tail else f"exit code {self.proc.returncode}"

    def close(self) -> None:
        """Close our end of its stdin and its log (after it exited)."""
        for f in (self.proc.stdin, self.log):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


def _read_line(fd: int) -> bytes:
    """One line from ``fd``, read unbuffered (the rest of the pipe stays for
    :func:`_stop_when_orphaned`; a buffered reader shared with a daemon thread aborts
    the interpreter at exit)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return line


def _stop_when_orphaned(fd: int) -> None:
    """End of file on ``fd`` (stdin): ``bonsai sweep`` died; stop this cell as on SIGTERM."""
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    from rich.console import Console

    from fl import interrupts
    from fl.config import from_flat
    from fl.procgroup import RuntimeFailure
    from fl.rundir import RunDirError
    from fl.simulation import run_simulation

    fd = sys.stdin.fileno()
    spec = json.loads(_read_line(fd) or b"null")
    if not isinstance(spec, dict):
        print(f"{_ERROR}no cell given (fl.cellproc is started by bonsai sweep)")
        return 2
    interrupts.install()
    threading.Thread(target=_stop_when_orphaned, args=(fd,), daemon=True).start()
    cfg = from_flat(spec["config"])
    try:
        run_simulation(cfg, Console(file=sys.stdout, width=120), live=False,
                       ray=RayTarget(**spec["ray"]))
    except KeyboardInterrupt as e:
        print(f"{_ERROR}interrupted; {interrupts.stopped(e)}")
        return INTERRUPTED
    except (RuntimeFailure, RunDirError) as e:
        print(f"{_ERROR}{str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
