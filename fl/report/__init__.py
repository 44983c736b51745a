"""Tables and plots of a study (``bonsai report STUDY_DIR``).

Reads ``STUDY_DIR/study.json`` (written by ``bonsai sweep``) and, for every
finished cell (one with ``summary.json``), its ``config.json``, ``rounds.jsonl``
and ``summary.json``. Cells are grouped by every axis but ``seed``; each group
gives one row: mean and sample standard deviation (n - 1) over seeds of the
final and best test accuracy, and of the rounds, cumulative bytes (``cum_bytes``,
down + up) and cumulative client training FLOPs (``cum_flops``, when the
strategy records it) at the first round whose accuracy reaches the target
(over the seeds that reach it; ``reached`` says how many did).

Writes to ``STUDY_DIR/report`` (or ``--out``): ``table.md``, ``table.csv``,
``cells.csv`` (one row per cell), ``report.md`` (the table and the figures),
with a baseline ``savings.md/.csv`` and ``paired.md/.csv`` (per-seed differences
against the baseline cell of the same seed: mean and 95% Student-t interval),
where measured ``guidance.md/.csv`` (guidance-quality correlations), and
PNG figures: accuracy against round, cumulative bytes and cumulative FLOPs, one
line per strategy (mean over seeds, band = min to max), one panel per
partition, one file per remaining axis combination; and a label-distribution
heatmap of each partition (flwr-datasets' ``plot_label_distributions``).
Everything is read and checked before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl.files import atomic_write_text
from fl.report.load import CellData, ReportError, StudyData, load_study_dir
from fl.report.plots import plot_curves, plot_partitions
from fl.report.stats import (
    aggregate,
    cell_row,
    guidance_rows,
    mean_std,
    paired_rows,
    savings_rows,
    to_target,
)
from fl.report.tables import (
    csv_text,
    decomposition_markdown,
    guidance_markdown,
    markdown_table,
    paired_markdown,
    savings_markdown,
)

__all__ = ["CellData", "ReportError", "StudyData", "aggregate", "cell_row", "guidance_rows",
           "load_study_dir", "mean_std", "paired_rows", "savings_rows", "to_target",
           "write_report"]


def write_report(study: StudyData, out: Path, target: float = 0.9,
                 line_axis: str | None = "strategy", panel_axis: str | None = "partition",
                 heatmaps: bool = True, baseline: tuple[str, str] | None = None
                 ) -> dict[str, Any]:
    """Write tables, figures and report.md to ``out``; return what was written."""
    line_axis = line_axis if line_axis in study.group_axes else (
        study.group_axes[0] if study.group_axes else None)
    panel_axis = panel_axis if panel_axis in study.group_axes and panel_axis != line_axis \
        else None
    rows = aggregate(study, target)
    cell_rows = [cell_row(c, target) for c in study.cells]
    table = markdown_table(study, rows, target)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "table.csv", csv_text(rows))
    atomic_write_text(out / "cells.csv", csv_text(cell_rows))
    savings_md = paired_md = None
    if baseline is not None:
        saved = savings_rows(study, rows, *baseline)
        savings_md = savings_markdown(study, saved, *baseline)
        atomic_write_text(out / "savings.md", savings_md)
        atomic_write_text(out / "savings.csv", csv_text(saved))
        paired = paired_rows(study, target, *baseline)
        if paired:
            paired_md = paired_markdown(study, paired, *baseline)
            atomic_write_text(out / "paired.md", paired_md)
            atomic_write_text(out / "paired.csv", csv_text(paired))
    decomposition_md = decomposition_markdown(study, rows)
    guidance = guidance_rows(study, target)
    guidance_md = guidance_markdown(study, guidance)
    if guidance_md:
        atomic_write_text(out / "guidance.md", guidance_md)
        atomic_write_text(out / "guidance.csv", csv_text(guidance))
    curves, notes = plot_curves(study, out, line_axis, panel_axis)
    maps: list[Path] = []
    if heatmaps:
        maps, more = plot_partitions(study, out, line_axis)
        notes += more
    if study.unfinished:
        notes.append(f"{len(study.unfinished)} cell(s) not finished and left out: "
                     + ", ".join(study.unfinished[:5]) + (" ..." if len(study.unfinished) > 5
                                                          else ""))
    md = [f"# Study `{study.name}`", "",
          f"{len(study.cells)} finished cells in `{study.dir}`; grouped by "
          f"{', '.join(study.group_axes) or 'nothing'}"
          + (f", mean ± sample std over `{study.seed_axis}`" if study.seed_axis else "")
          + f". Target accuracy: {100 * target:g}% (rounds, bytes and FLOPs to target are "
          "over the seeds that reach it).", "", table]
    if savings_md:
        md += ["", f"## Against {baseline[0]}={baseline[1]}", "",  # type: ignore[index]
               "Total client training FLOPs and total bytes include exploration and masks.",
               "", savings_md]
    if paired_md:
        md += ["", f"## Paired against {baseline[0]}={baseline[1]} (same seed, same θ_0)",  # type: ignore[index]
               "", "Mean over seeds of the per-seed difference against the baseline cell "
               "with the same seed and other choices, with its 95% Student-t interval; "
               "* marks an interval that excludes 0. Savings are per seed: "
               "1 - total / baseline total.", "", paired_md]
    if guidance_md:
        md += ["", "## Guidance quality", "",
               "Spearman rank correlation between a unit score and the loss increase when "
               "that unit alone is removed from the global model (the oracle), mean over "
               "each run's checks and over groups; mean ± std over seeds; the differences "
               "are paired within each run (95% interval, * excludes 0).", "", guidance_md]
    if decomposition_md:
        md += ["", "## Loss decomposition (last measured round)", "", decomposition_md]
    if notes:
        md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    md += ["", "## Accuracy curves", ""] + [f"![{p.stem}]({p.name})\n" for p in curves]
    if maps:
        md += ["", "## Label distribution of each partition", ""] + [
            f"![{p.stem}]({p.name})\n" for p in maps]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return {"out": out, "rows": rows, "curves": curves, "heatmaps": maps, "notes": notes,
            "savings": savings_md, "paired": paired_md, "guidance": guidance_md}
