"""``bonsai validate FILE...``: check experiment files without running anything."""

from __future__ import annotations

import argparse

from fl.cli.common import load_or_fail


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check experiment files and overrides")
    p.add_argument("files", nargs="+", help="experiment YAML files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    code = 0
    for f in args.files:
        cfg = load_or_fail(f, args.overrides)
        if isinstance(cfg, int):
            code = cfg
        else:
            print(f"{f}: ok ({cfg.strategy.name}, {cfg.model} on {cfg.dataset.name}, "
                  f"{cfg.partition.num_clients} clients, {cfg.rounds} rounds)")
    return code
