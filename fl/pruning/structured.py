"""Structured part M_s of the AutoFLIP hybrid mask: which units of each group survive.

Interno et al., "Federated Hybrid Model Pruning through Loss Landscape
Exploration", arXiv 2405.10271; the rule implemented is docs/ALGORITHMS.md §1.2:
a unit's score is the mean guidance over its fan-in weights; coupled units are
scored together (here: the mean over the group's producer layers of each
producer's fan-in mean); in every group the lowest ``structured_ratio``
fraction of the *full* unit count is removed, never leaving fewer than
``min_units``. Removal is permanent (docs/ALGORITHMS.md §1.3): only units kept by the
previous structure are candidates. Deviation from the paper: the paper's public
code has no structured part; this one follows docs/ALGORITHMS.md.

A :data:`Structure` maps group name -> sorted int64 tensor of kept unit indices
in the FULL model's index space; it travels to clients as JSON via
:func:`structure_to_json` / :func:`structure_from_json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch

from fl.pruning.groups import UnitGroup

__all__ = [
    "Structure",
    "full_structure",
    "select_units",
    "structure_from_json",
    "structure_to_json",
    "structured_mask",
    "unit_scores",
    "validate_structure",
    "zero_units",
]

Structure = dict[str, torch.Tensor]


def full_structure(groups: Sequence[UnitGroup]) -> Structure:
    """The structure that keeps every unit of every group."""
    return {g.name: torch.arange(g.n_units, dtype=torch.int64) for g in groups}


def validate_structure(
    structure: Mapping[str, torch.Tensor], groups: Sequence[UnitGroup]
) -> Structure:
    """Check ``structure`` against ``groups``; missing groups keep all their units.

    Raises
    ------
    ValueError
        Naming ``structure`` when a group is unknown, or its indices are not
        sorted, unique, in range and non-empty.
    """
    by_name = {g.name: g for g in groups}
    unknown = sorted(set(structure) - set(by_name))
    if unknown:
        raise ValueError(f"structure: unknown groups {unknown}; known: {sorted(by_name)}")
    out: Structure = {}
    for g in groups:
        if g.name not in structure:
            out[g.name] = torch.arange(g.n_units, dtype=torch.int64)
            continue
        kept = torch.as_tensor(structure[g.name]).to(torch.int64).reshape(-1)
        if kept.numel() == 0:
            raise ValueError(f"structure: group {g.name!r} keeps no unit")
        if int(kept.min()) < 0 or int(kept.max()) >= g.n_units:
            raise ValueError(f"structure: group {g.name!r} has indices outside [0, {g.n_units})")
        if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
            raise ValueError(f"structure: group {g.name!r} indices must be sorted and unique")
        out[g.name] = kept
    return out


def zero_units(
    groups: Sequence[UnitGroup], state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Group name -> bool ``(n_units,)``: True where every slice the unit indexes (all
    its members: weights, biases, norm parameters and buffers, the consumers' input
    columns) is exactly zero in the full-model ``state``.

    A model served under a structure has exactly its removed units zero
    (:func:`structured_mask` applied), so this reads the structure back from the
    weights alone; ``bonsai export`` checks structure.json against it.

    Raises
    ------
    ValueError
        Naming ``state`` when a member tensor is missing or not in full-model shape.
    """
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        nonzero = torch.zeros(g.n_units, dtype=torch.bool)
        for m in g.members:
            if m.param not in state:
                raise ValueError(f"state: missing tensor {m.param!r} of group {g.name!r}")
            t = state[m.param]
            if t.dim() <= m.dim or t.shape[m.dim] != g.n_units * m.width:
                raise ValueError(f"state: {m.param!r} has shape {tuple(t.shape)}; dim {m.dim} "
                                 f"must be {g.n_units * m.width} (full-model shape)")
            per_position = (t != 0).movedim(m.dim, 0).reshape(t.shape[m.dim], -1).any(dim=1)
            nonzero |= per_position.reshape(g.n_units, m.width).any(dim=1)
        out[g.name] = ~nonzero
    return out


def structure_to_json(structure: Mapping[str, torch.Tensor]) -> str:
    """Serialise a structure to a JSON object of plain integer lists."""
    return json.dumps({k: [int(i) for i in v.tolist()] for k, v in sorted(structure.items())})


def structure_from_json(text: str | Mapping[str, Sequence[int]]) -> Structure:
    """Inverse of :func:`structure_to_json` (also accepts the already-parsed dict)."""
    obj = json.loads(text) if isinstance(text, str) else text
    if not isinstance(obj, Mapping):
        raise ValueError("structure: expected a JSON object of group name -> list of ints")
    out: Structure = {}
    for k, v in obj.items():
        if not isinstance(v, Sequence) or not all(isinstance(i, int) for i in v):
            raise ValueError(f"structure: group {k!r} must be a list of ints")
        out[str(k)] = torch.tensor(list(v), dtype=torch.int64)
    return out


