"""Helpers shared by the subcommands."""

from __future__ import annotations

import sys

from fl.config import ConfigError, ExperimentConfig, load

USAGE_ERROR = 2


def fail(lines: list[str] | str, code: int = USAGE_ERROR) -> int:
    """Print ``bonsai: error: ...`` lines to stderr and return ``code``."""
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"bonsai: error: {line}", file=sys.stderr)
    return code


def load_or_fail(path: str | None, overrides: list[str]) -> ExperimentConfig | int:
    """The validated config, or the exit code after printing every problem."""
    try:
        return load(path, overrides)
    except ConfigError as e:
        return fail(e.problems)
