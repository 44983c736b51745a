"""Tests of fl/objectives.py: FedLD margin control and the FedProx proximal term."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fl.objectives import margin_loss, proximal_term


def test_margin_loss_hand_computed():
    # Row 1: logits (0, ln 3) -> p = (1/4, 3/4), target 1 -> CE = ln(4/3).
    # Row 2: logits (ln 2, ln 2) -> p = (1/2, 1/2), target 0 -> CE = ln 2.
    # Mean CE = ln(8/3) / 2 = 0.49041462650586...
    # ||P||_F^2 = 1/16 + 9/16 + 1/4 + 1/4 = 9/8, log(1 + 9/8) = ln(17/8) = 0.75377180237...
    logits = torch.tensor(
        [[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]], dtype=torch.float64
    )
    targets = torch.tensor([1, 0])
    expected_ce = math.log(8.0 / 3.0) / 2.0
    expected = expected_ce + 0.1 * math.log(17.0 / 8.0)
    assert expected == pytest.approx(0.49041462650586 + 0.1 * 0.75377180237, abs=1e-11)
    got = margin_loss(logits, targets, margin_lambda=0.1)
    assert got.dim() == 0
    assert float(got) == pytest.approx(expected, rel=1e-14)
    assert float(margin_loss(logits, targets, 0.0)) == pytest.approx(expected_ce, rel=1e-14)


def test_margin_loss_zero_lambda_is_plain_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=generator)
    targets = torch.randint(0, 5, (16,), generator=generator)
    assert torch.equal(margin_loss(logits, targets, 0.0), F.cross_entropy(logits, targets))


def test_margin_loss_gradient_matches_direct_formula():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 4, (8,), generator=generator)
    margin_loss(logits, targets, 0.3).backward()
    got = logits.grad.clone()
    logits.grad = None
    # Direct formula: log-softmax by hand, one Frobenius norm over the batch matrix.
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    direct = -log_p[torch.arange(8), targets].mean() + 0.3 * torch.log(1 + log_p.exp().pow(2).sum())
    direct.backward()
    torch.testing.assert_close(got, logits.grad, rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    c=st.integers(2, 7),
    lam=st.floats(0.01, 2.0),
    scale=st.floats(0.0, 30.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_margin_term_bounds(n, c, lam, scale, seed):
    # Each row of P sums to 1, so n/c <= ||P||_F^2 <= n: the term is bounded accordingly.
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, c, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, c, (n,), generator=generator)
    term = float(margin_loss(logits, targets, lam) - F.cross_entropy(logits, targets))
    assert lam * math.log1p(n / c) - 1e-12 <= term <= lam * math.log1p(n) + 1e-12


def test_margin_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="logits"):
        margin_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="targets"):
        margin_loss(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="margin_lambda"):
        margin_loss(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), -0.1)


def test_proximal_term_hand_values_and_gradient():
    w1 = torch.tensor([1.0, 2.0], requires_grad=True)
    w2 = torch.tensor([[3.0]], requires_grad=True)
    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    # mu/2 * (1 + 4 + 4) = 0.25 * 9
    term = proximal_term([w1, w2], anchor, mu=0.5)
    assert float(term.detach()) == 2.25
    term.backward()
    # d/dw = mu (w - w_g)
    torch.testing.assert_close(w1.grad, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(w2.grad, torch.tensor([[1.0]]))
    named = proximal_term({"a": w1, "b": w2}, {"b": anchor[1], "a": anchor[0]}, mu=0.5)
    assert float(named.detach()) == 2.25
    assert float(proximal_term([w1], [anchor[0]], mu=0.0).detach()) == 0.0


def test_proximal_term_rejects_bad_input():
    with pytest.raises(ValueError, match="mu"):
        proximal_term([torch.ones(1)], [torch.ones(1)], mu=-1.0)
    with pytest.raises(ValueError, match="anchor"):
        proximal_term([torch.ones(1)], [torch.ones(1), torch.ones(1)], mu=1.0)
    with pytest.raises(ValueError, match="shape"):
        proximal_term([torch.ones(2)], [torch.ones(3)], mu=1.0)
    with pytest.raises(ValueError, match="anchor"):
        proximal_term({"a": torch.ones(1)}, {"b": torch.ones(1)}, mu=1.0)
