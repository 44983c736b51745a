"""Studies: grid expansion, validation before anything runs, skipping finished
cells, every shipped study file, and one real two-cell sweep through Ray."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from fl.cli import main
from fl.config import to_json
from fl.study import (
    STUDY_JSON,
    StudyError,
    cell_dir_name,
    expand,
    load_study,
    parse_study,
    validate_cells,
)
from fl.sweep import run_study

ROOT = Path(__file__).resolve().parent.parent

GRID = {
    "strategy": {"fedavg": {"strategy.name": "fedavg"},
                 "fedprox": {"strategy.name": "fedprox", "strategy.proximal_mu": 0.1}},
    "partition": {"iid": {"partition.kind": "iid"},
                  "dir0.5": {"partition": {"kind": "dirichlet", "alpha": 0.5}}},
    "seed": [0, 1, 2],
}


def study_dict(tmp_path, **extra):
    d = {"name": "t", "output_dir": str(tmp_path / "out"),
         "base": {"rounds": 2, "partition": {"num_clients": 3}, "train": {"lr": 0.1}},
         "grid": GRID}
    d.update(extra)
    return d


def write_study(tmp_path, data, name="study.yaml"):
    path = tmp_path / name
    path.write_text(f"# bonsai sweep {path}\n" + yaml.safe_dump(data, sort_keys=False))
    return path


# --- expansion ---------------------------------------------------------------------
def test_grid_is_the_product_of_the_axes_with_overrides_applied(tmp_path):
    study = parse_study(study_dict(tmp_path))
    cells = expand(study)
    assert len(cells) == 2 * 2 * 3
    assert cells[0].id == "strategy=fedavg,partition=iid,seed=0"
    assert cells[1].id == "strategy=fedavg,partition=iid,seed=1"  # last axis fastest
    assert cells[-1].id == "strategy=fedprox,partition=dir0.5,seed=2"
    assert len({c.id for c in cells}) == 12
    c = next(c for c in cells if c.id == "strategy=fedprox,partition=dir0.5,seed=1")
    assert c.values["strategy.name"] == "fedprox"
    assert c.values["strategy.proximal_mu"] == 0.1
    assert c.values["partition.kind"] == "dirichlet"  # nested override sets are flattened
    assert c.values["partition.alpha"] == 0.5
    assert c.values["seed"] == 1
    assert c.values["rounds"] == 2 and c.values["train.lr"] == 0.1  # base keys
    assert c.values["run_dir"] == str(study.dir / "strategy=fedprox__partition=dir0.5__seed=1")
    configs, bad = validate_cells(cells)
    assert bad == {}
    cfg = configs[c.id]
    assert (cfg.strategy.name, cfg.partition.alpha, cfg.seed, cfg.rounds) == ("fedprox", 0.5,
                                                                              1, 2)


def test_set_overrides_win_over_base_and_grid(tmp_path):
    cells = expand(parse_study(study_dict(tmp_path), overrides=["rounds=1",
                                                                "strategy.proximal_mu=0.5"]))
    assert {c.values["rounds"] for c in cells} == {1}
    assert {c.values["strategy.proximal_mu"] for c in cells} == {0.5}


def test_exclude_drops_matching_cells(tmp_path):
    cells = expand(parse_study(study_dict(
        tmp_path, exclude=[{"strategy": "fedprox", "partition": "iid"},
                           {"seed": [1, 2], "partition": "dir0.5"}])))
    ids = {c.id for c in cells}
    assert len(ids) == 12 - 3 - 4  # fedprox x iid x 3 seeds; 2 strategies x dir0.5 x 2 seeds
    assert not any(i.startswith("strategy=fedprox,partition=iid") for i in ids)
    assert "strategy=fedavg,partition=dir0.5,seed=0" in ids
    assert "strategy=fedavg,partition=dir0.5,seed=1" not in ids


def test_cell_dir_names_are_safe_and_stable():
    assert cell_dir_name("strategy=autoflip+fedld,partition=dir0.5,seed=0") == \
        "strategy=autoflip+fedld__partition=dir0.5__seed=0"
    long = ",".join(f"axis{i}=choice{i}" for i in range(40))
    assert len(cell_dir_name(long)) <= 200 and cell_dir_name(long) == cell_dir_name(long)


@pytest.mark.parametrize("change, message", [
    ({"grid": {"clients": [10, 100]}}, "grid.clients: a list of values needs the axis to be "
                                       "a config key"),
    ({"grid": {"strategy": {"a,b": {"strategy.name": "fedavg"}}}}, "must not contain ','"),
    ({"exclude": [{"strategy": "fedld"}]}, "exclude[0].strategy: no choice named fedld"),
    ({"exclude": [{"dataset": "digits"}]}, "exclude[0].dataset: not an axis"),
    ({"rounds": 3}, "rounds: unknown study key"),
    ({"base": {"run_dir": "x"}}, "base.run_dir: set by the sweep"),
    ({"grid": {"a": {"b": {"run_dir": "/"}}}}, "grid.a.b.run_dir: set by the sweep"),
    ({"grid": {}}, "grid: expected at least one axis"),
])
def test_malformed_study_files_name_the_problem(tmp_path, change, message):
    with pytest.raises(StudyError) as e:
        expand(parse_study(study_dict(tmp_path, **change)))
    assert any(message in p for p in e.value.problems), e.value.problems


def test_two_axes_setting_one_key_differently_is_an_error(tmp_path):
    grid = {"a": {"x": {"rounds": 1}}, "b": {"y": {"rounds": 2}}}
    with pytest.raises(StudyError, match="cell a=x,b=y: rounds is set by both a=x and b=y"):
        expand(parse_study(study_dict(tmp_path, grid=grid)))


# --- validation before anything runs, through the CLI ------------------------------
@pytest.mark.parametrize("grid, first_line", [
    ({"strategy": {"bogus": {"strategy.name": "fedbogus"}}},
     "bonsai: error: cell strategy=bogus: strategy.name: got 'fedbogus'; allowed: fedavg"),
    ({"dataset": {"x": {"dataset.name": "mnist"}}, "seed": [0, 1]},
     "bonsai: error: cell dataset=x,seed=0 and 1 more cell: dataset.name: got 'mnist'; "
     "allowed: digits"),
    ({"strategy": {"a": {"strategy.nmae": "fedavg"}}},
     "bonsai: error: cell strategy=a: strategy.nmae: unknown key; did you mean strategy.name?"),
])
def test_invalid_cells_stop_the_sweep_before_anything_runs(tmp_path, capsys, grid, first_line):
    path = write_study(tmp_path, study_dict(tmp_path, grid=grid))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(first_line), err
    assert err[-1].startswith("bonsai: error: ") and "nothing was run" in err[-1]
    assert len(err) == 2  # one line per distinct problem + the summary line
    assert not (tmp_path / "out").exists()


def test_unknown_file_and_bad_yaml_exit_2(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid YAML" in err[0]


def test_unsatisfiable_partition_is_caught_before_running(tmp_path, capsys):
    base = {"rounds": 1, "partition": {"num_clients": 100, "kind": "dirichlet", "alpha": 0.1}}
    path = write_study(tmp_path, study_dict(tmp_path, base=base, grid={"seed": [0]}))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cell seed=0: partition: " in err and "nothing was run" in err
    assert not (tmp_path / "out").exists()


def test_model_too_big_for_the_files_images_is_caught_before_running(tmp_path, capsys):
    """An .npz's image size is known once the file is read: lenet on 8x8 images stops the
    sweep (and `bonsai run`, through the same check) before anything starts."""
    import numpy as np

    from fl.config import load
    from fl.study import check_partitions

    rng = np.random.default_rng(0)
    npz = tmp_path / "small.npz"
    np.savez(npz, x=rng.random((60, 1, 8, 8), dtype=np.float32), y=np.arange(60) % 3)
    data = {"dataset": {"name": "npz", "path": str(npz)}}
    base = {"rounds": 1, "partition": {"num_clients": 3, "kind": "iid"}, **data}
    grid = {"model": {"lenet": {"model": "lenet"}, "fedavg": {"model": "cnn_fedavg"}}}
    path = write_study(tmp_path, study_dict(tmp_path, base=base, grid=grid))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("cell model=lenet: model: 'lenet' needs images of at least 16x16, got 8x8; "
            "the examples come from dataset") in err
    assert "model=fedavg" not in err and not (tmp_path / "out").exists()
    sets = ["dataset.name=npz", f"dataset.path={npz}", "partition.kind=iid",
            "partition.num_clients=3"]
    assert check_partitions({"a": load(None, [*sets, "model=cnn_fedavg"])}) == {}


def test_dry_run_lists_every_cell_and_its_status(tmp_path, capsys):
    path = write_study(tmp_path, study_dict(tmp_path, grid={"seed": [0, 1]}))
    configs, _ = validate_cells(expand(load_study(path)))
    done = tmp_path / "out" / "t" / "seed=1"
    done.mkdir(parents=True)
    (done / "config.json").write_text(to_json(configs["seed=1"]))
    (done / "summary.json").write_text("{}")
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pending  seed=0" in out and "done     seed=1" in out


def test_finished_cell_with_another_config_stops_the_sweep(tmp_path, capsys):
    path = write_study(tmp_path, study_dict(tmp_path, grid={"seed": [0, 1]}))
    study = load_study(path)
    configs, _ = validate_cells(expand(study))
    done = study.dir / "seed=0"
    done.mkdir(parents=True)
    old = json.loads(to_json(configs["seed=0"]))
    old["rounds"] = 7  # finished under an earlier version of the study file
    (done / "config.json").write_text(json.dumps(old))
    (done / "summary.json").write_text("{}")
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "bonsai: error: cell seed=0: finished with another config (rounds: 7 -> 2)"
    assert "nothing was run" in err[1]
    assert not (study.dir / "seed=1").exists()
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert "stale    seed=0  rounds: 7 -> 2" in capsys.readouterr().out


# --- skipping finished cells ---------------------------------------------------------
def fake_runner(calls, fail_on=()):
    def runner(cfg, console=None, live=True):
        calls.append(cfg.run_dir)
        if Path(cfg.run_dir).name in fail_on:
            raise RuntimeError("boom\nmore")
        d = Path(cfg.run_dir)
        d.mkdir(parents=True, exist_ok=False)  # a half-finished folder must be gone
        (d / "rounds.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5}) + "\n")
        (d / "summary.json").write_text(json.dumps({"final_accuracy": 0.5}))
        return {"final_accuracy": 0.5}
    return runner


def test_finished_cells_are_skipped_and_half_finished_ones_rerun(tmp_path):
    study = parse_study(study_dict(tmp_path, grid={"seed": [0, 1, 2, 3]}))
    cells = expand(study)
    configs, bad = validate_cells(cells)
    assert not bad
    finished = study.dir / "seed=0"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text('{"final_accuracy": 0.9}')
    partial = study.dir / "seed=1"
    partial.mkdir()
    (partial / "rounds.jsonl").write_text('{"round": 1, "accu')  # interrupted mid-write
    calls: list[str] = []
    res = run_study(study, cells, configs, fake_runner(calls, fail_on={"seed=2"}), live=False)
    assert res.skipped == ["seed=0"]
    assert res.ran == ["seed=1", "seed=3"]
    assert res.failed == {"seed=2": "boom"}
    assert [Path(c).name for c in calls] == ["seed=1", "seed=2", "seed=3"]
    assert json.loads((finished / "summary.json").read_text()) == {"final_accuracy": 0.9}
    assert "accu\"" not in (partial / "rounds.jsonl").read_text()
    manifest = json.loads((study.dir / STUDY_JSON).read_text())
    assert manifest["axes"] == {"seed": ["0", "1", "2", "3"]}
    assert manifest["seed_axis"] == "seed"
    assert [c["dir"] for c in manifest["cells"]] == ["seed=0", "seed=1", "seed=2", "seed=3"]
    # a second pass runs only the failed cell
    calls.clear()
    res = run_study(study, cells, configs, fake_runner(calls), live=False)
    assert res.ran == ["seed=2"] and len(res.skipped) == 3


# --- shipped studies ---------------------------------------------------------------------
STUDIES = [f for f in sorted((ROOT / "simulations").glob("*.yaml"))
           if "grid" in (yaml.safe_load(f.read_text()) or {})]  # the rest: test_config
PENDING_STRATEGIES = {"fedld", "autoflip", "random", "magnitude"}


def test_the_studies_are_shipped():
    assert {p.name for p in STUDIES} >= {"noniid_study.yaml", "smoke_study.yaml"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_is_valid(path):
    rel = path.relative_to(ROOT)
    assert path.read_text().splitlines()[0] == f"# bonsai sweep {rel}"
    cells = expand(load_study(path))
    _, bad = validate_cells(cells)
    problems = sorted({p for ps in bad.values() for p in ps})
    pending = [p for p in problems if p.startswith("strategy.name: got ")
               and p.split("'")[1] in PENDING_STRATEGIES]
    if problems and len(pending) == len(problems):
        pytest.xfail(f"{rel}: strategies not yet known to fl.config: "
                     + ", ".join(sorted({p.split("'")[1] for p in pending})))
    assert problems == [], f"{rel}: " + "; ".join(problems)


def test_smoke_study_uses_only_strategies_that_run_today():
    cells = expand(load_study(ROOT / "simulations" / "smoke_study.yaml"))
    assert {c.values["strategy.name"] for c in cells} <= {"fedavg", "fedavgm", "fedprox"}


def test_noniid_study_covers_the_issue_grid():
    study = load_study(ROOT / "simulations" / "noniid_study.yaml")
    assert set(study.axes["strategy"]) == {"fedavg", "fedavgm", "fedprox", "fedld", "autoflip",
                                           "autoflip+fedld", "random", "magnitude"}
    alphas = {v.get("partition.alpha") for v in study.axes["partition"].values()
              if v["partition.kind"] == "dirichlet"}
    assert alphas == {100.0, 1.0, 0.5, 0.1}
    assert {v["partition.kind"] for v in study.axes["partition"].values()} == {
        "iid", "dirichlet", "pathological"}
    assert len(study.axes["dataset"]) >= 2 and len(study.axes["clients"]) >= 2
    assert len(study.axes["seed"]) >= 3


# --- one real sweep through Ray ------------------------------------------------------------
@pytest.mark.slow
def test_real_sweep_runs_one_cell_skips_the_finished_one_then_reports(tmp_path):
    """Two cells; one is already finished (written here), so Ray runs only the other."""
    data = {"name": "tiny", "output_dir": str(tmp_path / "out"),
            "base": {"rounds": 1, "partition": {"num_clients": 2, "kind": "iid"},
                     "train": {"local_epochs": 1}},
            "grid": {"strategy": {"fedavg": {"strategy.name": "fedavg"},
                                  "fedprox": {"strategy.name": "fedprox"}}}}
    path = write_study(tmp_path, data)
    study_dir = tmp_path / "out" / "tiny"
    configs, _ = validate_cells(expand(load_study(path)))
    done = study_dir / "strategy=fedprox"
    done.mkdir(parents=True)
    (done / "config.json").write_text(to_json(configs["strategy=fedprox"]))
    (done / "rounds.jsonl").write_text('{"round": 0, "accuracy": 0.1, "cum_bytes": 0}\n'
                                       '{"round": 1, "accuracy": 0.6, "cum_bytes": 10}\n')
    (done / "summary.json").write_text('{"final_accuracy": 0.6, "best_accuracy": 0.6}')
    env = {**os.environ, "BONSAI_TEST_MARK": uuid.uuid4().hex}

    def bonsai(*args):
        return subprocess.run([sys.executable, "-m", "fl.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=400)

    r = bonsai("sweep", str(path), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ran 1, skipped 1" in r.stdout, r.stdout
    cell = study_dir / "strategy=fedavg"
    rounds = [json.loads(line) for line in (cell / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in rounds] == [0, 1] and rounds[1]["cum_bytes"] > 0
    cfg = json.loads((cell / "config.json").read_text())
    assert cfg["strategy"]["name"] == "fedavg" and cfg["run_dir"] == str(cell)
    assert (done / "summary.json").read_text() == '{"final_accuracy": 0.6, "best_accuracy": 0.6}'
    r = bonsai("report", str(study_dir), "--target", "0.5", "--no-heatmaps")
    assert r.returncode == 0, r.stderr
    table = (study_dir / "report" / "table.md").read_text()
    assert "\n| fedavg | 1 |" in table and "\n| fedprox | 1 | 60.00 |" in table


def test_the_issue_16_studies_compare_what_they_say():
    """AutoFLIP against FedAvg, random and magnitude with the guidance check on in the
    pruned cells; FedLD against FedAvg and FedProx with the decomposition; 5 seeds."""
    def strategies(name):
        cells = expand(load_study(ROOT / "simulations" / f"{name}.yaml"))
        assert {c.values["seed"] for c in cells} == {0, 1, 2, 3, 4}, name
        return cells

    cells = strategies("autoflip_hard")
    assert {c.values["strategy.name"] for c in cells} == {"autoflip", "fedavg", "random",
                                                          "magnitude"}
    assert all(c.values.get("diagnostics.guidance_every", 0) > 0
               for c in cells if c.values["strategy.name"] != "fedavg")
    assert {c.values.get("strategy.fraction_train") for c in cells} == {None, 0.1}
    for name in ("fedld_hard", "fedld_noniid"):
        cells = strategies(name)
        assert {c.values["strategy.name"] for c in cells} == {"fedld", "fedavg", "fedprox"}
        configs, bad = validate_cells(cells)
        assert not bad
        assert {cfg.objective.margin_lambda for cid, cfg in configs.items()
                if cfg.strategy.name == "fedld"} == {0.1}  # FedLD with its margin control
        assert all(cfg.diagnostics.decomposition_every > 0 for cfg in configs.values())
    starts = {c.values.get("pruning.start_when", "warmup") for c in strategies("autoflip_start")}
    assert starts == {"warmup", "improved"}
