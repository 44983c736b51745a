"""Studies: a grid of experiments expanded into cells, each validated up front, and
the state of its cells on disk (fl/sweep.py runs them).

A study file (YAML, first line its command) holds::

    name: noniid                 # STUDY_DIR = OUTPUT_DIR/NAME
    output_dir: results/studies
    base: {rounds: 30, model: cnn, ...}        # experiment keys shared by every cell
    grid:                                      # axes, in order
      strategy:                                # named override sets
        fedavg: {strategy.name: fedavg}
        fedprox: {strategy.name: fedprox, strategy.proximal_mu: 0.01}
      seed: [0, 1, 2]                          # a list: the axis is a config key
    exclude:                                   # optional: drop matching cells
      - {strategy: fedprox, seed: [1, 2]}

A cell is ``base`` + one choice per axis (+ ``--set`` overrides, which win).
Its id names the choices in axis order (``strategy=fedavg,seed=0``); its run
folder is ``STUDY_DIR/<id with ',' -> '__'>`` and it is finished when that
folder holds ``summary.json``: finished cells are skipped, a half-finished one
is cleared and run again. ``STUDY_DIR/study.json`` lists the axes and cells
for ``bonsai report``.

Why one module of this length: the study file's grammar (axes, choices,
exclusions), its expansion into cells, their validation and their state on disk
are one concept, which ``bonsai sweep``, ``validate`` and ``report`` share.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl.config import (
    FIELDS,
    ConfigError,
    ExperimentConfig,
    build,
    parse_override,
    path_component_problem,
    shown,
)
from fl.dotted import flatten
from fl.files import atomic_write_json
from fl.results import SUMMARY_JSON
from fl.yamlfile import YamlFileError, load_yaml

__all__ = ["SEED_AXIS", "STUDY_JSON", "Cell", "Study", "StudyError", "cell_dir_name",
           "cell_status", "check_partitions", "expand", "load_study", "parse_study",
           "stale_cells", "summarize_problems", "validate_cells", "write_manifest"]

STUDY_JSON = "study.json"
SEED_AXIS = "seed"
_STUDY_KEYS = {"name", "output_dir", "base", "grid", "exclude", "description"}
_LABEL_RE = re.compile(r"^[^,=\s/\\]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
#: keys every cell gets from the sweep (its folder, never a resume, and for the trackers
#: the study as its group and the cell's choices: fl.tracking)
_SWEEP_KEYS = ("run_dir", "output_dir", "name", "resume", "tracking.group", "tracking.cell")


class StudyError(ValueError):
    """A problem with a study file; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Cell:
    """One experiment of a study: its choices (axis -> label) and flat config values."""

    choices: tuple[tuple[str, str], ...]
    values: Mapping[str, Any]

    @property
    def id(self) -> str:
        return ",".join(f"{a}={label}" for a, label in self.choices)

    @property
    def dir_name(self) -> str:
        return cell_dir_name(self.id)

    def choice(self, axis: str) -> str | None:
        return dict(self.choices).get(axis)


