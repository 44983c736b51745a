"""The numbers of a report: per cell, and per group of cells (every axis but the seed)
as mean and sample standard deviation over seeds; savings against a baseline; paired
differences against it (same seed, so the same theta_0, split and samples) with a 95%
Student-t interval over seeds; guidance-quality correlations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fl.report.load import CellData, StudyData

__all__ = ["DECOMPOSITION", "GUIDANCE", "METRICS", "PAIRED", "aggregate", "cell_row",
           "guidance_rows", "mean_std", "paired_rows", "savings_rows", "t_interval", "to_target"]

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
        **_mean_guidance(cell.rounds),
    }


DECOMPOSITION = ["loss_local", "loss_shift", "loss_aggregation", "loss_global"]


def _last_decomposition(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The loss-decomposition terms of the last round that measured them (or None)."""
    last = next((r for r in reversed(rounds) if "loss_global" in r), None)
    return {k: (last[k] if last else None) for k in DECOMPOSITION}


#: the guidance-quality correlations (docs/ALGORITHMS.md §1.5) a round may record
GUIDANCE = ["guidance_rho", "magnitude_rho", "random_rho"]


def _mean_guidance(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each guidance-quality rho averaged over the rounds that measured it (or None)."""
    out: dict[str, Any] = {}
    for k in GUIDANCE:
        vals = [r[k] for r in rounds if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


METRICS = ["final_accuracy", "best_accuracy", "rounds_to_target", "bytes_to_target",
           "flops_to_target", "total_bytes", "total_flops", *DECOMPOSITION, *GUIDANCE]


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


# --- paired comparisons ----------------------------------------------------------------
def t_interval(values: Sequence[float], level: float = 0.95
               ) -> tuple[float | None, float | None, float | None]:
    """Mean and the two-sided Student-t confidence interval of the mean (n - 1 degrees of
    freedom, scipy.stats.t); the interval is None for fewer than 2 values."""
    m, sd = mean_std(values)
    if m is None or sd is None:
        return m, None, None
    from scipy.stats import t  # the report's own process: the import costs nothing elsewhere

    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return m, m - half, m + half


#: (metric, kind) compared seed by seed: "points" = 100 (mine - baseline) for accuracies,
#: "saving" = 1 - mine / baseline for totals (exploration and masks included)
PAIRED = [("final_accuracy", "points"), ("best_accuracy", "points"),
          ("total_flops", "saving"), ("total_bytes", "saving")]


def _paired_value(kind: str, mine: float | None, base: float | None) -> float | None:
    if mine is None or base is None:
        return None
    if kind == "points":
        return 100.0 * (mine - base)
    return None if not base else 1.0 - mine / base


def _summary(values: list[float], prefix: str) -> dict[str, Any]:
    """``prefix_mean``, ``_lo``, ``_hi`` (95% CI) and ``_excludes_0``."""
    m, lo, hi = t_interval(values)
    return {f"{prefix}_mean": m, f"{prefix}_lo": lo, f"{prefix}_hi": hi,
            f"{prefix}_excludes_0": None if lo is None else bool(lo > 0 or hi < 0)}


def paired_rows(study: StudyData, target: float, axis: str, baseline: str
                ) -> list[dict[str, Any]]:
    """Each group against the ``axis=baseline`` group with the same other choices, seed by
    seed: a cell is paired with the baseline cell of the same seed (same theta_0, split,
    client samples and batches), the per-seed differences (:data:`PAIRED`) give a mean
    and a 95% Student-t interval over the seeds, marked when it excludes 0. Needs the
    study's seed axis; groups with no paired seed are left out."""
    seed_axis = study.seed_axis
    if seed_axis is None:
        return []
    others = [a for a in study.group_axes if a != axis]
    rows_by_key: dict[tuple, dict[str, Any]] = {}
    for cell in study.cells:
        key = tuple(cell.choices.get(a, "") for a in study.group_axes)
        rows_by_key.setdefault(key, {})[cell.choices.get(seed_axis, "")] = cell_row(cell, target)
    base_of = {tuple(k[study.group_axes.index(a)] for a in others): seeds
               for k, seeds in rows_by_key.items() if k[study.group_axes.index(axis)] == baseline}
    out = []
    for r in aggregate(study, target):  # grid order
        if r.get(axis) == baseline:
            continue
        key = tuple(r[a] for a in study.group_axes)
        base = base_of.get(tuple(r[a] for a in others))
        if base is None:
            continue
        mine = rows_by_key[key]
        seeds = [sd for sd in mine if sd in base]
        if not seeds:
            continue
        row: dict[str, Any] = {**{a: r[a] for a in study.group_axes}, "pairs": len(seeds)}
        for metric, kind in PAIRED:
            diffs = [_paired_value(kind, mine[sd][metric], base[sd][metric]) for sd in seeds]
            row.update(_summary([d for d in diffs if d is not None], metric))
        out.append(row)
    return out


def guidance_rows(study: StudyData, target: float) -> list[dict[str, Any]]:
    """Per group that measured guidance quality: the per-run mean rho of each score (mean
    and std over seeds, from :func:`aggregate`), and the paired difference guidance -
    magnitude and guidance - random within each run (mean and 95% interval over seeds)."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for cell in study.cells:
        key = tuple(cell.choices.get(a, "") for a in study.group_axes)
        cells.setdefault(key, []).append(cell_row(cell, target))
    out = []
    for r in aggregate(study, target):
        if r.get("magnitude_rho_mean") is None:
            continue
        mine = cells[tuple(r[a] for a in study.group_axes)]
        row = {**{a: r[a] for a in study.group_axes}, "seeds": r["seeds"],
               **{f"{k}_{s}": r[f"{k}_{s}"] for k in GUIDANCE for s in ("mean", "std")}}
        for other in ("magnitude", "random"):
            diffs = [c["guidance_rho"] - c[f"{other}_rho"] for c in mine
                     if c["guidance_rho"] is not None and c[f"{other}_rho"] is not None]
            row.update(_summary(diffs, f"guidance_minus_{other}"))
        out.append(row)
    return out
