"""``bonsai validate FILE...``: check experiment and study files without running anything."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fl.catalog import CatalogError, resolve
from fl.cli.common import fail, load_or_fail


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check experiment or study files and overrides")
    p.add_argument("files", nargs="+", help="experiment or study files, or shipped names")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def _is_study(path: str) -> bool:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the experiment loader reports it
    return isinstance(data, dict) and "grid" in data


def _validate_study(path: str, overrides: list[str]) -> int:
    from fl.sweep import StudyError, expand, load_study, validate_cells

    try:
        cells = expand(load_study(path, overrides))
    except StudyError as e:
        return fail(e.problems)
    _, bad = validate_cells(cells)
    if bad:
        return fail([f"{cid}: {p}" for cid, problems in bad.items() for p in problems])
    print(f"{path}: ok (study, {len(cells)} cells)")
    return 0


def run(args: argparse.Namespace) -> int:
    code = 0
    for name in args.files:
        try:
            f = resolve(name, "file")
        except CatalogError as e:
            code = fail(str(e))
            continue
        if _is_study(f):
            code = _validate_study(f, args.overrides) or code
            continue
        cfg = load_or_fail(f, args.overrides)
        if isinstance(cfg, int):
            code = cfg
        else:
            print(f"{f}: ok ({cfg.strategy.name}, {cfg.model} on {cfg.dataset.name}, "
                  f"{cfg.partition.num_clients} clients, {cfg.rounds} rounds)")
    return code
