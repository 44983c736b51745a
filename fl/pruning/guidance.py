"""Guidance G: per-entry importance from federated loss-landscape exploration.

AutoFLIP (Interno et al., "Federated Hybrid Model Pruning through Loss Landscape
Exploration", arXiv 2405.10271), as specified by docs/ALGORITHMS.md:

- 1.1 exploration: LS = sum_k n_k D_k / sum_k n_k over the explorers' squared
  deviations D_k = (theta_k - theta_0)^2, then per-tensor min-max scaling to
  G in [0, 1]; a tensor whose spread is constant gets G = 1 everywhere.
- 1.3 adaptive guidance: every round
  G <- beta G + (1 - beta) minmax(sum_k n_k Delta_k^2 / sum_k n_k).

All prunable tensors are packed into ONE flat float32 buffer so that the
accumulation and the per-tensor (segment) normalisation are single kernel
calls (:func:`fl.kernels.sq_dev_accumulate`,
:func:`fl.kernels.segment_minmax_normalize`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fl.kernels import segment_minmax_normalize, sq_dev_accumulate

__all__ = ["GuidanceState", "exploration_guidance", "fold_updates"]


def _weights(num_examples: Sequence[int], n_clients: int) -> list[float]:
    if len(num_examples) != n_clients:
        raise ValueError(f"num_examples: {len(num_examples)} counts for {n_clients} clients")
    if n_clients == 0:
        raise ValueError("num_examples: need at least one client")
    if any(int(n) < 0 for n in num_examples) or sum(int(n) for n in num_examples) <= 0:
        raise ValueError("num_examples: counts must be >= 0 with a positive sum")
    total = float(sum(int(n) for n in num_examples))
    return [int(n) / total for n in num_examples]


def _layout(
    names: Sequence[str], reference: Mapping[str, torch.Tensor], arg: str
) -> tuple[list[torch.Size], torch.Tensor]:
    """Shapes of ``names`` in ``reference`` and the int64 segment offsets (S + 1 boundaries)."""
    shapes = []
    for n in names:
        if n not in reference:
            raise ValueError(f"{arg}: missing tensor {n!r}")
        shapes.append(reference[n].shape)
    sizes = torch.tensor([0] + [s.numel() for s in shapes], dtype=torch.int64)
    return shapes, torch.cumsum(sizes, 0)


def _flat(
    tensors: Mapping[str, torch.Tensor],
    names: Sequence[str],
    shapes: Sequence[torch.Size],
    arg: str,
) -> torch.Tensor:
    parts = []
    for n, s in zip(names, shapes, strict=True):
        if n not in tensors:
            raise ValueError(f"{arg}: missing tensor {n!r}")
        t = tensors[n]
        if t.shape != s:
            raise ValueError(f"{arg}: {n!r} has shape {tuple(t.shape)}, expected {tuple(s)}")
        parts.append(t.detach().reshape(-1).to(torch.float32))
    if parts:
        dev = parts[0].device
        parts = [p.to(dev) for p in parts]
    return torch.cat(parts) if parts else torch.zeros(0)


def _device(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.device:
    return tensors[names[0]].device if names else torch.device("cpu")


def _unflat(
    flat: torch.Tensor, names: Sequence[str], shapes: Sequence[torch.Size], offsets: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {
        n: flat[int(offsets[i]) : int(offsets[i + 1])].reshape(s).clone()
        for i, (n, s) in enumerate(zip(names, shapes, strict=True))
    }


def exploration_guidance(
    deviations: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    prunable: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Initial guidance from the explorers' squared deviations (docs/ALGORITHMS.md §1.1).

    Parameters
    ----------
    deviations:
        One dict per explorer: tensor name -> D_k = (theta_k - theta_0)^2 (full shapes).
    num_examples:
        n_k of each explorer, same order.
    prunable:
        Names of the tensors to build guidance for (e.g.
        :func:`fl.pruning.groups.prunable_names`).

    Returns
    -------
    dict[str, torch.Tensor]
        name -> float32 G in [0, 1], min-max scaled per tensor (constant tensor: all 1).
    """
    if not deviations:
        raise ValueError("deviations: need at least one explorer")
    weights = _weights(num_examples, len(deviations))
    names = list(prunable)
    shapes, offsets = _layout(names, deviations[0], "deviations")
    device = _device(deviations[0], names)
    acc = torch.zeros(int(offsets[-1]), dtype=torch.float32, device=device)
    for d, w in zip(deviations, weights, strict=True):
        acc.add_(_flat(d, names, shapes, "deviations").to(device), alpha=w)
    return _unflat(segment_minmax_normalize(acc, offsets.to(device)), names, shapes, offsets)


