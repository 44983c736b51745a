"""Mask policies: what decides which units and weights go.

A policy wraps any aggregation rule the way Flower's DP wrappers wrap a
strategy: the strategy aggregates, the policy scores entries and the shared
rule (fl.pruning.plan_masks, cubic schedule) turns scores into masks.

- AutoFLIP (Interno et al., arXiv 2405.10271; docs/ALGORITHMS.md 1): scores are the
  loss-exploration guidance G, folded with the squared client updates every round.
- Magnitude: global magnitude pruning, scores |w|.
- Random: uniform random scores drawn once per run (seeded), so that the
  masks of the rising schedule are nested, as the other policies' are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fl.config import PruningConfig
from fl.pruning import GuidanceState, cubic_sparsity
from fl.sampling import round_seed


class MaskPolicy:
    """Base policy: the schedule and when it starts; subclasses give the scores.

    The first mask comes before round S (docs/ALGORITHMS.md §1.3): S = 1 by default;
    ``pruning.warmup_rounds`` W puts it at W + 1; with ``pruning.start_when=improved``
    it waits further, until the server's test loss has fallen ``pruning.patience``
    rounds in a row (told by :meth:`observe_evaluation`), and comes before the next
    round. The cubic schedule then runs from S: the final targets are reached
    ``schedule_rounds`` rounds after it.
    """

    name = "base"

    def __init__(self, cfg: PruningConfig, prunable: Sequence[str], seed: int = 0):
        self.cfg = cfg
        self.prunable = list(prunable)
        self.seed = seed
        #: the round before which the first mask comes (None: not decided yet)
        self.start_round: int | None = (cfg.warmup_rounds + 1 if cfg.start_when == "warmup"
                                        else None)
        self._streak = 0  # rounds in a row whose test loss fell (start_when=improved)
        self._last_loss: float | None = None

    def observe_evaluation(self, server_round: int, loss: float, accuracy: float) -> None:
        """The global model's test loss and accuracy after ``server_round`` (0: theta_0).

        Under ``start_when=improved`` this decides the start: the first round after
        the warm-up that ends a run of ``patience`` falls of the loss puts the first
        mask before the next round.
        """
        if self.start_round is not None:
            return
        fell = self._last_loss is not None and loss < self._last_loss
        self._streak = self._streak + 1 if fell else 0
        self._last_loss = loss
        if server_round >= self.cfg.warmup_rounds and self._streak >= self.cfg.patience:
            self.start_round = server_round + 1

    def due(self, server_round: int) -> bool:
        """Recompute the mask before rounds S, S + N, S + 2N, ... (N = mask_every)."""
        return (self.start_round is not None and server_round >= self.start_round
                and (server_round - self.start_round) % self.cfg.mask_every == 0)

    def targets(self, server_round: int) -> tuple[float, float]:
        """(structured, unstructured) ratios before ``server_round``: the cubic schedule
        s_t = s_f + (s_i - s_f)(1 - t/T)^3 with t = rounds since the start S,
        s_i = schedule_start * s_f."""
        t = max(0, server_round - (self.start_round or server_round))
        T = self.cfg.schedule_rounds
        start = self.cfg.schedule_start
        s = self.cfg.structured_ratio
        u = self.cfg.unstructured_ratio
        return cubic_sparsity(t, T, start * s, s), cubic_sparsity(t, T, start * u, u)

    def scores(self, theta: Mapping[str, torch.Tensor], server_round: int
               ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def guidance_scores(self) -> dict[str, torch.Tensor] | None:
        """AutoFLIP's per-entry guidance G (what its mask rule ranks units by), or None
        for a policy without it (the guidance-quality diagnostic asks)."""
        return None

    def observe(self, updates: Sequence[Mapping[str, torch.Tensor]],
                num_examples: Sequence[int]) -> None:
        """Fold a round's (full-shape) client updates in; no-op by default."""

    def state_dict(self) -> dict[str, Any]:
        """The schedule's start and the loss streak (checkpoints); subclasses add theirs."""
        return {"start_round": self.start_round, "streak": self._streak,
                "last_loss": self._last_loss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "start_round" in state:  # checkpoints from before the adaptive start have none
            self.start_round = state["start_round"]
            self._streak = int(state["streak"])
            self._last_loss = state["last_loss"]


class AutoFLIPPolicy(MaskPolicy):
    """Guidance from federated loss exploration, refreshed from client updates."""

    name = "autoflip"

    def __init__(self, cfg: PruningConfig, prunable: Sequence[str], seed: int = 0):
        super().__init__(cfg, prunable, seed)
        self.guidance: GuidanceState | None = None

    def start(self, deviations: Sequence[Mapping[str, torch.Tensor]],
              num_examples: Sequence[int]) -> None:
        """Guidance from the explorers' squared deviations (docs/ALGORITHMS.md 1.1)."""
        self.guidance = GuidanceState.from_exploration(list(deviations), list(num_examples),
                                                       self.prunable)

    def scores(self, theta: Mapping[str, torch.Tensor], server_round: int
               ) -> dict[str, torch.Tensor]:
        if self.guidance is None:
            raise RuntimeError("AutoFLIP: the mask was requested before exploration ran")
        return {n: self.guidance.guidance[n] for n in self.prunable}

    def guidance_scores(self) -> dict[str, torch.Tensor] | None:
        return None if self.guidance is None else {n: self.guidance.guidance[n]
                                                   for n in self.prunable}

    def observe(self, updates: Sequence[Mapping[str, torch.Tensor]],
                num_examples: Sequence[int]) -> None:
        if self.guidance is not None and updates:
            self.guidance.fold([{n: u[n] for n in self.prunable} for u in updates],
                               list(num_examples), self.cfg.guidance_decay)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "guidance": None if self.guidance is None else self.guidance.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("guidance") is not None:
            self.guidance = GuidanceState({}, 0)
            self.guidance.load_state_dict(state["guidance"])


class MagnitudePolicy(MaskPolicy):
    """Global magnitude pruning on the same schedule: scores |w|."""

    name = "magnitude"

    def scores(self, theta: Mapping[str, torch.Tensor], server_round: int
               ) -> dict[str, torch.Tensor]:
        return {n: theta[n].detach().abs().float() for n in self.prunable}


class RandomPolicy(MaskPolicy):
    """Random pruning at the same sparsity and schedule.

    The random scores are drawn once per run (seeded) and reused: each
    recomputation removes further random units and weights and keeps the
    earlier choices, as a pruning schedule should. (Fresh scores at every
    recomputation would swap trained weights for zeros every few rounds: measured
    on digits it left the model at chance accuracy, a straw man, not a baseline.)
    """

    name = "random"

    def scores(self, theta: Mapping[str, torch.Tensor], server_round: int
               ) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(round_seed(self.seed, 0, salt=77))
        return {n: torch.rand(theta[n].shape, generator=gen) for n in self.prunable}


POLICIES: dict[str, type[MaskPolicy]] = {
    "autoflip": AutoFLIPPolicy, "magnitude": MagnitudePolicy, "random": RandomPolicy,
}