@dataclass
class Study:
    """A parsed study file: axes of named override sets, exclusion rules, base keys."""

    name: str
    output_dir: str
    base: dict[str, Any]
    axes: dict[str, dict[str, dict[str, Any]]]
    exclude: list[dict[str, set[str]]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name


def cell_dir_name(cell_id: str) -> str:
    """A folder name for ``cell_id``: stable, readable, filesystem-safe."""
    name = _UNSAFE.sub("_", cell_id.replace(",", "__"))
    if len(name) > 200:  # keep under NAME_MAX with a hash for uniqueness
        name = name[:180] + "-" + hashlib.sha1(cell_id.encode()).hexdigest()[:12]
    return name


# --- parsing ---------------------------------------------------------------------
def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_axis(axis: str, spec: Any, problems: list[str]) -> dict[str, dict[str, Any]]:
    where = f"grid.{axis}"
    if not isinstance(axis, str) or not _LABEL_RE.match(axis):
        problems.append(f"{where}: an axis name must not contain ',', '=', '/' or spaces")
        return {}
    out: dict[str, dict[str, Any]] = {}
    if isinstance(spec, list):
        if axis not in FIELDS:
            problems.append(f"{where}: a list of values needs the axis to be a config key (e.g. "
                            "seed, partition.num_clients); otherwise give named override sets "
                            "(NAME: {key: value, ...})")
            return {}
        for v in spec:
            out[_label(v)] = {axis: v}
    elif isinstance(spec, Mapping):
        for name, overrides in spec.items():
            if overrides is None:
                overrides = {}
            if not isinstance(overrides, Mapping):
                problems.append(f"{where}.{name}: expected a mapping of config keys, got "
                                f"{shown(overrides)}")
                continue
            out[_label(name)] = flatten(overrides)
            for key in _SWEEP_KEYS:
                if key in out[_label(name)]:
                    problems.append(f"{where}.{name}.{key}: set by the sweep; remove it")
    else:
        problems.append(f"{where}: expected named override sets (a mapping) or a list of values")
        return {}
    if not out:
        problems.append(f"{where}: no choices")
    for label in out:
        if not _LABEL_RE.match(label):
            problems.append(f"{where}: choice name {shown(label)} must not contain ',', '=', '/' "
                            "or spaces (it is part of the cell id)")
    if len(set(out)) != len(spec):
        problems.append(f"{where}: two choices have the same name")
    return out


def _parse_exclude(rules: Any, axes: Mapping[str, Mapping[str, Any]],
                   problems: list[str]) -> list[dict[str, set[str]]]:
    if rules is None:
        return []
    if not isinstance(rules, list):
        problems.append("exclude: expected a list of rules like {strategy: fedprox, seed: [1, 2]}")
        return []
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, Mapping) or not rule:
            problems.append(f"exclude[{i}]: expected a mapping of axis -> choice (or choices)")
            continue
        parsed: dict[str, set[str]] = {}
        for axis, want in rule.items():
            if axis not in axes:
                problems.append(f"exclude[{i}].{axis}: not an axis of the grid "
                                f"({', '.join(axes)})")
                continue
            labels = {_label(w) for w in (want if isinstance(want, list) else [want])}
            unknown = sorted(labels - set(axes[axis]))
            if unknown:
                problems.append(f"exclude[{i}].{axis}: no choice named {', '.join(unknown)}; "
                                f"choices: {', '.join(axes[axis])}")
            parsed[axis] = labels
        out.append(parsed)
    return out


def parse_study(data: Any, source: str = "study file",
                overrides: Iterable[str] = ()) -> Study:
    """A :class:`Study` from the parsed YAML of a study file (structure only; the
    cells' configs are checked by :func:`validate_cells`)."""
    if not isinstance(data, Mapping):
        raise StudyError([f"{source}: expected a mapping with name, output_dir, base and grid"])
    problems: list[str] = []
    for key in data:
        if key not in _STUDY_KEYS:
            problems.append(f"{key}: unknown study key; allowed: {', '.join(sorted(_STUDY_KEYS))}"
                            " (experiment keys go under base:)")
    name = data.get("name")
    if not isinstance(name, str) or not _LABEL_RE.match(name) or path_component_problem(
            "name", name):
        problems.append(f"name: got {shown(name)}; expected one folder name (not '.' or '..'; "
                        "no ',', '=', '/', '\\', spaces)")
    output_dir = data.get("output_dir", "results/studies")
    if not isinstance(output_dir, str) or not output_dir:
        problems.append(f"output_dir: got {shown(output_dir)}; expected a folder path")
    base = data.get("base") or {}
    if not isinstance(base, Mapping):
        problems.append("base: expected a mapping of experiment keys")
        base = {}
    base = flatten(base)
    for key in _SWEEP_KEYS:
        if key in base:
            problems.append(f"base.{key}: set by the sweep (each cell runs in STUDY_DIR/CELL); "
                            "remove it")
    grid = data.get("grid")
    axes: dict[str, dict[str, dict[str, Any]]] = {}
    if not isinstance(grid, Mapping) or not grid:
        problems.append("grid: expected at least one axis, e.g. grid: {seed: [0, 1, 2]}")
    else:
        for axis, spec in grid.items():
            axes[str(axis)] = _parse_axis(str(axis), spec, problems)
    exclude = _parse_exclude(data.get("exclude"), axes, problems)
    extra: dict[str, Any] = {}
    try:
        for text in overrides:
            k, v = parse_override(text)
            extra[k] = v
    except ConfigError as e:
        problems.extend(e.problems)
    for key in _SWEEP_KEYS:
        if key in extra:
            problems.append(f"--set {key}: set by the sweep; change the study file instead")
    if problems:
        raise StudyError(problems)
    return Study(name=name, output_dir=output_dir, base=dict(base), axes=axes, exclude=exclude,
                 overrides=extra, source=source)


