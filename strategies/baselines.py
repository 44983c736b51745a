"""The FedAvg-family baselines: Flower's own strategies with seeded sampling.

FedAvg (McMahan et al., AISTATS 2017), FedAvgM (Hsu et al., arXiv 1909.06335)
and FedProx (Li et al., MLSys 2020; the client adds the proximal term for the
``proximal-mu`` that Flower's FedProx sends).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx

from fl.contract import PROXIMAL_MU
from strategies.seeded import SeededSampling


class SeededFedAvg(SeededSampling, FedAvg):
    """Flower's FedAvg with seeded sampling and ordered aggregation."""


class SeededFedAvgM(SeededSampling, FedAvgM):
    """Flower's FedAvgM with seeded sampling and ordered aggregation; with
    ``proximal_mu > 0`` the clients add FedProx's term (``strategy.prox``), sent the
    way Flower's FedProx sends it."""

    def __init__(self, *args: Any, proximal_mu: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proximal_mu = proximal_mu

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.proximal_mu > 0.0:
            config[PROXIMAL_MU] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)


class SeededFedProx(SeededSampling, FedProx):
    """Flower's FedProx with seeded sampling and ordered aggregation."""
