"""One mask recomputation: scores -> kept units (M_s) -> hybrid mask (M_s * M_u).

This is the per-round sequence of docs/ALGORITHMS.md §1.2-1.3 in one pure function,
used by AutoFLIP (scores = guidance G) and by the baselines (scores = |w| for
global magnitude pruning, uniform noise for random pruning), so all three
prune on the same schedule with the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fl.pruning.groups import UnitGroup
from fl.pruning.structured import Structure, select_units, structured_mask
from fl.pruning.unstructured import hybrid_mask


@dataclass(frozen=True)
class MaskPlan:
    """The kept units and the full-shape masks that go with them."""

    structure: Structure
    #: name -> bool mask, full shapes: every tensor a group touches (weights,
    #: biases, norm parameters and buffers) plus the unstructured zeros of the
    #: prunable weights
    masks: dict[str, torch.Tensor]
    #: the prunable weights' masks only (what travels on the wire)
    weight_masks: dict[str, torch.Tensor]


def plan_masks(
    scores: Mapping[str, torch.Tensor],
    groups: Sequence[UnitGroup],
    shapes: Mapping[str, torch.Tensor | torch.Size],
    *,
    structured_ratio: float,
    unstructured_ratio: float,
    min_units: int = 1,
    previous: Structure | None = None,
) -> MaskPlan:
    """Recompute the mask from per-entry ``scores`` of the prunable weights.

    Units removed in ``previous`` stay removed (structural removal is
    permanent); ``structured_ratio`` and ``unstructured_ratio`` are the
    cumulative targets of this round (e.g. from the cubic schedule).
    """
    structure = select_units(scores, groups, structured_ratio, min_units, previous)
    weight_masks = hybrid_mask(scores, groups, structure, unstructured_ratio)
    masks = structured_mask(groups, structure, shapes, strict=False)
    for name, m in weight_masks.items():
        masks[name] = masks[name] & m if name in masks else m.clone()
    return MaskPlan(structure, masks, weight_masks)