def fold_updates(
    guidance: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    decay: float,
) -> dict[str, torch.Tensor]:
    """Fold one round of client updates into the guidance (docs/ALGORITHMS.md §1.3).

    ``G <- decay * G + (1 - decay) * minmax(sum_k n_k Delta_k^2 / sum_k n_k)``,
    min-max per tensor (constant -> 1). Only the tensors in ``guidance`` are
    updated; ``updates`` are in full-model shapes (expand client updates first).

    Returns
    -------
    dict[str, torch.Tensor]
        The new guidance (the input is not modified).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay: must be in [0, 1], got {decay}")
    if not updates:
        raise ValueError("updates: need at least one client update")
    weights = _weights(num_examples, len(updates))
    names = list(guidance)
    shapes, offsets = _layout(names, guidance, "guidance")
    device = _device(guidance, names)
    acc = torch.zeros(int(offsets[-1]), dtype=torch.float32, device=device)
    zero = torch.zeros_like(acc)
    for u, w in zip(updates, weights, strict=True):
        sq_dev_accumulate(acc, _flat(u, names, shapes, "updates").to(device), zero, w)
    fresh = segment_minmax_normalize(acc, offsets.to(device))
    old = _flat(guidance, names, shapes, "guidance").to(device)
    return _unflat(old.mul_(decay).add_(fresh, alpha=1.0 - decay), names, shapes, offsets)


@dataclass
class GuidanceState:
    """The server's guidance G, one serialisable object (what checkpoints save).

    Attributes
    ----------
    guidance:
        name -> G tensor (full-model shapes, float32, values in [0, 1]).
    folds:
        Number of rounds folded in since exploration.
    """

    guidance: dict[str, torch.Tensor] = field(default_factory=dict)
    folds: int = 0

    @classmethod
    def from_exploration(
        cls,
        deviations: Sequence[Mapping[str, torch.Tensor]],
        num_examples: Sequence[int],
        prunable: Sequence[str],
    ) -> GuidanceState:
        """State holding :func:`exploration_guidance`."""
        return cls(exploration_guidance(deviations, num_examples, prunable), 0)

    def fold(
        self,
        updates: Sequence[Mapping[str, torch.Tensor]],
        num_examples: Sequence[int],
        decay: float,
    ) -> None:
        """Apply :func:`fold_updates` in place."""
        self.guidance = fold_updates(self.guidance, updates, num_examples, decay)
        self.folds += 1

    def state_dict(self) -> dict[str, object]:
        """``{"guidance": {name: tensor}, "folds": int}`` (tensors cloned)."""
        return {
            "guidance": {k: v.detach().clone() for k, v in self.guidance.items()},
            "folds": self.folds,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore from :meth:`state_dict`; raises ValueError naming ``state`` if malformed."""
        g = state.get("guidance") if isinstance(state, Mapping) else None
        folds = state.get("folds", 0) if isinstance(state, Mapping) else None
        if not isinstance(g, Mapping) or not all(isinstance(v, torch.Tensor) for v in g.values()):
            raise ValueError("state: expected {'guidance': {name: Tensor}, 'folds': int}")
        if not isinstance(folds, int) or folds < 0:
            raise ValueError("state: 'folds' must be a non-negative int")
        self.guidance = {str(k): v.detach().clone().to(torch.float32) for k, v in g.items()}
        self.folds = folds
