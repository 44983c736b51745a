"""Checks of the hyper-parameters that the masked optimizers (fl/optim/masked.py) and
their cohort versions (fl/optim/cohort.py) share: one error per bad value, naming it."""

from __future__ import annotations

from typing import Any

__all__ = ["check_adamw", "check_sgd"]


def _non_negative(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name}: expected a non-negative float, got {value!r}")


def check_sgd(momentum: Any, nesterov: Any, weight_decay: Any) -> None:
    """SGD: momentum and weight decay >= 0; Nesterov needs momentum."""
    _non_negative("momentum", momentum)
    if nesterov and momentum <= 0:
        raise ValueError("nesterov: requires momentum > 0")
    _non_negative("weight_decay", weight_decay)


def check_adamw(betas: Any, eps: Any, weight_decay: Any) -> tuple[float, float]:
    """AdamW: two betas in [0, 1), eps and weight decay >= 0; the betas as a tuple."""
    if (
        not isinstance(betas, tuple | list)
        or len(betas) != 2
        or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"betas: expected two floats in [0, 1), got {betas!r}")
    _non_negative("eps", eps)
    _non_negative("weight_decay", weight_decay)
    return float(betas[0]), float(betas[1])
