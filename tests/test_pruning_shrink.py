"""Physical shrinking and the state maps between the full and the small view (ALGORITHMS.md 1.2)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl.models import build_model
from fl.pruning import expand_state, groups_for, shrink_model, shrink_state, structured_mask

MLP = ("mlp", (1, 8, 8))
CNN = ("cnn", (1, 8, 8))
RES = ("resnet8", (3, 8, 8))


def _keep(n: int, k: int, offset: int = 0) -> torch.Tensor:
    """k units spread over range(n), deterministic."""
    return torch.sort(
        torch.randperm(n, generator=torch.Generator().manual_seed(n + offset))[:k]
    ).values


STRUCTS = {
    "mlp": {"fc1": _keep(128, 96), "fc2": _keep(64, 48)},
    "cnn": {"conv1": _keep(32, 20), "conv2": _keep(64, 40), "fc1": _keep(128, 100)},
    "resnet8": {
        "conv1": _keep(16, 12),
        "layer1.conv1": _keep(16, 10, 1),
        "layer2.conv2": _keep(32, 24),
        "layer2.conv1": _keep(32, 20, 1),
        "layer3.conv2": _keep(64, 50),
        "layer3.conv1": _keep(64, 40, 1),
    },
}


def _mlp_params(k1: int, k2: int) -> int:
    return 64 * k1 + k1 + k1 * k2 + k2 + k2 * 10 + 10


def _cnn_params(c1: int, c2: int, f: int) -> int:
    # conv1 1->c1 3x3, conv2 c1->c2 3x3, fc1 (c2*4*4)->f, fc2 f->10, all with biases
    return (9 * c1 + c1) + (9 * c1 * c2 + c2) + (16 * c2 * f + f) + (f * 10 + 10)


def _resnet_params(s: int, a1: int, s2: int, a2: int, s3: int, a3: int) -> int:
    bn = 2  # weight + bias per channel
    stem = 3 * 9 * s + bn * s
    l1 = s * 9 * a1 + bn * a1 + a1 * 9 * s + bn * s
    l2 = s * 9 * a2 + bn * a2 + a2 * 9 * s2 + bn * s2 + s * s2 + bn * s2
    l3 = s2 * 9 * a3 + bn * a3 + a3 * 9 * s3 + bn * s3 + s2 * s3 + bn * s3
    return stem + l1 + l2 + l3 + s3 * 10 + 10


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (MLP, _mlp_params(96, 48)),
        (CNN, _cnn_params(20, 40, 100)),
        (RES, _resnet_params(12, 10, 24, 20, 50, 40)),
    ],
)
def test_shrunk_model_is_really_smaller(spec, expected):
    name, shape = spec
    small = shrink_model(name, shape, 10, STRUCTS[name], seed=0)
    assert sum(p.numel() for p in small.parameters()) == expected
    full = build_model(name, shape, 10, seed=0)
    assert (
        sum(p.numel() for p in full.parameters())
        == {
            "mlp": _mlp_params(128, 64),
            "cnn": _cnn_params(32, 64, 128),
            "resnet8": _resnet_params(16, 16, 32, 32, 64, 64),
        }[name]
    )
    assert small(torch.randn(2, *shape)).shape == (2, 10)


def test_resnet8_stream_removed_across_conv_bn_and_shortcut():
    structure = {"conv1": torch.tensor([0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 15])}
    small = shrink_model("resnet8", (3, 8, 8), 10, structure)
    assert small.conv1.weight.shape == (14, 3, 3, 3)
    assert small.bn1.running_mean.shape == (14,)
    assert small.layer1.conv1.weight.shape == (16, 14, 3, 3)  # inner conv keeps its outputs
    assert small.layer1.conv2.weight.shape == (14, 16, 3, 3)
    assert small.layer1.bn2.weight.shape == (14,)
    assert small.layer2.conv1.weight.shape == (32, 14, 3, 3)  # next block's inputs shrink
    assert small.layer2.shortcut[0].weight.shape == (32, 14, 1, 1)


@pytest.mark.parametrize("spec", [MLP, CNN, RES])
def test_shrunk_state_matches_shrunk_model_and_round_trips(spec):
    name, shape = spec
    groups = groups_for(name, shape, 10)
    structure = STRUCTS[name]
    full = build_model(name, shape, 10, seed=3).state_dict()
    small_model = shrink_model(name, shape, 10, structure, seed=3)
    small = shrink_state(full, groups, structure)
    ref = small_model.state_dict()
    assert small.keys() == ref.keys()
    for k in ref:
        assert torch.equal(small[k], ref[k]), k  # same layout torch-pruning produced
    back = expand_state(small, groups, structure, full)
    m_s = structured_mask(groups, structure, full)
    for k, v in full.items():
        expected = v * m_s[k] if k in m_s else v
        assert torch.equal(back[k], expected), k
    # masks travel the same way: bools shrink and expand with False at removed units
    masks = {k: v > 0 for k, v in full.items() if k.endswith("weight")}
    mback = expand_state(shrink_state(masks, groups, structure), groups, structure, full)
    for k, v in masks.items():
        expected = v & m_s[k] if k in m_s else v
        assert mback[k].dtype == torch.bool and torch.equal(mback[k], expected), k


@pytest.mark.parametrize("spec", [MLP, CNN, RES])
def test_shrunk_model_computes_what_the_zeroed_full_model_computes(spec):
    """Removing a unit == zeroing its fan-in weights, bias and BN affine (eval mode).

    ReLU(0) = 0 and a BN with weight = bias = 0 outputs 0, so the removed
    unit contributes nothing downstream: its outgoing weights may stay.
    """
    name, shape = spec
    groups = groups_for(name, shape, 10)
    structure = STRUCTS[name]
    full = build_model(name, shape, 10, seed=5)
    state = full.state_dict()
    if name == "resnet8":  # non-trivial running statistics
        g = torch.Generator().manual_seed(0)
        for k in state:
            if k.endswith("running_mean"):
                state[k] = torch.randn(state[k].shape, generator=g)
            elif k.endswith("running_var"):
                state[k] = torch.rand(state[k].shape, generator=g) + 0.5
    zeroed = {k: v.clone() for k, v in state.items()}
    for g in groups:
        removed = torch.tensor([u for u in range(g.n_units) if u not in structure[g.name]])
        for m in g.members:
            # only the unit's own outputs: fan-in rows, bias, BN affine; stats and the
            # next layer's input columns stay as they are
            if m.dim == 0 and not m.param.endswith(("running_mean", "running_var")):
                zeroed[m.param].index_fill_(0, removed, 0.0)
    full.load_state_dict(zeroed)
    small = shrink_model(name, shape, 10, structure)
    small.load_state_dict(shrink_state(state, groups, structure))
    full.eval()
    small.eval()
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(x), full(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_round_trip_is_exact_for_any_structure(data):
    groups = groups_for("cnn", (1, 8, 8), 10)
    structure = {}
    for g in groups:
        kept = data.draw(st.sets(st.integers(0, g.n_units - 1), min_size=1, max_size=g.n_units))
        structure[g.name] = torch.tensor(sorted(kept))
    full = build_model("cnn", (1, 8, 8), 10, seed=0).state_dict()
    small = shrink_state(full, groups, structure)
    back = expand_state(small, groups, structure, full)
    again = shrink_state(back, groups, structure)
    for k in small:
        assert torch.equal(again[k], small[k]), k


def test_shape_errors_name_the_argument():
    groups = groups_for("mlp", (1, 8, 8), 10)
    full = build_model("mlp", (1, 8, 8), 10, seed=0).state_dict()
    small = shrink_state(full, groups, STRUCTS["mlp"])
    with pytest.raises(ValueError, match="full_state"):
        shrink_state(small, groups, STRUCTS["mlp"])
    with pytest.raises(ValueError, match="small_state"):
        expand_state(full, groups, STRUCTS["mlp"], full)


@settings(max_examples=6, deadline=None)
@given(data=st.data(), name=st.sampled_from(["cnn", "resnet8"]))
def test_shrink_model_matches_shrink_state_for_any_structure(data, name):
    shape = (1, 8, 8) if name == "cnn" else (3, 8, 8)
    groups = groups_for(name, shape, 10)
    structure = {}
    for g in groups:
        kept = data.draw(st.sets(st.integers(0, g.n_units - 1), min_size=1, max_size=g.n_units))
        structure[g.name] = torch.tensor(sorted(kept))
    small = shrink_model(name, shape, 10, structure, seed=2)
    expected = shrink_state(build_model(name, shape, 10, seed=2).state_dict(), groups, structure)
    got = small.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert small(torch.zeros(1, *shape)).shape == (1, 10)  # classifier outputs all kept
