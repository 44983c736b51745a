"""The torch-pruning dependency graph of a model, with our rules for two layer types.

:mod:`fl.pruning.groups` reads the coupled groups from this graph and
:mod:`fl.pruning.shrink` removes units through it, so both use one builder.
torch-pruning (1.6) ships rules for conv, linear and normalisation layers; two
of them do not fit what AutoFLIP needs, so they are replaced here:

- ``nn.LSTM``: torch-pruning's ``LSTMPruner`` (1.6.0) slices the recurrent
  weights with un-expanded gate indices and fails with an index error when a
  hidden unit is removed (checked; see tests/test_pruning_shrink.py), and it
  allows one layer only. :class:`LSTMRule` removes hidden unit ``u`` from all
  four gate blocks (rows ``u + k * hidden``, k = i, f, g, o) of ``weight_ih``,
  ``weight_hh`` and both biases, and column ``u`` of ``weight_hh`` (the
  recurrence); the next layer's input columns follow through the graph.
- ``nn.GroupNorm``: torch-pruning slices the affine parameters but keeps
  ``num_groups``, so the channels left per group, and with them the
  normalisation statistics, change. :class:`GroupNormRule` only accepts the
  removal of whole groups and lowers ``num_groups`` to match, so a shrunk
  GroupNorm normalises its kept channels exactly as the full one did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc, GroupNormPruner

from fl.models import example_input

__all__ = ["LSTM_GATES", "GroupNormRule", "LSTMRule", "check_lstm", "dependency_graph"]

#: gate blocks stacked along dim 0 of an LSTM's weights and biases (i, f, g, o)
LSTM_GATES = 4


def check_lstm(name: str, layer: nn.LSTM) -> None:
    """The LSTM layouts the rule handles: one unidirectional layer, no projection."""
    if layer.num_layers != 1 or layer.bidirectional or layer.proj_size:
        raise ValueError(
            f"model: LSTM {name!r} must be single-layer, unidirectional and without "
            "projection to be pruned (stack one nn.LSTM per layer)"
        )


def _keep(n: int, idxs: Sequence[int]) -> torch.Tensor:
    return torch.tensor(sorted(set(range(n)) - {int(i) for i in idxs}), dtype=torch.int64)


def _slice(layer: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    old = getattr(layer, name)
    setattr(layer, name, nn.Parameter(old.detach().index_select(dim, keep.to(old.device)),
                                      requires_grad=old.requires_grad))


class LSTMRule(BasePruningFunc):
    """Remove hidden units (out) or input features (in) of a single-layer ``nn.LSTM``."""

    TARGET_MODULES = nn.LSTM

    def prune_out_channels(self, layer: nn.LSTM, idxs: Sequence[int]) -> nn.LSTM:
        check_lstm(type(layer).__name__, layer)
        hidden = layer.hidden_size
        keep = _keep(hidden, idxs)
        rows = torch.cat([keep + k * hidden for k in range(LSTM_GATES)])
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            if getattr(layer, name, None) is not None:
                _slice(layer, name, 0, rows)
        _slice(layer, "weight_hh_l0", 1, keep)
        layer.hidden_size = int(keep.numel())
        return layer

    def prune_in_channels(self, layer: nn.LSTM, idxs: Sequence[int]) -> nn.LSTM:
        check_lstm(type(layer).__name__, layer)
        keep = _keep(layer.input_size, idxs)
        _slice(layer, "weight_ih_l0", 1, keep)
        layer.input_size = int(keep.numel())
        return layer

    def get_out_channels(self, layer: nn.LSTM) -> int:
        return layer.hidden_size

    def get_in_channels(self, layer: nn.LSTM) -> int:
        return layer.input_size


class GroupNormRule(GroupNormPruner):
    """torch-pruning's GroupNorm rule, restricted to whole groups, with ``num_groups``
    lowered to the groups kept."""

    def prune_out_channels(self, layer: nn.GroupNorm, idxs: Sequence[int]) -> nn.GroupNorm:
        per_group = layer.num_channels // layer.num_groups
        gone = {int(i) for i in idxs}
        for g in {i // per_group for i in gone}:
            if not set(range(g * per_group, (g + 1) * per_group)) <= gone:
                raise ValueError(
                    f"GroupNorm: removing channels {sorted(gone)} splits group {g} of "
                    f"{per_group} channels; only whole groups can be removed"
                )
        super().prune_out_channels(layer, list(gone))
        layer.num_groups = layer.num_channels // per_group
        return layer

    prune_in_channels = prune_out_channels


_RULES: dict[type[nn.Module], BasePruningFunc] = {nn.LSTM: LSTMRule(),
                                                    nn.GroupNorm: GroupNormRule()}


def dependency_graph(model: nn.Module, input_shape: tuple[int, ...]) -> tp.DependencyGraph:
    """Trace ``model`` on one example of ``input_shape`` (in eval mode; the mode is
    restored) and return its dependency graph with the rules above."""
    was_training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input(model, input_shape),
            customized_pruners=dict(_RULES))
    finally:
        model.train(was_training)
