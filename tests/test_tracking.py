"""Experiment tracking (fl/tracking) with the real libraries, offline.

Every tracker's output is read back with that tracker's own tooling and compared
with the records: TensorBoard's event reader, ``wandb leet inspect --json`` on the
offline run's .wandb log, and ``MlflowClient`` on a SQLite store in tmp. The unit
tests feed a fake record stream through fl.results.RunRecorder (as the round loop
does); the slow one runs a real Flower simulation through ``python -m fl.cli`` (a
deployment's ServerApp logging to MLflow and TensorBoard is checked in
tests/test_deploy_e2e.py, on its TLS run). Nothing reaches the network
(tests/conftest.py: W&B offline; SQLite or a closed port for MLflow).
"""

from __future__ import annotations

import json
import logging
import random
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from processes import bonsai, wait_gone

import fl.config as c
from fl.results import RunRecorder, read_rounds
from fl.study import StudyError, cell_status, expand, parse_study, stale_cells, validate_cells
from fl.tracking import (
    Trackers,
    cell_choices,
    missing_packages,
    read_ids,
    start_trackers,
)

ROOT = Path(__file__).resolve().parent.parent

#: the numeric keys of the fake records below: what every tracker must log as metrics
NUMERIC = {"accuracy", "loss", "seconds", "bytes_down", "bytes_up", "cum_bytes",
           "train_flops", "cum_flops", "clients", "failures", "density", "mask_version",
           "flops_per_example", "bytes_saved", "train_loss"}
DECOMPOSITION = {"loss_global", "loss_local", "loss_shift", "loss_aggregation"}
#: TensorBoard stores scalars as float32: relative error up to 2**-24
F32 = 2.0 ** -24


def fake_records(n: int = 3, seed: int = 0) -> list[dict]:
    """Round records shaped like server/rounds.py's (round 0, then n rounds; the loss
    decomposition in round 2; strings and lists that are not metrics)."""
    rng = random.Random(seed)
    out, cum = [], 0
    for r in range(n + 1):
        down, up = rng.randrange(10**5, 10**6), rng.randrange(10**5, 10**6)
        cum += down + up + 12_345_678_901  # beyond float32's exact integers
        rec = {"round": r, "accuracy": rng.random(), "loss": rng.uniform(0.1, 3.0),
               "seconds": rng.uniform(0.1, 2.0), "bytes_down": down, "bytes_up": up,
               "cum_bytes": cum, "train_flops": rng.randrange(10**9),
               "cum_flops": rng.randrange(10**10), "clients": 3, "failures": 0}
        if r:
            rec.update({"density": rng.random(), "mask_version": r,
                        "flops_per_example": rng.randrange(10**6), "bytes_saved": rng.random(),
                        "kept_units": "conv1:4/8 fc:16/32", "participants": [0, 1, 2],
                        "failed": [], "train_loss": rng.uniform(0.1, 3.0)})
        if r == 2:
            rec.update({k: rng.uniform(-1, 1) for k in sorted(DECOMPOSITION)})
        out.append(rec)
    return out


def expected_metrics(rec: dict) -> dict[str, float]:
    return {k: float(rec[k]) for k in (NUMERIC | DECOMPOSITION) if k in rec}


def config_for(tmp_path: Path, *overrides: str) -> c.ExperimentConfig:
    return c.load(None, [f"run_dir={tmp_path / 'run'}", *overrides])


def all_trackers(tmp_path: Path) -> list[str]:
    return ["tracking.tensorboard=true", "tracking.wandb_project=bonsai-test",
            "tracking.wandb_mode=offline", f"tracking.mlflow_uri=sqlite:///{tmp_path}/ml.db",
            "tracking.mlflow_experiment=unit"]


