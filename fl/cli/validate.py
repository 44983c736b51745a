"""``bonsai validate FILE...``: check experiment and study files without running anything.

Besides the keys, the data is checked as ``bonsai run`` checks it (in a child
process, fl.cli.common.check_data): an experiment's dataset, its values, labels
and shape against the model, and its partition; a study's datasets and models
(each distinct one once; whether every cell's partition can be made is what
``bonsai sweep --dry-run`` tells). An ``hf`` dataset is downloaded (once, into the
Hugging Face cache) to be checked; without the network that is the error.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from fl.catalog import CatalogError, resolve
from fl.cli.common import check_data, fail, load_or_fail
from fl.config import ExperimentConfig
from fl.procgroup import RuntimeFailure
from fl.tracking import missing_packages
from fl.yamlfile import YamlFileError, load_yaml


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check experiment or study files and overrides")
    p.add_argument("files", nargs="+", help="experiment or study files, or shipped names")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-data-check", action="store_true",
                   help="check the keys only, not the data against the model")
    p.set_defaults(func=run)


def _study_cells(path: str, overrides: list[str]) -> dict[str, ExperimentConfig] | int:
    from fl.study import StudyError, expand, load_study, validate_cells

    try:
        cells = expand(load_study(path, overrides))
    except StudyError as e:
        return fail(e.problems)
    configs, bad = validate_cells(cells)
    if bad:
        return fail([f"{cid}: {p}" for cid, problems in bad.items() for p in problems])
    return configs


def run(args: argparse.Namespace) -> int:
    code = 0
    ok: dict[str, str] = {}  # file -> its "ok" line, printed once its data is checked too
    experiments: dict[str, ExperimentConfig] = {}
    studies: dict[str, dict[str, ExperimentConfig]] = {}
    for name in args.files:
        try:
            f = resolve(name, "file")
        except CatalogError as e:
            code = fail(str(e))
            continue
        data: Any = None
        try:
            data = load_yaml(f)
        except YamlFileError as e:
            code = fail(str(e))
            continue
        if isinstance(data, Mapping) and "grid" in data:
            configs = _study_cells(f, args.overrides)
            if isinstance(configs, int):
                code = configs
                continue
            studies[f] = configs
            ok[f] = f"{f}: ok (study, {len(configs)} cells)"
            continue
        cfg = load_or_fail(f, args.overrides)
        if isinstance(cfg, int):
            code = cfg
            continue
        if missing := missing_packages(cfg):  # a tracker's pip extra (fl.tracking)
            code = fail([f"{f}: {p}" for p in missing])
            continue
        experiments[f] = cfg
        ok[f] = (f"{f}: ok ({cfg.strategy.name}, {cfg.model} on {cfg.dataset.name}, "
                 f"{cfg.partition.num_clients} clients, {cfg.rounds} rounds)")
    if not args.no_data_check:
        try:
            bad = check_data(experiments) if experiments else {}
            cells = {f"{f}\0{cid}": c for f, cs in studies.items() for cid, c in cs.items()}
            bad.update(check_data(cells, partitions=False) if cells else {})
        except RuntimeFailure as e:
            return fail(str(e), code=1)
        seen: set[tuple[str, str]] = set()
        for key, problems in bad.items():
            f, _, cid = key.partition("\0")
            ok.pop(f, None)
            for p in problems:
                if (f, p) not in seen:  # a study's cells share datasets: one line each
                    seen.add((f, p))
                    code = fail(f"{f}: {p}" + (f" (cell {cid})" if cid else ""))
    for line in ok.values():
        print(line)
    return code
