"""``bonsai keys``: every experiment key with its default and allowed values."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from fl.config import describe


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="list every experiment key, its default and allowed values")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    table = Table("key", "default", "allowed / meaning")
    for row in describe():
        table.add_row(*row)
    Console().print(table)
    return 0
