"""Running a study's cells, each a Flower simulation in its own results folder, with a
live display: finished cells are skipped, half-finished ones cleared and run again, a
failed one reported while the others go on (the study file, its cells and their state
on disk: fl/study.py).

:func:`run_study` runs them one after another in this process; :func:`run_study_parallel`
runs up to N at once, each in a child process of its own (fl/cellproc.py says why) with
its own SuperLink, ports and a private Ray of a share of this machine (fl/scaleout.py).
Both apply the same skip rules; Ctrl-C stops every running cell.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fl import interrupts
from fl.cellproc import INTERRUPTED, CellProcess
from fl.config import ExperimentConfig
from fl.results import SUMMARY_JSON, read_rounds
from fl.scaleout import RayTarget
from fl.study import Cell, Study, cell_status, write_manifest

__all__ = ["CellHandle", "Launcher", "Runner", "StudyResult", "run_study",
           "run_study_parallel"]


Runner = Callable[..., dict[str, Any]]
#: how long stopped cells get to end their runs before they are killed (their
#: watchdogs then end what they started)
STOP_SECONDS = 180.0


class CellHandle(Protocol):
    """A cell running in a child process (fl.cellproc.CellProcess)."""

    def poll(self) -> int | None: ...
    def interrupt(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def outcome(self) -> str: ...
    def kill(self) -> None: ...
    def close(self) -> None: ...


#: start a cell: (its config, where its Ray runs) -> its handle
Launcher = Callable[[ExperimentConfig, RayTarget], CellHandle]


@dataclass
class StudyResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _progress(console: Any, live: bool) -> Any:
    """The sweep's bars: one for the cells, then one per running cell or round."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=not live)

def run_study(study: Study, cells: list[Cell], configs: Mapping[str, ExperimentConfig],
              runner: Runner, console: Any = None, live: bool = True,
              poll: float = 0.5) -> StudyResult:
    """Run the cells in order: skip finished ones, clear and rerun half-finished ones.

    ``runner(cfg, console, live=False)`` runs one experiment and returns its summary
    (``fl.simulation.run_simulation``); it raises on failure. A failed cell is recorded
    and the study goes on; KeyboardInterrupt stops it (finished cells stay).
    """
    from rich.console import Console

    console = console or Console()
    write_manifest(study, cells)
    result = StudyResult()
    progress = _progress(console, live)
    cells_task = progress.add_task("[bold]cells", total=len(cells))
    rounds_task = progress.add_task("rounds", total=1, visible=False)
    with progress:
        for i, cell in enumerate(cells, 1):
            cfg = configs[cell.id]
            run_dir = Path(cfg.run_dir)
            status = cell_status(run_dir)
            if status == "done":
                result.skipped.append(cell.id)
                progress.advance(cells_task)
                continue
            if status == "partial":
                shutil.rmtree(run_dir)
            console.print(f"cell {i}/{len(cells)}: {cell.id}", soft_wrap=True)
            progress.update(rounds_task, description=f"rounds of cell {i}", total=cfg.rounds,
                            completed=0, visible=True)
            stop = threading.Event()
            watcher = threading.Thread(target=_follow, daemon=True,
                                       args=(run_dir, progress, rounds_task, stop, poll))
            watcher.start()
            t0 = time.perf_counter()
            try:
                summary = runner(cfg, console, live=False)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a failed cell: record it, go on with the next
                result.failed[cell.id] = str(e).splitlines()[0] if str(e) else type(e).__name__
                console.print(f"[red]cell {cell.id} failed[/red]: {result.failed[cell.id]}",
                              soft_wrap=True)
            else:
                result.ran.append(cell.id)
                console.print(f"  done in {time.perf_counter() - t0:.1f} s: final accuracy "
                              f"{_final_accuracy(summary)}", soft_wrap=True)
            finally:
                stop.set()
                watcher.join(timeout=5)
            progress.update(rounds_task, visible=False)
            progress.advance(cells_task)
    return result


def _follow(run_dir: Path, progress: Any, task: Any, stop: threading.Event,
            poll: float) -> None:
    """Move the rounds bar as the current cell writes rounds.jsonl."""
    while not stop.is_set():
        rounds = read_rounds(run_dir)
        done = max((r.get("round", 0) for r in rounds), default=0)
        progress.update(task, completed=done)
        stop.wait(poll)


def _final_accuracy(summary: Mapping[str, Any]) -> str:
    acc = summary.get("final_accuracy")
    return f"{100 * acc:.2f}%" if isinstance(acc, (int, float)) else "n/a"


@dataclass
class _Running:
    number: int  #: the cell's place in the study, from 1
    cell: Cell
    run_dir: Path
    handle: CellHandle
    task: Any  #: its progress bar
    t0: float