def load_study(path: str | Path, overrides: Iterable[str] = ()) -> Study:
    """Read and parse a study file; raise StudyError naming each problem."""
    p = Path(path)
    if not p.is_file():
        raise StudyError([f"study file: {str(p)!r} does not exist"])
    try:
        data = load_yaml(p, f"study file {str(p)!r}")
    except YamlFileError as e:
        raise StudyError([str(e)]) from None
    return parse_study(data, str(p), overrides)


# --- expansion -----------------------------------------------------------------
def _excluded(choices: Mapping[str, str], rules: list[dict[str, set[str]]]) -> bool:
    return any(all(choices.get(a) in labels for a, labels in rule.items()) for rule in rules)


def expand(study: Study) -> list[Cell]:
    """Every cell of the grid (axis order as written, last axis fastest), minus
    the excluded ones. Raises StudyError when two axes set one key differently."""
    cells: list[Cell] = []
    problems: list[str] = []
    names = list(study.axes)
    for combo in itertools.product(*(list(study.axes[a].items()) for a in names)):
        choices = {a: label for a, (label, _) in zip(names, combo)}
        if _excluded(choices, study.exclude):
            continue
        values: dict[str, Any] = dict(study.base)
        setter: dict[str, str] = {}
        for axis, (label, overrides) in zip(names, combo):
            for key, value in overrides.items():
                if key in setter and values[key] != value:
                    problems.append(f"cell {_cid(choices)}: {key} is set by both "
                                    f"{setter[key]} and {axis}={label}")
                values[key] = value
                setter[key] = f"{axis}={label}"
        values.update(study.overrides)
        values["name"] = study.name
        values["output_dir"] = str(study.dir.parent)
        cell = Cell(tuple(choices.items()), values)
        values["run_dir"] = str(study.dir / cell.dir_name)
        values["tracking.group"], values["tracking.cell"] = study.name, cell.id
        cells.append(cell)
    if problems:
        raise StudyError(problems)
    if not cells:
        raise StudyError(["exclude: every cell of the grid is excluded"])
    dirs = Counter(c.dir_name for c in cells)
    clash = [d for d, n in dirs.items() if n > 1]
    if clash:
        raise StudyError([f"grid: choice names map to the same folder {clash[0]!r}; rename them"])
    return cells


def _cid(choices: Mapping[str, str]) -> str:
    return ",".join(f"{a}={label}" for a, label in choices.items())


def validate_cells(cells: list[Cell]) -> tuple[dict[str, ExperimentConfig], dict[str, list[str]]]:
    """Build every cell's config: (cell id -> config, cell id -> problems); a tracker
    whose pip extra is missing is a problem (fl.tracking.missing_packages)."""
    from fl.tracking import missing_packages

    ok: dict[str, ExperimentConfig] = {}
    bad: dict[str, list[str]] = {}
    for cell in cells:
        try:
            cfg = build(cell.values)
        except ConfigError as e:
            bad[cell.id] = list(e.problems)
            continue
        if missing := missing_packages(cfg):
            bad[cell.id] = missing
        else:
            ok[cell.id] = cfg
    return ok, bad


