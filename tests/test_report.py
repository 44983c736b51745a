"""`bonsai report` on a study folder written here by hand: numbers against
hand-computed means and standard deviations, valid non-trivial PNGs, and bad
input (missing folder, corrupt JSON) as one line, exit 2, nothing overwritten."""

import csv
import json
import struct
from pathlib import Path

import pytest

from fl.cli import main
from fl.config import build, to_json

# accuracy per round 0..3; cum_bytes = 1e6 * round; strategy a also has cum_flops = 5e9 * round
ACC = {
    ("a", 0): [0.10, 0.50, 0.92, 0.95],  # reaches 0.9 at round 2
    ("a", 1): [0.10, 0.60, 0.85, 0.90],  # round 3
    ("a", 2): [0.10, 0.70, 0.91, 0.85],  # round 2
    ("b", 0): [0.10, 0.50, 0.70, 0.80],  # b never reaches 0.9
    ("b", 1): [0.10, 0.50, 0.60, 0.70],
    ("b", 2): [0.10, 0.40, 0.50, 0.60],
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_cell(d: Path, strategy: str, seed: int, accs, finished=True):
    d.mkdir(parents=True)
    cfg = build({"seed": seed, "rounds": 3, "partition.kind": "iid", "partition.num_clients": 4,
                 "strategy.name": "fedavg" if strategy == "a" else "fedprox",
                 "run_dir": str(d)})
    (d / "config.json").write_text(to_json(cfg) + "\n")
    lines = []
    for rnd, acc in enumerate(accs):
        rec = {"round": rnd, "accuracy": acc, "loss": 1.0 - acc, "cum_bytes": 10**6 * rnd}
        if strategy == "a":
            rec["cum_flops"] = 5 * 10**9 * rnd
        lines.append(json.dumps(rec))
    (d / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (d / "summary.json").write_text(json.dumps({
            "rounds": len(accs) - 1, "final_accuracy": accs[-1], "best_accuracy": max(accs)}))


@pytest.fixture
def study_dir(tmp_path):
    root = tmp_path / "studies" / "fixture"
    cells = []
    for (strategy, seed), accs in ACC.items():
        cid = f"strategy={strategy},partition=iid,seed={seed}"
        dname = cid.replace(",", "__")
        write_cell(root / dname, strategy, seed, accs)
        cells.append({"id": cid, "dir": dname,
                      "choices": {"strategy": strategy, "partition": "iid", "seed": str(seed)}})
    # an interrupted cell: rounds but no summary; left out and noted
    cid = "strategy=a,partition=iid,seed=3"
    write_cell(root / cid.replace(",", "__"), "a", 3, [0.1, 0.99], finished=False)
    cells.append({"id": cid, "dir": cid.replace(",", "__"),
                  "choices": {"strategy": "a", "partition": "iid", "seed": "3"}})
    (root / "study.json").write_text(json.dumps({
        "name": "fixture", "axes": {"strategy": ["a", "b"], "partition": ["iid"],
                                    "seed": ["0", "1", "2", "3"]},
        "seed_axis": "seed", "cells": cells}))
    return root


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_table_numbers_match_hand_computed_means_and_stds(study_dir, capsys):
    assert main(["report", str(study_dir)]) == 0
    out = study_dir / "report"
    rows = {r["strategy"]: r for r in read_csv(out / "table.csv")}
    a, b = rows["a"], rows["b"]
    assert a["seeds"] == "3" and a["reached_target"] == "3"
    # final: 0.95, 0.90, 0.85 -> mean 0.90, sample std 0.05
    assert float(a["final_accuracy_mean"]) == pytest.approx(0.90)
    assert float(a["final_accuracy_std"]) == pytest.approx(0.05)
    # best: 0.95, 0.90, 0.91 -> mean 0.92, std sqrt(0.0014 / 2)
    assert float(a["best_accuracy_mean"]) == pytest.approx(0.92)
    assert float(a["best_accuracy_std"]) == pytest.approx(0.0007 ** 0.5)
    # rounds to 90%: 2, 3, 2 -> mean 7/3, std sqrt(1/3)
    assert float(a["rounds_to_target_mean"]) == pytest.approx(7 / 3)
    assert float(a["rounds_to_target_std"]) == pytest.approx((1 / 3) ** 0.5)
    assert float(a["bytes_to_target_mean"]) == pytest.approx(7e6 / 3)
    assert float(a["flops_to_target_mean"]) == pytest.approx(35e9 / 3)
    assert float(a["flops_to_target_std"]) == pytest.approx(5e9 * (1 / 3) ** 0.5)
    # b: never reaches 90%; no FLOPs recorded -> empty cells
    assert b["reached_target"] == "0"
    assert float(b["final_accuracy_mean"]) == pytest.approx(0.70)
    assert float(b["final_accuracy_std"]) == pytest.approx(0.10)
    assert b["rounds_to_target_mean"] == b["bytes_to_target_mean"] == ""
    assert b["flops_to_target_mean"] == ""
    md = (out / "table.md").read_text().splitlines()
    assert md[0] == ("| strategy | partition | seeds | final acc. (%) | best acc. (%) | "
                     "reached 90% | rounds to 90% | MB to 90% | GFLOP to 90% |")
    assert md[2] == ("| a | iid | 3 | 90.00 ± 5.00 | 92.00 ± 2.65 | 3/3 | 2.3 ± 0.6 | "
                     "2.3 ± 0.6 | 11.67 ± 2.89 |")
    assert md[3] == "| b | iid | 3 | 70.00 ± 10.00 | 70.00 ± 10.00 | 0/3 | — | — | — |"
    cells = read_csv(out / "cells.csv")
    assert len(cells) == 6  # the unfinished cell is left out ...
    printed = capsys.readouterr().out
    assert "1 cell(s) not finished" in printed  # ... and said so
    assert "strategy=a,partition=iid,seed=3" in (out / "report.md").read_text()


def test_target_option_changes_what_counts_as_reached(study_dir):
    assert main(["report", str(study_dir), "--target", "0.7", "--no-heatmaps"]) == 0
    rows = {r["strategy"]: r for r in read_csv(study_dir / "report" / "table.csv")}
    # a: 0.7 first reached at rounds 2, 2, 1; b: rounds 2, 3, never
    assert rows["a"]["reached_target"] == "3"
    assert float(rows["a"]["rounds_to_target_mean"]) == pytest.approx(5 / 3)
    assert rows["b"]["reached_target"] == "2"
    assert float(rows["b"]["rounds_to_target_mean"]) == pytest.approx(2.5)


def test_plots_are_valid_non_trivial_pngs(study_dir):
    assert main(["report", str(study_dir)]) == 0
    out = study_dir / "report"
    expected = ["accuracy_vs_round.png", "accuracy_vs_bytes.png", "accuracy_vs_flops.png",
                "labels__partition=iid.png"]
    for name in expected:
        path = out / name
        assert path.is_file(), name
        assert path.stat().st_size > 10_000, name
        w, h = png_size(path)
        assert w >= 400 and h >= 300, (name, w, h)
    report = (out / "report.md").read_text()
    assert all(f"({name})" in report for name in expected)


def test_flops_plot_skipped_when_no_record_has_flops(tmp_path, study_dir):
    for d in study_dir.iterdir():
        if d.name.startswith("strategy=a"):
            recs = [json.loads(x) for x in (d / "rounds.jsonl").read_text().splitlines()]
            (d / "rounds.jsonl").write_text("".join(
                json.dumps({k: v for k, v in r.items() if k != "cum_flops"}) + "\n"
                for r in recs))
    assert main(["report", str(study_dir), "--no-heatmaps"]) == 0
    assert not (study_dir / "report" / "accuracy_vs_flops.png").exists()
    assert "no round record has `cum_flops`" in (study_dir / "report" / "report.md").read_text()


# --- bad input ------------------------------------------------------------------------
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("bonsai: error: ")
    return err[0]


def test_missing_or_empty_study_dir_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "study.json: missing" in one_error_line(capsys)
    assert list((tmp_path / "empty").iterdir()) == []


def test_no_finished_cell_exit_2(study_dir, capsys):
    for summary in study_dir.glob("*/summary.json"):
        summary.unlink()
    assert main(["report", str(study_dir)]) == 2
    assert "no finished cells" in one_error_line(capsys)
    assert not (study_dir / "report").exists()


@pytest.mark.parametrize("target, content, message", [
    ("strategy=a__partition=iid__seed=1/summary.json", '{"final_accuracy": 0.9',
     "summary.json: not valid JSON"),
    ("strategy=b__partition=iid__seed=0/config.json", "", "config.json: not valid JSON"),
    ("strategy=b__partition=iid__seed=2/rounds.jsonl", '{"round": 0, "accuracy": 0.1}\n{"rou\n'
     '{"round": 2, "accuracy": 0.5}\n', "rounds.jsonl: line 2 is not valid JSON"),
    ("study.json", "[1, 2", "study.json: not valid JSON"),
])
def test_corrupt_json_exit_2_and_nothing_overwritten(study_dir, capsys, target, content,
                                                     message):
    assert main(["report", str(study_dir)]) == 0
    capsys.readouterr()
    out = study_dir / "report"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    (study_dir / target).write_text(content)
    assert main(["report", str(study_dir)]) == 2
    line = one_error_line(capsys)
    assert message in line and str(study_dir) in line
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert after == before


def test_target_out_of_range_is_a_usage_error(study_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(study_dir), "--target", "1.5"])
    assert e.value.code == 2
    assert "--target: got 1.5; expected an accuracy in (0, 1]" in capsys.readouterr().err


def test_baseline_savings_against_hand_computed_totals(study_dir, capsys):
    from fl.cli import main

    for seed in (0, 1, 2):  # strategy b moves half the bytes of a
        path = study_dir / f"strategy=b__partition=iid__seed={seed}" / "rounds.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        for r in recs:
            r["cum_bytes"] = r["cum_bytes"] // 2
        path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert main(["report", str(study_dir), "--baseline", "strategy=a", "--no-heatmaps"]) == 0
    (row,) = read_csv(study_dir / "report" / "savings.csv")
    final_a = sum(ACC[("a", s)][-1] for s in (0, 1, 2)) / 3
    final_b = (0.80 + 0.70 + 0.60) / 3
    assert row["strategy"] == "b"
    assert float(row["bytes_saving"]) == pytest.approx(0.5)
    assert row["flops_saving"] == ""  # b records no FLOPs: no claim
    assert float(row["accuracy_delta_points"]) == pytest.approx(100 * (final_b - final_a))
    assert "bytes saved" in (study_dir / "report" / "report.md").read_text()
    assert main(["report", str(study_dir), "--baseline", "strategy=zzz"]) == 2
    assert "allowed: strategy=a, strategy=b" in capsys.readouterr().err


T_975_2DF = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def test_paired_comparison_against_hand_computed_intervals(study_dir, capsys):
    """Per seed (same theta_0): b - a in points and b's saving; mean and the 95% t
    interval over the 3 seeds, * when it excludes 0."""
    for seed in (0, 1, 2):  # strategy b moves half the bytes of a, on every seed
        path = study_dir / f"strategy=b__partition=iid__seed={seed}" / "rounds.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("\n".join(json.dumps({**r, "cum_bytes": r["cum_bytes"] // 2})
                                  for r in recs) + "\n")
    assert main(["report", str(study_dir), "--baseline", "strategy=a", "--no-heatmaps"]) == 0
    (row,) = read_csv(study_dir / "report" / "paired.csv")
    assert row["strategy"] == "b" and row["pairs"] == "3"  # seed 3 of a is unfinished
    final = [100 * (b - a) for a, b in ((0.95, 0.80), (0.90, 0.70), (0.85, 0.60))]  # -15..-25
    best = [100 * (b - a) for a, b in ((0.95, 0.80), (0.90, 0.70), (0.91, 0.60))]
    for key, diffs in (("final_accuracy", final), ("best_accuracy", best)):
        mean = sum(diffs) / 3
        sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
        half = T_975_2DF * sd / 3 ** 0.5
        assert float(row[f"{key}_mean"]) == pytest.approx(mean)
        assert float(row[f"{key}_lo"]) == pytest.approx(mean - half)
        assert float(row[f"{key}_hi"]) == pytest.approx(mean + half)
        assert row[f"{key}_excludes_0"] == "True"
    assert float(row["total_bytes_mean"]) == pytest.approx(0.5)
    assert float(row["total_bytes_lo"]) == pytest.approx(0.5)  # the same saving every seed
    assert row["total_flops_mean"] == "" and row["total_flops_lo"] == ""  # b has no FLOPs
    md = (study_dir / "report" / "paired.md").read_text()
    assert "| b | iid | 3 | -20.00 [-32.42, -7.58] * |" in md
    assert "Paired against strategy=a (same seed" in (study_dir / "report" / "report.md"
                                                       ).read_text()
    assert "paired against strategy=a" in capsys.readouterr().out


