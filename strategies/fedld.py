"""FedLD: loss decomposition against data heterogeneity.

Zeng et al., "Tackling Data Heterogeneity in Federated Learning via Loss
Decomposition", MICCAI 2024, arXiv 2408.12300. Server side: the
principal-gradient aggregation (fl.aggregate.fedld_aggregate, ALGORITHMS.md
2.3) of the client updates, uniform client weights as in the reference code;
client side: margin control, cross-entropy + lambda log(1 + ||softmax(z)||_F^2)
(fl.objectives.margin_loss, ``objective.margin_lambda``).
"""

from __future__ import annotations

from typing import Any

from strategies.sparse import SparseStrategy


class FedLD(SparseStrategy):
    """FedLD on an unpruned model: :class:`SparseStrategy` with the FedLD rule.

    Parameters are those of :class:`SparseStrategy` less ``aggregation`` and
    ``policy``; ``k_proportion`` (default 0.8), ``eigen_eps`` (1e-8) and
    ``server_lr`` (1.0) set the rule.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(aggregation="fedld", policy=None, **kwargs)
