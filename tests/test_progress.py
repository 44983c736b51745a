"""The live round table: one line per round at any terminal width, the least important
columns dropped first."""

from rich.console import Console

from fl.progress import round_table

RECORDS = [{"round": r, "accuracy": 0.9778, "loss": 0.08231, "density": 0.376,
            "seconds": 12.34, "bytes_down": 825_000.0, "bytes_up": 1_234_567_890.0,
            "bytes_saved": 0.804} for r in range(98, 101)]


def _render(width: int) -> list[str]:
    console = Console(width=width, record=True, force_terminal=False)
    console.print(round_table(RECORDS, width=width))
    return [line for line in console.export_text().splitlines() if line.strip()]


def test_fits_80_columns_with_every_column():
    lines = _render(80)
    assert len(lines) == 2 + len(RECORDS)  # header, rule, one line per round
    assert max(len(line) for line in lines) <= 80
    header = lines[0].split()
    assert header == ["round", "accuracy", "loss", "density", "seconds", "down", "up", "saved"]
    assert lines[-1].split() == ["100", "97.78%", "0.0823", "37.6%", "12.34", "825.0", "KB",
                                 "1.2", "GB", "80.4%"]


def test_narrow_terminal_drops_the_least_important_columns():
    lines = _render(50)
    assert len(lines) == 2 + len(RECORDS)
    assert max(len(line) for line in lines) <= 50
    assert lines[0].split() == ["round", "accuracy", "loss", "density", "saved"]
    lines = _render(24)
    assert lines[0].split() == ["round", "accuracy"]
    assert max(len(line) for line in lines) <= 24