def check_partitions(configs: Mapping[str, ExperimentConfig],
                     partitions: bool = True) -> dict[str, list[str]]:
    """Check the data of every config: cell id -> problem for the configs whose data is
    unusable (fl.data.prepare: file, columns,
    finite values, labels, shape against the model) or whose split cannot be made
    (e.g. Dirichlet(0.1) cannot give 100 clients 2 examples each). Each distinct
    dataset, partition and seed is built once, into the data cache the runs read.
    ``partitions=False`` checks each distinct dataset, model and seed only
    (fl.data.check_dataset; no partitioning: seconds for a study of hundreds of cells).
    """
    import warnings

    from fl.data import check_dataset, prepare
    from fl.userdata import DataError

    seen: dict[tuple, str | None] = {}
    bad: dict[str, list[str]] = {}
    for cid, cfg in configs.items():
        # hf datasets too: their one download and decoding happens here, before any run,
        # and no network is one line
        key = ((repr(cfg.dataset), cfg.model, cfg.seed, repr(cfg.partition)) if partitions
               else (repr(cfg.dataset), cfg.model))  # the data checks do not depend on seed
        if key not in seen:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    (prepare if partitions else check_dataset)(cfg)  # fills the data cache
                seen[key] = None
            except (DataError, ValueError, OSError) as e:
                what = str(e) if isinstance(e, DataError) else f"data: {type(e).__name__}: {e}"
                seen[key] = f"{what} (dataset {cfg.dataset.name}" + (
                    f", seed {cfg.seed})" if partitions else ")")
            except MemoryError:
                seen[key] = (f"data: out of memory loading or partitioning dataset "
                             f"{cfg.dataset.name} (seed {cfg.seed}) for model {cfg.model}")
        if seen[key]:
            bad[cid] = [seen[key]]
    return bad


def summarize_problems(bad: Mapping[str, list[str]]) -> list[str]:
    """One line per distinct config problem, with how many cells it hits and the first."""
    first: dict[str, str] = {}
    count: Counter[str] = Counter()
    for cid, problems in bad.items():
        for p in problems:
            first.setdefault(p, cid)
            count[p] += 1
    lines = []
    for p, n in count.items():
        more = f" and {n - 1} more cell{'s' * (n > 2)}" if n > 1 else ""
        lines.append(f"cell {first[p]}{more}: {p}")
    return lines


# --- state on disk -------------------------------------------------------------
def cell_status(run_dir: Path) -> str:
    """``done`` (summary.json), ``partial`` (a folder without it) or ``pending``."""
    if (run_dir / SUMMARY_JSON).is_file():
        return "done"
    if run_dir.exists():
        return "partial"
    return "pending"


def stale_cells(configs: Mapping[str, ExperimentConfig]) -> dict[str, list[str]]:
    """Finished cells whose ``config.json`` differs from what the study asks now
    (a key present in both with another value; where a cell is reported, the
    tracking section, aside): cell id -> ``key: old -> new``.
    Rerunning them silently would mix two studies in one table."""
    from fl.config import PLACE_SECTIONS, to_json
    from fl.results import CONFIG_JSON

    out: dict[str, list[str]] = {}
    for cid, cfg in configs.items():
        run_dir = Path(cfg.run_dir)
        if cell_status(run_dir) != "done":
            continue
        try:
            old = flatten(json.loads((run_dir / CONFIG_JSON).read_text()))
        except (OSError, ValueError, AttributeError):
            out[cid] = [f"{run_dir / CONFIG_JSON} is missing or corrupt"]
            continue
        new = flatten(json.loads(to_json(cfg)))
        diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new
                 if k in old and k.split(".", 1)[0] not in PLACE_SECTIONS and old[k] != new[k]]
        if diffs:
            out[cid] = diffs
    return out


def write_manifest(study: Study, cells: list[Cell]) -> Path:
    """STUDY_DIR/study.json: the axes (choice names in order) and each cell."""
    study.dir.mkdir(parents=True, exist_ok=True)
    path = study.dir / STUDY_JSON
    atomic_write_json(path, {
        "name": study.name,
        "source": study.source,
        "axes": {a: list(choices) for a, choices in study.axes.items()},
        "seed_axis": SEED_AXIS if SEED_AXIS in study.axes else None,
        "cells": [{"id": c.id, "dir": c.dir_name, "choices": dict(c.choices)} for c in cells],
    })
    return path
