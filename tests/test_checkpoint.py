"""Checkpoints load with ``weights_only=True``: a crafted pickle runs nothing and is one
line, exit 2; every strategy's state is plain (tensors and containers) and survives the
round trip, so a resumed run continues bit for bit."""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from processes import bonsai, wait_gone
from test_strategies import LoopbackGrid, experiment

from fl.checkpoint import Checkpoint, CheckpointError, check_plain, load, save
from fl.results import RunRecorder

pytestmark = pytest.mark.usefixtures("flower_task")


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would run."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "touch":
            return (Path.touch, (self.marker,))
        return (os.system, (f"touch {self.marker}",))


def _malicious(run_dir: Path, marker: Path, how: str) -> None:
    """A checkpoint.pt whose full unpickling would create ``marker``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"format": 1, "round": 1, "arrays": {}, "strategy": {"x": _Payload(marker, how)},
               "counters": {}, "config": ""}
    if how == "touch":
        torch.save(payload, run_dir / "checkpoint.pt")  # torch's zip format
    else:
        with open(run_dir / "checkpoint.pt", "wb") as f:  # a bare pickle
            pickle.dump(payload, f)
    # the payload is real: plain unpickling (what weights_only=False does) creates a file
    probe = run_dir.parent / f"probe-{how}"
    pickle.loads(pickle.dumps(_Payload(probe, how)))
    assert probe.exists()


@pytest.mark.parametrize("how", ["touch", "system"])
def test_crafted_pickle_runs_nothing_on_load(tmp_path, how):
    marker = tmp_path / "pwned"
    _malicious(tmp_path / "run", marker, how)
    with pytest.raises(CheckpointError) as e:
        load(tmp_path / "run")
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and "not a valid, safe Bonsai checkpoint" in msg
    assert msg.startswith("--resume: ")


@pytest.mark.parametrize("how", ["touch", "system"])
def test_bonsai_run_resume_of_a_crafted_pickle_is_one_line_exit_2(tmp_path, how):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    _malicious(run_dir, marker, how)
    before = (run_dir / "checkpoint.pt").read_bytes()
    mark = uuid.uuid4().hex
    proc = bonsai(["run", "--resume", str(run_dir)], mark)
    out, err = proc.communicate(timeout=120)
    assert not (left := wait_gone(mark)), left
    assert proc.returncode == 2, err
    assert not marker.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bonsai: error: --resume: "), err
    assert "not a valid, safe Bonsai checkpoint" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt"]  # nothing written
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_save_refuses_what_weights_only_cannot_load(tmp_path):
    ok = Checkpoint(1, {"w": torch.ones(2)}, {"a": [1, 2.0, "x", None, True, torch.zeros(1)],
                                              "b": {"c": {3: torch.ones(1)}}}, {"bytes": 3})
    save(tmp_path, ok)
    back = load(tmp_path)
    assert back.strategy["b"]["c"][3].tolist() == [1.0] and back.counters == {"bytes": 3}
    for bad, where in [({"m": [np.zeros(2)]}, "['m'][0]"), ({"t": (1, 2)}, "['t']"),
                       ({"s": {1}}, "['s']"), ({"f": np.float64(1.0)}, "['f']"),
                       ({"r": ArrayRecord({"w": torch.ones(1)})}, "['r']")]:
        with pytest.raises(TypeError, match=r"checkpoint\['strategy'\]" + where.replace(
                "[", r"\[").replace("]", r"\]")):
            save(tmp_path / "bad", Checkpoint(1, {}, bad))
        assert not (tmp_path / "bad").exists()


def _run(strategy, contexts, theta, rounds, run_dir, resume_from=None):
    from server.rounds import run_rounds

    return run_rounds(LoopbackGrid(contexts), strategy, ArrayRecord(theta), rounds,
                      ConfigRecord({}), lambda rnd, arrays: {"accuracy": 0.5, "loss": 1.0},
                      RunRecorder(run_dir), 60, config_json="{}", resume_from=resume_from)


@pytest.mark.parametrize("overrides", [
    ["strategy.name=fedavgm", "strategy.server_momentum=0.9"],
    ["strategy.name=autoflip", "strategy.server_momentum=0.5", "pruning.mask_every=1",
     "pruning.schedule_rounds=2"],
    ["strategy.name=magnitude", "pruning.mask_every=1", "pruning.schedule_rounds=2"],
    ["strategy.name=fedld"],
])
def test_every_strategy_state_is_plain_and_resumes_bit_for_bit(tmp_path, overrides):
    from fl.models import build_model

    cfg, s, contexts = experiment(*overrides)
    theta = build_model(cfg.model, (1, 8, 8), 10, seed=cfg.seed).state_dict()
    ref = _run(s, contexts, theta, 3, tmp_path / "ref").to_torch_state_dict()
    check_plain(s.state_dict())

    _, s1, contexts = experiment(*overrides)
    _run(s1, contexts, theta, 2, tmp_path / "cut")
    ckpt = load(tmp_path / "cut", "{}")  # weights_only=True
    assert ckpt.round == 2
    if "fedavgm" in overrides[0]:  # Flower's numpy momentum went through as tensors
        assert isinstance(s1.momentum_vector[0], np.ndarray)
        assert set(ckpt.strategy) == {"current_arrays", "momentum_vector"}
        assert all(isinstance(t, torch.Tensor)
                   for t in ckpt.strategy["momentum_vector"]["ndarrays"])
    _, s2, contexts = experiment(*overrides)
    got = _run(s2, contexts, theta, 3, tmp_path / "cut", resume_from=ckpt).to_torch_state_dict()
    assert list(got) == list(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    if "fedavgm" in overrides[0]:
        for a, b in zip(s2.momentum_vector, s.momentum_vector, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
