"""How well a pruning score predicts what removing a unit costs (docs/ALGORITHMS.md §1.5).

The oracle: the loss increase of a model on held-out data when one unit alone
is removed, the way the structured mask removes it (every member slice of the
unit in its coupled group zeroed: fan-in rows, bias, normalisation entries, the
consumers' input columns; fl.pruning.groups). A good score ranks units as the
oracle does: its Spearman rank correlation with the oracle over the units of a
group is near 1; random scores give about 0.

Scores compared (all unit scores by :func:`fl.pruning.structured.unit_scores`,
the rule the mask uses): AutoFLIP's guidance G, the weight magnitude (mean |w|
over the unit's fan-in, what global magnitude pruning ranks by) and uniform
random scores (the noise level of the correlation at this sample size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fl.pruning.groups import UnitGroup
from fl.pruning.structured import unit_scores

__all__ = ["GroupQuality", "GuidanceQuality", "guidance_quality", "magnitude_unit_scores",
           "mean_loss", "rank_correlation", "remove_unit", "removal_costs", "sample_units"]

#: scores compared against the oracle, in the order they are reported
SCORES = ("guidance", "magnitude", "random")


def remove_unit(state: Mapping[str, torch.Tensor], group: UnitGroup, unit: int
                ) -> dict[str, torch.Tensor]:
    """A copy of the full-model ``state`` with ``unit`` of ``group`` removed: every
    position it covers in every member tensor zeroed (what the structured mask does)."""
    out = dict(state)
    idx = torch.tensor([unit], dtype=torch.int64)
    for m in group.members:
        t = out[m.param]
        out[m.param] = t.index_fill(m.dim, m.positions(idx), 0)
    return out


@torch.no_grad()
def mean_loss(model: nn.Module, state: Mapping[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor, batch_size: int = 512) -> float:
    """Mean cross-entropy of ``model`` run with the tensors of ``state`` on ``(x, y)``
    (eval mode; ``state`` is not copied into the model, so it may alias its weights)."""
    model.eval()
    tensors = dict(state)
    total = 0.0
    for start in range(0, len(y), batch_size):
        logits = functional_call(model, tensors, (x[start:start + batch_size],))
        total += float(F.cross_entropy(logits, y[start:start + batch_size], reduction="sum"))
    return total / max(1, len(y))


def removal_costs(model: nn.Module, state: Mapping[str, torch.Tensor], group: UnitGroup,
                  units: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  base_loss: float | None = None) -> torch.Tensor:
    """The oracle: loss increase on ``(x, y)`` when each of ``units`` alone is removed
    (float64, one per unit). ``base_loss``: the intact model's loss, if known."""
    base = mean_loss(model, state, x, y) if base_loss is None else base_loss
    return torch.tensor([mean_loss(model, remove_unit(state, group, int(u)), x, y) - base
                         for u in units], dtype=torch.float64)


def magnitude_unit_scores(group: UnitGroup, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean |w| over each unit's fan-in: global magnitude pruning's unit score."""
    return unit_scores(group, {p: state[p].abs() for p in group.producers})


def sample_units(kept: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``k`` of the ``kept`` unit indices, drawn without replacement, sorted."""
    if kept.numel() <= k:
        return kept.clone()
    pick = torch.randperm(kept.numel(), generator=generator)[:k]
    return torch.sort(kept[pick]).values


def rank_correlation(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor
                     ) -> float | None:
    """Spearman's rank correlation (ties get their average rank; scipy.stats.spearmanr),
    or None when it is undefined: fewer than 3 pairs, or either side constant."""
    x = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if x.numel() != y.numel():
        raise ValueError(f"rank_correlation: {x.numel()} values against {y.numel()}")
    if x.numel() < 3 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return None
    from scipy.stats import spearmanr  # only where the diagnostic runs

    return float(spearmanr(x.numpy(), y.numpy()).statistic)


@dataclass
class GroupQuality:
    """One group's sample: the units, their oracle costs, each score and its rho."""

    units: list[int]
    oracle: list[float]
    scores: dict[str, list[float]]
    rho: dict[str, float | None]


@dataclass
class GuidanceQuality:
    """Per-group results and, per score, the mean rho over the groups where it is defined."""

    base_loss: float
    groups: dict[str, GroupQuality] = field(default_factory=dict)

    def overall(self, score: str) -> float | None:
        vals = [g.rho[score] for g in self.groups.values() if g.rho.get(score) is not None]
        return sum(vals) / len(vals) if vals else None  # type: ignore[arg-type]


def guidance_quality(
    model: nn.Module, state: Mapping[str, torch.Tensor], groups: Sequence[UnitGroup],
    kept: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
    units_per_group: int, generator: torch.Generator,
    guidance: Mapping[str, torch.Tensor] | None = None,
) -> GuidanceQuality:
    """Oracle costs of a seeded sample of each group's kept units, and the rank correlation
    of the guidance (when given), magnitude and random unit scores with them.

    ``model`` is the full model, ``state`` its full-shape weights (removed units zero),
    ``kept`` the kept unit indices per group (a Structure); ``generator`` draws the sample
    and the random scores.
    """
    state = {n: t.detach().to("cpu") for n, t in state.items()}
    model = model.to("cpu")
    result = GuidanceQuality(base_loss=mean_loss(model, state, x, y))
    for g in groups:
        units = sample_units(kept[g.name], units_per_group, generator)
        if units.numel() == 0:
            continue
        oracle = removal_costs(model, state, g, units, x, y, result.base_loss)
        scores = {"magnitude": magnitude_unit_scores(g, state)[units],
                  "random": torch.rand(units.numel(), generator=generator, dtype=torch.float64)}
        if guidance is not None:
            scores = {"guidance": unit_scores(g, guidance)[units], **scores}
        result.groups[g.name] = GroupQuality(
            units=units.tolist(), oracle=oracle.tolist(),
            scores={k: v.tolist() for k, v in scores.items()},
            rho={k: rank_correlation(v, oracle) for k, v in scores.items()})
    return result
