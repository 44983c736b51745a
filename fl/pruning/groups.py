"""Coupled unit groups of a model: which tensor dimensions index the same structural unit.

AutoFLIP (Interno et al., "Federated Hybrid Model Pruning through Loss Landscape
Exploration", arXiv 2405.10271) removes whole units (convolution filters, linear
neurons). ALGORITHMS.md 1.2: units whose outputs are tied together (a residual
addition, a normalisation layer after a convolution, the next layer's matching
input channels) form one group and are scored and removed together.

Why torch-pruning's ``DependencyGraph``: the coupling is a property of the traced
computation, not of the module tree. A residual addition ties the output
channels of the stem, of ``layer1.conv2`` and of everything reading the stream;
a flatten ties one conv channel to ``h*w`` consecutive input columns of the next
linear layer. Re-deriving this by hand per architecture is error-prone and would
silently break for a new model; torch-pruning traces the forward pass once and
already implements the index propagation (including the flatten stride). It is
also the tool :mod:`fl.pruning.shrink` uses to remove units physically, so the
groups we score are by construction the groups that get removed. We read its
groups once and turn them into plain, serialisable :class:`UnitGroup` records
(parameter name, dimension, block width), so the rest of the package works on
state dicts and never touches the graph.

Prunable tensors are the weights of convolution and linear layers. The final
classifier (the last ``nn.Linear`` registered in the model) keeps all of its
output units, so its output group is not a :class:`UnitGroup`; its input columns
still belong to the group of the layer feeding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch_pruning as tp
from torch import nn

from fl.models import build_model

__all__ = [
    "Member",
    "UnitGroup",
    "build_groups",
    "classifier_name",
    "groups_for",
    "prunable_names",
]

#: Parameters and buffers of a module that are indexed by its output units.
_OUT_TENSORS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv2d: ("weight", "bias"),
    nn.Linear: ("weight", "bias"),
    nn.BatchNorm2d: ("weight", "bias", "running_mean", "running_var"),
    nn.BatchNorm1d: ("weight", "bias", "running_mean", "running_var"),
}
_IN_TENSORS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv2d: ("weight",),
    nn.Linear: ("weight",),
}


@dataclass(frozen=True)
class Member:
    """One tensor dimension indexed by a group's units.

    Unit ``u`` covers positions ``u*width .. u*width + width - 1`` of dimension
    ``dim`` of tensor ``param`` (``width > 1`` after a flatten: one channel feeds
    ``h*w`` consecutive input columns of the next linear layer).
    """

    param: str
    dim: int
    width: int = 1

    def positions(self, units: torch.Tensor) -> torch.Tensor:
        """Indices along :attr:`dim` covered by ``units`` (sorted if ``units`` is)."""
        units = units.to(torch.int64)
        if self.width == 1:
            return units
        offs = torch.arange(self.width, dtype=torch.int64)
        return (units[:, None] * self.width + offs[None, :]).reshape(-1)


@dataclass(frozen=True)
class UnitGroup:
    """A set of structurally coupled units, removed together.

    Attributes
    ----------
    name:
        Stable group name: the alphabetically first producer module. Structures
        are keyed by it.
    members:
        Every ``(param, dim, width)`` indexed by the group's units: out-channel
        dims of producer weights and biases, normalisation parameters and
        running statistics, and in-channel dims of consumer weights.
    n_units:
        Number of units in the full model.
    producers:
        Weight names of the convolution/linear layers whose *outputs* are the
        units (the fan-in used to score them, ALGORITHMS.md 1.2).
    """

    name: str
    members: tuple[Member, ...]
    n_units: int
    producers: tuple[str, ...]


def classifier_name(model: nn.Module) -> str:
    """Module name of the final classifier: the last ``nn.Linear`` registered in ``model``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("model: has no nn.Linear classifier")
    return names[-1]


