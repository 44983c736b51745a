"""The report's figures: accuracy against round, cumulative bytes and cumulative FLOPs
(a line per strategy, a band over seeds, a panel per partition), and a
label-distribution heatmap of each partition (flwr-datasets)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.report.load import CellData, StudyData
from fl.report.tables import BYTE_UNITS, FLOP_UNITS, pick_unit

__all__ = ["X_AXES", "plot_curves", "plot_partitions"]

# --- plots ------------------------------------------------------------------------------
X_AXES = {
    "round": ("round", "communication round", None),
    "bytes": ("cum_bytes", "cumulative bytes, down + up", BYTE_UNITS),
    "flops": ("cum_flops", "cumulative client training FLOPs", FLOP_UNITS),
}


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._=+-" else "_" for ch in text)


def _curve(cells: list[CellData], key: str) -> tuple[list[float], list[float], list[float],
                                                      list[float]] | None:
    """Per round: x (mean over seeds), accuracy mean/min/max (%) over seeds."""
    series = []
    for c in cells:
        pts = [(r[key], r["accuracy"]) for r in c.rounds if r.get(key) is not None]
        if pts:
            series.append(pts)
    if not series:
        return None
    n = min(len(s) for s in series)
    xs = [sum(s[i][0] for s in series) / len(series) for i in range(n)]
    ys = [[100 * s[i][1] for s in series] for i in range(n)]
    return xs, [sum(y) / len(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


@dataclass(frozen=True)
class _Layout:
    """What every accuracy figure of a report shares: lines, panels, colours."""

    line_axis: str | None
    panel_axis: str | None
    lines: list[str]  #: the line axis's choices in grid order ([""]: one line)
    panels: list[str]  #: the panel axis's choices in grid order ([]: one panel)
    color: dict[str, Any]
    n_seeds: int


def _draw_panel(ax: Any, layout: _Layout, cells: list[CellData], panel: str | None,
                key: str, scale: float, handles: dict[str, Any]) -> None:
    """One panel: a line (mean over seeds) and a band (min to max) per line choice."""
    styles = ["-", "--", "-.", ":"]
    for i, label in enumerate(layout.lines):
        sel = [c for c in cells
               if (not layout.line_axis or c.choices.get(layout.line_axis) == label)
               and (panel is None or c.choices.get(layout.panel_axis) == panel)]
        cur = _curve(sel, key)
        if cur is None:
            continue
        xs = [x / scale for x in cur[0]]
        (h,) = ax.plot(xs, cur[1], styles[(i // 10) % 4], color=layout.color[label], lw=1.8,
                       label=label or "mean")
        if len(sel) > 1:
            ax.fill_between(xs, cur[2], cur[3], color=layout.color[label], alpha=0.18, lw=0)
        handles.setdefault(label, h)


def _figure(plt: Any, layout: _Layout, cells: list[CellData], x: tuple[str, str, Any],
            title: str) -> Any:
    """The figure of one x axis for one combination of the fixed axes."""
    key, xlabel, units = x
    panels: list[str | None] = [None]
    if layout.panel_axis:
        panels = [p for p in layout.panels if any(c.choices.get(layout.panel_axis) == p
                                                  for c in cells)]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(5.2 * ncols + 1.8, 3.9 * nrows),
                            squeeze=False, sharey=True)
    scale, unit = (1.0, "") if units is None else pick_unit(
        [r.get(key) for c in cells for r in c.rounds], units)
    handles: dict[str, Any] = {}
    for ax, panel in zip(axs.flat, panels):
        _draw_panel(ax, layout, cells, panel, key, scale, handles)
        ax.set_title(f"{layout.panel_axis}={panel}" if panel is not None else "", fontsize=11)
        ax.set_xlabel(xlabel + (f" ({unit})" if unit else ""))
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 100)
    for ax in axs[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    for ax in list(axs.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=12)
    if handles:
        handles = {k: handles[k] for k in layout.lines if k in handles}  # grid order
        n = layout.n_seeds
        fig.legend(list(handles.values()), list(handles), loc="center right",
                   title=(layout.line_axis or "") + f"\nline: mean, band: min–max\nover {n} "
                   f"seed{'s' * (n > 1)}", fontsize=9, title_fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    return fig


def plot_curves(study: StudyData, out: Path, line_axis: str | None,
                panel_axis: str | None) -> tuple[list[Path], list[str]]:
    """Accuracy against round / bytes / FLOPs, one file per x axis and combination of the
    other axes; returns (files, notes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[Path] = []
    notes: list[str] = []
    fixed = [a for a in study.group_axes if a not in (line_axis, panel_axis)]
    lines = study.axes[line_axis] if line_axis else [""]
    cmap = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20")
    layout = _Layout(line_axis, panel_axis, lines,
                     study.axes[panel_axis] if panel_axis else [],
                     {label: cmap(i % cmap.N) for i, label in enumerate(lines)},
                     max(len(study.axes.get(study.seed_axis, [])) if study.seed_axis else 1, 1))
    combos: dict[tuple, list[CellData]] = {}
    for c in study.cells:
        combos.setdefault(tuple(c.choices.get(a) for a in fixed), []).append(c)
    for xname, x in X_AXES.items():
        if not any(r.get(x[0]) is not None for c in study.cells for r in c.rounds):
            notes.append(f"no round record has `{x[0]}`: the accuracy-vs-{xname} plot is "
                         "skipped (AutoFLIP records it)")
            continue
        for combo, cells in combos.items():
            where = ", ".join(f"{a}={v}" for a, v in zip(fixed, combo))
            title = f"{study.name}: test accuracy vs {x[1]}" + (f" — {where}" if where else "")
            fig = _figure(plt, layout, cells, x, title)
            suffix = "".join(f"__{_safe(a)}={_safe(str(v))}" for a, v in zip(fixed, combo))
            path = out / f"accuracy_vs_{xname}{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
    return files, notes


def plot_partitions(study: StudyData, out: Path, line_axis: str | None,
                    max_clients: int = 50) -> tuple[list[Path], list[str]]:
    """A label-distribution heatmap of each distinct partition (first seed's cell)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from datasets import Dataset
    from flwr_datasets.visualization import plot_label_distributions

    from fl.config import ConfigError, build
    from fl.data import load_federated
    from fl.dotted import flatten
    from fl.partition import make_partitioner

    files: list[Path] = []
    notes: list[str] = []
    seen: set[str] = set()
    for cell in study.cells:
        try:
            cfg = build(flatten(cell.config))
        except ConfigError as e:
            notes.append(f"cell {cell.id}: config.json no longer validates ({e.problems[0]}); "
                         "no label heatmap")
            continue
        key = repr((cfg.dataset, cfg.partition))
        if key in seen or cfg.partition.kind == "natural" or cfg.dataset.name == "hf":
            if key not in seen and cfg.partition.kind == "natural":
                notes.append(f"cell {cell.id}: natural partitions have no heatmap here")
            seen.add(key)
            continue
        seen.add(key)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                labels = load_federated(cfg).train.y.numpy()
                part = make_partitioner(cfg.partition, cfg.seed, pool_size=len(labels))
                part.dataset = Dataset.from_dict({"label": labels.tolist()})
                n = cfg.partition.num_clients
                shown = min(n, max_clients)
                where = ", ".join(f"{a}={v}" for a, v in cell.choices.items()
                                  if a not in (line_axis, study.seed_axis))
                fig, ax, _ = plot_label_distributions(
                    part, "label", plot_type="heatmap", size_unit="absolute",
                    max_num_partitions=shown, partition_id_axis="x",
                    figsize=(max(6.0, 0.28 * shown + 2.5), 4.6),
                    title=f"{study.name}: examples per label and client — {where} "
                          f"(seed {cfg.seed}" + (f", first {shown} of {n} clients)" if shown < n
                                                 else ")"),
                    plot_kwargs={"annot": shown <= 20},
                )
                ax.set_xlabel("client (partition id)")
                ax.set_ylabel("label")
                ax.title.set_fontsize(10)
                fig.tight_layout()
                name = "__".join(f"{_safe(a)}={_safe(v)}" for a, v in cell.choices.items()
                                 if a not in (line_axis, study.seed_axis)) or "partition"
                path = out / f"labels__{name}.png"
                fig.savefig(path, dpi=110)
                plt.close(fig)
                files.append(path)
        except Exception as e:  # a heatmap must not sink the tables and curves
            notes.append(f"cell {cell.id}: no label heatmap ({type(e).__name__}: {e})")
    return files, notes
