"""A mask policy around an aggregation rule: AutoFLIP's shape, and its baselines.

The policy decides which units and weights go (docs/ALGORITHMS.md §1.2-1.3);
the shared rule (fl.pruning.plan_masks, the cubic schedule) turns its scores
into masks, and :class:`~strategies.sparse.SparseStrategy` aggregates with the
weighted mean or FedLD's principal gradient (§3). The random and global
magnitude baselines (§4) are this class with their policy; AutoFLIP adds its
exploration phase (strategies/autoflip.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fl.config import PruningConfig
from fl.pruning import prunable_names
from strategies.mask_policy import POLICIES
from strategies.sparse import ModelSpec, ServerRule, SparseStrategy

__all__ = ["PrunedStrategy"]


class PrunedStrategy(SparseStrategy):
    """A pruning baseline (``policy`` "magnitude" or "random") around ``rule``.

    Parameters are those of :class:`SparseStrategy` plus ``pruning`` (the
    ``pruning.*`` config) and ``policy`` (a name in strategies.mask_policy.POLICIES).
    """

    def __init__(self, *, model: ModelSpec, initial_state: Mapping[str, torch.Tensor],
                 pruning: PruningConfig, policy: str, rule: ServerRule | None = None,
                 min_train_nodes: int = 2, seed: int = 0, sample_fraction: float = 1.0,
                 evaluate_fraction: float = 0.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: got {policy!r}; allowed: {', '.join(POLICIES)}")
        self.pruning = pruning
        mask_policy = POLICIES[policy](pruning, prunable_names(model.build()), seed=seed)
        super().__init__(model=model, initial_state=initial_state, rule=rule,
                         policy=mask_policy, quantize=pruning.quantize,
                         min_train_nodes=min_train_nodes, seed=seed,
                         sample_fraction=sample_fraction, evaluate_fraction=evaluate_fraction)