def prunable_names(model: nn.Module) -> list[str]:
    """State-dict names of the prunable tensors: conv and linear weights (classifier included).

    The classifier's weight is prunable entry-wise (unstructured); only its
    output units are protected (ALGORITHMS.md 1.2).
    """
    return [
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


def _check_module(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(f"model: grouped convolution {name!r} is not supported")
    has_params = any(True for _ in module.parameters(recurse=False))
    if has_params and type(module) not in _OUT_TENSORS:
        raise ValueError(
            f"model: layer {name!r} of type {type(module).__name__} is coupled to a prunable "
            "group but has no shrinking rule; supported: Conv2d, Linear, BatchNorm1d/2d"
        )


def _width(name: str, idxs: list[int], root_idxs: list[int]) -> int:
    """Block width of a coupled dimension; checks the unit -> position layout."""
    n_units = len(set(root_idxs))
    if n_units == 0 or len(idxs) % n_units:
        raise ValueError(f"model: cannot map units of layer {name!r} to positions")
    width = len(idxs) // n_units
    if any(i // width != r for i, r in zip(idxs, root_idxs, strict=True)):
        raise ValueError(
            f"model: layer {name!r} couples units in a non-block layout; not supported"
        )
    return width


def build_groups(model: nn.Module, input_shape: tuple[int, ...]) -> list[UnitGroup]:
    """Trace ``model`` and return its structurally prunable unit groups.

    Parameters
    ----------
    model:
        The full model (e.g. from :func:`fl.models.build_model`).
    input_shape:
        Shape of one example, without the batch dimension.

    Returns
    -------
    list[UnitGroup]
        One group per coupled set of output units, sorted by name. The group of
        the final classifier's outputs is excluded (it keeps all its outputs).
    """
    example = torch.zeros(1, *tuple(input_shape))
    was_training = model.training
    model.eval()
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    head = dict(model.named_modules())[classifier_name(model)]
    groups: list[UnitGroup] = []
    for group in dg.get_all_groups(ignored_layers=[head], root_module_types=(nn.Conv2d, nn.Linear)):
        members: dict[tuple[str, int], Member] = {}
        producers: list[str] = []
        n_units = 0
        for item in group:
            dep = item.dep
            module = dep.target.module
            if not isinstance(module, nn.Module) or module not in names:
                continue
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            mname = names[module]
            _check_module(mname, module)
            idxs = [int(i) for i in item.idxs]
            root_idxs = [int(r) for r in item.root_idxs]
            n_units = max(n_units, len(set(root_idxs)))
            width = _width(mname, idxs, root_idxs)
            if dg.is_out_channel_pruning_fn(dep.handler):
                tensors, dim = _OUT_TENSORS[type(module)], 0
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    producers.append(f"{mname}.weight")
            elif dg.is_in_channel_pruning_fn(dep.handler):
                tensors, dim = _IN_TENSORS.get(type(module), ()), 1
            else:
                continue
            state = dict(module.named_parameters(recurse=False)) | dict(
                module.named_buffers(recurse=False)
            )
            for t in tensors:
                if state.get(t) is not None:
                    key = (f"{mname}.{t}", dim)
                    members[key] = Member(f"{mname}.{t}", dim, width)
        if not producers:
            continue
        producers.sort()
        groups.append(
            UnitGroup(
                name=producers[0].removesuffix(".weight"),
                members=tuple(sorted(members.values(), key=lambda m: (m.param, m.dim))),
                n_units=n_units,
                producers=tuple(producers),
            )
        )
    return sorted(groups, key=lambda g: g.name)


@lru_cache(maxsize=32)
def _groups_cached(
    model_name: str, input_shape: tuple[int, ...], num_classes: int
) -> tuple[UnitGroup, ...]:
    return tuple(
        build_groups(build_model(model_name, input_shape, num_classes, seed=0), input_shape)
    )


def groups_for(model_name: str, input_shape: tuple[int, ...], num_classes: int) -> list[UnitGroup]:
    """:func:`build_groups` of a registry model, cached per ``(name, input_shape, num_classes)``."""
    return list(_groups_cached(model_name, tuple(int(s) for s in input_shape), int(num_classes)))
