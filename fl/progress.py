"""The live per-round table and progress bar a user watches during a run.

The ServerApp writes one JSON line per round (fl/results); this view tails that
file, so it works the same for a simulation and a deployment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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


#: (column title, record key, formatter); a column shows when any record has the key
COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("round", "round", str),
    ("accuracy", "accuracy", lambda v: f"{100 * v:.2f}%"),
    ("loss", "loss", lambda v: f"{v:.4f}"),
    ("density", "density", lambda v: f"{100 * v:.1f}%"),
    ("seconds", "seconds", lambda v: f"{v:.2f}"),
    ("bytes down", "bytes_down", human_bytes),
    ("bytes up", "bytes_up", human_bytes),
    ("bytes saved", "bytes_saved", lambda v: f"{100 * v:.1f}%"),
]


def round_table(records: list[Mapping[str, Any]], last: int = 12) -> Table:
    """The last ``last`` rounds as a rich table."""
    cols = [c for c in COLUMNS if any(c[1] in r for r in records)] or COLUMNS[:3]
    table = Table(expand=False)
    for title, _, _ in cols:
        table.add_column(title, justify="right")
    for r in records[-last:]:
        table.add_row(*[fmt(r[key]) if r.get(key) is not None else "" for _, key, fmt in cols])
    return table


def watch(run_dir: Path, total_rounds: int, is_running: Callable[[], bool],
          console: Console | None = None, poll: float = 0.25) -> list[dict[str, Any]]:
    """Show the table and a progress bar until ``is_running()`` is false."""
    console = console or Console()
    progress = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    task = progress.add_task("rounds", total=total_rounds)
    records: list[dict[str, Any]] = []
    with Live(Group(round_table(records), progress), console=console, refresh_per_second=4,
              transient=False) as live:
        while True:
            running = is_running()
            new = read_rounds(run_dir)
            if len(new) != len(records):
                records = new
                done = max((r.get("round", 0) for r in records), default=0)
                progress.update(task, completed=done)
                live.update(Group(round_table(records), progress))
            if not running:
                break
            time.sleep(poll)
    return records
