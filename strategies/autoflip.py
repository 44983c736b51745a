"""AutoFLIP: federated hybrid pruning guided by loss-landscape exploration.

Interno et al., "Federated Hybrid Model Pruning through Loss Landscape
Exploration", arXiv 2405.10271, as specified by ALGORITHMS.md section 1 (which
adds structured pruning and physical shrinking; the public reference code has
neither and its masking never activates). Exploration and guidance:
strategies.mask_policy.AutoFLIPPolicy and fl.pruning.guidance; the mask rule:
fl.pruning.plan_masks; the wire and aggregation: strategies.sparse.
"""

from __future__ import annotations

from typing import Any

from fl.config import PruningConfig
from strategies.mask_policy import POLICIES
from strategies.sparse import SparseStrategy


class PrunedStrategy(SparseStrategy):
    """AutoFLIP (``policy="autoflip"``) or a baseline (``"magnitude"``, ``"random"``)
    around the weighted mean (``aggregation="mean"``) or FedLD (``"fedld"``).

    Parameters are those of :class:`SparseStrategy` plus ``pruning`` (the
    ``pruning.*`` config) and ``policy``.
    """

    def __init__(self, *, pruning: PruningConfig, policy: str = "autoflip",
                 **kwargs: Any) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: got {policy!r}; allowed: {', '.join(POLICIES)}")
        model_name, shape, classes = kwargs["model_name"], kwargs["input_shape"], \
            kwargs["num_classes"]
        from fl.models import build_model
        from fl.pruning import prunable_names

        prunable = prunable_names(build_model(model_name, shape, classes))
        super().__init__(
            policy=POLICIES[policy](pruning, prunable, seed=kwargs.get("seed", 0)),
            quantize=pruning.quantize, explore_fraction=pruning.explore_fraction,
            explore_epochs=pruning.explore_epochs, **kwargs)


AutoFLIP = PrunedStrategy