def run_study_parallel(study: Study, cells: list[Cell], configs: Mapping[str, ExperimentConfig],
                       targets: list[RayTarget], console: Any = None, live: bool = True,
                       poll: float = 0.5, launch: Launcher | None = None) -> StudyResult:
    """Run up to ``len(targets)`` cells at once, in study order, the i-th running one on
    ``targets[slot]``; the skip rules of :func:`run_study` (finished cells skipped,
    half-finished ones cleared and rerun). A failed cell is recorded and the others go on;
    KeyboardInterrupt stops every running cell (SIGINT, a second one on a second Ctrl-C)
    and waits for their teardowns, then goes on up (finished cells stay).

    ``launch(cfg, target)`` starts a cell (default: fl.cellproc.CellProcess).
    """
    from rich.console import Console

    launch = launch or CellProcess
    console = console or Console()
    write_manifest(study, cells)
    result = StudyResult()
    progress = _progress(console, live)
    cells_task = progress.add_task("[bold]cells", total=len(cells))
    queue: deque[tuple[int, Cell]] = deque()
    for i, cell in enumerate(cells, 1):
        if cell_status(Path(configs[cell.id].run_dir)) == "done":
            result.skipped.append(cell.id)
            progress.advance(cells_task)
        else:
            queue.append((i, cell))
    free = list(range(len(targets)))
    running: dict[int, _Running] = {}
    with progress:
        try:
            while queue or running:
                while queue and free:
                    i, cell = queue.popleft()
                    cfg = configs[cell.id]
                    run_dir = Path(cfg.run_dir)
                    if cell_status(run_dir) == "partial":
                        shutil.rmtree(run_dir)
                    console.print(f"cell {i}/{len(cells)}: {cell.id}", soft_wrap=True)
                    slot = free.pop(0)
                    try:
                        handle = launch(cfg, targets[slot])
                    except OSError as e:
                        result.failed[cell.id] = f"could not start: {e}"
                        free.append(slot)
                        progress.advance(cells_task)
                        continue
                    task = progress.add_task(f"cell {i} {cell.id}", total=cfg.rounds)
                    running[slot] = _Running(i, cell, run_dir, handle, task, time.perf_counter())
                for slot, run in list(running.items()):
                    rounds = read_rounds(run.run_dir)
                    progress.update(run.task, completed=max(
                        (r.get("round", 0) for r in rounds), default=0))
                    if run.handle.poll() is None:
                        continue
                    _finish(run, result, console)
                    progress.remove_task(run.task)
                    progress.advance(cells_task)
                    del running[slot]
                    free.append(slot)
                if queue or running:
                    time.sleep(poll)
        except KeyboardInterrupt as e:
            left = _stop(list(running.values()))
            if left:
                raise KeyboardInterrupt("; ".join(left)) from e
            raise
    return result


def _finish(run: _Running, result: StudyResult, console: Any) -> None:
    """Record a cell whose process exited: ran (its summary is on disk) or failed."""
    summary_path = run.run_dir / SUMMARY_JSON
    if run.handle.poll() == 0 and summary_path.is_file():
        result.ran.append(run.cell.id)
        summary = json.loads(summary_path.read_text())
        console.print(f"  cell {run.number} done in {time.perf_counter() - run.t0:.1f} s: "
                      f"final accuracy {_final_accuracy(summary)}", soft_wrap=True)
    else:
        result.failed[run.cell.id] = run.handle.outcome()
        console.print(f"[red]cell {run.cell.id} failed[/red]: {result.failed[run.cell.id]}",
                      soft_wrap=True, highlight=False)
    run.handle.close()


def _stop(running: list[_Running]) -> list[str]:
    """Stop the running cells and wait for them (a signal meanwhile hurries their
    teardowns, never abandons them); what any of them said of processes it could not
    stop."""
    with interrupts.teardown():
        for run in running:
            run.handle.interrupt()
        hurried = False
        deadline = time.monotonic() + STOP_SECONDS
        while any(r.handle.poll() is None for r in running) and time.monotonic() < deadline:
            if interrupts.hurried() and not hurried:
                hurried = True
                for run in running:
                    run.handle.interrupt()
            time.sleep(0.1)
        left = []
        for run in running:
            if run.handle.poll() is None:  # its watchdog ends its processes when it dies
                run.handle.kill()
                run.handle.wait(10)
                left.append(f"cell {run.cell.id} did not stop in {STOP_SECONDS:.0f} s and "
                            "was killed (its watchdog ended its processes)")
            elif run.handle.poll() == INTERRUPTED and not run.handle.outcome().endswith(
                    interrupts.stopped(KeyboardInterrupt())):
                left.append(f"cell {run.cell.id}: {run.handle.outcome()}")
            run.handle.close()
    return left
