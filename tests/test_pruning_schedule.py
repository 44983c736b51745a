"""Cubic sparsity schedule (Zhu and Gupta 2017; ALGORITHMS.md 1.3) and the mask period."""

from __future__ import annotations

import pytest

from fl.pruning import cubic_sparsity, mask_due


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


def test_mask_due():
    assert [r for r in range(1, 11) if mask_due(r, 3)] == [3, 6, 9]
    assert all(mask_due(r, 1) for r in range(1, 5))
    assert not any(mask_due(r, 0) for r in range(1, 5))
    with pytest.raises(ValueError, match="server_round"):
        mask_due(0, 2)
