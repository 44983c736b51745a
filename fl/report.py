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
``cells.csv`` (one row per cell), ``report.md`` (the table and the figures), and
PNG figures: accuracy against round, cumulative bytes and cumulative FLOPs, one
line per strategy (mean over seeds, band = min to max), one panel per
partition, one file per remaining axis combination; and a label-distribution
heatmap of each partition (flwr-datasets' ``plot_label_distributions``).
Everything is read and checked before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl.results import CONFIG_JSON, ROUNDS_JSONL, SUMMARY_JSON

__all__ = ["CellData", "ReportError", "StudyData", "aggregate", "load_study_dir",
           "write_report"]

STUDY_JSON = "study.json"  # same name as fl.sweep.STUDY_JSON (kept import-light)


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
                      "loss_global")
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


# --- tables ----------------------------------------------------------------------------
def _unit(values: Sequence[float | None], units: Sequence[tuple[float, str]]) -> tuple[float, str]:
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
    bscale, bunit = _unit([r["bytes_to_target_mean"] for r in rows], BYTE_UNITS)
    fscale, funit = _unit([r["flops_to_target_mean"] for r in rows], FLOP_UNITS)
    t = f"{100 * target:g}%"
    head = [*study.group_axes, "seeds", "final acc. (%)", "best acc. (%)", f"reached {t}",
            f"rounds to {t}", f"{bunit} to {t}", f"{funit} to {t}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(study.group_axes)
             + "---:|" * (len(head) - len(study.group_axes))]
    for r in rows:
        cells = [*(str(r[a]) for a in study.group_axes), str(r["seeds"]),
                 _pm(r["final_accuracy_mean"], r["final_accuracy_std"], 0.01, 2),
                 _pm(r["best_accuracy_mean"], r["best_accuracy_std"], 0.01, 2),
                 f"{r['reached_target']}/{r['seeds']}",
                 _pm(r["rounds_to_target_mean"], r["rounds_to_target_std"], 1.0, 1),
                 _pm(r["bytes_to_target_mean"], r["bytes_to_target_std"], bscale, 1),
                 _pm(r["flops_to_target_mean"], r["flops_to_target_std"], fscale, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


def savings_markdown(study: StudyData, rows: list[dict[str, Any]], axis: str,
                     baseline: str) -> str:
    """The savings table, then the mean over the other axes for each ``axis`` choice."""
    axes = study.group_axes
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    pts = lambda v: "—" if v is None else f"{v:+.2f}"  # noqa: E731
    head = [*axes, "final acc. (%)", f"{baseline} acc. (%)", "Δ acc. (points)",
            "FLOPs saved", "bytes saved"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(axes) + "---:|" * 5]
    for r in rows:
        lines.append("| " + " | ".join([*(str(r[a]) for a in axes),
                                        f"{100 * r['final_accuracy']:.2f}",
                                        f"{100 * r['baseline_accuracy']:.2f}",
                                        pts(r["accuracy_delta_points"]),
                                        pct(r["flops_saving"]), pct(r["bytes_saving"])]) + " |")
    lines += ["", f"Mean over the other axes, against {axis}={baseline}:", "",
              f"| {axis} | settings | Δ acc. (points) | FLOPs saved | bytes saved |",
              "|---|---:|---:|---:|---:|"]
    for choice in dict.fromkeys(r[axis] for r in rows):
        mine = [r for r in rows if r[axis] == choice]

        def avg(key: str, mine=mine) -> float | None:
            vals = [r[key] for r in mine if r[key] is not None]
            return sum(vals) / len(vals) if vals else None

        lines.append(f"| {choice} | {len(mine)} | {pts(avg('accuracy_delta_points'))} | "
                     f"{pct(avg('flops_saving'))} | {pct(avg('bytes_saving'))} |")
    return "\n".join(lines) + "\n"


def decomposition_markdown(study: StudyData, rows: list[dict[str, Any]]) -> str | None:
    """Mean loss-decomposition terms per group (last measured round), when measured."""
    if not any(r.get("loss_global_mean") is not None for r in rows):
        return None
    axes = study.group_axes
    head = [*axes, "local", "distribution shift", "aggregation", "global"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(axes) + "---:|" * 4]
    for r in rows:
        lines.append("| " + " | ".join([*(str(r[a]) for a in axes),
                                        *(_pm(r[f"{k}_mean"], r[f"{k}_std"], 1.0, 4)
                                          for k in DECOMPOSITION)]) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


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


def plot_curves(study: StudyData, out: Path, line_axis: str | None,
                panel_axis: str | None) -> tuple[list[Path], list[str]]:
    """Accuracy against round / bytes / FLOPs; returns (files, notes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[Path] = []
    notes: list[str] = []
    fixed = [a for a in study.group_axes if a not in (line_axis, panel_axis)]
    lines = study.axes[line_axis] if line_axis else [""]
    cmap = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20")
    color = {label: cmap(i % cmap.N) for i, label in enumerate(lines)}
    styles = ["-", "--", "-.", ":"]
    combos: dict[tuple, list[CellData]] = {}
    for c in study.cells:
        combos.setdefault(tuple(c.choices.get(a) for a in fixed), []).append(c)
    n_seeds = max(len(study.axes.get(study.seed_axis, [])) if study.seed_axis else 1, 1)
    for xname, (key, xlabel, units) in X_AXES.items():
        if not any(r.get(key) is not None for c in study.cells for r in c.rounds):
            notes.append(f"no round record has `{key}`: the accuracy-vs-{xname} plot is "
                         "skipped (AutoFLIP records it)")
            continue
        for combo, cells in combos.items():
            panels = ([p for p in study.axes[panel_axis] if any(c.choices.get(panel_axis) == p
                                                               for c in cells)]
                      if panel_axis else [None])
            ncols = min(3, len(panels))
            nrows = math.ceil(len(panels) / ncols)
            fig, axs = plt.subplots(nrows, ncols, figsize=(5.2 * ncols + 1.8, 3.9 * nrows),
                                    squeeze=False, sharey=True)
            scale, unit = (1.0, "") if units is None else _unit(
                [r.get(key) for c in cells for r in c.rounds], units)
            handles: dict[str, Any] = {}
            for ax, panel in zip(axs.flat, panels):
                for i, label in enumerate(lines):
                    sel = [c for c in cells if (not line_axis or c.choices.get(line_axis) == label)
                           and (panel is None or c.choices.get(panel_axis) == panel)]
                    cur = _curve(sel, key)
                    if cur is None:
                        continue
                    xs = [x / scale for x in cur[0]]
                    (h,) = ax.plot(xs, cur[1], styles[(i // 10) % 4], color=color[label],
                                   lw=1.8, label=label or "mean")
                    if len(sel) > 1:
                        ax.fill_between(xs, cur[2], cur[3], color=color[label], alpha=0.18,
                                        lw=0)
                    handles.setdefault(label, h)
                ax.set_title(f"{panel_axis}={panel}" if panel is not None else "", fontsize=11)
                ax.set_xlabel(xlabel + (f" ({unit})" if unit else ""))
                ax.grid(alpha=0.3)
                ax.set_ylim(0, 100)
            for ax in axs[:, 0]:
                ax.set_ylabel("test accuracy (%)")
            for ax in list(axs.flat)[len(panels):]:
                ax.set_visible(False)
            where = ", ".join(f"{a}={v}" for a, v in zip(fixed, combo))
            fig.suptitle(f"{study.name}: test accuracy vs {xlabel}" + (f" — {where}" if where
                                                                        else ""), fontsize=12)
            if handles:
                handles = {k: handles[k] for k in lines if k in handles}  # grid order
                fig.legend(list(handles.values()), list(handles), loc="center right",
                           title=(line_axis or "") + f"\nline: mean, band: min–max\nover "
                           f"{n_seeds} seed{'s' * (n_seeds > 1)}", fontsize=9, title_fontsize=9,
                           frameon=False)
            fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
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

    from fl.config import ConfigError, _flatten_yaml, build
    from fl.data import load_federated, make_partitioner

    files: list[Path] = []
    notes: list[str] = []
    seen: set[str] = set()
    for cell in study.cells:
        try:
            cfg = build(_flatten_yaml(cell.config))
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
                part = make_partitioner(cfg.partition, cfg.seed)
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


# --- the whole report --------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    _atomic_write(out / "table.md", table)
    _atomic_write(out / "table.csv", _csv(rows))
    _atomic_write(out / "cells.csv", _csv(cell_rows))
    savings_md = None
    if baseline is not None:
        saved = savings_rows(study, rows, *baseline)
        savings_md = savings_markdown(study, saved, *baseline)
        _atomic_write(out / "savings.md", savings_md)
        _atomic_write(out / "savings.csv", _csv(saved))
    decomposition_md = decomposition_markdown(study, rows)
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
    if decomposition_md:
        md += ["", "## Loss decomposition (last measured round)", "", decomposition_md]
    if notes:
        md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    md += ["", "## Accuracy curves", ""] + [f"![{p.stem}]({p.name})\n" for p in curves]
    if maps:
        md += ["", "## Label distribution of each partition", ""] + [
            f"![{p.stem}]({p.name})\n" for p in maps]
    _atomic_write(out / "report.md", "\n".join(md) + "\n")
    return {"out": out, "rows": rows, "curves": curves, "heatmaps": maps, "notes": notes,
            "savings": savings_md}