def run_fake(cfg: c.ExperimentConfig, records: list[dict], resume_round: int | None = None,
             finish: bool = True) -> RunRecorder:
    """What server/app.py does with a recorder and the trackers, records from a list."""
    run_dir = Path(cfg.run_dir)
    rec = RunRecorder(run_dir)
    if resume_round is not None:
        rec.truncate(resume_round)
    rec.trackers = start_trackers(cfg, run_dir, resume_round)
    for r in records:
        rec.add_round(r)
    if finish:
        (run_dir / "final_model.pt").write_bytes(b"weights")
        (run_dir / "structure.json").write_text('{"conv1": [0, 2]}\n')
        rec.write_summary({"strategy": "autoflip"},
                          artifacts=[run_dir / "final_model.pt", run_dir / "structure.json"])
    return rec


# --- readers: each tracker's own tooling ----------------------------------------------------
def tb_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    ea = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def tb_hparams(folder: Path) -> dict[str, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(folder))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    out: dict[str, object] = {}
    for k, v in info.hparams.items():
        kind = v.WhichOneof("kind")
        out[k] = getattr(v, kind)
    return out


def wandb_log(run_dir: Path) -> list[tuple[Path, list[dict]]]:
    """Every offline W&B run under ``run_dir`` (oldest first) with its records, read by
    ``wandb leet inspect --json``."""
    out = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        res = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                              str(f)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        out.append((f, [json.loads(line) for line in res.stdout.splitlines() if line.strip()]))
    return out


