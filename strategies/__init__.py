"""Flower Message-API strategies.

- FedAvg, FedAvgM, FedProx: Flower's own, with seeded sampling (baselines.py).
- FedLD (fedld.py), AutoFLIP and the random/magnitude pruning baselines
  (autoflip.py): server-side model and Bonsai's sparse wire format (sparse.py),
  mask policies (mask_policy.py).

:func:`build_strategy` turns an experiment config into one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.serverapp.strategy import Strategy

from fl.config import ExperimentConfig
from fl.contract import ARRAYS, CONFIG, NUM_EXAMPLES
from strategies.autoflip import AutoFLIP, PrunedStrategy
from strategies.baselines import SeededFedAvg, SeededFedAvgM, SeededFedProx
from strategies.fedld import FedLD
from strategies.seeded import Population, SeededSampling
from strategies.sparse import SparseStrategy

__all__ = ["AutoFLIP", "FedLD", "Population", "PrunedStrategy", "SeededFedAvg",
           "SeededFedAvgM", "SeededFedProx", "SeededSampling", "SparseStrategy",
           "build_strategy"]


def build_strategy(
    cfg: ExperimentConfig, initial_state: Mapping[str, torch.Tensor],
    input_shape: tuple[int, ...], num_classes: int,
) -> Strategy:
    """The strategy named by ``strategy.name``, configured from ``cfg``."""
    s = cfg.strategy
    sampling = dict(seed=cfg.seed, sample_fraction=s.fraction_train,
                    evaluate_fraction=s.fraction_evaluate)
    if s.name in ("fedavg", "fedavgm", "fedprox"):
        common = dict(
            fraction_train=1.0,  # SeededSampling samples; the Flower strategy addresses all
            fraction_evaluate=1.0 if s.fraction_evaluate > 0 else 0.0,
            min_train_nodes=s.min_train_clients, min_evaluate_nodes=1,
            min_available_nodes=s.min_train_clients, weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=ARRAYS, configrecord_key=CONFIG, **sampling,
        )
        if s.name == "fedavg":
            return SeededFedAvg(**common)
        if s.name == "fedavgm":
            return SeededFedAvgM(**common, server_learning_rate=s.server_lr,
                                 server_momentum=s.server_momentum)
        return SeededFedProx(**common, proximal_mu=s.proximal_mu)
    sparse = dict(
        model_name=cfg.model, input_shape=tuple(input_shape), num_classes=num_classes,
        initial_state=initial_state, server_lr=s.server_lr, server_momentum=s.server_momentum,
        k_proportion=s.k_proportion, eigen_eps=s.eigen_eps, min_train_nodes=s.min_train_clients,
        **sampling,
    )
    if s.name == "fedld":
        return FedLD(**sparse)
    if s.name in ("autoflip", "random", "magnitude"):
        return PrunedStrategy(pruning=cfg.pruning, policy=s.name, aggregation=s.aggregation,
                              **sparse)
    raise ValueError(f"strategy.name: unknown value {s.name!r}")
