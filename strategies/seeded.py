"""Seeded, order-stable client sampling for Flower's FedAvg-family strategies.

Flower's strategies sample with the unseeded ``random`` module, and replies
arrive in completion order, which changes floating-point sums. This mixin
samples with :func:`fl.sampling.sample_clients` over a population that the
server ordered by partition id, and aggregates replies in that order, so the
same seed gives the same clients and bit-identical aggregates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fl.sampling import sample_clients
from strategies.base import BonsaiStrategy, ClientState

_TRAIN_SALT, _EVAL_SALT = 0, 1


class Population(BonsaiStrategy):
    """The federation's nodes in partition-id order, and seeded sampling over them."""

    min_train_nodes: int

    def __init__(self, *args: Any, seed: int = 0, sample_fraction: float = 1.0,
                 evaluate_fraction: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.sample_fraction = sample_fraction
        self.evaluate_fraction = evaluate_fraction
        self.population: list[int] = []
        self._rank: dict[int, int] = {}
        self._client_states: list[ClientState] = []

    def set_population(self, population: Sequence[int]) -> None:
        """Node ids ordered by partition id (from the server's discovery query)."""
        self.population = list(population)
        self._rank = {nid: i for i, nid in enumerate(self.population)}

    def sample(self, server_round: int, salt: int = _TRAIN_SALT) -> list[int]:
        """The nodes of this round: a function of (seed, round, salt) only."""
        frac = self.sample_fraction if salt == _TRAIN_SALT else self.evaluate_fraction
        min_nodes = self.min_train_nodes if salt == _TRAIN_SALT else 1
        return sample_clients(self.population, frac, min_nodes, self.seed, server_round, salt)

    def order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies sorted by the population order (deterministic aggregation)."""
        return sorted(replies, key=lambda m: self._rank.get(m.metadata.src_node_id, 1 << 62))

    def client_states(self) -> list[ClientState]:
        return list(self._client_states)


class SeededSampling(Population):
    """Mix in before a Flower strategy: ``class S(SeededSampling, FedAvg)``.

    The wrapped strategy must be built with ``fraction_train=1.0`` (and
    ``fraction_evaluate`` 1.0 or 0.0): it then addresses every node and this
    mixin keeps the sampled ones.
    """

    arrayrecord_key: str  #: set by the wrapped Flower strategy

    #: server-side state of Flower's strategies that a resumed run needs (FedAvgM)
    _STATE = ("current_arrays", "momentum_vector")

    def state_dict(self) -> dict[str, Any]:
        """FedAvgM's last global arrays and momentum (nothing for FedAvg/FedProx), as plain
        containers of tensors (what fl.checkpoint saves and loads with weights_only=True):
        the ArrayRecord as ``{"arrayrecord": {name: tensor}}``, the numpy momentum list
        as ``{"ndarrays": [tensor, ...]}``."""
        out: dict[str, Any] = {}
        for name in self._STATE:
            value = getattr(self, name, None)
            if isinstance(value, ArrayRecord):
                value = {"arrayrecord": dict(value.to_torch_state_dict())}
            elif isinstance(value, list | tuple) and all(isinstance(a, np.ndarray)
                                                         for a in value):
                value = {"ndarrays": [torch.from_numpy(np.array(a)) for a in value]}
            out[name] = value
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        for name, value in state.items():
            if name in self._STATE and hasattr(self, name):
                if isinstance(value, dict) and "arrayrecord" in value:
                    value = ArrayRecord(dict(value["arrayrecord"]))
                elif isinstance(value, dict) and "ndarrays" in value:
                    value = [t.numpy() for t in value["ndarrays"]]
                setattr(self, name, value)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        chosen = set(self.sample(server_round))
        msgs = super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        return [m for m in msgs if m.metadata.dst_node_id in chosen]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = self.order(replies)
        if self.tracks_client_states:  # the replies are the client models themselves
            self._client_states = [
                (r.metadata.src_node_id, r.content[self.arrayrecord_key].to_torch_state_dict())
                for r in ordered if not r.has_error() and self.arrayrecord_key in r.content]
        return super().aggregate_train(server_round, ordered)  # type: ignore[misc]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.evaluate_fraction <= 0.0:
            return []
        chosen = set(self.sample(server_round, _EVAL_SALT))
        msgs = super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]
        return [m for m in msgs if m.metadata.dst_node_id in chosen]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, self.order(replies))  # type: ignore[misc]
