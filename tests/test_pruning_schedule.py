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
