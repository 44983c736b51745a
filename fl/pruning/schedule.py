"""How much to prune: the cubic sparsity schedule.

docs/ALGORITHMS.md §1.3 (AutoFLIP, Interno et al., arXiv 2405.10271): the target
sparsities rise along s_t = s_final + (s_init - s_final)(1 - t / T)^3 (Zhu and
Gupta, "To prune, or not to prune", arXiv 1710.01878, 2017) and stay at s_final
after round T. Both the structured and the unstructured ratio follow such a
schedule; when the mask is recomputed is the mask policy's
(strategies.mask_policy.MaskPolicy.due).
"""

from __future__ import annotations

__all__ = ["cubic_sparsity"]


def cubic_sparsity(t: int | float, total: int | float, s_init: float, s_final: float) -> float:
    """Target sparsity at round ``t``: s_final + (s_init - s_final)(1 - t/T)^3, s_final after T.

    Parameters
    ----------
    t:
        Round since the schedule started (0 = start), ``>= 0``.
    total:
        T, the round at which ``s_final`` is reached; ``0`` means ``s_final`` at once.
    s_init, s_final:
        Start and end sparsity, each in [0, 1).
    """
    if t < 0:
        raise ValueError(f"t: must be >= 0, got {t}")
    if total < 0:
        raise ValueError(f"total: must be >= 0, got {total}")
    for arg, s in (("s_init", s_init), ("s_final", s_final)):
        if not 0.0 <= s < 1.0:
            raise ValueError(f"{arg}: must be in [0, 1), got {s}")
    if total == 0 or t >= total:
        return float(s_final)
    return float(s_final + (s_init - s_final) * (1.0 - t / total) ** 3)
