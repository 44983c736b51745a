"""Running a study's cells one after another, each a Flower simulation in its own
results folder, with a progress bar: finished cells are skipped, half-finished ones
cleared and run again, a failed one reported while the others go on (the study
file, its cells and their state on disk: fl/study.py)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl.config import ExperimentConfig
from fl.results import read_rounds
from fl.study import Cell, Study, cell_status, write_manifest

__all__ = ["Runner", "StudyResult", "run_study"]


Runner = Callable[..., dict[str, Any]]


@dataclass
class StudyResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def run_study(study: Study, cells: list[Cell], configs: Mapping[str, ExperimentConfig],
              runner: Runner, console: Any = None, live: bool = True,
              poll: float = 0.5) -> StudyResult:
    """Run the cells in order: skip finished ones, clear and rerun half-finished ones.

    ``runner(cfg, console, live=False)`` runs one experiment and returns its summary
    (``fl.simulation.run_simulation``); it raises on failure. A failed cell is recorded
    and the study goes on; KeyboardInterrupt stops it (finished cells stay).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    write_manifest(study, cells)
    result = StudyResult()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=not live)
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
                acc = summary.get("final_accuracy")
                acc_s = f"{100 * acc:.2f}%" if isinstance(acc, (int, float)) else "n/a"
                console.print(f"  done in {time.perf_counter() - t0:.1f} s: final accuracy "
                              f"{acc_s}", soft_wrap=True)
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
