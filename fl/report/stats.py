"""The numbers of a report: per cell, and per group of cells (every axis but the seed)
as mean and sample standard deviation over seeds; savings against a baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fl.report.load import CellData, StudyData

__all__ = ["DECOMPOSITION", "METRICS", "aggregate", "cell_row", "mean_std", "savings_rows",
           "to_target"]

# --- numbers -------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than 2."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def to_target(rounds: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first round record whose accuracy reaches ``target``, or None."""
    return next((r for r in rounds if r["accuracy"] >= target), None)


def cell_row(cell: CellData, target: float) -> dict[str, Any]:
    hit = to_target(cell.rounds, target)
    accs = [r["accuracy"] for r in cell.rounds]
    return {
        "cell": cell.id, **cell.choices,
        "final_accuracy": cell.summary.get("final_accuracy", accs[-1]),
        "best_accuracy": cell.summary.get("best_accuracy", max(accs)),
        "rounds": cell.summary.get("rounds", cell.rounds[-1]["round"]),
        "rounds_to_target": hit["round"] if hit else None,
        "bytes_to_target": hit.get("cum_bytes") if hit else None,
        "flops_to_target": hit.get("cum_flops") if hit else None,
        "total_bytes": cell.rounds[-1].get("cum_bytes"),
        "total_flops": cell.rounds[-1].get("cum_flops"),
        **_last_decomposition(cell.rounds),
    }


DECOMPOSITION = ["loss_local", "loss_shift", "loss_aggregation", "loss_global"]


def _last_decomposition(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The loss-decomposition terms of the last round that measured them (or None)."""
    last = next((r for r in reversed(rounds) if "loss_global" in r), None)
    return {k: (last[k] if last else None) for k in DECOMPOSITION}


METRICS = ["final_accuracy", "best_accuracy", "rounds_to_target", "bytes_to_target",
           "flops_to_target", "total_bytes", "total_flops", *DECOMPOSITION]


def aggregate(study: StudyData, target: float) -> list[dict[str, Any]]:
    """One row per group (every axis but seed), in grid order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in study.cells:
        key = tuple(cell.choices.get(a, "") for a in study.group_axes)
        groups.setdefault(key, []).append(cell_row(cell, target))
    order = {a: {c: i for i, c in enumerate(study.axes[a])} for a in study.group_axes}
    rows = []
    for key in sorted(groups, key=lambda k: [order[a].get(v, 1 << 30)
                                             for a, v in zip(study.group_axes, k)]):
        cells = groups[key]
        row: dict[str, Any] = dict(zip(study.group_axes, key))
        row["seeds"] = len(cells)
        row["reached_target"] = sum(c["rounds_to_target"] is not None for c in cells)
        for metric in METRICS:
            vals = [c[metric] for c in cells if c[metric] is not None]
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(vals)
        rows.append(row)
    return rows


def savings_rows(study: StudyData, rows: list[dict[str, Any]], axis: str, baseline: str
                 ) -> list[dict[str, Any]]:
    """Each row against the ``axis=baseline`` row with the same other choices: accuracy
    difference (points) and the saving of total client training FLOPs and total bytes
    (exploration and masks included), as fractions: 1 - mean(row) / mean(baseline)."""
    others = [a for a in study.group_axes if a != axis]
    base = {tuple(r[a] for a in others): r for r in rows if r.get(axis) == baseline}
    out = []
    for r in rows:
        b = base.get(tuple(r[a] for a in others))
        if b is None or r.get(axis) == baseline:
            continue

        def saving(key: str, r=r, b=b) -> float | None:
            mine, theirs = r[f"{key}_mean"], b[f"{key}_mean"]
            return None if not mine or not theirs else 1.0 - mine / theirs

        out.append({**{a: r[a] for a in study.group_axes},
                    "final_accuracy": r["final_accuracy_mean"],
                    "baseline_accuracy": b["final_accuracy_mean"],
                    "accuracy_delta_points": None if r["final_accuracy_mean"] is None else
                    100 * (r["final_accuracy_mean"] - b["final_accuracy_mean"]),
                    "flops_saving": saving("total_flops"), "bytes_saving": saving("total_bytes")})
    return out
