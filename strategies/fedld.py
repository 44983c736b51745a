"""FedLD: loss decomposition against data heterogeneity.

Zeng et al., "Tackling Data Heterogeneity in Federated Learning via Loss
Decomposition", MICCAI 2024, arXiv 2408.12300. Server side: the
principal-gradient aggregation (fl.aggregate.fedld_aggregate, docs/ALGORITHMS.md
§2.3) of the client updates, uniform client weights as in the reference code;
client side: margin control, cross-entropy + lambda log(1 + ||softmax(z)||_F^2)
(fl.objectives.margin_loss, ``objective.margin_lambda``, §2.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from strategies.sparse import ModelSpec, ServerRule, SparseStrategy

__all__ = ["FedLD"]


class FedLD(SparseStrategy):
    """FedLD on an unpruned model: :class:`SparseStrategy` with the FedLD rule.

    Parameters are those of :class:`SparseStrategy` less ``policy``; the rule's
    aggregation is always "fedld" (``k_proportion`` 0.8, ``eigen_eps`` 1e-8 and
    ``server_lr`` 1.0 by default).
    """

    def __init__(self, *, model: ModelSpec, initial_state: Mapping[str, torch.Tensor],
                 rule: ServerRule | None = None, **kwargs: Any) -> None:
        rule = replace(rule or ServerRule(), aggregation="fedld")
        super().__init__(model=model, initial_state=initial_state, rule=rule, **kwargs)
