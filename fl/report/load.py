"""Reading a study folder for its report: the manifest, and every finished cell's config,
summary and round records, each checked (a missing or corrupt file is one line)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl.results import CONFIG_JSON, ROUNDS_JSONL, SUMMARY_JSON

__all__ = ["CellData", "ReportError", "StudyData", "load_study_dir"]

STUDY_JSON = "study.json"  # same name as fl.study.STUDY_JSON (kept import-light)


class ReportError(ValueError):
    """A study folder that cannot be reported on (one line, names the file)."""


@dataclass
class CellData:
    id: str
    choices: dict[str, str]
    config: dict[str, Any]
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    dir: Path


@dataclass
class StudyData:
    name: str
    dir: Path
    axes: dict[str, list[str]]
    seed_axis: str | None
    cells: list[CellData]
    unfinished: list[str] = field(default_factory=list)

    @property
    def group_axes(self) -> list[str]:
        return [a for a in self.axes if a != self.seed_axis]


# --- reading ------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column "
                          f"{e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot be read ({e})") from None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: round-record keys the report computes with: a number (or null) when present
NUMERIC_ROUND_KEYS = ("cum_bytes", "cum_flops", "loss_local", "loss_shift", "loss_aggregation",
                      "loss_global", "guidance_rho", "magnitude_rho", "random_rho")


#: summary keys the report computes with: a number (or null) when present
NUMERIC_SUMMARY_KEYS = ("final_accuracy", "best_accuracy", "rounds")


def _wrong_type(obj: dict[str, Any], keys: Sequence[str]) -> str | None:
    """``key: got VALUE`` for the first of ``keys`` holding a non-number, else None."""
    for key in keys:
        v = obj.get(key)
        if v is not None and not _is_number(v):
            return f"{key} is {json.dumps(v)[:40]}, expected a number"
    return None


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ReportError(f"{path}: missing (the cell has a summary but no round records)")
    out = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("round"), int) \
                or isinstance(rec.get("round"), bool) or not _is_number(rec.get("accuracy")):
            raise ReportError(f"{path}: line {i} is not a round record (needs round and "
                              "accuracy)")
        wrong = _wrong_type(rec, NUMERIC_ROUND_KEYS)
        if wrong:
            raise ReportError(f"{path}: line {i}: {wrong}")
        out.append(rec)
    if not out:
        raise ReportError(f"{path}: no round records")
    return out


def load_study_dir(study_dir: str | Path) -> StudyData:
    """Read a study folder; raise ReportError (one line) on anything missing or corrupt."""
    d = Path(study_dir).expanduser()
    if not d.is_dir():
        raise ReportError(f"STUDY_DIR: {str(d)!r} does not exist or is not a folder")
    manifest = d / STUDY_JSON
    if not manifest.is_file():
        raise ReportError(f"{manifest}: missing; is {str(d)!r} a study folder? (`bonsai sweep "
                          "STUDY.yaml` writes it)")
    m = _read_json(manifest)
    if not isinstance(m, dict) or not isinstance(m.get("axes"), dict) \
            or not isinstance(m.get("cells"), list):
        raise ReportError(f"{manifest}: expected an object with axes and cells")
    for a, v in m["axes"].items():
        if not isinstance(v, list):
            raise ReportError(f"{manifest}: axis {str(a)[:40]!r} is {json.dumps(v)[:40]}, "
                              "expected a list of choice names")
    axes = {str(a): [str(c) for c in v] for a, v in m["axes"].items()}
    seed_axis = m.get("seed_axis")
    seed_axis = seed_axis if isinstance(seed_axis, str) and seed_axis in axes else None
    cells, unfinished = [], []
    for c in m["cells"]:
        if not isinstance(c, dict) or not {"id", "dir", "choices"} <= set(c):
            raise ReportError(f"{manifest}: a cell entry lacks id, dir or choices: {c!r:.80}")
        if not isinstance(c["choices"], dict) or not isinstance(c["dir"], str) \
                or c["dir"] in ("", ".", "..") or "/" in c["dir"] or "\\" in c["dir"]:
            raise ReportError(f"{manifest}: a cell entry needs choices as an object and dir "
                              f"as one folder name: {c!r:.80}")
        cdir = d / c["dir"]
        if not (cdir / SUMMARY_JSON).is_file():
            unfinished.append(str(c["id"]))
            continue
        summary = _read_json(cdir / SUMMARY_JSON)
        config = _read_json(cdir / CONFIG_JSON)
        if not isinstance(summary, dict) or not isinstance(config, dict):
            raise ReportError(f"{cdir}: summary.json and config.json must be JSON objects")
        wrong = _wrong_type(summary, NUMERIC_SUMMARY_KEYS)
        if wrong:
            raise ReportError(f"{cdir / SUMMARY_JSON}: {wrong}")
        cells.append(CellData(str(c["id"]), {str(k): str(v) for k, v in c["choices"].items()},
                              config, summary, _read_rounds(cdir / ROUNDS_JSONL), cdir))
    if not cells:
        raise ReportError(f"{d}: no finished cells (none of its {len(m['cells'])} cells has "
                          f"{SUMMARY_JSON}); run `bonsai sweep` first")
    return StudyData(str(m.get("name") or d.name), d, axes, seed_axis, cells, unfinished)
