"""``bonsai init DIR``: copy the shipped experiment and study files into a folder to edit."""

from __future__ import annotations

import argparse

from fl.catalog import CatalogError, copy_to
from fl.cli.common import fail


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="copy the shipped experiment and study files into DIR")
    p.add_argument("dir", metavar="DIR", help="folder to create or fill (nothing is "
                   "overwritten)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        copied = copy_to(args.dir)
    except CatalogError as e:
        return fail(str(e))
    for path in copied:
        print(f"wrote {path}")
    print(f"edit them, then e.g.: bonsai run {copied[0].parent / 'quickstart.yaml'}")
    return 0
