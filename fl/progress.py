"""The live per-round table and progress bar a user watches during a run.

The ServerApp writes one JSON line per round (fl/results); this view tails that
file, so it works the same for a simulation and a deployment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fl.results import read_rounds


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


#: (column title, record key, formatter, priority): a column shows when any record has
#: the key; on a narrow terminal the columns of highest priority number go first
COLUMNS: list[tuple[str, str, Callable[[Any], str], int]] = [
    ("round", "round", str, 0),
    ("accuracy", "accuracy", lambda v: f"{100 * v:.2f}%", 0),
    ("loss", "loss", lambda v: f"{v:.4f}", 1),
    ("density", "density", lambda v: f"{100 * v:.1f}%", 3),
    ("seconds", "seconds", lambda v: f"{v:.2f}", 4),
    ("down", "bytes_down", human_bytes, 5),
    ("up", "bytes_up", human_bytes, 5),
    ("saved", "bytes_saved", lambda v: f"{100 * v:.1f}%", 2),
]
_PAD = 1  #: cell padding each side


def _width(cells: list[list[str]]) -> int:
    """Characters a table with these columns (header first) takes: the widest cell of
    each column plus its padding, and one separator between neighbouring columns."""
    return sum(max(len(c) for c in col) + 2 * _PAD for col in cells) + len(cells) - 1


def round_table(records: list[Mapping[str, Any]], last: int = 12,
                width: int | None = None) -> Table:
    """The last ``last`` rounds as a rich table no wider than ``width`` characters:
    cells never wrap; the least important columns are dropped until it fits."""
    cols = [c for c in COLUMNS if any(c[1] in r for r in records)] or COLUMNS[:3]
    rows = records[-last:]
    cells = [[title] + [fmt(r[key]) if r.get(key) is not None else "" for r in rows]
             for title, key, fmt, _ in cols]
    if width is not None:
        while len(cols) > 2 and _width(cells) > width:
            drop = max(range(len(cols)), key=lambda i: (cols[i][3], i))
            del cols[drop], cells[drop]
    table = Table(expand=False, box=box.SIMPLE_HEAD, padding=(0, _PAD), show_edge=False)
    for title, _, _, _ in cols:
        table.add_column(title, justify="right", no_wrap=True)
    for i in range(len(rows)):
        table.add_row(*[col[i + 1] for col in cells])
    return table


def watch(run_dir: Path, total_rounds: int, is_running: Callable[[], bool],
          console: Console | None = None, poll: float = 0.25) -> list[dict[str, Any]]:
    """Show the table and a progress bar until ``is_running()`` is false."""
    console = console or Console()
    progress = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    task = progress.add_task("rounds", total=total_rounds)
    records: list[dict[str, Any]] = []

    def view() -> Group:
        return Group(round_table(records, width=console.width), progress)

    with Live(view(), console=console, refresh_per_second=4, transient=False) as live:
        while True:
            running = is_running()
            new = read_rounds(run_dir)
            if len(new) != len(records):
                records = new
                done = max((r.get("round", 0) for r in records), default=0)
                progress.update(task, completed=done)
                live.update(view())
            if not running:
                break
            time.sleep(poll)
    return records
