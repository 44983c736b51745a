"""A real Flower simulation through Ray, driven by `bonsai run` as a user types it.

Each run starts a private SuperLink, 3 simulated SuperNodes and a Ray cluster;
the tests check the results files, learning, reproducibility, and that no
process is left behind (found by an environment marker every child inherits).
"""

import json
import signal
import time
import uuid
from pathlib import Path

import pytest
from loopback import run_in_process
from processes import bonsai, leftovers, wait_gone

from fl.config import load
from fl.results import read_rounds

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SMALL = ["--set", "rounds=2", "--set", "partition.num_clients=3", "--set",
         "strategy.min_train_clients=3"]


def run_ok(tmp_path, name, extra=()):
    mark = uuid.uuid4().hex
    proc = bonsai(["run", "simulations/quickstart.yaml", "--quiet", *SMALL,
                   "--set", f"output_dir={tmp_path}", "--set", f"name={name}", *extra], mark)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert not (left := wait_gone(mark)), left
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith(name)]
    return run_dir, out


def run_alone(run_dir, extra=()):
    """The records of ``run_ok``'s experiment run with one in-process node per client
    (tests/loopback.py): the same seeded run as through Flower and Ray."""
    sets = [*SMALL, *extra]
    overrides = [v for k, v in zip(sets[::2], sets[1::2]) if k == "--set"]
    run_in_process(load(ROOT / "simulations" / "quickstart.yaml", overrides), run_dir)
    return read_rounds(run_dir)


FEDLD = ["--set", "strategy.name=fedld"]


