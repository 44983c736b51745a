"""Flower Message-API strategies: the FedAvg-family baselines (AutoFLIP and FedLD
plug in here). :func:`build_strategy` turns an experiment config into one."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fl.config import ExperimentConfig
from fl.contract import ARRAYS, CONFIG, NUM_EXAMPLES
from strategies.baselines import SeededFedAvg, SeededFedAvgM, SeededFedProx
from strategies.seeded import SeededSampling

__all__ = ["SeededFedAvg", "SeededFedAvgM", "SeededFedProx", "SeededSampling",
           "build_strategy"]


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The strategy named by ``strategy.name``, configured from ``cfg``."""
    s = cfg.strategy
    common = dict(
        fraction_train=1.0,  # SeededSampling samples; the Flower strategy addresses all
        fraction_evaluate=1.0 if s.fraction_evaluate > 0 else 0.0,
        min_train_nodes=s.min_train_clients,
        min_evaluate_nodes=1,
        min_available_nodes=s.min_train_clients,
        weighted_by_key=NUM_EXAMPLES,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
        seed=cfg.seed,
        sample_fraction=s.fraction_train,
        evaluate_fraction=s.fraction_evaluate,
    )
    if s.name == "fedavg":
        return SeededFedAvg(**common)
    if s.name == "fedavgm":
        return SeededFedAvgM(**common, server_learning_rate=s.server_lr,
                             server_momentum=s.server_momentum)
    if s.name == "fedprox":
        return SeededFedProx(**common, proximal_mu=s.proximal_mu)
    raise ValueError(f"strategy.name: unknown value {s.name!r}")
