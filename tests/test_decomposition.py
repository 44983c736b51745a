"""Tests of fl/decomposition.py: the FedLD loss decomposition (docs/ALGORITHMS.md §2.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fl.decomposition import LossDecomposition, decompose_loss


def test_two_clients_by_hand():
    # L[j, i] = loss of client i's model on client j's data.
    L = [[1.0, 3.0], [2.0, 0.5]]
    Lg = [1.5, 1.0]
    # local = (L00 + L11)/2 = 0.75; L(theta_0) = (1 + 2)/2 = 1.5, L(theta_1) = (3 + 0.5)/2 = 1.75
    # shift = ((1.5 - 1) + (1.75 - 0.5))/2 = 0.875; global = 1.25
    # aggregation = 1.25 - (1.5 + 1.75)/2 = -0.375; 0.75 + 0.875 - 0.375 = 1.25
    got = decompose_loss(L, Lg)
    assert got == LossDecomposition(
        global_loss=1.25, local=0.75, distribution_shift=0.875, aggregation=-0.375
    )
    assert got.as_dict() == {
        "global_loss": 1.25,
        "local": 0.75,
        "distribution_shift": 0.875,
        "aggregation": -0.375,
    }


def test_two_clients_weighted_by_hand():
    # p = (0.25, 0.75): local = 0.25 + 0.375 = 0.625; L(theta_0) = 0.25 + 1.5 = 1.75,
    # L(theta_1) = 0.75 + 0.375 = 1.125; sum_i p_i L(theta_i) = 0.4375 + 0.84375 = 1.28125
    # global = 0.375 + 0.75 = 1.125; shift = 0.65625; aggregation = -0.15625
    got = decompose_loss(np.array([[1.0, 3.0], [2.0, 0.5]]), [1.5, 1.0], weights=[1.0, 3.0])
    assert got == LossDecomposition(1.125, 0.625, 0.65625, -0.15625)


def test_identical_models_have_no_aggregation_loss():
    Lg = np.array([0.3, 0.9, 0.6])
    L = np.repeat(Lg[:, None], 3, axis=1)  # every model behaves like the global one
    got = decompose_loss(L, Lg)
    assert got.aggregation == pytest.approx(0.0, abs=1e-15)
    assert got.distribution_shift == pytest.approx(0.0, abs=1e-15)


@settings(max_examples=50, deadline=None)
@given(
    data=st.integers(1, 12).flatmap(
        lambda k: st.tuples(
            arrays(np.float64, (k, k), elements=st.floats(0.0, 50.0)),
            arrays(np.float64, (k,), elements=st.floats(0.0, 50.0)),
            st.one_of(
                st.none(),
                st.lists(st.floats(0.0, 100.0), min_size=k, max_size=k).filter(
                    lambda w: sum(w) > 0
                ),
            ),
        )
    )
)
def test_terms_sum_to_global_loss(data):
    L, Lg, weights = data
    got = decompose_loss(L, Lg, weights)
    total = got.local + got.distribution_shift + got.aggregation
    assert abs(total - got.global_loss) <= 1e-12
    p = np.full(len(Lg), 1 / len(Lg)) if weights is None else np.array(weights) / sum(weights)
    assert got.global_loss == pytest.approx(float(np.dot(p, Lg)), abs=1e-12)
    assert got.local == pytest.approx(sum(p[i] * L[i, i] for i in range(len(p))), abs=1e-12)


def test_accepts_torch_tensors():
    got = decompose_loss(torch.tensor([[1.0, 3.0], [2.0, 0.5]]), torch.tensor([1.5, 1.0]))
    assert got.global_loss == 1.25 and got.aggregation == -0.375


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="loss_matrix"):
        decompose_loss([[1.0, 2.0]], [1.0])
    with pytest.raises(ValueError, match="global_losses"):
        decompose_loss([[1.0]], [1.0, 2.0])
    with pytest.raises(ValueError, match="loss_matrix"):
        decompose_loss([[float("nan")]], [1.0])
    with pytest.raises(ValueError, match="weights"):
        decompose_loss([[1.0]], [1.0], weights=[0.0])
    with pytest.raises(ValueError, match="weights"):
        decompose_loss([[1.0, 2.0], [3.0, 4.0]], [1.0, 1.0], weights=[-1.0, 2.0])
    with pytest.raises(ValueError, match="loss_matrix"):
        decompose_loss("abc", [1.0])