def test_two_round_simulation_writes_results_learns_and_reproduces(tmp_path):
    """Two rounds of FedLD (AutoFLIP's real run: conftest.py autoflip_run): the results
    files, learning, margin control on by default, and the same records again."""
    run_dir, out = run_ok(tmp_path, "a", FEDLD)
    assert f"results: {run_dir}" in out
    for f in ("config.json", "rounds.jsonl", "rounds.csv", "summary.json", "final_model.pt"):
        assert (run_dir / f).is_file(), f
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["accuracy"] > rounds[0]["accuracy"] + 0.2
    assert all(r["clients"] == 3 and r["bytes_down"] > 0 and r["bytes_up"] > 0
               for r in rounds[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == rounds[2]["accuracy"]
    assert 0 < summary["discovery_seconds"] < summary["wall_seconds"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["partition"]["num_clients"] == 3 and config["strategy"]["name"] == "fedld"
    assert config["objective"]["margin_lambda"] == 0.1  # margin control on by default

    # seeded: the same experiment run again (in this process, tests/loopback.py) gives
    # the same records
    again = run_alone(tmp_path / "again", FEDLD)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rounds]
    assert [r["loss"] for r in again] == [r["loss"] for r in rounds]


def test_bad_config_starts_nothing(tmp_path):
    mark = uuid.uuid4().hex
    proc = bonsai(["run", "simulations/quickstart.yaml", "--set", "partition.kind=zipf",
                   "--set", f"output_dir={tmp_path}"], mark)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().startswith("bonsai: error: partition.kind: got 'zipf'; allowed: iid")
    assert list(tmp_path.iterdir()) == []


def test_impossible_partition_fails_before_flower_starts(tmp_path):
    """The data split is prepared before the federation: a partition that cannot be
    made is one line and exit 2, with no results folder and no process left."""
    mark = uuid.uuid4().hex
    proc = bonsai(["run", "simulations/quickstart.yaml", "--quiet", "--set",
                   "partition.num_clients=100", "--set", "partition.min_size=20", "--set",
                   f"output_dir={tmp_path}"], mark)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert err.strip().startswith("bonsai: error: partition: ")
    assert "num_clients=100" in err and "min_size=20" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    assert not (left := wait_gone(mark)), left


def test_autoflip_simulation_explores_prunes_and_saves_bytes(autoflip_run):
    run_dir = autoflip_run  # conftest.py: 3 clients, 3 rounds, final targets from round 2
    rounds = read_rounds(run_dir)
    assert rounds[0]["bytes_down"] > 0 and rounds[0]["train_flops"] > 0  # exploration
    dens = [r["density"] for r in rounds[1:]]
    assert dens[0] > dens[1] > dens[2] and dens[2] < 0.2
    down = [r["bytes_down"] for r in rounds[1:]]
    assert down[0] > down[1] > down[2]
    flops = [r["flops_per_example"] for r in rounds[1:]]
    assert flops[0] > flops[2]
    assert rounds[3]["accuracy"] > rounds[0]["accuracy"] + 0.2
    # pruned entries of the final global model are exactly zero
    import torch

    from fl.pruning import groups_for, structure_from_json, structured_mask

    state = torch.load(run_dir / "final_model.pt", weights_only=True)
    structure = structure_from_json((run_dir / "structure.json").read_text())
    masks = structured_mask(groups_for("cnn", (1, 8, 8), 10), structure, state, strict=False)
    for name, m in masks.items():
        assert torch.count_nonzero(state[name][~m]) == 0, name
    weights = [n for n in state if n.endswith("weight")]
    zeros = sum(int((state[n] == 0).sum()) for n in weights)
    total = sum(state[n].numel() for n in weights)
    assert zeros / total > 0.7


def test_guidance_diagnostic_in_a_simulation(autoflip_run):
    """docs/ALGORITHMS.md §1.5 in a real run: three rounds of AutoFLIP with the guidance
    check after each; the records carry the three correlations, guidance.jsonl the
    per-group samples of the CNN's three unit groups."""
    run_dir = autoflip_run
    rounds = read_rounds(run_dir)
    for r in rounds[1:]:
        for key in ("guidance_rho", "magnitude_rho", "random_rho"):
            assert -1.0 <= r[key] <= 1.0, (r["round"], key)
    assert "guidance_rho" not in rounds[0]
    lines = [json.loads(x) for x in (run_dir / "guidance.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    for x in lines:
        assert set(x["groups"]) == {"conv1", "conv2", "fc1"}
        assert all(len(g["units"]) == 8 and len(g["oracle"]) == 8
                   for g in x["groups"].values())


RESUME = ["--set", "rounds=4", "--set", "pruning.mask_every=1", "--set",
          "pruning.schedule_rounds=3", "--set", "strategy.server_momentum=0.5"]


def test_interrupted_run_resumes_to_the_same_results(tmp_path):
    """Ctrl-C after round 2 stops every process (exit 130, nothing left); --resume
    then finishes the run with the records of an uninterrupted one."""
    reference = run_alone(tmp_path / "ref", RESUME)

    mark = uuid.uuid4().hex
    out = tmp_path / "cut"
    proc = bonsai(["run", "simulations/quickstart.yaml", "--quiet", *SMALL, *RESUME,
                   "--set", f"output_dir={out}", "--set", "name=c"], mark)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = list(out.iterdir()) if out.exists() else []
        if dirs and len(read_rounds(dirs[0])) >= 3:  # rounds 0, 1, 2 recorded
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert leftovers(mark)  # the SuperLink, SuperExec, simulation and Ray are running
    proc.send_signal(signal.SIGINT)  # Ctrl-C: every process stops, exit 130
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert not (left := wait_gone(mark)), left
    (cut_dir,) = list(out.iterdir())
    assert not (cut_dir / "summary.json").exists()

    mark = uuid.uuid4().hex
    proc = bonsai(["run", "simulations/quickstart.yaml", "--quiet", *SMALL, *RESUME,
                   "--set", f"output_dir={out}", "--set", "name=c", "--resume", str(cut_dir)],
                  mark)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    resumed = read_rounds(cut_dir)
    assert [r["round"] for r in resumed] == [0, 1, 2, 3, 4]
    for key in ("accuracy", "loss", "density", "cum_flops"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in reference], key


def test_resume_refuses_bad_input(tmp_path):
    mark = uuid.uuid4().hex
    proc = bonsai(["run", "--resume", str(tmp_path)], mark)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "has no checkpoint.pt" in err
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = bonsai(["run", "--resume", str(tmp_path)], mark)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "is not a valid, safe Bonsai checkpoint" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # untouched
