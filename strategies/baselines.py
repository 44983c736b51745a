"""The FedAvg-family baselines: Flower's own strategies with seeded sampling.

FedAvg (McMahan et al., AISTATS 2017), FedAvgM (Hsu et al., arXiv 1909.06335)
and FedProx (Li et al., MLSys 2020; the client adds the proximal term for the
``proximal-mu`` that Flower's FedProx sends).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx

from strategies.seeded import SeededSampling


class SeededFedAvg(SeededSampling, FedAvg):
    """Flower's FedAvg with seeded sampling and ordered aggregation."""


class SeededFedAvgM(SeededSampling, FedAvgM):
    """Flower's FedAvgM with seeded sampling and ordered aggregation."""


class SeededFedProx(SeededSampling, FedProx):
    """Flower's FedProx with seeded sampling and ordered aggregation."""