def unit_scores(group: UnitGroup, guidance: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Score of every unit of ``group``: mean over producers of the mean fan-in guidance.

    A unit's fan-in rows are its positions along dim 0 of each producer weight
    (one row per channel of a GroupNorm group, one row per gate of an LSTM unit).

    Returns
    -------
    torch.Tensor
        float64 tensor of shape ``(group.n_units,)``.
    """
    total = torch.zeros(group.n_units, dtype=torch.float64)
    for p in group.producers:
        if p not in guidance:
            raise ValueError(f"guidance: missing tensor {p!r} (producer of group {group.name!r})")
        g = guidance[p]
        m = group.member(p, 0)
        rows = m.size(group.n_units)
        if g.shape[0] != rows:
            raise ValueError(
                f"guidance: {p!r} has {g.shape[0]} rows, group {group.name!r} has "
                f"{group.n_units} units over {rows} rows (guidance must be in full-model shapes)"
            )
        # rows are laid out (gate, unit, width): average each unit's rows in every gate
        per_unit = g.detach().to("cpu", torch.float64).reshape(m.gates, group.n_units, -1)
        total += per_unit.mean(dim=(0, 2))
    return total / len(group.producers)


def _n_keep(n_units: int, ratio: float, min_units: int) -> int:
    # 1e-9 guards products like 0.3 * 10 = 2.9999999999999996.
    n_remove = math.floor(ratio * n_units + 1e-9)
    return min(n_units, max(min_units, n_units - n_remove))


def select_units(
    guidance: Mapping[str, torch.Tensor],
    groups: Sequence[UnitGroup],
    structured_ratio: float,
    min_units: int = 1,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> Structure:
    """Compute the new structure M_s from the guidance (docs/ALGORITHMS.md §1.2, 1.3).

    Parameters
    ----------
    guidance:
        Per-tensor guidance G in full-model shapes (at least the producers' weights).
    groups:
        From :func:`fl.pruning.groups.build_groups`.
    structured_ratio:
        Fraction in [0, 1) of each group's FULL unit count to be removed
        (cumulative target, e.g. from the cubic schedule).
    min_units:
        Never keep fewer units than this in a group (default 1, at least 1).
    previous:
        The previous structure; its removed units stay removed. ``None`` means
        everything is still present.

    Returns
    -------
    Structure
        Group name -> sorted kept unit indices (full-model index space). Ties in
        score keep the lower index.
    """
    if not 0.0 <= structured_ratio < 1.0:
        raise ValueError(f"structured_ratio: must be in [0, 1), got {structured_ratio}")
    if min_units < 1:
        raise ValueError(f"min_units: must be >= 1, got {min_units}")
    prev = validate_structure(previous or {}, groups)
    out: Structure = {}
    for g in groups:
        alive = prev[g.name]
        n_keep = min(alive.numel(), _n_keep(g.n_units, structured_ratio, min_units))
        scores = unit_scores(g, guidance)[alive]
        order = torch.argsort(-scores, stable=True)  # best first, lower index wins ties
        out[g.name] = torch.sort(alive[order[:n_keep]]).values
    return out


def structured_mask(
    groups: Sequence[UnitGroup],
    structure: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size | Sequence[int] | torch.Tensor],
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """Boolean M_s for every tensor a group touches, in full-model shapes.

    ``shapes`` maps tensor names to shapes (or tensors, e.g. a full state dict).
    Covers weights, biases and normalisation parameters/buffers, so applying it
    to the full state zeroes exactly what :func:`fl.pruning.shrink.shrink_state`
    drops. Tensors in no group are absent from the result.
    """
    structure = validate_structure(structure, groups)
    masks: dict[str, torch.Tensor] = {}
    for g in groups:
        removed = torch.ones(g.n_units, dtype=torch.bool)
        removed[structure[g.name]] = False
        gone = torch.nonzero(removed).reshape(-1)
        for m in g.members:
            if m.param not in shapes:
                if not strict:
                    continue
                raise ValueError(f"shapes: missing tensor {m.param!r} of group {g.name!r}")
            s = shapes[m.param]
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else tuple(s)
            if shape[m.dim] != m.size(g.n_units):
                raise ValueError(
                    f"shapes: {m.param!r} dim {m.dim} has size {shape[m.dim]}, expected "
                    f"{m.size(g.n_units)} (full-model shape)"
                )
            mask = masks.setdefault(m.param, torch.ones(shape, dtype=torch.bool))
            mask.index_fill_(m.dim, m.positions(gone), False)
    return masks
