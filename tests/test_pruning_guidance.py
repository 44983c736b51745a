"""Guidance from exploration and from round updates (docs/ALGORITHMS.md §1.1, 1.3), by hand."""

from __future__ import annotations

import pytest
import torch

from fl.pruning import GuidanceState, exploration_guidance, fold_updates


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


DEV1 = {"a": _t([[0, 4], [8, 4]]), "b": _t([1, 1, 1]), "c": _t([0, 2, 4]), "bn": _t([9.0])}
DEV2 = {"a": _t([[4, 0], [4, 8]]), "b": _t([1, 1, 1]), "c": _t([0, 2, 4]), "bn": _t([1.0])}


def test_exploration_guidance_by_hand():
    g = exploration_guidance([DEV1, DEV2], [1, 3], ["a", "b", "c"])
    assert sorted(g) == ["a", "b", "c"]  # only the prunable tensors
    # LS_a = (1*DEV1 + 3*DEV2)/4 = [[3, 1], [5, 7]] -> min-max over [1, 7]
    torch.testing.assert_close(g["a"], _t([[2 / 6, 0.0], [4 / 6, 1.0]]))
    assert torch.equal(g["b"], _t([1, 1, 1]))  # constant spread -> all kept
    torch.testing.assert_close(g["c"], _t([0.0, 0.5, 1.0]))
    assert g["a"].dtype == torch.float32


def test_fold_updates_by_hand():
    guidance = {"a": torch.full((2, 2), 0.5), "b": _t([0.2, 0.4])}
    up1 = {"a": _t([[1, 0], [0, 2]]), "b": _t([1, 1])}
    up2 = {"a": _t([[0, 1], [1, 0]]), "b": _t([-1, 1])}
    new = fold_updates(guidance, [up1, up2], [1, 1], decay=0.75)
    # mean of squares [[.5, .5], [.5, 2]] -> min-max [[0, 0], [0, 1]]
    torch.testing.assert_close(new["a"], _t([[0.375, 0.375], [0.375, 0.625]]))
    # b: mean of squares [1, 1] is constant -> 1
    torch.testing.assert_close(new["b"], _t([0.75 * 0.2 + 0.25, 0.75 * 0.4 + 0.25]))
    assert torch.equal(guidance["a"], torch.full((2, 2), 0.5))  # input untouched


def test_state_round_trip_and_fold():
    state = GuidanceState.from_exploration([DEV1, DEV2], [1, 3], ["a", "c"])
    state.fold([{"a": _t([[1, 0], [0, 0]]), "c": _t([0, 0, 3])}], [5], decay=0.5)
    saved = state.state_dict()
    other = GuidanceState()
    other.load_state_dict(saved)
    assert other.folds == 1
    torch.testing.assert_close(other.guidance["a"], _t([[2 / 6 / 2 + 0.5, 0.0], [2 / 6, 0.5]]))
    torch.testing.assert_close(other.guidance["c"], _t([0.0, 0.25, 1.0]))
    with pytest.raises(ValueError, match="state"):
        other.load_state_dict({"guidance": {"a": [1, 2]}})


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="num_examples"):
        exploration_guidance([DEV1, DEV2], [1], ["a"])
    with pytest.raises(ValueError, match="deviations"):
        exploration_guidance([DEV1, {"a": _t([1.0])}], [1, 1], ["a"])
    with pytest.raises(ValueError, match="updates"):
        fold_updates({"a": _t([1.0, 2.0])}, [{"b": _t([1.0])}], [1], 0.5)
    with pytest.raises(ValueError, match="decay"):
        fold_updates({"a": _t([1.0, 2.0])}, [{"a": _t([1.0, 0.0])}], [1], 1.5)
