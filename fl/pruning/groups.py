"""Coupled unit groups of a model: which tensor dimensions index the same structural unit.

AutoFLIP (Interno et al., "Federated Hybrid Model Pruning through Loss Landscape
Exploration", arXiv 2405.10271) removes whole units (convolution filters, linear
neurons). docs/ALGORITHMS.md §1.2: units whose outputs are tied together (a residual
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

Prunable tensors are the weights of convolution, linear and LSTM layers. The
final classifier (the last ``nn.Linear`` registered in the model) keeps all of
its output units, so its output group is not a :class:`UnitGroup`; its input
columns still belong to the group of the layer feeding it.

Two layer types need more than one channel per index (rules in
:mod:`fl.pruning.tracing`):

- ``nn.LSTM`` (single layer): a unit is a hidden unit, i.e. one row in each of
  the four gate blocks of ``weight_ih``/``weight_hh``/biases (a member with
  ``gates=4``), one column of ``weight_hh`` (the recurrence) and the next
  layer's input column. Its fan-in for scoring is both weight matrices.
- ``nn.GroupNorm``: removing single channels would change the statistics of
  the channels left in their group (and leave counts not divisible by the
  number of groups), so a unit of a group that a GroupNorm normalises is one
  GroupNorm group: ``block`` consecutive channels (the least common multiple
  of the groups' sizes when several GroupNorms share the channels). Removing
  it zeroes a whole group, which leaves the other groups' statistics as they
  are: the shrunk model computes exactly what the masked full model computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from fl.models import build_model
from fl.pruning.tracing import LSTM_GATES, check_lstm, dependency_graph

__all__ = [
    "Member",
    "UnitGroup",
    "build_groups",
    "classifier_name",
    "groups_for",
    "prunable_names",
]

_BN = (("weight", 0, False), ("bias", 0, False), ("running_mean", 0, False),
       ("running_var", 0, False))
#: (tensor, dim, gated) of a module indexed by its OUTPUT units; ``gated``: the dim
#: stacks the LSTM's four gate blocks (i, f, g, o) of the units
_OUT_TENSORS: dict[type[nn.Module], tuple[tuple[str, int, bool], ...]] = {
    nn.Conv2d: (("weight", 0, False), ("bias", 0, False)),
    nn.Linear: (("weight", 0, False), ("bias", 0, False)),
    nn.BatchNorm2d: _BN,
    nn.BatchNorm1d: _BN,
    nn.GroupNorm: (("weight", 0, False), ("bias", 0, False)),
    nn.LSTM: (("weight_ih_l0", 0, True), ("weight_hh_l0", 0, True), ("weight_hh_l0", 1, False),
              ("bias_ih_l0", 0, True), ("bias_hh_l0", 0, True)),
}
#: the same for a module's INPUT channels
_IN_TENSORS: dict[type[nn.Module], tuple[tuple[str, int, bool], ...]] = {
    nn.Conv2d: (("weight", 1, False),),
    nn.Linear: (("weight", 1, False),),
    nn.LSTM: (("weight_ih_l0", 1, False),),
}
#: the weights whose rows compute a unit (its fan-in, docs/ALGORITHMS.md §1.2)
_PRODUCER_WEIGHTS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv2d: ("weight",),
    nn.Linear: ("weight",),
    nn.LSTM: ("weight_ih_l0", "weight_hh_l0"),
}
_ROOTS = (nn.Conv2d, nn.Linear, nn.LSTM)


@dataclass(frozen=True)
class Member:
    """One tensor dimension indexed by a group's units.

    Unit ``u`` covers positions ``u*width .. u*width + width - 1`` of dimension
    ``dim`` of tensor ``param`` (``width > 1`` after a flatten: one channel feeds
    ``h*w`` consecutive input columns of the next linear layer; or when a unit is
    a GroupNorm group of channels). With ``gates > 1`` the dimension stacks that
    many such blocks, ``gate_stride`` apart (an LSTM's i, f, g, o rows), and the
    unit covers its positions in each.
    """

    param: str
    dim: int
    width: int = 1
    gates: int = 1
    gate_stride: int = 0

    def size(self, n_units: int) -> int:
        """Length of :attr:`dim` in the full model with ``n_units`` units."""
        return n_units * self.width * self.gates

    def positions(self, units: torch.Tensor) -> torch.Tensor:
        """Indices along :attr:`dim` covered by ``units`` (sorted if ``units`` is)."""
        units = units.to(torch.int64)
        pos = units
        if self.width != 1:
            offs = torch.arange(self.width, dtype=torch.int64)
            pos = (units[:, None] * self.width + offs[None, :]).reshape(-1)
        if self.gates > 1:
            pos = torch.cat([pos + k * self.gate_stride for k in range(self.gates)])
        return pos


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
        Weight names of the convolution/linear/LSTM layers whose *outputs* are
        the units (the fan-in used to score them, docs/ALGORITHMS.md §1.2; both
        weight matrices of an LSTM).
    block:
        Channels per unit: the GroupNorm group size where a GroupNorm normalises
        the units, else 1.
    """

    name: str
    members: tuple[Member, ...]
    n_units: int
    producers: tuple[str, ...]
    block: int = 1

    def member(self, param: str, dim: int) -> Member:
        """The member for dimension ``dim`` of tensor ``param``."""
        for m in self.members:
            if m.param == param and m.dim == dim:
                return m
        raise KeyError(f"group {self.name!r} has no member {param!r} dim {dim}")


def classifier_name(model: nn.Module) -> str:
    """Module name of the final classifier: the last ``nn.Linear`` registered in ``model``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("model: has no nn.Linear classifier")
    return names[-1]


def prunable_names(model: nn.Module) -> list[str]:
    """State-dict names of the prunable tensors: conv and linear weights (classifier
    included) and the weight matrices of LSTMs (``weight_ih_l*``, ``weight_hh_l*``).

    The classifier's weight is prunable entry-wise (unstructured); only its
    output units are protected (docs/ALGORITHMS.md §1.2). Embeddings, biases and
    normalisation parameters are not prunable.
    """
    out = []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out.append(f"{n}.weight")
        elif isinstance(m, nn.LSTM):
            out += [f"{n}.{p}" for p, _ in m.named_parameters(recurse=False)
                    if p.startswith("weight_")]
    return out


def _check_module(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(f"model: grouped convolution {name!r} is not supported")
    if isinstance(module, nn.LSTM):
        check_lstm(name, module)
    has_params = any(True for _ in module.parameters(recurse=False))
    if has_params and type(module) not in _OUT_TENSORS:
        raise ValueError(
            f"model: layer {name!r} of type {type(module).__name__} is coupled to a prunable "
            "group but has no shrinking rule; supported: Conv2d, Linear, BatchNorm1d/2d, "
            "GroupNorm, LSTM"
        )


def _block(norms: list[tuple[str, nn.GroupNorm, int]], n_channels: int) -> int:
    """Channels per unit: the lcm of the group sizes of the GroupNorms on the channels."""
    block = 1
    for name, gn, width in norms:
        if width != 1:
            raise ValueError(f"model: GroupNorm {name!r} is coupled in a non-channel layout; "
                             "not supported")
        block = math.lcm(block, gn.num_channels // gn.num_groups)
    if n_channels % block:
        raise ValueError(f"model: the GroupNorm groups ({block} channels) do not tile the "
                         f"{n_channels} coupled channels of layer {norms[0][0]!r}")
    return block


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
    dg = dependency_graph(model, input_shape)
    names = {m: n for n, m in model.named_modules()}
    head = dict(model.named_modules())[classifier_name(model)]
    groups: list[UnitGroup] = []
    for group in dg.get_all_groups(ignored_layers=[head], root_module_types=_ROOTS):
        deps: list[tuple[str, nn.Module, bool, int]] = []  # name, module, out?, width
        n_channels = 0
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
            n_channels = max(n_channels, len(set(root_idxs)))
            width = _width(mname, idxs, root_idxs)
            if dg.is_out_channel_pruning_fn(dep.handler):
                deps.append((mname, module, True, width))
            elif dg.is_in_channel_pruning_fn(dep.handler):
                deps.append((mname, module, False, width))
        norms = [(n, m, w) for n, m, out, w in deps if out and isinstance(m, nn.GroupNorm)]
        block = _block(norms, n_channels) if norms else 1
        members: dict[tuple[str, int], Member] = {}
        producers: dict[str, str] = {}  # weight name -> module name
        for mname, module, out, width in deps:
            state = dict(module.named_parameters(recurse=False)) | dict(
                module.named_buffers(recurse=False)
            )
            for t, dim, gated in (_OUT_TENSORS if out else _IN_TENSORS).get(type(module), ()):
                if state.get(t) is None:
                    continue
                w = width * block
                gates = LSTM_GATES if gated else 1
                members[(f"{mname}.{t}", dim)] = Member(
                    f"{mname}.{t}", dim, w, gates, n_channels * width if gated else 0)
            if out:
                for t in _PRODUCER_WEIGHTS.get(type(module), ()):
                    producers[f"{mname}.{t}"] = mname
        if not producers:
            continue
        groups.append(
            UnitGroup(
                name=min(producers.values()),
                members=tuple(sorted(members.values(), key=lambda m: (m.param, m.dim))),
                n_units=n_channels // block,
                producers=tuple(sorted(producers)),
                block=block,
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
