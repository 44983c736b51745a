"""`bonsai sweep --parallel N` (fl.sweep.run_study_parallel, fl/cellproc.py): at most N
cells at once, the skip rules of the sequential sweep, a failed cell does not stop the
others, Ctrl-C stops every running cell; and one real run that resumes after a SIGINT
and reproduces the per-round accuracies of each cell run on its own."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path

import pytest
import yaml
from loopback import run_in_process
from processes import bonsai, wait_gone

from fl.cellproc import INTERRUPTED
from fl.results import read_rounds
from fl.scaleout import RayTarget
from fl.study import expand, parse_study, validate_cells
from fl.sweep import run_study_parallel

STOPPED = "interrupted; every process was stopped"


class FakeCell:
    """A cell that finishes on its ``polls``-th poll (writes summary.json, exit 0), or
    fails, or stops on interrupt(); ``log`` records what the launcher saw."""

    def __init__(self, cfg, target, log, fail=(), polls=3, said=STOPPED, raise_on=None):
        self.run_dir = Path(cfg.run_dir)
        self.name = self.run_dir.name
        self.rc = None
        self.left = polls
        self.fail = self.name in fail
        self.said = said
        self.raise_on = raise_on
        self.interrupted = 0
        self.closed = False
        self.run_dir.mkdir(parents=True, exist_ok=False)  # a half-finished one is gone
        log.append((self.name, target, sum(c.rc is None for c in log.cells)))
        log.cells.append(self)

    def poll(self):
        if self.rc is None:
            self.left -= 1
            if self.raise_on is not None and self.left == self.raise_on:
                self.raise_on = None
                raise KeyboardInterrupt  # as a Ctrl-C landing in the loop
            if self.left <= 0:
                if self.fail:
                    self.rc = 1
                else:
                    (self.run_dir / "summary.json").write_text('{"final_accuracy": 0.5}')
                    self.rc = 0
        return self.rc

    def interrupt(self):
        self.interrupted += 1
        if self.rc is None:
            self.rc = INTERRUPTED

    def wait(self, timeout=None):
        return self.rc

    def kill(self):
        self.rc = -9

    def outcome(self):
        return "boom: the cell failed" if self.fail else self.said

    def close(self):
        self.closed = True


class Log(list):
    def __init__(self):
        super().__init__()
        self.cells: list[FakeCell] = []


def launcher(log, **kw):
    return lambda cfg, target: FakeCell(cfg, target, log, **kw)


def study_of(tmp_path, seeds=(0, 1, 2, 3, 4)):
    study = parse_study({"name": "p", "output_dir": str(tmp_path / "out"),
                         "base": {"rounds": 2, "partition": {"num_clients": 3}},
                         "grid": {"seed": list(seeds)}})
    cells = expand(study)
    configs, bad = validate_cells(cells)
    assert not bad
    return study, cells, configs


TARGETS = [RayTarget(num_cpus=1, num_gpus=0), RayTarget(num_cpus=1, num_gpus=0)]


def test_at_most_n_at_once_with_the_sequential_skip_rules(tmp_path):
    study, cells, configs = study_of(tmp_path)
    done = study.dir / "seed=0"
    done.mkdir(parents=True)
    (done / "summary.json").write_text('{"final_accuracy": 0.9}')
    partial = study.dir / "seed=1"
    partial.mkdir()
    (partial / "rounds.jsonl").write_text('{"round": 1, "accu')
    log = Log()
    res = run_study_parallel(study, cells, configs, TARGETS, live=False, poll=0,
                             launch=launcher(log, fail={"seed=3"}))
    assert res.skipped == ["seed=0"]
    assert sorted(res.ran) == ["seed=1", "seed=2", "seed=4"]
    assert res.failed == {"seed=3": "boom: the cell failed"}  # the others went on
    assert [name for name, _, _ in log] == ["seed=1", "seed=2", "seed=3", "seed=4"]
    assert max(running for _, _, running in log) == 1  # one other running at each start
    assert {t for _, t, _ in log} == {TARGETS[0]}  # equal targets: any slot's
    assert not (partial / "rounds.jsonl").exists()  # cleared and run again
    assert json.loads((done / "summary.json").read_text()) == {"final_accuracy": 0.9}
    assert all(c.closed for c in log.cells)
    # a second pass runs only the failed cell
    log2 = Log()
    res = run_study_parallel(study, cells, configs, TARGETS, live=False, poll=0,
                             launch=launcher(log2))
    assert res.ran == ["seed=3"] and len(res.skipped) == 4


def test_each_slot_keeps_its_own_share(tmp_path):
    study, cells, configs = study_of(tmp_path, seeds=(0, 1, 2))
    targets = [RayTarget(num_cpus=1, cuda_devices="0"), RayTarget(num_cpus=1, cuda_devices="1")]
    log = Log()
    run_study_parallel(study, cells, configs, targets, live=False, poll=0,
                       launch=launcher(log))
    by_cell = {name: t.cuda_devices for name, t, _ in log}
    assert by_cell["seed=0"] == "0" and by_cell["seed=1"] == "1"
    # two cells never share a card at once: cell 3 takes the slot that freed first
    assert by_cell["seed=2"] in ("0", "1")


def test_ctrl_c_stops_every_running_cell_and_keeps_finished_ones(tmp_path):
    study, cells, configs = study_of(tmp_path)
    log = Log()
    launch = launcher(log)
    calls = {"n": 0}

    def launch_then_ctrl_c(cfg, target):
        calls["n"] += 1
        # the 4th cell raises on its first poll: seed=0 and 1 finished, 2 and 3 running
        return launch(cfg, target) if calls["n"] < 4 else FakeCell(
            cfg, target, log, polls=3, raise_on=2)

    with pytest.raises(KeyboardInterrupt) as e:
        run_study_parallel(study, cells, configs, TARGETS, live=False, poll=0,
                           launch=launch_then_ctrl_c)
    assert str(e.value) == ""  # every cell said it stopped everything
    running = [c for c in log.cells if c.rc == INTERRUPTED]
    assert [c.name for c in running] == ["seed=2", "seed=3"]
    assert all(c.interrupted == 1 for c in running)
    assert (study.dir / "seed=0" / "summary.json").exists()
    assert not (study.dir / "seed=4").exists()  # never started


def test_ctrl_c_reports_a_cell_whose_processes_survived(tmp_path):
    study, cells, configs = study_of(tmp_path, seeds=(0, 1))
    log = Log()
    said = "interrupted; 1 process(es) did not stop: 123 (raylet)"

    def launch(cfg, target):
        return FakeCell(cfg, target, log, polls=5, said=said, raise_on=3)

    with pytest.raises(KeyboardInterrupt) as e:
        run_study_parallel(study, cells, configs, TARGETS, live=False, poll=0, launch=launch)
    assert f"cell seed=0: {said}" in str(e.value) and f"cell seed=1: {said}" in str(e.value)


# --- real cells through Ray ----------------------------------------------------------------
STUDY = {"name": "par", "base": {
    "rounds": 2, "model": "mlp", "dataset": {"name": "digits"},
    "partition": {"num_clients": 3, "kind": "iid"}, "train": {"local_epochs": 1},
    "strategy": {"name": "fedavg", "min_train_clients": 3}, "resources": {"client_cpus": 1}},
    "grid": {"seed": [0, 1]}}


def write(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "output_dir": str(tmp_path / name)}))
    return path, tmp_path / name / "par"


def accuracies(study_dir):
    return {d.name: [r["accuracy"] for r in read_rounds(d)]
            for d in sorted(study_dir.iterdir()) if d.is_dir()}


@pytest.mark.slow
def test_parallel_sweep_resumes_after_sigint_and_reproduces_each_cell_alone(tmp_path):
    """Two cells at once, interrupted while both run, resumed, then each cell alone: the
    same per-round accuracies. (That a finished cell is skipped
    on resume is the fake-cell tests' part: the sequential rules, which this runner
    shares.)"""
    mark = uuid.uuid4().hex
    par, par_dir = write(tmp_path, "parallel")
    proc = bonsai(["sweep", str(par), "--parallel", "2", "--quiet"], mark)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:  # both cells running
        cells = [d for d in par_dir.iterdir() if d.is_dir()] if par_dir.exists() else []
        if len(cells) == 2 and all(read_rounds(d) for d in cells):
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "2 cells at a time, each on a private Ray of 1 CPU" in out
    assert f"{STOPPED}; finished cells are kept" in err and "Traceback" not in err
    assert not (left := wait_gone(mark, 10.0)), left
    stopped = [d.name for d in par_dir.iterdir() if (d / "STOPPING").exists()]
    assert stopped and not any((d / "summary.json").exists() for d in par_dir.iterdir()
                               if d.name in stopped)

    proc = bonsai(["sweep", str(par), "--parallel", "2", "--quiet"], mark)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert f"ran {len(stopped)}, skipped {2 - len(stopped)} finished earlier, failed 0" in out
    assert not (left := wait_gone(mark, 10.0)), left

    # each cell alone, in this process (tests/loopback.py: the same seeded run)
    study = parse_study({**STUDY, "output_dir": str(tmp_path / "alone")})
    configs, bad = validate_cells(expand(study))
    assert not bad
    for cfg in configs.values():
        run_in_process(cfg, cfg.run_dir)
    got, want = accuracies(par_dir), accuracies(study.dir)
    assert sorted(got) == ["seed=0", "seed=1"]
    assert all(len(a) == 3 for a in got.values())  # rounds 0, 1, 2, each once
    assert got == want  # seeded: exactly each cell's run on its own


@pytest.mark.slow
def test_cells_stop_themselves_when_the_sweep_is_killed(tmp_path):
    """SIGKILL of `bonsai sweep --parallel 2` closes the cells' stdin: each stops its run
    as on SIGTERM (fl/cellproc.py) and nothing of either is left."""
    mark = uuid.uuid4().hex
    par, par_dir = write(tmp_path, "killed")
    proc = bonsai(["sweep", str(par), "--parallel", "2", "--quiet"], mark)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # both SuperLinks up
        logs = list(par_dir.glob("*/superlink.log")) if par_dir.exists() else []
        if len(logs) == 2 and all(b"Uvicorn running" in p.read_bytes() for p in logs):
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.kill()
    proc.wait(timeout=10)
    assert not (left := wait_gone(mark, 60.0)), left
    assert sorted(p.name for p in par_dir.glob("*/STOPPING")) == ["STOPPING", "STOPPING"]
