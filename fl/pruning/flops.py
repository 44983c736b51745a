"""FLOPs per example of the model the clients train, from its REAL layer shapes.

docs/ALGORITHMS.md §1.4 (AutoFLIP, Interno et al., arXiv 2405.10271) asks for the
FLOPs of the shrunken model, with unstructured zeros counted separately.

Convention (stated once, used everywhere):

- FLOPs = 2 x multiply-accumulates (MACs) of convolution, linear and LSTM
  layers, measured with forward hooks on one example, so spatial sizes,
  strides, padding and sequence lengths are the real ones. Conv:
  ``k_h*k_w*(c_in/groups)*c_out*h_out*w_out`` MACs; linear: ``in*out`` MACs
  (times the leading dims of a >2-D input); LSTM: every weight matrix is used
  once per time step, ``4 gates x (input + hidden) x hidden`` MACs per step
  and layer, times the steps (the recurrent product at step 1 included).
- Not counted: bias additions, normalisation (BatchNorm, GroupNorm),
  activations, the LSTM's gate nonlinearities and element-wise cell updates,
  pooling, the residual additions (each well under 2% of the total for our
  models), and embedding lookups (no multiplications).
- :func:`sparse_flops` counts only the MACs of kept (nonzero) weights.
- Training costs ``3 x`` the forward FLOPs per example: the backward pass is
  ~2x the forward (gradients w.r.t. activations and w.r.t. weights), the usual
  convention (e.g. Kaplan et al. 2020; the AutoFLIP paper reports relative
  savings, which this factor does not change).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fl.models import example_input

__all__ = ["count_flops", "sparse_flops", "training_flops_per_example"]

TRAINING_FACTOR = 3


def _weights(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The counted weights of a layer: conv/linear ``weight``, an LSTM's weight matrices."""
    if isinstance(module, nn.LSTM):
        return {f"{name}.{p}": w for p, w in module.named_parameters(recurse=False)
                if p.startswith("weight_")}
    return {f"{name}.weight": module.weight}


_COUNTED = (nn.Conv2d, nn.Linear, nn.LSTM)


def _trace_macs(
    model: nn.Module, input_shape: tuple[int, ...], nnz: Mapping[str, int] | None
) -> int:
    total = 0
    handles = []

    def hook_for(name: str, module: nn.Module):
        def hook(mod: nn.Module, inputs, output) -> None:
            nonlocal total
            weights = _weights(name, mod)
            per_weight = sum(w.numel() if nnz is None else nnz.get(n, w.numel())
                             for n, w in weights.items())
            if isinstance(mod, nn.LSTM):
                out = output[0]  # (output, (h_n, c_n)); every weight is used once per step
                positions = out.shape[-2] if mod.batch_first or out.dim() == 2 else out.shape[0]
            elif isinstance(mod, nn.Conv2d):
                # each weight is used once per output position
                positions = output.shape[-2] * output.shape[-1]
            else:
                positions = output[0].numel() // mod.out_features
            total += per_weight * positions

        return hook

    for name, module in model.named_modules():
        if isinstance(module, _COUNTED):
            handles.append(module.register_forward_hook(hook_for(name, module)))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(example_input(model, input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Dense forward FLOPs per example (2 x MACs of conv, linear and LSTM layers).

    Parameters
    ----------
    model:
        The model as the clients train it (e.g. from :func:`fl.pruning.shrink_model`).
    input_shape:
        Shape of one example, without the batch dimension.
    """
    return 2 * _trace_macs(model, input_shape, None)


def sparse_flops(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    input_shape: tuple[int, ...],
) -> int:
    """Forward FLOPs per example counting only kept weights of conv, linear and LSTM layers.

    Parameters
    ----------
    model:
        The model (its own, possibly shrunken, shapes).
    masks:
        name -> bool mask in the model's shapes; weights without a mask are dense.
        ``None`` counts the nonzero entries of the weights themselves.
    input_shape:
        Shape of one example.

    Raises
    ------
    ValueError
        Naming ``masks`` when a mask does not match the model's tensor.
    """
    params = dict(model.named_parameters())
    nnz: dict[str, int] = {}
    if masks is None:
        for name, module in model.named_modules():
            if isinstance(module, _COUNTED):
                for n, w in _weights(name, module).items():
                    nnz[n] = int(torch.count_nonzero(w))
    else:
        for name, m in masks.items():
            if name not in params:
                raise ValueError(f"masks: {name!r} is not a parameter of the model")
            if tuple(m.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"masks: {name!r} has shape {tuple(m.shape)}, the model's tensor has "
                    f"{tuple(params[name].shape)}"
                )
            nnz[name] = int(torch.count_nonzero(m))
    return 2 * _trace_macs(model, input_shape, nnz)


def training_flops_per_example(forward_flops: int) -> int:
    """Training FLOPs per example: ``3 x`` forward (backward ~2x forward)."""
    return TRAINING_FACTOR * int(forward_flops)
