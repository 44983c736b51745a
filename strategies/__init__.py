"""Flower Message-API strategies.

- FedAvg, FedAvgM, FedProx: Flower's own, with seeded sampling (baselines.py).
- FedLD (fedld.py), AutoFLIP (autoflip.py) and the random/magnitude pruning
  baselines (pruned.py): server-side model and Bonsai's sparse wire format
  (sparse.py), mask policies (mask_policy.py).
- base.py: the interface the round loop calls (BonsaiStrategy).

:func:`build_strategy` turns an experiment config into one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fl.config import ExperimentConfig, proximal_mu
from fl.contract import ARRAYS, CONFIG, NUM_EXAMPLES
from strategies.autoflip import AutoFLIP
from strategies.base import BonsaiStrategy, ClientState, PhaseCost
from strategies.baselines import SeededFedAvg, SeededFedAvgM, SeededFedProx
from strategies.fedld import FedLD
from strategies.pruned import PrunedStrategy
from strategies.seeded import Population, SeededSampling
from strategies.sparse import ModelSpec, ServerRule, SparseStrategy

__all__ = ["AutoFLIP", "BonsaiStrategy", "ClientState", "FedLD", "ModelSpec", "PhaseCost",
           "Population", "PrunedStrategy", "SeededFedAvg", "SeededFedAvgM", "SeededFedProx",
           "SeededSampling", "ServerRule", "SparseStrategy", "build_strategy"]


def build_strategy(
    cfg: ExperimentConfig, initial_state: Mapping[str, torch.Tensor],
    input_shape: tuple[int, ...], num_classes: int,
) -> BonsaiStrategy:
    """The strategy named by ``strategy.name``, configured from ``cfg``."""
    s = cfg.strategy
    sampling = dict(seed=cfg.seed, sample_fraction=s.fraction_train,
                    evaluate_fraction=s.fraction_evaluate)
    mu = proximal_mu(cfg)  # FedProx's term, composed with any strategy (ALGORITHMS.md §3)
    if s.name in ("fedavg", "fedavgm", "fedprox"):
        common = dict(
            fraction_train=1.0,  # SeededSampling samples; the Flower strategy addresses all
            fraction_evaluate=1.0 if s.fraction_evaluate > 0 else 0.0,
            min_train_nodes=s.min_train_clients, min_evaluate_nodes=1,
            min_available_nodes=s.min_train_clients, weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=ARRAYS, configrecord_key=CONFIG, **sampling,
        )
        if s.name == "fedavgm":
            return SeededFedAvgM(**common, server_learning_rate=s.server_lr,
                                 server_momentum=s.server_momentum, proximal_mu=mu)
        if s.name == "fedprox" or mu > 0.0:  # fedavg with strategy.prox is FedProx
            return SeededFedProx(**common, proximal_mu=mu)
        return SeededFedAvg(**common)
    model = ModelSpec(cfg.model, tuple(input_shape), num_classes)
    rule = ServerRule(aggregation=s.aggregation, server_lr=s.server_lr,
                      server_momentum=s.server_momentum, k_proportion=s.k_proportion,
                      eigen_eps=s.eigen_eps, proximal_mu=mu)
    common = dict(model=model, initial_state=initial_state, rule=rule,
                  min_train_nodes=s.min_train_clients, **sampling)
    if s.name == "fedld":
        return FedLD(**common)
    if s.name == "autoflip":
        return AutoFLIP(pruning=cfg.pruning, **common)
    if s.name in ("random", "magnitude"):
        return PrunedStrategy(pruning=cfg.pruning, policy=s.name, **common)
    raise ValueError(f"strategy.name: unknown value {s.name!r}")
