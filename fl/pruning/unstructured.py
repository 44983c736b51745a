"""Unstructured part M_u, the hybrid mask M = M_s * M_u, and the pruning baselines.

AutoFLIP (Interno et al., arXiv 2405.10271) as specified by docs/ALGORITHMS.md §1.2:
over the entries that survive M_s, one GLOBAL threshold tau = the
``unstructured_ratio`` quantile of the guidance G (exact, linear interpolation
as :func:`torch.quantile`, also beyond 2^24 entries, via
:func:`fl.kernels.quantile`); keep G > tau. ``unstructured_ratio == 0`` keeps
every surviving entry (``G > min`` would drop the minimum). Entries equal to
tau are dropped, as the rule says, so heavy ties at tau prune more than the
ratio.

Baselines (docs/ALGORITHMS.md §4), same schedule and sparsity: :func:`random_mask`
(a fresh, seeded random mask keeping exactly the same number of entries) and
:func:`magnitude_mask` (global magnitude: the same quantile rule on |w|).
All masks are ``dict[name -> bool Tensor]`` over the prunable tensors, in
FULL-model shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl.kernels import quantile, threshold_mask
from fl.pruning.groups import UnitGroup
from fl.pruning.structured import structured_mask

__all__ = ["density", "global_threshold_mask", "hybrid_mask", "magnitude_mask", "random_mask"]


def _check_ratio(arg: str, ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{arg}: must be in [0, 1), got {ratio}")


def _allowed(
    scores: Mapping[str, torch.Tensor], allowed: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    out = {}
    for n, s in scores.items():
        a = None if allowed is None else allowed.get(n)
        if a is None:
            out[n] = torch.ones(s.shape, dtype=torch.bool, device=s.device)
        elif tuple(a.shape) != tuple(s.shape) or a.dtype != torch.bool:
            raise ValueError(
                f"allowed: {n!r} must be a bool tensor of shape {tuple(s.shape)}, "
                f"got {a.dtype} {tuple(a.shape)}"
            )
        else:
            out[n] = a.to(s.device)
    return out


def global_threshold_mask(
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    allowed: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep ``score > tau`` with tau the exact ``ratio`` quantile over all allowed entries.

    Parameters
    ----------
    scores:
        name -> score tensor (guidance, or |w| for magnitude pruning).
    ratio:
        Target fraction pruned, in [0, 1). 0 keeps every allowed entry.
    allowed:
        Optional name -> bool tensor (e.g. M_s); disallowed entries are neither
        counted in the quantile nor kept. Missing names are fully allowed.

    Returns
    -------
    dict[str, torch.Tensor]
        name -> bool mask, shapes of ``scores``.
    """
    _check_ratio("ratio", ratio)
    ok = _allowed(scores, allowed)
    if ratio == 0.0:
        return {n: a.clone() for n, a in ok.items()}
    pool = [s.detach().reshape(-1)[ok[n].reshape(-1)].to(torch.float32) for n, s in scores.items()]
    flat = torch.cat(pool) if pool else torch.zeros(0)
    if flat.numel() == 0:
        return {n: a.clone() for n, a in ok.items()}
    tau = quantile(flat, ratio)  # exact, a 0-d float32 tensor
    return {
        n: threshold_mask(s.detach().to(torch.float32).contiguous(), tau) & ok[n]
        for n, s in scores.items()
    }


def hybrid_mask(
    guidance: Mapping[str, torch.Tensor],
    groups: Sequence[UnitGroup],
    structure: Mapping[str, torch.Tensor],
    unstructured_ratio: float,
) -> dict[str, torch.Tensor]:
    """M = M_s * M_u over the prunable tensors (the keys of ``guidance``), full shapes.

    Parameters
    ----------
    guidance:
        name -> G for every prunable tensor (conv and linear weights).
    groups, structure:
        The coupling and the current structure (:func:`fl.pruning.select_units`).
    unstructured_ratio:
        Quantile of G, over entries surviving M_s, below or at which entries are pruned.

    Returns
    -------
    dict[str, torch.Tensor]
        name -> bool mask for each tensor of ``guidance``.
    """
    _check_ratio("unstructured_ratio", unstructured_ratio)
    m_s = structured_mask(groups, structure, guidance, strict=False)
    return global_threshold_mask(guidance, unstructured_ratio, m_s)


def magnitude_mask(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    allowed: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Global magnitude baseline: keep ``|w| > tau``, tau the ``sparsity`` quantile of |w|."""
    return global_threshold_mask(
        {n: w.detach().abs() for n, w in weights.items()}, sparsity, allowed
    )


def random_mask(
    shapes: Mapping[str, torch.Tensor | torch.Size | Sequence[int]],
    keep: int | float,
    seed: int,
    allowed: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Random pruning baseline: a fresh uniformly random mask, seeded.

    Parameters
    ----------
    shapes:
        name -> shape (or a tensor, e.g. the mask it must match in density).
    keep:
        Number of entries kept (int), or density in [0, 1] of the allowed entries
        (float, rounded to the nearest count). Pass ``density(reference)`` or the
        reference mask's kept count to match a mask's density exactly.
    seed:
        Seed of the private generator (e.g. ``hash((run_seed, round))``).
    allowed:
        Optional name -> bool tensor restricting the candidates (e.g. M_s).

    Returns
    -------
    dict[str, torch.Tensor]
        name -> bool mask keeping exactly ``keep`` allowed entries overall.
    """
    dims = {
        n: tuple(s.shape) if isinstance(s, torch.Tensor) else tuple(s) for n, s in shapes.items()
    }
    ok = _allowed({n: torch.empty(d, dtype=torch.bool) for n, d in dims.items()}, allowed)
    flat_ok = torch.cat([a.reshape(-1) for a in ok.values()]) if ok else torch.zeros(0, dtype=bool)
    cand = torch.nonzero(flat_ok).reshape(-1)
    n_cand = cand.numel()
    if isinstance(keep, float):
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep: a density must be in [0, 1], got {keep}")
        k = int(round(keep * n_cand))
    else:
        k = int(keep)
    if not 0 <= k <= n_cand:
        raise ValueError(f"keep: must be in [0, {n_cand}] allowed entries, got {k}")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = cand[torch.randperm(n_cand, generator=gen)[:k]]
    flat = torch.zeros(flat_ok.numel(), dtype=torch.bool)
    flat[chosen] = True
    out, start = {}, 0
    for n, d in dims.items():
        size = int(torch.Size(d).numel())
        out[n] = flat[start : start + size].reshape(d)
        start += size
    return out


def density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of kept entries over all tensors of ``masks`` (1.0 for no entries)."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return kept / total if total else 1.0
