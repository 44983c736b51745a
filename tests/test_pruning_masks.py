"""Structured and unstructured masks on hand-built guidance (docs/ALGORITHMS.md §1.2, 1.3, 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl.models import build_model
from fl.pruning import (
    density,
    global_threshold_mask,
    groups_for,
    hybrid_mask,
    magnitude_mask,
    prunable_names,
    random_mask,
    select_units,
    structure_from_json,
    structure_to_json,
    structured_mask,
    zero_units,
)

MLP_SHAPE = (1, 2, 2)  # 4 inputs -> 128 -> 64 -> 3


def _mlp_guidance() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """fc1 unit u scores perm[u]/127 (row mean; rows vary around it), fc2 unit v (63-v)/63."""
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(7))
    wiggle = torch.tensor([-0.25, 0.25, -0.125, 0.125], dtype=torch.float64)
    fc1 = (perm.double()[:, None] / 127 + wiggle[None, :] / 127).float()
    fc2 = ((63 - torch.arange(64)).double()[:, None] / 63).expand(64, 128).float().clone()
    fc2[:, ::2] += 0.25  # mean over the row still orders the units by (63 - v)
    fc2[:, 1::2] -= 0.25
    fc3 = torch.full((3, 64), 0.5)
    return {"fc1.weight": fc1, "fc2.weight": fc2, "fc3.weight": fc3}, perm


def test_select_units_removes_exactly_the_lowest_scored_units():
    guidance, perm = _mlp_guidance()
    groups = groups_for("mlp", MLP_SHAPE, 3)
    st = select_units(guidance, groups, structured_ratio=0.25)
    # 25% of 128 = 32 units with perm < 32 go; 25% of 64 = 16 units with v >= 48 go
    assert st["fc1"].tolist() == [u for u in range(128) if int(perm[u]) >= 32]
    assert st["fc2"].tolist() == list(range(48))
    assert st["fc1"].dtype == torch.int64


def test_min_units_is_respected():
    guidance, perm = _mlp_guidance()
    groups = groups_for("mlp", MLP_SHAPE, 3)
    st = select_units(guidance, groups, structured_ratio=0.99, min_units=5)
    best5 = sorted(int(u) for u in torch.nonzero(perm >= 123).reshape(-1))
    assert st["fc1"].tolist() == best5
    assert st["fc2"].tolist() == [0, 1, 2, 3, 4]
    st1 = select_units(guidance, groups, structured_ratio=0.99)  # floor(0.99*64)=63 -> keep 1
    assert st1["fc2"].tolist() == [0]
    with pytest.raises(ValueError, match="min_units"):
        select_units(guidance, groups, 0.5, min_units=0)
    with pytest.raises(ValueError, match="structured_ratio"):
        select_units(guidance, groups, 1.0)


def test_removal_is_permanent_across_recomputations():
    guidance, _ = _mlp_guidance()
    groups = groups_for("mlp", MLP_SHAPE, 3)
    first = select_units(guidance, groups, structured_ratio=0.25)
    # the guidance flips: the removed fc2 units 48..63 now score highest
    flipped = dict(guidance, **{"fc2.weight": guidance["fc2.weight"].flip(0)})
    second = select_units(flipped, groups, structured_ratio=0.5, previous=first)
    # 32 of 64 must go; 48..63 are gone for good, so the 16 lowest survivors (0..15) go too
    assert second["fc2"].tolist() == list(range(16, 48))
    fresh = select_units(flipped, groups, structured_ratio=0.5)
    assert fresh["fc2"].tolist() == list(range(32, 64))
    # a lower ratio later never brings units back
    again = select_units(guidance, groups, structured_ratio=0.0, previous=second)
    assert again["fc2"].tolist() == list(range(16, 48))


def test_ties_keep_the_lower_index():
    groups = groups_for("mlp", MLP_SHAPE, 3)
    guidance = {"fc1.weight": torch.ones(128, 4), "fc2.weight": torch.ones(64, 128)}
    st = select_units(guidance, groups, structured_ratio=0.5)
    assert st["fc1"].tolist() == list(range(64)) and st["fc2"].tolist() == list(range(32))


def test_resnet8_stream_is_scored_over_both_producers():
    groups = groups_for("resnet8", (3, 8, 8), 10)
    model = build_model("resnet8", (3, 8, 8), 10, seed=0)
    guidance = {
        n: torch.ones_like(p) for n, p in model.named_parameters() if n in prunable_names(model)
    }
    # conv1 alone would drop unit 0 first; layer1.conv2 drags units 3 and 9 far lower
    a = torch.linspace(0.1, 0.9, 16)
    b = torch.ones(16)
    b[3], b[9] = -1.0, -0.5
    guidance["conv1.weight"] = a[:, None, None, None].expand(16, 3, 3, 3).clone()
    guidance["layer1.conv2.weight"] = b[:, None, None, None].expand(16, 16, 3, 3).clone()
    st = select_units(guidance, groups, structured_ratio=3 / 16)  # remove 3 of 16
    # scores (a+b)/2: unit 3 -> -0.37, unit 9 -> 0.04, unit 0 -> 0.55, unit 1 -> 0.58
    assert st["conv1"].tolist() == [u for u in range(16) if u not in (0, 3, 9)]


def test_structured_mask_covers_every_member():
    groups = groups_for("mlp", MLP_SHAPE, 3)
    model = build_model("mlp", MLP_SHAPE, 3, seed=0)
    st = {"fc1": torch.tensor([0, 2, 5]), "fc2": torch.tensor([1])}
    m = structured_mask(groups, st, model.state_dict())
    assert torch.nonzero(m["fc1.weight"].all(1)).reshape(-1).tolist() == [0, 2, 5]
    assert torch.nonzero(m["fc1.bias"]).reshape(-1).tolist() == [0, 2, 5]
    exp_fc2 = torch.zeros(64, 128, dtype=torch.bool)
    exp_fc2[1, [0, 2, 5]] = True
    assert torch.equal(m["fc2.weight"], exp_fc2)
    exp_fc3 = torch.zeros(3, 64, dtype=torch.bool)
    exp_fc3[:, 1] = True
    assert torch.equal(m["fc3.weight"], exp_fc3)
    assert "fc3.bias" not in m


def test_global_threshold_by_hand():
    scores = {"a": torch.tensor([[0.1, 0.5], [0.9, 0.3]]), "b": torch.tensor([0.2, 0.7, 0.4])}
    # sorted 0.1 .2 .3 .4 .5 .7 .9; the 0.5 quantile is 0.4 exactly: keep > 0.4
    m = global_threshold_mask(scores, 0.5)
    assert m["a"].tolist() == [[False, True], [True, False]]
    assert m["b"].tolist() == [False, True, False]
    # without b[1]: .1 .2 .3 .4 .5 .9, position 2.5 -> tau = 0.35
    allowed = {"b": torch.tensor([True, False, True])}
    m = global_threshold_mask(scores, 0.5, allowed)
    assert m["a"].tolist() == [[False, True], [True, False]]
    assert m["b"].tolist() == [False, False, True]
    assert global_threshold_mask(scores, 0.0)["a"].all()  # ratio 0 keeps everything


def test_hybrid_mask_quantile_only_over_structured_survivors():
    groups = groups_for("mlp", MLP_SHAPE, 3)
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    shapes = {"fc1.weight": (128, 4), "fc2.weight": (64, 128), "fc3.weight": (3, 64)}
    total = sum(int(np.prod(s)) for s in shapes.values())
    vals = torch.randperm(total, generator=torch.Generator().manual_seed(3)).double() / (total - 1)
    guidance, start = {}, 0
    for n in names:
        k = int(np.prod(shapes[n]))
        guidance[n] = vals[start : start + k].reshape(shapes[n]).float()
        start += k
    st = {"fc1": torch.arange(0, 128, 2), "fc2": torch.arange(10, 42)}  # 64 and 32 units kept
    m = hybrid_mask(guidance, groups, st, unstructured_ratio=0.3)
    survivors = {
        "fc1.weight": torch.zeros(128, 4, dtype=torch.bool),
        "fc2.weight": torch.zeros(64, 128, dtype=torch.bool),
        "fc3.weight": torch.zeros(3, 64, dtype=torch.bool),
    }
    survivors["fc1.weight"][0::2] = True
    survivors["fc2.weight"][10:42, 0::2] = True
    survivors["fc3.weight"][:, 10:42] = True
    pool = np.concatenate([guidance[n][survivors[n]].numpy() for n in names])
    assert pool.size == 256 + 32 * 64 + 96
    tau = np.quantile(pool.astype(np.float64), 0.3)
    for n in names:
        expected = survivors[n] & torch.from_numpy(guidance[n].numpy() > tau)
        assert torch.equal(m[n], expected), n
    kept = sum(int(m[n].sum()) for n in names)
    assert kept == int((pool > tau).sum())
    assert abs(kept - 0.7 * pool.size) <= 1


def test_magnitude_baseline_is_global():
    w = {"a": torch.tensor([[-3.0, 0.5], [1.0, -0.1]]), "b": torch.tensor([2.0, -0.2, 0.3, 4.0])}
    m = magnitude_mask(w, 0.5)  # |w| sorted .1 .2 .3 .5 1 2 3 4: tau = 0.75
    assert m["a"].tolist() == [[True, False], [True, False]]
    assert m["b"].tolist() == [True, False, False, True]


def test_random_baseline_matches_density_and_is_seeded():
    shapes = {"a": (10, 10), "b": (50,)}
    allowed = {"a": torch.ones(10, 10, dtype=torch.bool).triu()}  # 55 allowed in a
    m1 = random_mask(shapes, 40, seed=1, allowed=allowed)
    m2 = random_mask(shapes, 40, seed=1, allowed=allowed)
    m3 = random_mask(shapes, 40, seed=2, allowed=allowed)
    assert all(torch.equal(m1[k], m2[k]) for k in shapes)
    assert any(not torch.equal(m1[k], m3[k]) for k in shapes)
    assert sum(int(v.sum()) for v in m1.values()) == 40
    assert not (m1["a"] & ~allowed["a"]).any()
    half = random_mask(shapes, 0.5, seed=0)
    assert density(half) == 0.5
    with pytest.raises(ValueError, match="keep"):
        random_mask(shapes, 1000, seed=0)


def test_structure_json_round_trip_and_validation():
    st = {"fc1": torch.tensor([0, 3, 7]), "fc2": torch.tensor([5])}
    text = structure_to_json(st)
    assert text == '{"fc1": [0, 3, 7], "fc2": [5]}'
    back = structure_from_json(text)
    assert back.keys() == st.keys() and all(torch.equal(back[k], st[k]) for k in st)
    groups = groups_for("mlp", MLP_SHAPE, 3)
    guidance, _ = _mlp_guidance()
    for bad in (
        {"fc9": torch.tensor([0])},
        {"fc1": torch.tensor([3, 1])},
        {"fc1": torch.tensor([128])},
    ):
        with pytest.raises(ValueError, match="structure"):
            select_units(guidance, groups, 0.1, previous=bad)


def test_bad_guidance_and_masks_are_named():
    groups = groups_for("mlp", MLP_SHAPE, 3)
    with pytest.raises(ValueError, match="guidance"):
        select_units({"fc1.weight": torch.ones(128, 4)}, groups, 0.1)
    with pytest.raises(ValueError, match="allowed"):
        global_threshold_mask({"a": torch.ones(3)}, 0.5, {"a": torch.ones(4, dtype=torch.bool)})


def test_threshold_beyond_2_pow_24_entries():
    """torch.quantile refuses > 2**24 entries; the exact kernel quantile does not."""
    n = 2**23 + 7
    a = torch.zeros(n)
    b = torch.zeros(n)
    a[: n // 4] = 1.0
    b[n // 2 : n // 2 + 3] = 2.0
    b[-1] = 0.5
    # sorted: ~3/4 zeros, then 0.5, ones, three 2s; the 0.7 quantile is 0 -> keep > 0
    m = global_threshold_mask({"a": a, "b": b}, 0.7)
    assert int(m["a"].sum()) == n // 4 and int(m["b"].sum()) == 4
    # the 0.9 quantile lies among the ones -> tau = 1.0, only the 2s survive
    m = global_threshold_mask({"a": a, "b": b}, 0.9)
    assert int(m["a"].sum()) == 0 and m["b"].nonzero().reshape(-1).tolist() == [
        n // 2,
        n // 2 + 1,
        n // 2 + 2,
    ]


def test_classifier_outputs_survive_any_ratio():
    groups = groups_for("cnn", (1, 8, 8), 10)
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    guidance = {n: torch.rand_like(p) for n, p in model.named_parameters() if n.endswith("weight")}
    st = select_units(guidance, groups, structured_ratio=0.95)
    assert "fc2" not in st  # the classifier's outputs are no group
    m_s = structured_mask(groups, st, model.state_dict())
    assert m_s["fc2.weight"].any(dim=1).all()  # every output row keeps its kept inputs
    assert "fc2.bias" not in m_s


@pytest.mark.parametrize("model, shape", [("cnn", (1, 8, 8)), ("resnet8", (3, 8, 8)),
                                          ("mlp", MLP_SHAPE)])
def test_zero_units_reads_the_structure_back_from_masked_weights(model, shape):
    """zero_units(masked state) is exactly the complement of the structure, with the
    unstructured zeros of a hybrid mask on top (a kept unit is never all zero)."""
    groups = groups_for(model, shape, 10)
    state = build_model(model, shape, 10, seed=1).state_dict()
    for n, t in state.items():  # BN statistics as after training (not 0/1)
        if n.endswith("running_var"):
            t.uniform_(0.5, 2.0)
        elif n.endswith("running_mean"):
            t.normal_(0.0, 0.1)
    gen = torch.Generator().manual_seed(2)
    guidance = {n: torch.rand(t.shape, generator=gen) for n, t in state.items()
                if n in prunable_names(build_model(model, shape, 10))}
    structure = select_units(guidance, groups, 0.5)
    masks = structured_mask(groups, structure, state)
    masked = {n: t * masks[n].to(t.dtype) if n in masks else t for n, t in state.items()}
    unstructured = global_threshold_mask({n: masked[n].abs() for n in guidance}, 0.5,
                                         allowed={n: masks[n] for n in guidance if n in masks})
    masked = {n: t * unstructured[n].to(t.dtype) if n in unstructured else t
              for n, t in masked.items()}
    zero = zero_units(groups, masked)
    for g in groups:
        kept = torch.zeros(g.n_units, dtype=torch.bool)
        kept[structure[g.name]] = True
        assert torch.equal(zero[g.name], ~kept), g.name
        assert 0 < int(kept.sum()) < g.n_units
    assert not any(z.any() for z in zero_units(groups, state).values())  # unmasked: none
    one = dict(masked)
    g = groups[0]
    gone = int(torch.nonzero(zero[g.name])[0])
    m = g.members[-1]  # one nonzero entry in one member revives the unit
    t = one[m.param].clone()
    at = [0] * t.dim()
    at[m.dim] = gone * m.width
    t[tuple(at)] = 1e-30
    one[m.param] = t
    assert not bool(zero_units(groups, one)[g.name][gone])
    with pytest.raises(ValueError, match="state: missing tensor"):
        zero_units(groups, {n: t for n, t in masked.items() if n != m.param})
