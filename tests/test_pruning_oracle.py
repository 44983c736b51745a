"""The guidance-quality oracle (fl/pruning/oracle.py, docs/ALGORITHMS.md §1.5): removing a
unit as the mask does, its loss increase, and rank correlations of scores with it."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from fl.models import build_model
from fl.pruning import full_structure, groups_for, shrink_model, shrink_state, structured_mask
from fl.pruning.oracle import (
    guidance_quality,
    magnitude_unit_scores,
    mean_loss,
    rank_correlation,
    removal_costs,
    remove_unit,
)

SHAPE = (1, 8, 8)


def _data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("model_name", ["cnn", "resnet8"])
def test_removing_a_unit_is_what_the_mask_and_the_shrunk_model_do(model_name):
    model = build_model(model_name, SHAPE, 10, seed=1)
    state = model.state_dict()
    groups = groups_for(model_name, SHAPE, 10)
    x, y = _data()
    for g in groups:
        u = g.n_units // 2
        removed = remove_unit(state, g, u)
        structure = full_structure(groups)
        structure[g.name] = torch.tensor([i for i in range(g.n_units) if i != u])
        masks = structured_mask(groups, structure, state)
        for name, t in state.items():  # exactly the structured mask's zeros
            want = t * masks[name].to(t.dtype) if name in masks else t
            assert torch.equal(removed[name], want), (g.name, name)
        # and the physically smaller model without that unit computes the same loss
        small = shrink_model(model_name, SHAPE, 10, structure)
        small.load_state_dict(shrink_state(state, groups, structure))
        small.eval()
        with torch.no_grad():
            direct = float(F.cross_entropy(small(x), y))
        assert mean_loss(build_model(model_name, SHAPE, 10), removed, x, y) == pytest.approx(
            direct, rel=1e-5)
    cost = removal_costs(build_model(model_name, SHAPE, 10), state, groups[0],
                         torch.tensor([0, 1]), x, y)
    base = mean_loss(model, state, x, y)
    assert cost.tolist() == pytest.approx(
        [mean_loss(model, remove_unit(state, groups[0], u), x, y) - base for u in (0, 1)],
        abs=1e-12)


def test_rank_correlation_by_hand():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4),
    # Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert rank_correlation([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert rank_correlation([1, 1, 1], [1, 2, 3]) is None  # constant: undefined
    assert rank_correlation([1, 2], [2, 1]) is None  # too few pairs
    with pytest.raises(ValueError, match="rank_correlation"):
        rank_correlation([1, 2, 3], [1, 2])


def test_a_score_that_ranks_like_the_oracle_gets_rho_1_and_magnitude_its_own():
    model = build_model("mlp", SHAPE, 10, seed=2)
    state = model.state_dict()
    groups = groups_for("mlp", SHAPE, 10)
    x, y = _data()
    # a guidance whose unit scores are the oracle itself: every fan-in entry = the cost
    guidance = {}
    for g in groups:
        costs = removal_costs(model, state, g, torch.arange(g.n_units), x, y)
        (p,) = g.producers
        guidance[p] = costs.float()[:, None].expand_as(state[p]).clone()
    kept = full_structure(groups)
    kept["fc1"] = kept["fc1"][::2]  # half of fc1 was removed: only kept units are sampled
    q = guidance_quality(model, state, groups, kept, x, y, units_per_group=12,
                         generator=torch.Generator().manual_seed(5), guidance=guidance)
    assert set(q.groups) == {"fc1", "fc2"}
    for name, gq in q.groups.items():
        assert len(gq.units) == 12 and gq.units == sorted(gq.units)
        assert set(gq.units) <= set(kept[name].tolist())
        assert gq.rho["guidance"] == pytest.approx(1.0)
        w = state[f"{name}.weight"]
        mag = w.abs().mean(dim=1)[gq.units]  # mean |w| over the fan-in, in plain torch
        assert gq.scores["magnitude"] == pytest.approx(mag.double().tolist(), rel=1e-6)
        assert gq.rho["magnitude"] == pytest.approx(rank_correlation(mag, gq.oracle))
        assert -1.0 <= gq.rho["random"] <= 1.0
    assert q.overall("guidance") == pytest.approx(1.0)
    assert q.overall("magnitude") == pytest.approx(
        (q.groups["fc1"].rho["magnitude"] + q.groups["fc2"].rho["magnitude"]) / 2)
    assert magnitude_unit_scores(groups[0], state).shape == (groups[0].n_units,)
    again = guidance_quality(model, state, groups, kept, x, y, units_per_group=12,
                             generator=torch.Generator().manual_seed(5), guidance=guidance)
    assert again.groups["fc1"].units == q.groups["fc1"].units  # seeded
    assert again.groups["fc2"].rho == q.groups["fc2"].rho
    unguided = guidance_quality(model, state, groups, kept, x, y, units_per_group=4,
                                generator=torch.Generator().manual_seed(5))
    assert unguided.overall("guidance") is None and unguided.overall("magnitude") is not None
