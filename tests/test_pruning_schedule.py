"""Cubic sparsity schedule (Zhu and Gupta 2017; docs/ALGORITHMS.md §1.3) and the mask period."""

from __future__ import annotations

import pytest

from fl.config import PruningConfig
from fl.pruning import cubic_sparsity
from strategies.mask_policy import MaskPolicy


def test_cubic_values():
    assert cubic_sparsity(0, 10, 0.0, 0.8) == 0.0
    assert cubic_sparsity(5, 10, 0.0, 0.8) == pytest.approx(0.8 - 0.8 / 8)  # (1/2)^3
    assert cubic_sparsity(10, 10, 0.0, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(15, 10, 0.0, 0.8) == 0.8
    assert cubic_sparsity(3, 6, 0.2, 0.6) == pytest.approx(0.6 - 0.4 / 8)
    assert cubic_sparsity(0, 0, 0.2, 0.6) == 0.6
    values = [cubic_sparsity(t, 20, 0.1, 0.9) for t in range(25)]
    assert values == sorted(values)


def test_schedule_rejects_bad_values():
    for kwargs, arg in (
        ({"t": -1, "total": 5, "s_init": 0.0, "s_final": 0.5}, "t"),
        ({"t": 1, "total": 5, "s_init": 0.0, "s_final": 1.0}, "s_final"),
        ({"t": 1, "total": 5, "s_init": -0.1, "s_final": 0.5}, "s_init"),
    ):
        with pytest.raises(ValueError, match=arg):
            cubic_sparsity(**kwargs)


def test_policy_recomputes_the_mask_before_rounds_1_then_every_n():
    """The schedule the strategies run: a mask before round 1, then before 1 + N, 1 + 2N."""
    policy = MaskPolicy(PruningConfig(mask_every=3), prunable=[])
    assert [r for r in range(1, 11) if policy.due(r)] == [1, 4, 7, 10]
    every = MaskPolicy(PruningConfig(mask_every=1), prunable=[])
    assert all(every.due(r) for r in range(1, 6))


def test_policy_targets_follow_the_cubic_schedule_from_round_1():
    cfg = PruningConfig(structured_ratio=0.4, unstructured_ratio=0.8, schedule_start=0.5,
                        schedule_rounds=4)
    policy = MaskPolicy(cfg, prunable=[])
    # before round r, t = r - 1 rounds are done; s_i = start * s_f
    assert policy.targets(1) == (pytest.approx(0.2), pytest.approx(0.4))
    assert policy.targets(3) == (pytest.approx(0.4 - 0.2 / 8), pytest.approx(0.8 - 0.4 / 8))
    assert policy.targets(5) == (pytest.approx(0.4), pytest.approx(0.8))
    assert policy.targets(50) == (pytest.approx(0.4), pytest.approx(0.8))


def test_warmup_delays_the_first_mask_and_the_schedule_runs_from_there():
    cfg = PruningConfig(structured_ratio=0.4, unstructured_ratio=0.8, schedule_start=0.5,
                        schedule_rounds=4, mask_every=2, warmup_rounds=3)
    policy = MaskPolicy(cfg, prunable=[])
    assert [r for r in range(1, 13) if policy.due(r)] == [4, 6, 8, 10, 12]
    assert policy.targets(4) == (pytest.approx(0.2), pytest.approx(0.4))  # t = 0 at round 4
    assert policy.targets(6) == (pytest.approx(0.4 - 0.2 / 8), pytest.approx(0.8 - 0.4 / 8))
    assert policy.targets(8) == (pytest.approx(0.4), pytest.approx(0.8))  # T = 4 rounds later


def _fed(policy, losses):
    for rnd, loss in enumerate(losses):  # round 0 is theta_0's evaluation
        policy.observe_evaluation(rnd, loss, 0.0)


def test_improved_waits_for_the_loss_to_fall_patience_rounds_in_a_row():
    cfg = PruningConfig(mask_every=2, schedule_rounds=4, start_when="improved", patience=2)
    policy = MaskPolicy(cfg, prunable=[])
    _fed(policy, [2.0, 1.9, 2.1, 1.8])  # fell, rose, fell: one in a row
    assert policy.start_round is None and not any(policy.due(r) for r in range(1, 20))
    policy.observe_evaluation(4, 1.7, 0.0)  # fell again: two in a row after round 4
    assert policy.start_round == 5
    assert [r for r in range(1, 12) if policy.due(r)] == [5, 7, 9, 11]
    assert policy.targets(5) == (pytest.approx(0.25), pytest.approx(0.25))  # t = 0
    assert policy.targets(9) == (pytest.approx(0.5), pytest.approx(0.5))
    policy.observe_evaluation(5, 9.0, 0.0)  # once started, it stays started
    assert policy.start_round == 5


def test_improved_waits_for_the_warmup_too_and_survives_a_checkpoint():
    cfg = PruningConfig(start_when="improved", patience=2, warmup_rounds=4)
    policy = MaskPolicy(cfg, prunable=[])
    _fed(policy, [2.0, 1.9, 1.8, 1.7])  # falling from round 1, but the warm-up lasts to 4
    assert policy.start_round is None
    resumed = MaskPolicy(cfg, prunable=[])
    resumed.load_state_dict(policy.state_dict())
    resumed.observe_evaluation(4, 1.6, 0.0)
    assert resumed.start_round == 5
    old = MaskPolicy(PruningConfig(), prunable=[])
    old.load_state_dict({})  # a checkpoint from before the adaptive start: round 1
    assert old.start_round == 1
