"""The interface Bonsai's round loop talks to: Flower's Strategy plus a few hooks.

Flower's :class:`~flwr.serverapp.strategy.Strategy` declares the five calls of a
round (configure/aggregate train and evaluate, summary). Bonsai's round loop
(server/rounds.py) needs a few more, and every Bonsai strategy implements them:
the population the server discovered, an optional phase before round 1
(AutoFLIP's exploration), what a round record shows beside accuracy, the
round's client models for the loss decomposition, checkpointable state, the
kept units of a pruned model, the server's evaluation of each round (a pruning
schedule may wait for it) and AutoFLIP's guidance (the guidance-quality
diagnostic asks for it). The defaults here are no-ops, so a strategy
overrides only what it has, the way FedProx overrides one hook of FedAvg.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["BonsaiStrategy", "ClientState", "PhaseCost"]

#: (node id, the client's full model state after local training)
ClientState = tuple[int, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class PhaseCost:
    """What a phase before round 1 cost (recorded as round 0, counted in every total)."""

    clients: int = 0
    train_flops: int = 0
    bytes_down: int = 0
    bytes_up: int = 0


class BonsaiStrategy(Strategy):
    """A Flower strategy with the hooks of Bonsai's round loop (see the module docstring)."""

    _track_client_states: bool = False

    @abstractmethod
    def set_population(self, population: Sequence[int]) -> None:
        """The federation's node ids in partition-id order (the server's discovery)."""

    def prepare(self, grid: Grid, timeout: float) -> PhaseCost:
        """Run a phase before round 1 (AutoFLIP's exploration); return its cost."""
        return PhaseCost()

    def observe_evaluation(self, server_round: int, loss: float, accuracy: float) -> None:
        """The server's evaluation of the global model after ``server_round`` (0: theta_0):
        a pruning schedule may wait for the loss to fall before it starts (§1.3)."""

    def evaluation_steers_next_round(self) -> bool:
        """Whether :meth:`observe_evaluation` of this round can change how the next one
        is configured. While it can, the round loop evaluates each round before the
        next starts; otherwise it may evaluate beside the next round's training."""
        return False

    def clients_keep_state(self) -> bool:
        """Whether a client's messages rely on what it kept from earlier ones (AutoFLIP's
        masks: a mask is sent only to clients whose copy is stale). In cohort mode such
        clients always go to the same worker, which holds what they keep; otherwise each
        round's clients are shared evenly among the workers (server/cohorts.py)."""
        return False

    def guidance_scores(self) -> Mapping[str, torch.Tensor] | None:
        """AutoFLIP's per-entry guidance G in full-model shapes (what its mask rule ranks
        units by, docs/ALGORITHMS.md §1.2), or None for a strategy without it (the
        guidance-quality diagnostic asks)."""
        return None

    def round_info(self) -> dict[str, Any]:
        """Fields the round record shows beside accuracy (density, FLOPs, ...)."""
        return {}

    def track_client_states(self, enabled: bool) -> None:
        """From now on, keep each round's client models for :meth:`client_states`
        (the loss decomposition needs them; off by default: they cost memory)."""
        self._track_client_states = enabled

    @property
    def tracks_client_states(self) -> bool:
        return self._track_client_states

    def client_states(self) -> list[ClientState]:
        """The last aggregated round's client models, in population order ([] unless
        :meth:`track_client_states` is on)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain values (checkpoints)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def structure_json(self) -> str | None:
        """The kept units of a structurally pruned model (``structure.json``), or None."""
        return None
