"""The round loop's overlapped evaluation (server/rounds.py ``overlap``): the server
evaluates round r while round r + 1 trains, and records and checkpoints exactly what
the plain loop does, in process (real ClientApp handlers over a loopback grid)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from test_strategies import LoopbackGrid, experiment

from fl.checkpoint import load as load_checkpoint
from fl.results import RunRecorder, read_rounds
from server.rounds import RunStopped, run_rounds

pytestmark = pytest.mark.usefixtures("flower_task")

AUTOFLIP = ("strategy.name=autoflip", "pruning.mask_every=1", "pruning.schedule_rounds=3",
            "strategy.fraction_train=0.67")  # 2 of the 3 clients a round: the sampler counts


class Watched(LoopbackGrid):
    """A loopback grid that tells which round's training messages it has received."""

    def __init__(self, contexts):
        super().__init__(contexts)
        self.sends = 0
        self.sent = {i: threading.Event() for i in range(1, 20)}

    def send_and_receive(self, messages, timeout=None):
        self.sends += 1
        self.sent[self.sends].set()
        return super().send_and_receive(messages, timeout)


def _run(tmp_path, *overrides: str, overlap: bool, rounds: int = 4,
         stop_in: int | None = None, resume: bool = False):
    """run_rounds over a Watched grid; evaluate_fn's calls are logged as (round, thread
    name, whether round r + 1 had been sent when round r's evaluation ended)."""
    cfg, s, contexts = experiment(*AUTOFLIP, *overrides)
    grid = Watched(contexts)
    calls = []

    def evaluate_fn(rnd, arrays):
        overlapped = threading.current_thread().name.startswith("bonsai-eval")
        # beside the next round, this evaluation sees that round's messages go out
        seen = grid.sent[grid.sends + 1].wait(10) if overlapped else False
        calls.append((rnd, overlapped, seen))
        state = arrays.to_torch_state_dict()
        return {"accuracy": 0.5, "loss": float(sum(t.double().square().sum()
                                                    for t in state.values()))}

    kw = {}
    if resume:
        kw["resume_from"] = load_checkpoint(tmp_path)
    if stop_in is not None:
        kw["stopping"] = lambda: grid.sends >= stop_in + 1  # exploration is send 1
    theta = ArrayRecord(s.theta)
    final = run_rounds(grid, s, theta, rounds, ConfigRecord({}), evaluate_fn,
                       RunRecorder(tmp_path), 60, overlap=overlap, **kw)
    return final.to_torch_state_dict(), read_rounds(tmp_path), calls


def _same(a, b) -> bool:
    """Equal checkpoint contents: tensors bitwise, containers item by item."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k])
                                                                  for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_each_round_is_evaluated_beside_the_next_and_recorded_as_without_overlap(
        tmp_path, monkeypatch):
    saved = []  # every checkpoint as written: (run, round, contents)
    monkeypatch.setattr("server.rounds.save_checkpoint",
                        lambda run_dir, ck: saved.append((run_dir.name, ck.round, copy.deepcopy(
                            (ck.arrays, ck.strategy, ck.counters)))))
    plain, plain_rounds, plain_calls = _run(tmp_path / "plain", overlap=False)
    final, rounds, calls = _run(tmp_path / "overlap", overlap=True)
    assert all(torch.equal(final[n], plain[n]) for n in plain)
    assert _without_seconds(rounds) == _without_seconds(plain_rounds)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    assert plain_calls == [(r, False, False) for r in range(5)]
    # rounds 1-3 in the background, each while the next round's messages were out; the
    # last round (nothing follows it) and theta_0 in the loop
    assert calls == [(0, False, False), (1, True, True), (2, True, True), (3, True, True),
                     (4, False, False)]
    # each round's checkpoint holds the strategy as it was after that round, not after
    # the next round was configured (a new mask, its version) beside the evaluation
    a = [(r, c) for run, r, c in saved if run == "plain"]
    b = [(r, c) for run, r, c in saved if run == "overlap"]
    assert [r for r, _ in a] == [r for r, _ in b] == [1, 2, 3, 4]
    assert all(_same(x, y) for (_, x), (_, y) in zip(a, b))


def test_a_round_that_ended_before_a_shutdown_is_recorded_and_resumes_exactly(tmp_path):
    """Stopped while round 3 trains: round 2 (evaluated beside it) is recorded and
    checkpointed with the strategy as it was after round 2, so a resumed run ends
    with the uninterrupted run's weights and records."""
    whole, whole_rounds, _ = _run(tmp_path / "whole", overlap=True)
    with pytest.raises(RunStopped):
        _run(tmp_path / "cut", overlap=True, stop_in=3)
    assert [r["round"] for r in read_rounds(tmp_path / "cut")] == [0, 1, 2]
    assert load_checkpoint(tmp_path / "cut").round == 2
    final, rounds, _ = _run(tmp_path / "cut", overlap=True, resume=True)
    assert all(torch.equal(final[n], whole[n]) for n in whole)
    assert _without_seconds(rounds) == _without_seconds(whole_rounds)


def test_a_schedule_waiting_for_the_loss_is_evaluated_before_each_next_round(tmp_path):
    """pruning.start_when=improved: the next round's mask depends on this round's
    evaluation, so nothing overlaps until the start is decided."""
    _, _, calls = _run(tmp_path, "pruning.start_when=improved", "pruning.patience=9",
                       overlap=True)
    assert calls == [(r, False, False) for r in range(5)]


def test_auto_overlaps_only_cohort_mode_evaluated_on_a_gpu():
    """On a CPU the evaluation takes every core (fl.train.evaluate's threads), and beside
    the workers it made rounds slower (docs/RESULTS.md): auto keeps it out of the way."""
    from fl import config as c

    def overlaps(*over, device="cpu"):
        return c.load(None, list(over)).simulation.overlaps_evaluation(device)

    cohort = "simulation.cohort_size=8"
    assert not overlaps(cohort) and overlaps(cohort, device="cuda")
    assert not overlaps(device="cuda")  # one client per message: nothing to overlap with
    assert overlaps("simulation.overlap_evaluation=always")
    assert not overlaps(cohort, "simulation.overlap_evaluation=never", device="cuda")
