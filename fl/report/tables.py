"""The report's tables: markdown (one helper builds every table) and CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from fl.report.load import StudyData
from fl.report.stats import DECOMPOSITION, GUIDANCE, PAIRED

__all__ = ["BYTE_UNITS", "FLOP_UNITS", "csv_text", "decomposition_markdown",
           "guidance_markdown", "markdown", "markdown_table", "paired_markdown", "pick_unit",
           "savings_markdown"]


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int) -> str:
    """A markdown table: the first ``text_columns`` columns left-aligned, the rest
    right-aligned (numbers)."""
    align = "|" + "---|" * text_columns + "---:|" * (len(head) - text_columns)
    lines = ["| " + " | ".join(head) + " |", align]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"

def pick_unit(values: Sequence[float | None], units: Sequence[tuple[float, str]]
              ) -> tuple[float, str]:
    """The largest unit (scale, name) not above the largest value."""
    biggest = max((abs(v) for v in values if v is not None), default=0.0)
    chosen = units[0]
    for scale, name in units:
        if biggest >= scale:
            chosen = (scale, name)
    return chosen


BYTE_UNITS = [(1.0, "B"), (1e3, "kB"), (1e6, "MB"), (1e9, "GB"), (1e12, "TB")]


FLOP_UNITS = [(1.0, "FLOP"), (1e6, "MFLOP"), (1e9, "GFLOP"), (1e12, "TFLOP"), (1e15, "PFLOP")]


def _pm(mean: float | None, std: float | None, scale: float, digits: int) -> str:
    if mean is None:
        return "—"
    s = f"{mean / scale:.{digits}f}"
    return s + (f" ± {std / scale:.{digits}f}" if std is not None else "")


def markdown_table(study: StudyData, rows: list[dict[str, Any]], target: float) -> str:
    """Mean ± std over seeds of each group: accuracy, and rounds/bytes/FLOPs to target."""
    bscale, bunit = pick_unit([r["bytes_to_target_mean"] for r in rows], BYTE_UNITS)
    fscale, funit = pick_unit([r["flops_to_target_mean"] for r in rows], FLOP_UNITS)
    t = f"{100 * target:g}%"
    head = [*study.group_axes, "seeds", "final acc. (%)", "best acc. (%)", f"reached {t}",
            f"rounds to {t}", f"{bunit} to {t}", f"{funit} to {t}"]
    body = [[*(str(r[a]) for a in study.group_axes), str(r["seeds"]),
             _pm(r["final_accuracy_mean"], r["final_accuracy_std"], 0.01, 2),
             _pm(r["best_accuracy_mean"], r["best_accuracy_std"], 0.01, 2),
             f"{r['reached_target']}/{r['seeds']}",
             _pm(r["rounds_to_target_mean"], r["rounds_to_target_std"], 1.0, 1),
             _pm(r["bytes_to_target_mean"], r["bytes_to_target_std"], bscale, 1),
             _pm(r["flops_to_target_mean"], r["flops_to_target_std"], fscale, 2)]
            for r in rows]
    return markdown(head, body, len(study.group_axes))


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _pts(v: float | None) -> str:
    return "—" if v is None else f"{v:+.2f}"


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def savings_markdown(study: StudyData, rows: list[dict[str, Any]], axis: str,
                     baseline: str) -> str:
    """The savings table, then the mean over the other axes for each ``axis`` choice."""
    axes = study.group_axes
    head = [*axes, "final acc. (%)", f"{baseline} acc. (%)", "Δ acc. (points)",
            "FLOPs saved", "bytes saved"]
    body = [[*(str(r[a]) for a in axes), f"{100 * r['final_accuracy']:.2f}",
             f"{100 * r['baseline_accuracy']:.2f}", _pts(r["accuracy_delta_points"]),
             _pct(r["flops_saving"]), _pct(r["bytes_saving"])] for r in rows]
    means = []
    for choice in dict.fromkeys(r[axis] for r in rows):
        mine = [r for r in rows if r[axis] == choice]
        means.append([choice, str(len(mine)),
                      _pts(_mean([r["accuracy_delta_points"] for r in mine])),
                      _pct(_mean([r["flops_saving"] for r in mine])),
                      _pct(_mean([r["bytes_saving"] for r in mine]))])
    return (markdown(head, body, len(axes)) + f"\nMean over the other axes, against "
            f"{axis}={baseline}:\n\n" + markdown(
                [axis, "settings", "Δ acc. (points)", "FLOPs saved", "bytes saved"], means, 1))


def decomposition_markdown(study: StudyData, rows: list[dict[str, Any]]) -> str | None:
    """Mean loss-decomposition terms per group (last measured round), when measured."""
    if not any(r.get("loss_global_mean") is not None for r in rows):
        return None
    axes = study.group_axes
    body = [[*(str(r[a]) for a in axes),
             *(_pm(r[f"{k}_mean"], r[f"{k}_std"], 1.0, 4) for k in DECOMPOSITION)]
            for r in rows]
    return markdown([*axes, "local", "distribution shift", "aggregation", "global"], body,
                    len(axes))


def _ci(row: dict[str, Any], prefix: str, scale: float, fmt: str, unit: str = "") -> str:
    """``mean [lo, hi]`` of a paired difference, ``*`` when the interval excludes 0."""
    m, lo, hi = row[f"{prefix}_mean"], row[f"{prefix}_lo"], row[f"{prefix}_hi"]
    if m is None:
        return "—"
    text = f"{scale * m:{fmt}}{unit}"
    if lo is None:
        return text
    mark = " *" if row[f"{prefix}_excludes_0"] else ""
    return f"{text} [{scale * lo:{fmt}}, {scale * hi:{fmt}}]{mark}"


_PAIRED_HEAD = {"final_accuracy": "Δ final acc. (points)", "best_accuracy": "Δ best acc. (points)",
                "total_flops": "FLOPs saved (%)", "total_bytes": "bytes saved (%)"}


def paired_markdown(study: StudyData, rows: list[dict[str, Any]], axis: str,
                    baseline: str) -> str:
    """The paired comparison: mean per-seed difference against ``axis=baseline`` with its
    95% interval over seeds; ``*`` marks an interval that excludes 0."""
    axes = study.group_axes
    head = [*axes, "pairs", *(_PAIRED_HEAD[m] for m, _ in PAIRED)]
    body = [[*(str(r[a]) for a in axes), str(r["pairs"]),
             *(_ci(r, m, 1.0 if kind == "points" else 100.0, "+.2f" if kind == "points"
                   else ".1f") for m, kind in PAIRED)] for r in rows]
    return markdown(head, body, len(axes))


def guidance_markdown(study: StudyData, rows: list[dict[str, Any]]) -> str | None:
    """Guidance quality per group: mean ± std over seeds of each run's mean rho, and the
    paired differences guidance - magnitude, guidance - random (95% interval, ``*``)."""
    if not rows:
        return None
    axes = study.group_axes
    body = [[*(str(r[a]) for a in axes), str(r["seeds"]),
             *(_pm(r[f"{k}_mean"], r[f"{k}_std"], 1.0, 3) for k in GUIDANCE),
             _ci(r, "guidance_minus_magnitude", 1.0, "+.3f"),
             _ci(r, "guidance_minus_random", 1.0, "+.3f")] for r in rows]
    return markdown([*axes, "seeds", "ρ guidance", "ρ magnitude", "ρ random",
                     "guidance − magnitude", "guidance − random"], body, len(axes))


def csv_text(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()
