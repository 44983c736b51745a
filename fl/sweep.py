"""Studies: a grid of experiments, expanded into cells, validated up front, run one
after another, each in its own results folder, resumable.

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
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl.config import (
    FIELDS,
    ConfigError,
    ExperimentConfig,
    _flatten_yaml,
    build,
    parse_override,
    path_component_problem,
    shown,
)
from fl.results import SUMMARY_JSON, read_rounds
from fl.yamlfile import YamlFileError, load_yaml

__all__ = ["STUDY_JSON", "Cell", "Study", "StudyError", "cell_dir_name", "expand", "load_study",
           "run_study", "validate_cells"]

STUDY_JSON = "study.json"
SEED_AXIS = "seed"
_STUDY_KEYS = {"name", "output_dir", "base", "grid", "exclude", "description"}
_LABEL_RE = re.compile(r"^[^,=\s/\\]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
#: keys every cell gets from the sweep (its folder, and never a resume)
_SWEEP_KEYS = ("run_dir", "output_dir", "name", "resume")


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
            out[_label(name)] = _flatten_yaml(overrides)
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
    base = _flatten_yaml(base)
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
    """Build every cell's config: (cell id -> config, cell id -> problems)."""
    ok: dict[str, ExperimentConfig] = {}
    bad: dict[str, list[str]] = {}
    for cell in cells:
        try:
            ok[cell.id] = build(cell.values)
        except ConfigError as e:
            bad[cell.id] = list(e.problems)
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

    from fl.data import DataError, check_dataset, prepare

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


def _flat_json(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, Mapping):
            out.update(_flat_json(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stale_cells(configs: Mapping[str, ExperimentConfig]) -> dict[str, list[str]]:
    """Finished cells whose ``config.json`` differs from what the study asks now
    (a key present in both with another value): cell id -> ``key: old -> new``.
    Rerunning them silently would mix two studies in one table."""
    from fl.config import to_json
    from fl.results import CONFIG_JSON

    out: dict[str, list[str]] = {}
    for cid, cfg in configs.items():
        run_dir = Path(cfg.run_dir)
        if cell_status(run_dir) != "done":
            continue
        try:
            old = _flat_json(json.loads((run_dir / CONFIG_JSON).read_text()))
        except (OSError, ValueError, AttributeError):
            out[cid] = [f"{run_dir / CONFIG_JSON} is missing or corrupt"]
            continue
        new = _flat_json(json.loads(to_json(cfg)))
        diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k]]
        if diffs:
            out[cid] = diffs
    return out


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_manifest(study: Study, cells: list[Cell]) -> Path:
    """STUDY_DIR/study.json: the axes (choice names in order) and each cell."""
    study.dir.mkdir(parents=True, exist_ok=True)
    path = study.dir / STUDY_JSON
    _atomic_json(path, {
        "name": study.name,
        "source": study.source,
        "axes": {a: list(choices) for a, choices in study.axes.items()},
        "seed_axis": SEED_AXIS if SEED_AXIS in study.axes else None,
        "cells": [{"id": c.id, "dir": c.dir_name, "choices": dict(c.choices)} for c in cells],
    })
    return path


# --- running --------------------------------------------------------------------
Runner = Callable[..., dict[str, Any]]


@dataclass
class StudyResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def run_study(study: Study, cells: list[Cell], configs: Mapping[str, ExperimentConfig],
              runner: Runner, console: Any = None, live: bool = True,
              poll: float = 0.5) -> StudyResult:
    """Run the cells in order: skip finished ones, clear and rerun half-finished ones.

    ``runner(cfg, console, live=False)`` runs one experiment and returns its summary
    (``fl.cli.run.run_simulation``); it raises on failure. A failed cell is recorded
    and the study goes on; KeyboardInterrupt stops it (finished cells stay).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    write_manifest(study, cells)
    result = StudyResult()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=not live)
    cells_task = progress.add_task("[bold]cells", total=len(cells))
    rounds_task = progress.add_task("rounds", total=1, visible=False)
    with progress:
        for i, cell in enumerate(cells, 1):
            cfg = configs[cell.id]
            run_dir = Path(cfg.run_dir)
            status = cell_status(run_dir)
            if status == "done":
                result.skipped.append(cell.id)
                progress.advance(cells_task)
                continue
            if status == "partial":
                shutil.rmtree(run_dir)
            console.print(f"cell {i}/{len(cells)}: {cell.id}", soft_wrap=True)
            progress.update(rounds_task, description=f"rounds of cell {i}", total=cfg.rounds,
                            completed=0, visible=True)
            stop = threading.Event()
            watcher = threading.Thread(target=_follow, daemon=True,
                                       args=(run_dir, progress, rounds_task, stop, poll))
            watcher.start()
            t0 = time.perf_counter()
            try:
                summary = runner(cfg, console, live=False)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a failed cell: record it, go on with the next
                result.failed[cell.id] = str(e).splitlines()[0] if str(e) else type(e).__name__
                console.print(f"[red]cell {cell.id} failed[/red]: {result.failed[cell.id]}",
                              soft_wrap=True)
            else:
                result.ran.append(cell.id)
                acc = summary.get("final_accuracy")
                acc_s = f"{100 * acc:.2f}%" if isinstance(acc, (int, float)) else "n/a"
                console.print(f"  done in {time.perf_counter() - t0:.1f} s: final accuracy "
                              f"{acc_s}", soft_wrap=True)
            finally:
                stop.set()
                watcher.join(timeout=5)
            progress.update(rounds_task, visible=False)
            progress.advance(cells_task)
    return result


def _follow(run_dir: Path, progress: Any, task: Any, stop: threading.Event,
            poll: float) -> None:
    """Move the rounds bar as the current cell writes rounds.jsonl."""
    while not stop.is_set():
        rounds = read_rounds(run_dir)
        done = max((r.get("round", 0) for r in rounds), default=0)
        progress.update(task, completed=done)
        stop.wait(poll)
