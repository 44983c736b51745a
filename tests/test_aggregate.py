"""Tests of fl/aggregate.py: weighted mean, server momentum, FedLD principal gradient.

The principal gradient is checked against `_slow_principal_gradient`, written here from the
per-client projection-and-rescale form of docs/ALGORITHMS.md §2.3: it takes the directions from an
SVD of the update matrix (not from the Gram matrix the code uses), materialises every u_j and
projects every client on it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fl.aggregate import (
    ServerMomentum,
    apply_update,
    fedld_aggregate,
    principal_gradient,
    principal_gradient_loop,
    validate_update,
    weighted_mean,
)

# float64 throughout for the oracle comparisons. The two forms differ only in rounding of
# O(m^2) float64 operations on well-conditioned random inputs: rtol 1e-9 is ~1e6 ulp of
# slack and still catches any formula error (those are O(1)).
RTOL = 1e-9
ATOL = 1e-12


def _slow_principal_gradient(
    updates: list[torch.Tensor], k_proportion: float = 0.8, eps: float = 1e-8
) -> torch.Tensor:
    """Direct form: g = sum_j (s_j / sum_l s_l) u_j (1/m) sum_i sign(<D_i, u_j>) ||D_i||."""
    m = len(updates)
    G = torch.stack([u.reshape(-1).double() for u in updates])  # m x d
    # G = U diag(sigma) V^T: e_j = U[:, j], u_j = V[:, j] = G^T e_j / sigma_j, s_j = sigma_j^2/m
    U, sigma, Vh = torch.linalg.svd(G, full_matrices=False)
    s = torch.zeros(m, dtype=torch.float64)
    s[: sigma.numel()] = sigma**2 / m
    total = float(s.sum())
    if total == 0.0:
        return torch.zeros_like(updates[0])
    k = max(1, math.floor(m * k_proportion))
    g = torch.zeros(G.shape[1], dtype=torch.float64)
    for j in range(min(k, sigma.numel())):
        if s[j] <= eps * s[0]:
            continue
        u_j = G.T @ U[:, j]
        u_j = u_j / torch.linalg.vector_norm(u_j)
        rescaled = 0.0
        for i in range(m):
            projection = float(G[i] @ u_j)
            sign = (projection > 0) - (projection < 0)
            rescaled += sign * float(torch.linalg.vector_norm(G[i]))
        g += (s[j] / total) * u_j * (rescaled / m)
    return g.reshape(updates[0].shape).to(updates[0].dtype)


def _random_updates(m: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # A shared component plus client noise: correlated like real updates, distinct spectrum.
    common = torch.randn(shape, generator=generator, dtype=torch.float64)
    return [
        common * (0.5 + i / m) + torch.randn(shape, generator=generator, dtype=torch.float64)
        for i in range(m)
    ]


# ----------------------------------------------------------------------------- principal


@pytest.mark.parametrize(
    ("m", "shape", "k_proportion"),
    [
        (1, (7,), 0.8),
        (2, (5, 3), 0.8),
        (3, (40,), 0.5),
        (5, (8, 4, 3), 0.8),
        (5, (100,), 1.0),
        (12, (257,), 0.8),
        (12, (6, 11), 0.25),
        (20, (10,), 0.8),  # m > d: rank-deficient Gram matrix
    ],
)
def test_principal_gradient_matches_slow_oracle(m, shape, k_proportion):
    updates = _random_updates(m, shape, seed=m * 1000 + len(shape))
    got = principal_gradient(updates, k_proportion=k_proportion)
    expected = _slow_principal_gradient(updates, k_proportion=k_proportion)
    assert got.shape == torch.Size(shape)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    # The per-client loop form agrees too (it is timed against the Gram form).
    loop = principal_gradient_loop(updates, k_proportion=k_proportion)
    torch.testing.assert_close(loop, expected, rtol=RTOL, atol=ATOL)


def test_principal_gradient_blocks_match_oracle_across_block_boundary():
    # d > one streaming block (2**16 columns) and not a multiple of it.
    updates = _random_updates(4, (70_001,), seed=7)
    torch.testing.assert_close(
        principal_gradient(updates), _slow_principal_gradient(updates), rtol=RTOL, atol=ATOL
    )


def test_principal_gradient_float32_close_to_float64_oracle():
    updates = _random_updates(6, (3000,), seed=3)
    got = principal_gradient([u.float() for u in updates])
    assert got.dtype == torch.float32
    # float32 inputs and final weighted sum: ~1e-6 relative error.
    torch.testing.assert_close(
        got.double(), _slow_principal_gradient(updates), rtol=1e-5, atol=1e-6
    )


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 9),
    d=st.integers(1, 30),
    k_proportion=st.sampled_from([0.1, 0.5, 0.8, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_principal_gradient_oracle_property(m, d, k_proportion, seed):
    generator = torch.Generator().manual_seed(seed)
    updates = list(torch.randn(m, d, generator=generator, dtype=torch.float64))
    # The method is discontinuous where a kept eigenvector has a coordinate at zero (its sign
    # flips) or two kept eigenvalues (nearly) coincide (the basis is arbitrary); both forms
    # are right there but need not agree. Skip such draws (rare for Gaussian inputs).
    G = torch.stack(updates)
    s, e = torch.linalg.eigh(G @ G.T / m)
    s, e = s.flip(0), e.flip(1)
    k = max(1, math.floor(m * k_proportion))
    kept = [j for j in range(k) if s[j] > 1e-8 * s[0]]
    assume(all(float(e[:, j].abs().min()) > 1e-6 for j in kept))
    gaps = [float(s[j] - s[j + 1]) for j in range(m - 1) if j in kept or j + 1 in kept]
    assume(all(gap > 1e-6 * float(s[0]) for gap in gaps))
    got = principal_gradient(updates, k_proportion=k_proportion)
    expected = _slow_principal_gradient(updates, k_proportion=k_proportion)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_one_client_returns_its_update():
    delta = torch.tensor([[3.0, -4.0], [0.5, 2.0]], dtype=torch.float64)
    # m = 1, k = 1: s_1 = ||D||^2, c_1 = sign(e_1) ||D||, a = c_1 e_1 / ||D|| = 1, g = D.
    torch.testing.assert_close(principal_gradient([delta]), delta, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("m", [2, 5, 12])
def test_identical_updates_return_that_update(m):
    delta = torch.linspace(-2.0, 3.0, 50, dtype=torch.float64)
    got = principal_gradient([delta.clone() for _ in range(m)])
    torch.testing.assert_close(got, delta, rtol=1e-12, atol=1e-14)


def test_orthogonal_updates_hand_formula():
    # Disjoint supports, norms 4 > 3 > 2 > 1: C = diag(r_i^2 / m) exactly, e_j are unit
    # vectors, c_j = r_j / m, so a_j = (r_j^2 / sum r^2) / m for the k = floor(4 * 0.8) = 3
    # largest: g = (16 D_1 + 9 D_2 + 4 D_3) / (30 * 4); the smallest is dropped.
    d = torch.zeros(4, 8, dtype=torch.float64)
    d[0, 0:2] = torch.tensor([0.0, 4.0], dtype=torch.float64)
    d[1, 2:4] = torch.tensor([3.0, 0.0], dtype=torch.float64)
    d[2, 4:6] = torch.tensor([math.sqrt(2.0), -math.sqrt(2.0)], dtype=torch.float64)
    d[3, 6:8] = torch.tensor([0.6, 0.8], dtype=torch.float64)
    updates = list(d[[2, 0, 3, 1]])  # order must not matter
    expected = (16 * d[0] + 9 * d[1] + 4 * d[2]) / 120.0
    got = principal_gradient(updates, k_proportion=0.8)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]],  # duplicate + zero row
        [[0.0, 0.0, 0.0]] * 4,  # all zeros
        [[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]],  # one zero client
        [[1.0, 1.0], [-1.0, -1.0], [2.0, 2.0]],  # rank one with opposite signs
        [[1e-300, 0.0], [0.0, 1e-300]],  # squares underflow to zero
        [[1e150, 1.0], [1.0, 1e150]],  # large but finite in float64 squares
    ],
)
def test_rank_deficient_and_degenerate_never_nan(rows):
    updates = list(torch.tensor(rows, dtype=torch.float64))
    got = principal_gradient(updates)
    assert torch.isfinite(got).all()
    assert got.shape == updates[0].shape


def test_all_zero_updates_give_zeros():
    got = principal_gradient([torch.zeros(3, 4) for _ in range(5)])
    assert torch.equal(got, torch.zeros(3, 4))


def test_zero_row_among_duplicates_hand_value():
    # Rows D, D, 0 (m = 3): C = (||D||^2 / 3) [[1,1,0],[1,1,0],[0,0,0]], s_1 = 2||D||^2/3,
    # e_1 = (1,1,0)/sqrt2, others 0 and dropped. c_1 = (1/3)(||D|| + ||D|| + 0) = 2||D||/3,
    # a = 1 * c_1 * e_1 / sqrt(3 s_1) = (2||D||/3)(1,1,0)/sqrt2 / (sqrt2 ||D||) = (1,1,0)/3.
    delta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    got = principal_gradient([delta, delta.clone(), torch.zeros(3, dtype=torch.float64)])
    torch.testing.assert_close(got, 2.0 * delta / 3.0, rtol=1e-12, atol=1e-15)


def test_eigenvector_sign_flip_invariance(monkeypatch):
    updates = _random_updates(6, (31,), seed=11)
    reference = principal_gradient(updates)
    original = torch.linalg.eigh
    calls = []

    def flipped_eigh(matrix):
        calls.append(matrix.shape)
        values, vectors = original(matrix)
        signs = torch.tensor([(-1.0) ** j for j in range(vectors.shape[1])], dtype=vectors.dtype)
        return values, vectors * signs  # flip every other eigenvector

    monkeypatch.setattr(torch.linalg, "eigh", flipped_eigh)
    flipped = principal_gradient(updates)
    assert calls == [(6, 6)]  # the patched solver was used
    torch.testing.assert_close(flipped, reference, rtol=1e-14, atol=1e-15)


def test_non_contiguous_inputs_are_read_not_modified():
    updates = [u.reshape(5, 6) for u in _random_updates(4, (30,), seed=13)]
    transposed = [u.T for u in updates]  # non-contiguous views
    before = [u.clone() for u in updates]
    got = principal_gradient(transposed)
    expected = _slow_principal_gradient([u.contiguous() for u in transposed])
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    for u, b in zip(updates, before, strict=True):
        assert torch.equal(u, b)


def test_client_order_and_uniform_weights():
    updates = _random_updates(5, (20,), seed=5)
    forward = principal_gradient(updates)
    backward = principal_gradient(updates[::-1])
    torch.testing.assert_close(forward, backward, rtol=1e-10, atol=1e-13)


def test_scale_equivariance():
    updates = _random_updates(4, (25,), seed=9)
    torch.testing.assert_close(
        principal_gradient([3.0 * u for u in updates]),
        3.0 * principal_gradient(updates),
        rtol=1e-10,
        atol=1e-13,
    )


def test_principal_gradient_rejects_bad_input():
    with pytest.raises(ValueError, match="updates"):
        principal_gradient([])
    with pytest.raises(ValueError, match="shape"):
        principal_gradient([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match="floating"):
        principal_gradient([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="k_proportion"):
        principal_gradient([torch.ones(3)], k_proportion=0.0)
    with pytest.raises(ValueError, match="eps"):
        principal_gradient([torch.ones(3)], eps=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        principal_gradient([torch.tensor([1.0, float("nan")]), torch.ones(2)])


# ----------------------------------------------------------------------------- weighted mean


def test_weighted_mean_hand_values():
    updates = [
        {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)},
        {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(13)},
    ]
    got = weighted_mean(updates, [1.0, 3.0])
    # w: 0.25 * [1, 2] + 0.75 * [3, 6] = [2.5, 5.0]; n: 2.5 + 9.75 = 12.25 -> 12
    torch.testing.assert_close(got["w"], torch.tensor([2.5, 5.0]))
    assert got["n"].dtype == torch.int64 and int(got["n"]) == 12


def test_weighted_mean_half_precision_accumulates_in_float32():
    # 1000 copies of 1 + 2**-10 in float16: a float16 running sum would stall; float32 does not.
    value = torch.tensor([1.0 + 2**-10], dtype=torch.float16)
    got = weighted_mean([{"x": value} for _ in range(1000)], [1.0] * 1000)
    assert got["x"].dtype == torch.float16
    assert float(got["x"]) == float(value)


def test_weighted_mean_rejects_bad_input():
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([{"a": torch.ones(1)}], [1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([{"a": torch.ones(1)}], [0.0])
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([{"a": torch.ones(1)}], [-1.0])
    with pytest.raises(ValueError, match="keys"):
        weighted_mean([{"a": torch.ones(1)}, {"b": torch.ones(1)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([{"a": torch.ones(1)}, {"a": torch.ones(2)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="updates"):
        weighted_mean([], [])


@settings(max_examples=30, deadline=None)
@given(
    weights=st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=8).filter(
        lambda w: sum(w) > 0
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_weighted_mean_matches_float64_sum(weights, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(5, generator=generator, dtype=torch.float64) for _ in weights]
    total = sum(weights)
    expected = sum(w / total * t for w, t in zip(weights, tensors, strict=True))
    got = weighted_mean([{"x": t} for t in tensors], weights)["x"]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- fedld_aggregate


def test_fedld_aggregate_routes_tensors():
    generator = torch.Generator().manual_seed(0)
    updates = [
        {
            "conv.weight": torch.randn(4, 3, generator=generator, dtype=torch.float64),
            "conv.bias": torch.randn(1, generator=generator, dtype=torch.float64),
            "bn.running_mean": torch.randn(4, generator=generator, dtype=torch.float64),
            "bn.num_batches_tracked": torch.tensor(i + 1),
        }
        for i in range(3)
    ]
    weights = [1.0, 2.0, 1.0]
    buffers = {"bn.running_mean", "bn.num_batches_tracked"}
    later = fedld_aggregate(updates, weights, first_round=False, buffer_names=buffers)
    first = fedld_aggregate(updates, weights, first_round=True, buffer_names=buffers)
    mean = weighted_mean(updates, weights)
    principal = _slow_principal_gradient([u["conv.weight"] for u in updates])
    torch.testing.assert_close(later["conv.weight"], principal, rtol=RTOL, atol=ATOL)
    for name in ("conv.bias", "bn.running_mean", "bn.num_batches_tracked"):
        torch.testing.assert_close(later[name], mean[name], rtol=0, atol=0)
    for name in mean:
        torch.testing.assert_close(first[name], mean[name], rtol=0, atol=0)
    assert int(later["bn.num_batches_tracked"]) == 2  # (1 + 4 + 3) / 4


# ----------------------------------------------------------------------------- momentum


def test_server_momentum_hand_values_and_state():
    momentum = ServerMomentum(beta=0.5)
    first = momentum.step({"w": torch.tensor([2.0]), "n": torch.tensor(3)})
    second = momentum.step({"w": torch.tensor([1.0]), "n": torch.tensor(1)})
    assert float(first["w"]) == 2.0
    assert float(second["w"]) == 0.5 * 2.0 + 1.0
    assert int(second["n"]) == 1  # integer tensors pass through
    second["w"].add_(100.0)  # the returned step is not the stored state
    state = momentum.state_dict()
    restored = ServerMomentum()
    restored.load_state_dict(state)
    assert restored.beta == 0.5
    third = restored.step({"w": torch.tensor([0.0])})
    assert float(third["w"]) == 0.5 * 2.0


def test_server_momentum_zero_beta_is_identity_and_skip():
    momentum = ServerMomentum(beta=0.0)
    momentum.step({"w": torch.tensor([5.0])})
    step = momentum.step({"w": torch.tensor([1.0]), "bn": torch.tensor([7.0])}, skip={"bn"})
    assert float(step["w"]) == 1.0 and float(step["bn"]) == 7.0
    assert "bn" not in momentum.velocity


def test_server_momentum_rejects_bad_beta_and_shape_change():
    with pytest.raises(ValueError, match="beta"):
        ServerMomentum(beta=1.0)
    momentum = ServerMomentum(beta=0.9)
    momentum.step({"w": torch.ones(4)})
    with pytest.raises(ValueError, match="velocity"):
        momentum.step({"w": torch.ones(3)})


# ----------------------------------------------------------------------------- apply, validate


def test_apply_update_server_lr_and_buffers():
    global_state = {
        "w": torch.tensor([1.0, 1.0]),
        "bn.running_mean": torch.tensor([0.0]),
        "bn.num_batches_tracked": torch.tensor(10),
        "frozen": torch.tensor([9.0]),
    }
    aggregate = {
        "w": torch.tensor([2.0, -2.0]),
        "bn.running_mean": torch.tensor([4.0]),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    new = apply_update(
        global_state,
        aggregate,
        server_lr=0.5,
        buffer_names={"bn.running_mean", "bn.num_batches_tracked"},
    )
    torch.testing.assert_close(new["w"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(new["bn.running_mean"], torch.tensor([4.0]))
    assert int(new["bn.num_batches_tracked"]) == 13
    torch.testing.assert_close(new["frozen"], torch.tensor([9.0]))
    assert float(global_state["w"][0]) == 1.0  # input untouched
    with pytest.raises(ValueError, match="server_lr"):
        apply_update(global_state, aggregate, server_lr=0.0)
    with pytest.raises(ValueError, match="aggregate"):
        apply_update(global_state, {"nope": torch.zeros(1)})


def test_validate_update_reasons():
    shapes = {"a": (2, 3), "b": torch.Size([4])}
    good = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert validate_update(good, shapes) is None
    assert "missing" in validate_update({"a": torch.zeros(2, 3)}, shapes)
    assert "unexpected" in validate_update({**good, "c": torch.zeros(1)}, shapes)
    assert "shape" in validate_update({**good, "b": torch.zeros(5)}, shapes)
    assert "not a tensor" in validate_update({**good, "b": [0.0] * 4}, shapes)
    nan = torch.zeros(4)
    nan[2] = float("nan")
    assert "1 NaN/Inf" in validate_update({**good, "b": nan}, shapes)
    inf = torch.zeros(2, 3)
    inf[0, 0] = float("inf")
    inf[1, 1] = float("-inf")
    assert "2 NaN/Inf" in validate_update({**good, "a": inf}, shapes)
    assert validate_update({**good, "b": torch.zeros(4, dtype=torch.int64)}, shapes) is None
