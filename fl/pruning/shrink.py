"""Physical shrinking: the smaller model the clients train, and state maps between views.

docs/ALGORITHMS.md §1.2 (AutoFLIP, Interno et al., arXiv 2405.10271): structurally
removed units are removed physically, so the clients' model has fewer channels
and neurons, which is where the computation saving comes from. The server keeps
the full-model view; :func:`shrink_state` and :func:`expand_state` move state
dicts (and boolean masks) between the two views. Both are pure index maps, so
shrink -> expand is exact on kept entries and puts zeros (``False`` for masks)
at removed units.

The small model is built with torch-pruning (the same dependency graph, with
the same LSTM and GroupNorm rules, that defined the groups; see
:mod:`fl.pruning.tracing` and :mod:`fl.pruning.groups`), so its layer shapes and
state-dict names match :func:`shrink_state` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fl.models import build_model
from fl.pruning.groups import UnitGroup, groups_for
from fl.pruning.structured import validate_structure
from fl.pruning.tracing import dependency_graph

__all__ = ["expand_state", "shrink_model", "shrink_state"]


def _member_dims(groups: Sequence[UnitGroup], structure: Mapping[str, torch.Tensor]):
    """tensor name -> list of (dim, kept positions, full size)."""
    dims: dict[str, list[tuple[int, torch.Tensor, int]]] = {}
    for g in groups:
        kept = structure[g.name]
        for m in g.members:
            dims.setdefault(m.param, []).append((m.dim, m.positions(kept), m.size(g.n_units)))
    return dims


def shrink_model(
    model_name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    structure: Mapping[str, torch.Tensor],
    seed: int | None = None,
) -> nn.Module:
    """Build registry model ``model_name`` and physically remove the units not kept.

    Parameters
    ----------
    model_name, input_shape, num_classes, seed:
        As for :func:`fl.models.build_model`.
    structure:
        Group name -> kept unit indices (full-model index space); groups absent
        from it keep all units.

    Returns
    -------
    nn.Module
        The smaller model; its parameters are the kept slices of the seeded full
        model (load :func:`shrink_state` of the global state to train it).
    """
    model = build_model(model_name, input_shape, num_classes, seed=seed)
    groups = groups_for(model_name, input_shape, num_classes)
    structure = validate_structure(structure, groups)
    dg = dependency_graph(model, input_shape)
    modules = dict(model.named_modules())
    for g in groups:
        kept = set(structure[g.name].tolist())
        removed = [u for u in range(g.n_units) if u not in kept]
        if not removed:
            continue
        root = modules[g.name]
        # the root's output channels of the removed units (a unit is `block` channels)
        channels = [u * g.block + j for u in removed for j in range(g.block)]
        fn = dg.get_pruner_of_module(root).prune_out_channels
        dg.get_pruning_group(root, fn, idxs=channels).prune()
    model.train()
    return model


def shrink_state(
    full_state: Mapping[str, torch.Tensor],
    groups: Sequence[UnitGroup],
    structure: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Select the kept units of every group member from a full-model state (or mask) dict.

    Tensors that belong to no group are copied unchanged (cloned). Works for
    boolean masks as well as parameters and buffers.

    Raises
    ------
    ValueError
        Naming ``full_state`` when a member tensor has a non-full shape.
    """
    structure = validate_structure(structure, groups)
    dims = _member_dims(groups, structure)
    out: dict[str, torch.Tensor] = {}
    for name, t in full_state.items():
        cur = t
        for dim, pos, full in dims.get(name, []):
            if cur.shape[dim] != full:
                raise ValueError(
                    f"full_state: {name!r} dim {dim} has size {cur.shape[dim]}, expected {full}"
                )
            cur = cur.index_select(dim, pos.to(cur.device))
        out[name] = cur if cur is not t else t.clone()
    return out


def expand_state(
    small_state: Mapping[str, torch.Tensor],
    groups: Sequence[UnitGroup],
    structure: Mapping[str, torch.Tensor],
    full_template: Mapping[str, torch.Tensor | torch.Size | Sequence[int]],
) -> dict[str, torch.Tensor]:
    """Scatter a small-model state (or mask) dict back into full-model shapes.

    Removed units get zeros (``False`` for boolean masks); dtypes follow
    ``small_state``, shapes follow ``full_template`` (a full state dict or a
    dict of shapes).

    Raises
    ------
    ValueError
        Naming ``small_state`` when a tensor's shape does not match the structure.
    """
    structure = validate_structure(structure, groups)
    dims = _member_dims(groups, structure)
    out: dict[str, torch.Tensor] = {}
    for name, t in small_state.items():
        if name not in dims:
            out[name] = t.clone()
            continue
        if name not in full_template:
            raise ValueError(f"full_template: missing tensor {name!r}")
        tmpl = full_template[name]
        full_shape = tuple(tmpl.shape) if isinstance(tmpl, torch.Tensor) else tuple(tmpl)
        cur = t
        for dim, pos, full in dims[name]:
            if cur.shape[dim] != pos.numel():
                raise ValueError(
                    f"small_state: {name!r} dim {dim} has size {cur.shape[dim]}, the structure "
                    f"keeps {pos.numel()}"
                )
            shape = list(cur.shape)
            shape[dim] = full
            cur = torch.zeros(shape, dtype=t.dtype, device=t.device).index_copy_(
                dim, pos.to(t.device), cur
            )
        if tuple(cur.shape) != full_shape:
            raise ValueError(
                f"small_state: {name!r} expands to {tuple(cur.shape)}, template has {full_shape}"
            )
        out[name] = cur
    return out
