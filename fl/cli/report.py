"""``bonsai report STUDY_DIR [--target 0.9] [--out DIR]``: tables (markdown, CSV) and
PNG plots of a study that ``bonsai sweep`` ran."""

from __future__ import annotations

import argparse
from pathlib import Path

from fl.cli.common import fail


def _target(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a number in (0, 1]") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"got {v}; expected an accuracy in (0, 1], e.g. 0.9")
    return v


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and plots of a study folder")
    p.add_argument("study_dir", help="the study folder, e.g. results/studies/smoke")
    p.add_argument("--target", type=_target, default=0.9,
                   help="target test accuracy for rounds/bytes/FLOPs to target (default 0.9)")
    p.add_argument("--out", default=None, help="output folder (default STUDY_DIR/report)")
    p.add_argument("--lines", default="strategy",
                   help="axis drawn as one line per choice (default strategy)")
    p.add_argument("--panels", default="partition",
                   help="axis drawn as one panel per choice (default partition)")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the label heatmaps")
    p.add_argument("--baseline", default=None, metavar="AXIS=CHOICE",
                   help="also tabulate accuracy and FLOP/byte savings against this cell "
                        "choice, e.g. strategy=fedavg, and the paired comparison (per seed: "
                        "same theta_0) with 95%% intervals")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fl.report import ReportError, load_study_dir, write_report

    try:
        study = load_study_dir(args.study_dir)
    except ReportError as e:
        return fail(str(e))
    baseline = None
    if args.baseline:
        axis, _, choice = args.baseline.partition("=")
        if axis not in study.group_axes or choice not in study.axes.get(axis, []):
            allowed = ", ".join(f"{a}={c}" for a in study.group_axes for c in study.axes[a])
            return fail(f"--baseline: got {args.baseline!r}; allowed: {allowed}")
        baseline = (axis, choice)
    out = Path(args.out) if args.out else study.dir / "report"
    if out.exists() and not out.is_dir():
        return fail(f"--out: {str(out)!r} exists and is not a folder")
    from fl.rundir import writable_problem

    problem = writable_problem(out.expanduser().resolve(), "--out", str(out))
    if problem:
        return fail(problem)
    try:
        res = write_report(study, out, args.target, args.lines, args.panels,
                           heatmaps=not args.no_heatmaps, baseline=baseline)
    except OSError as e:  # the disk filled up or the folder vanished while writing
        return fail(f"--out: writing {str(out)!r} failed ({e.strerror or e})", code=1)
    print(open(out / "table.md").read(), end="")
    if res["savings"]:
        print(f"\nagainst {args.baseline}:\n{res['savings']}", end="")
    if res["paired"]:
        print(f"\npaired against {args.baseline} (mean [95% CI] over seeds, * excludes 0):\n"
              f"{res['paired']}", end="")
    if res["guidance"]:
        print(f"\nguidance quality (Spearman rho against the oracle):\n{res['guidance']}",
              end="")
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"\n{len(study.cells)} cells, {len(res['rows'])} rows; wrote {out}/: table.md, "
          f"table.csv, cells.csv, report.md, {len(res['curves'])} curve plot(s), "
          f"{len(res['heatmaps'])} label heatmap(s)")
    return 0