def wandb_history(records: list[dict]) -> dict[int, dict]:
    hist = {}
    for r in records:
        if r["type"] == "history":
            item = {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            hist[int(r["history"].get("step", {}).get("num", 0))] = item
    return hist


def wandb_of(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def mlflow_artifacts(uri: str, run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    return {a.path for a in MlflowClient(uri).list_artifacts(run_id)}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the config section ---------------------------------------------------------------------
def test_tracking_is_off_by_default_and_any_combination_turns_on():
    assert c.ExperimentConfig().tracking.enabled() == ()
    cfg = c.load(None, ["tracking.mlflow_uri=http://mlflow.lab:5000", "tracking.tensorboard=true"])
    assert cfg.tracking.enabled() == ("tensorboard", "mlflow")
    cfg = c.load(None, ["tracking.wandb_project=p", "tracking.wandb_tags= a, b ,,c"])
    assert cfg.tracking.enabled() == ("wandb",) and c.tag_list(cfg.tracking) == ["a", "b", "c"]


def test_relative_tracking_paths_are_made_absolute_where_the_command_runs(tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = c.load(None, ["tracking.tensorboard=true", "tracking.tensorboard_dir=tb",
                        "tracking.mlflow_uri=sqlite:///mlruns.db"])
    assert cfg.tracking.tensorboard_dir == str(tmp_path.resolve() / "tb")
    assert cfg.tracking.mlflow_uri == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    assert c.load(None, ["tracking.mlflow_uri=mlruns"]).tracking.mlflow_uri == str(
        tmp_path.resolve() / "mlruns")
    for uri in ("sqlite:////abs/x.db", "http://h:5000", "databricks"):
        assert c.load(None, [f"tracking.mlflow_uri={uri}"]).tracking.mlflow_uri == uri
    # the ServerApp reads the same absolute values wherever it runs
    assert c.from_flat(c.to_flat(cfg)) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["tracking.tensorboard_dir=tb"], "tracking.tensorboard_dir: got 'tb'; it needs "
                                      "tracking.tensorboard: true"),
    (["tracking.wandb_mode=offline"], "tracking.wandb_mode: got 'offline'; it needs "
                                      "tracking.wandb_project"),
    (["tracking.wandb_project=p", "tracking.wandb_mode=disabled"],
     "tracking.wandb_mode: got 'disabled'; allowed: online, offline"),
    (["tracking.wandb_project=a/b"], "tracking.wandb_project: got 'a/b'; allowed: at most 128"),
    (["tracking.wandb_project=p", f"tracking.wandb_tags={'x' * 65}"],
     "tracking.wandb_tags: tag 'xxx"),
    (["tracking.mlflow_experiment=e"], "tracking.mlflow_experiment: got 'e'; it needs "
                                       "tracking.mlflow_uri"),
    (["tracking.mlflow_uri=postgresql://db/ml"], "tracking.mlflow_uri: got "
                                                 "'postgresql://db/ml'; allowed: a folder"),
    (["tracking.mlflow_uri=sqlite://x.db"], "tracking.mlflow_uri: got 'sqlite://x.db'; expected "
                                            "sqlite:///FILE.db (relative)"),
    (["tracking.mlflow_uri=http://"], "tracking.mlflow_uri: got 'http://'; expected a server"),
])
def test_bad_tracking_settings_name_the_key(overrides, message):
    with pytest.raises(c.ConfigError) as e:
        c.load(None, overrides)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(message), e.value


def test_missing_package_names_the_extra_before_anything_starts(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = c.load(None, ["tracking.mlflow_uri=sqlite:///x.db", "tracking.tensorboard=true"])
    (line,) = missing_packages(cfg)
    assert line.startswith("tracking.mlflow_uri: MLflow needs the mlflow package") and \
        "pip install 'bonsai-fl[mlflow]'" in line and "'.[mlflow]'" in line
    # through the command line: one line, exit 2, no results folder
    code = ("import importlib.util as u, sys; real = u.find_spec; u.find_spec = lambda n, *a: "
            "None if n == 'wandb' else real(n, *a); from fl.cli import main; sys.exit(main())")
    out = subprocess.run(
        [sys.executable, "-c", code, "run", "--set", "tracking.wandb_project=p",
         "--set", f"output_dir={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "bonsai: error: tracking.wandb_project: Weights & Biases needs the wandb package, "
        "which is not installed: pip install 'bonsai-fl[wandb]' (in a checkout: pip install "
        "-e '.[wandb]'; all trackers: the tracking extra)"]
    assert not (tmp_path / "out").exists()


def test_a_sweep_names_its_cells_for_the_trackers_and_tracking_never_makes_cells_stale(
        tmp_path):
    study = parse_study({"name": "trk", "output_dir": str(tmp_path),
                         "base": {"rounds": 2, "tracking": {"tensorboard": True}},
                         "grid": {"strategy": {"fedavg": {"strategy.name": "fedavg"},
                                               "fedprox": {"strategy.name": "fedprox"}},
                                  "seed": [0, 1]}})
    configs, bad = validate_cells(expand(study))
    assert not bad
    cfg = configs["strategy=fedprox,seed=1"]
    assert (cfg.tracking.group, cfg.tracking.cell) == ("trk", "strategy=fedprox,seed=1")
    assert cell_choices(cfg.tracking.cell) == (("strategy", "fedprox"), ("seed", "1"))
    with pytest.raises(StudyError, match="tracking.group: set by the sweep"):
        parse_study({"name": "trk", "base": {"tracking": {"group": "x"}},
                     "grid": {"seed": [0]}})
    # a cell finished without tracking is not stale once the study turns tracking on
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    old = c.build({k: v for k, v in c.to_flat(cfg).items() if not k.startswith("tracking.")})
    (run_dir / "config.json").write_text(c.to_json(old))
    (run_dir / "summary.json").write_text("{}")
    assert cell_status(run_dir) == "done"
    assert stale_cells({"strategy=fedprox,seed=1": cfg}) == {}
    assert c.config_differences(c.to_flat(old), c.to_flat(cfg)) == []


# --- the fan-out ----------------------------------------------------------------------------
class Boom:
    """A tracker that fails at one of its calls."""

    def __init__(self, name: str, fail_at: str):
        self.name, self.fail_at, self.calls = name, fail_at, []
        self.location = f"memory of {name}"

    def start(self, run):
        self._call("start")

    def log_round(self, record):
        self._call(f"round {record['round']}")

    def finish(self, summary, artifacts):
        self._call("finish")

    def _call(self, what):
        self.calls.append(what)
        if what == self.fail_at:
            raise OSError(28, "No space left on device")


def test_a_failing_tracker_warns_once_and_the_others_go_on(tmp_path, caplog):
    bad, good = Boom("bad", "round 1"), Boom("good", "never")
    rec = RunRecorder(tmp_path, Trackers([bad, good]))
    from fl.tracking import RunInfo

    rec.trackers.start(RunInfo(tmp_path, "run", {}))
    with caplog.at_level(logging.WARNING, logger="fl.tracking"):
        for r in fake_records(3):
            rec.add_round(r)
        rec.write_summary()
    assert bad.calls == ["start", "round 0", "round 1"]
    assert good.calls == ["start", "round 0", "round 1", "round 2", "round 3", "finish"]
    warnings = [r for r in caplog.records if r.name == "fl.tracking"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "bad failed at logging round 1 (OSError: [Errno 28] No space left on device)" in \
        warnings[0].getMessage()
    assert [r["round"] for r in read_rounds(tmp_path)] == [0, 1, 2, 3]  # files unaffected
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 3


def test_unreachable_mlflow_server_costs_one_warning_and_nothing_else(tmp_path, caplog):
    uri = f"http://127.0.0.1:{closed_port()}"
    cfg = config_for(tmp_path, "tracking.tensorboard=true", f"tracking.mlflow_uri={uri}")
    records = fake_records(3)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        rec = run_fake(cfg, records)
    assert time.perf_counter() - t0 < 30  # MLflow's own retries would take minutes
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "fl.tracking"]
    assert len(warnings) == 1 and warnings[0].startswith("tracking: mlflow failed at start") \
        and f"cannot reach {uri}" in warnings[0], warnings
    assert "mlflow" in rec.trackers.failed and "mlflow" not in read_ids(Path(cfg.run_dir))
    scalars = tb_scalars(Path(cfg.run_dir) / "tensorboard")  # the other tracker logged it all
    assert scalars["accuracy"] == pytest.approx({r["round"]: r["accuracy"] for r in records},
                                                rel=F32)
    assert (Path(cfg.run_dir) / "summary.json").is_file()


# --- each tracker, read back ----------------------------------------------------------------
def test_tensorboard_scalars_hparams_and_summary_match_the_records(tmp_path):
    cfg = config_for(tmp_path, "tracking.tensorboard=true", "strategy.name=fedld")
    records = fake_records(3)
    run_fake(cfg, records)
    run_dir = Path(cfg.run_dir)
    scalars = tb_scalars(run_dir / "tensorboard")
    rounds = read_rounds(run_dir)
    for key in NUMERIC | DECOMPOSITION:
        want = {r["round"]: float(r[key]) for r in rounds if key in r}
        assert scalars[key] == pytest.approx(want, rel=F32), key
    assert {k for k in scalars if not k.startswith("summary/")} == NUMERIC | DECOMPOSITION
    summary = json.loads((run_dir / "summary.json").read_text())
    assert scalars["summary/final_accuracy"] == {3: pytest.approx(summary["final_accuracy"],
                                                                  rel=F32)}
    assert scalars["summary/total_bytes"][3] == pytest.approx(summary["total_bytes"], rel=F32)
    hp = tb_hparams(run_dir / "tensorboard")
    assert hp["strategy.name"] == "fedld" and hp["partition.alpha"] == 0.5
    assert hp["rounds"] == 30 and not any(k.startswith("tracking.") for k in hp)


def test_a_run_started_again_in_its_folder_replaces_its_tensorboard_rounds(tmp_path):
    """A run stopped before round 1 ended starts again in its folder (no checkpoint):
    TensorBoard shows the new attempt's rounds only."""
    cfg = config_for(tmp_path, "tracking.tensorboard=true")
    first, again = fake_records(2, seed=3), fake_records(2, seed=4)
    run_fake(cfg, first[:2], finish=False)
    (Path(cfg.run_dir) / "rounds.jsonl").unlink()  # what fl.simulation does before it
    run_fake(cfg, again)
    assert tb_scalars(Path(cfg.run_dir) / "tensorboard")["accuracy"] == pytest.approx(
        {r["round"]: r["accuracy"] for r in again}, rel=F32)


def test_tensorboard_dir_holds_a_folder_per_run_and_per_study(tmp_path):
    cfg = config_for(tmp_path, "tracking.tensorboard=true",
                     f"tracking.tensorboard_dir={tmp_path / 'tb'}", "tracking.group=study1",
                     "tracking.cell=strategy=fedavg,seed=0")
    run_fake(cfg, fake_records(1))
    folder = tmp_path / "tb" / "study1" / "run"
    assert set(tb_scalars(folder)["accuracy"]) == {0, 1}
    hp = tb_hparams(folder)
    assert hp["cell.strategy"] == "fedavg" and hp["cell.seed"] == "0"


def test_wandb_offline_run_holds_every_round_the_config_and_the_artifact(tmp_path):
    cfg = config_for(tmp_path, "tracking.wandb_project=bonsai-test",
                     "tracking.wandb_mode=offline", "tracking.wandb_tags=nightly,cpu",
                     "tracking.group=study1", "tracking.cell=strategy=fedavg,seed=0")
    records = fake_records(3)
    run_fake(cfg, records)
    run_dir = Path(cfg.run_dir)
    ((path, log),) = wandb_log(run_dir)
    run_id = read_ids(run_dir)["wandb"]["run_id"]
    assert path.name == f"run-{run_id}.wandb" and path.parent.name.startswith("offline-run-")
    hist = wandb_history(log)
    assert sorted(hist) == [0, 1, 2, 3]
    for r in records:
        assert hist[r["round"]] == pytest.approx(expected_metrics(r), rel=1e-12)
    (run,) = wandb_of(log, "run")
    assert run["project"] == "bonsai-test" and run["run_group"] == "study1"
    assert run["display_name"] == "strategy=fedavg,seed=0"
    assert run["tags"] == ["nightly", "cpu", "strategy=fedavg", "seed=0"]
    config = run["config"]["update"]
    assert config["partition"]["alpha"] == 0.5 and config["cell"] == {"strategy": "fedavg",
                                                                        "seed": "0"}
    assert "tracking" not in config
    summary = {}
    for s in wandb_of(log, "summary"):
        summary.update(s["update"])
    assert summary["final_accuracy"] == pytest.approx(records[-1]["accuracy"], rel=1e-12)
    assert summary["strategy"] == "autoflip"
    (art,) = wandb_of(log, "artifact")
    assert art["type"] == "model" and art["name"] == f"model-{run_id}"
    assert {e["path"] for e in art["manifest"]["contents"]} == {"final_model.pt",
                                                                "structure.json"}
    assert wandb_of(log, "exit") == [{}] or wandb_of(log, "exit")[0].get("exit_code", 0) == 0


def test_mlflow_sqlite_run_has_the_params_every_rounds_metrics_and_the_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path}/ml.db"
    cfg = config_for(tmp_path, f"tracking.mlflow_uri={uri}", "name=mnist-trial")
    records = fake_records(3)
    run_fake(cfg, records)
    run_dir = Path(cfg.run_dir)
    (run,) = mlflow_runs(uri, "mnist-trial")  # the experiment is the run's name by default
    assert run.info.run_id == read_ids(run_dir)["mlflow"]["run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    flat = {k: v for k, v in c.to_flat(cfg).items() if not k.startswith("tracking.")}
    assert run.data.params == {k: str(v) for k, v in flat.items()}
    rounds = read_rounds(run_dir)
    assert set(run.data.metrics) - {k for k in run.data.metrics if k.startswith("summary/")} \
        == NUMERIC | DECOMPOSITION
    for key in NUMERIC | DECOMPOSITION:
        want = [(r["round"], float(r[key])) for r in rounds if key in r]
        assert mlflow_history(uri, run.info.run_id, key) == want, key  # float64: exact
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary/best_accuracy"] == summary["best_accuracy"]
    assert mlflow_artifacts(uri, run.info.run_id) == {"final_model.pt", "structure.json",
                                                     "summary.json"}
    assert (tmp_path / "mlruns").is_dir()  # artifacts beside the database


def test_resume_continues_the_same_tracker_runs(tmp_path):
    """A run killed after round 3 was logged but before it was checkpointed (the
    checkpoint is at round 2) is resumed: the same W&B and MLflow runs go on, and
    TensorBoard hides the interrupted round 3 in favour of the redone one."""
    import wandb

    cfg = config_for(tmp_path, *all_trackers(tmp_path))
    run_dir = Path(cfg.run_dir)
    first, redo = fake_records(4, seed=1), fake_records(4, seed=2)
    run_fake(cfg, first[:4], finish=False)
    ids = read_ids(run_dir)
    wandb.finish(exit_code=1)  # what W&B records when the process dies (it runs in ours)
    resumed = c.load(None, [f"run_dir={run_dir}", *all_trackers(tmp_path)])
    resumed.resume = True
    run_fake(resumed, redo[3:], resume_round=2)
    assert read_ids(run_dir) == ids
    assert [r["accuracy"] for r in read_rounds(run_dir)] == \
        [r["accuracy"] for r in first[:3] + redo[3:]]
    # TensorBoard: one value per round; round 3 is the redone one
    acc = tb_scalars(run_dir / "tensorboard")["accuracy"]
    assert acc == pytest.approx({r["round"]: r["accuracy"] for r in first[:3] + redo[3:]},
                                rel=F32)
    # MLflow: one run, every round; round 3 holds both values (MLflow cannot delete one)
    uri = f"sqlite:///{tmp_path}/ml.db"
    (run,) = mlflow_runs(uri, "unit")
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    hist = mlflow_history(uri, run.info.run_id, "accuracy")
    assert sorted(set(s for s, _ in hist)) == [0, 1, 2, 3, 4]
    assert (3, redo[3]["accuracy"]) in hist and (4, redo[4]["accuracy"]) in hist
    # W&B: the second offline run continues the same id from round 3
    (f1, log1), (f2, log2) = wandb_log(run_dir)
    assert f1.name == f2.name == f"run-{ids['wandb']['run_id']}.wandb"
    assert sorted(wandb_history(log1)) == [0, 1, 2, 3]
    assert sorted(wandb_history(log2)) == [3, 4]
    assert wandb_history(log2)[4]["accuracy"] == pytest.approx(redo[4]["accuracy"], rel=1e-12)


def test_a_sweep_logs_each_cell_as_its_own_mlflow_run_tagged_with_its_choices(tmp_path):
    """fl.sweep runs the cells; each cell's runner plays the ServerApp's part for the
    trackers (server/app.py: the recorder with the trackers, the records, the summary)."""
    from rich.console import Console

    from fl.sweep import run_study

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    study = parse_study({"name": "trk-study", "output_dir": str(tmp_path / "out"),
                         "base": {"rounds": 3, "tracking": {"mlflow_uri": uri,
                                                             "tensorboard": True}},
                         "grid": {"strategy": {"fedavg": {"strategy.name": "fedavg"},
                                               "fedprox": {"strategy.name": "fedprox"}},
                                  "seed": [0]}})
    cells = expand(study)
    configs, bad = validate_cells(cells)
    assert not bad
    seeds = {"strategy=fedavg,seed=0": 1, "strategy=fedprox,seed=0": 2}

    def runner(cfg, console, live=False):
        Path(cfg.run_dir).mkdir(parents=True)
        run_fake(cfg, fake_records(3, seed=seeds[cfg.tracking.cell]))
        return json.loads((Path(cfg.run_dir) / "summary.json").read_text())

    res = run_study(study, cells, configs, runner, Console(quiet=True), live=False)
    assert res.ran == list(seeds) and not res.failed
    runs = mlflow_runs(uri, "trk-study")  # one experiment: the study's name
    assert sorted(r.info.run_name for r in runs) == sorted(seeds)
    for run in runs:
        cell = run.info.run_name
        choice = dict(cell_choices(cell))["strategy"]
        assert run.data.tags["bonsai.group"] == "trk-study" and run.data.tags["bonsai.cell"] == cell
        assert run.data.tags["cell.strategy"] == choice and run.data.tags["cell.seed"] == "0"
        assert run.data.params["strategy.name"] == choice
        rounds = read_rounds(configs[cell].run_dir)
        assert rounds == fake_records(3, seed=seeds[cell])
        assert mlflow_history(uri, run.info.run_id, "accuracy") == [
            (r["round"], r["accuracy"]) for r in rounds]
    # TensorBoard: one folder per cell under the study, the choices as hyper-parameters
    for cell, cfg in configs.items():
        hp = tb_hparams(Path(cfg.run_dir) / "tensorboard")
        assert hp["cell.strategy"] == dict(cell_choices(cell))["strategy"]


# --- real Flower runs through the command line ----------------------------------------------
SMALL = ["--set", "rounds=2", "--set", "partition.num_clients=3",
         "--set", "strategy.min_train_clients=3", "--set", "train.local_epochs=1"]


@pytest.mark.slow
def test_bonsai_run_logs_to_tensorboard_wandb_and_mlflow(tmp_path):
    mark = uuid.uuid4().hex
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    sets = [a for s in ["tracking.tensorboard=true", "tracking.wandb_project=bonsai-e2e",
                        "tracking.wandb_mode=offline", f"tracking.mlflow_uri={uri}"]
            for a in ("--set", s)]
    proc = bonsai(["run", "quickstart", "--quiet", *SMALL, *sets, "--set", "name=trk",
                   "--set", f"output_dir={tmp_path / 'out'}"], mark)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert not (left := wait_gone(mark)), left
    (run_dir,) = (tmp_path / "out").iterdir()
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    flower_log = (run_dir / "flower.log").read_text()
    assert " failed at " not in flower_log, flower_log[-3000:]  # no tracker failed
    ids = read_ids(run_dir)
    assert f"tracking: mlflow -> run {ids['mlflow']['run_id']} of experiment 'trk'" in flower_log
    assert f"tracking: wandb -> offline run {ids['wandb']['run_id']}" in flower_log
    assert f"tracking: tensorboard -> {run_dir / 'tensorboard'}" in flower_log
    numeric = {k for r in rounds for k, v in r.items()
               if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"accuracy", "loss", "cum_bytes", "cum_flops", "density"} <= numeric
    # TensorBoard
    scalars = tb_scalars(run_dir / "tensorboard")
    for key in numeric:
        assert scalars[key] == pytest.approx(
            {r["round"]: float(r[key]) for r in rounds if key in r}, rel=F32), key
    # MLflow: the experiment is named after the run (name=trk)
    (run,) = mlflow_runs(uri, "trk")
    assert run.info.status == "FINISHED" and run.data.params["strategy.name"] == "autoflip"
    for key in numeric:
        assert mlflow_history(uri, run.info.run_id, key) == [
            (r["round"], float(r[key])) for r in rounds if key in r], key
    assert mlflow_artifacts(uri, run.info.run_id) == {"final_model.pt", "structure.json",
                                                     "summary.json"}
    # W&B offline, in the run folder
    ((_, log),) = wandb_log(run_dir)
    hist = wandb_history(log)
    assert sorted(hist) == [0, 1, 2]
    for r in rounds:
        assert hist[r["round"]] == pytest.approx(
            {k: float(r[k]) for k in numeric if k in r}, rel=1e-12)
