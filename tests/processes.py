"""Test helpers: start ``bonsai`` with a marker in its environment, and find the
processes still carrying that marker (every child inherits it) by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK_ENV = "BONSAI_TEST_MARK"


def bonsai(args: list[str], mark: str, env: Mapping[str, str] | None = None,
           **kw) -> subprocess.Popen:
    """``python -m fl.cli ARGS`` from the repo root, marked, stdout/stderr piped;
    ``env`` adds to our environment."""
    env = {**os.environ, **(env or {}), MARK_ENV: mark}
    return subprocess.Popen([sys.executable, "-m", "fl.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def leftovers(mark: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries the mark."""
    needle = f"{MARK_ENV}={mark}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                state = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if needle in env and state[state.rindex(")") + 2] != "Z":
                pids.append(int(entry))
    return pids


def wait_gone(mark: str | Callable[[], list[int]], timeout: float = 15.0) -> str:
    """Wait until no process is left; '' then, else one line per survivor (its PID,
    parent, state and command line) for the assertion message."""
    check = (lambda: leftovers(mark)) if isinstance(mark, str) else mark
    deadline = time.monotonic() + timeout
    while (left := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return "\n".join(describe(pid) for pid in left)


def describe(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return f"{pid} (gone)"
    fields = stat[stat.rindex(")") + 2:].split()
    return f"{pid} state={fields[0]} ppid={fields[1]} sid={fields[3]}: {cmd[:300]}"
