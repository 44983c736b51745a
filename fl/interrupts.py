"""Ctrl-C and SIGTERM for the commands that own process trees (``bonsai run``,
``sweep``, ``deploy``): the first signal interrupts, a later one hurries the
teardown, and no signal abandons it.

:func:`install` (each such command calls it once) makes SIGINT and SIGTERM raise
KeyboardInterrupt, also where the shell started us with SIGINT ignored (a
background job). A teardown runs inside :func:`teardown`; a signal that arrives
there, or after the first interrupt, raises nothing (an exception half-way
through a teardown leaves processes and temporary folders behind): it sets
:func:`hurried`, on which the teardown stops granting its SIGTERM grace and
SIGKILLs at once. A signal that came during a teardown no interrupt had caused
(the end of a finished or failed run) is not lost: KeyboardInterrupt is raised
when that teardown is done, so the command still stops.

Without :func:`install` (the library used from Python) nothing changes: Python's
own SIGINT handler raises KeyboardInterrupt wherever it lands.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["SIGNALS", "hurried", "install", "stopped", "teardown"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
    installed = False
    interrupted = False  #: KeyboardInterrupt was raised for a signal
    owed = False  #: a signal came during a teardown that no interrupt had caused
    hurry = False  #: a signal came during a teardown or after the first interrupt
    depth = 0  #: nesting of teardown()


_state = _State()


def install() -> None:
    """Make SIGINT and SIGTERM interrupt this process (KeyboardInterrupt), once;
    later signals hurry the teardown instead. Call it from the main thread."""
    _state.interrupted = _state.owed = _state.hurry = False
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    _state.installed = True


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _state.interrupted or _state.depth:
        _state.hurry = True
        if not _state.interrupted:
            _state.owed = True
        return
    _state.interrupted = True
    raise KeyboardInterrupt


def hurried() -> bool:
    """True once a second signal (or any signal during a teardown) came: kill at once."""
    return _state.hurry


@contextmanager
def teardown() -> Iterator[None]:
    """Run the enclosed teardown to its end whatever signals arrive (see the module
    docstring); raise the KeyboardInterrupt a signal during it is owed afterwards."""
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0 and _state.owed:
            _state.owed = False
            _state.interrupted = True
            raise KeyboardInterrupt  # noqa: B012 - replaces what was in flight: we stop


def stopped(interrupt: KeyboardInterrupt) -> str:
    """What an interrupted command says of its processes: that every one was stopped,
    or the teardown's own account of what survived (the interrupt's message)."""
    return str(interrupt) or "every process was stopped"