def test_paired_interval_that_includes_0_is_not_marked(study_dir):
    from fl.report import load_study_dir, paired_rows

    # b's final accuracy: +5, -5, +3 points against a, seed by seed
    for seed, acc in ((0, 1.00), (1, 0.85), (2, 0.88)):
        p = study_dir / f"strategy=b__partition=iid__seed={seed}" / "summary.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "final_accuracy": acc}))
    (row,) = paired_rows(load_study_dir(study_dir), 0.9, "strategy", "a")
    mean, sd = 1.0, ((4 ** 2 + 6 ** 2 + 2 ** 2) / 2) ** 0.5
    assert row["final_accuracy_mean"] == pytest.approx(mean)
    assert row["final_accuracy_hi"] - row["final_accuracy_mean"] == pytest.approx(
        T_975_2DF * sd / 3 ** 0.5)
    assert row["final_accuracy_excludes_0"] is False


def test_guidance_quality_table(study_dir):
    """Each run's mean rho over its checks; mean and std over seeds; guidance - magnitude
    paired within each run."""
    rhos = {0: [(0.6, 0.2, 0.1), (0.8, 0.4, -0.1)], 1: [(0.5, 0.1, 0.0), (0.5, 0.2, 0.2)],
            2: [(0.9, 0.3, 0.1), (0.7, 0.4, 0.1)]}  # (guidance, magnitude, random) rounds 2, 3
    for seed, checks in rhos.items():
        path = study_dir / f"strategy=a__partition=iid__seed={seed}" / "rounds.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        for r, (g, m, rnd) in zip(recs[2:], checks):
            r.update(guidance_rho=g, magnitude_rho=m, random_rho=rnd)
        path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert main(["report", str(study_dir), "--no-heatmaps"]) == 0
    (row,) = read_csv(study_dir / "report" / "guidance.csv")  # b measured nothing
    assert row["strategy"] == "a"
    per_run_g = [0.7, 0.5, 0.8]
    per_run_m = [0.3, 0.15, 0.35]
    assert float(row["guidance_rho_mean"]) == pytest.approx(2.0 / 3)
    assert float(row["magnitude_rho_mean"]) == pytest.approx(0.8 / 3)
    diffs = [g - m for g, m in zip(per_run_g, per_run_m)]  # 0.4, 0.35, 0.45: sd 0.05
    assert diffs == pytest.approx([0.4, 0.35, 0.45])
    half = T_975_2DF * 0.05 / 3 ** 0.5
    assert float(row["guidance_minus_magnitude_mean"]) == pytest.approx(0.4)
    assert float(row["guidance_minus_magnitude_lo"]) == pytest.approx(0.4 - half)
    assert row["guidance_minus_magnitude_excludes_0"] == "True"
    assert "## Guidance quality" in (study_dir / "report" / "report.md").read_text()
