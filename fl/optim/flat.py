"""The flat buffers every masked optimizer steps: one contiguous fp32 buffer per (param
group, device) holding the parameters, their gradients, optimizer state and mask as
views, padded with masked zeros to a multiple of 16 entries (see FlatBuffers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fl.kernels import use_triton

__all__ = ["FlatBuffers", "check_masks_arg", "padded"]


class FlatBuffers:
    """The flat buffers of the parameters of one param group on one device."""

    def __init__(self, group_index: int, params: list[torch.Tensor], backend: str) -> None:
        self.group_index = group_index  # groups are replaced by load_state_dict: look up
        self.params = params
        self.device = params[0].device
        self.triton = use_triton(backend, self.device)
        self.backend = "triton" if self.triton else "torch"  #: what each step dispatches to
        self.numels = [p.numel() for p in params]
        # a 4-D parameter stored channels-last (fl.train trains conv models so on a CPU)
        # keeps that layout as a view of the flat buffer: its entries lie in memory order
        # there, which the elementwise step does not mind
        self.channels_last = [_is_channels_last(p) for p in params]
        bounds = [0]
        for k in self.numels:
            bounds.append(bounds[-1] + k)
        self.bounds = bounds
        self.n = bounds[-1]  # entries that belong to parameters
        # Every buffer is padded with zeros (mask 0) to a multiple of 16 entries: Triton
        # vectorises the bounds-checked loads of a kernel only when the length is such a
        # multiple (the SGD step over 50M entries on an H200: 79% of copy bandwidth with
        # n % 16 = 14, 96% with 0; benchmarks/kernels.py --sweep-launch). A zero entry
        # with no gradient stays zero under every option of both optimizers.
        self.size = -(-self.n // 16) * 16
        self.param = self.zeros()
        self.grad = self.zeros()
        with torch.no_grad():
            for i, p in enumerate(params):
                view = self.view(self.param, i)
                view.copy_(p)
                p.data = view
                if p.grad is not None:
                    self.view(self.grad, i).copy_(p.grad)
                p.grad = self.view(self.grad, i)
        # what sync_grads, run at every zero_grad, compares a gradient's strides with
        self.strides = [p.stride() for p in params]
        self.mask: torch.Tensor | None = None
        self.anchor: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.workspace: torch.Tensor | None = None

    def zeros(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A zero flat buffer of the padded size."""
        return torch.zeros(self.size, dtype=dtype, device=self.device)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i``'s part of ``flat``, shaped (and laid out) as the parameter."""
        part = flat[self.bounds[i] : self.bounds[i + 1]]
        shape = self.params[i].shape
        if self.channels_last[i]:
            n, c, h, w = shape
            return part.view(n, h, w, c).permute(0, 3, 1, 2)
        return part.view(shape)

    def sync_grads(self) -> None:
        """Make every ``p.grad`` a view of the flat gradient again (copying if replaced)."""
        base = self.grad.data_ptr()
        for i, p in enumerate(self.params):
            g = p.grad
            if (g is not None and g.data_ptr() == base + 4 * self.bounds[i]
                    and g.stride() == self.strides[i]):
                continue
            view = self.view(self.grad, i)
            if g is None:
                view.zero_()
            else:
                view.copy_(g)
            p.grad = view

    def ensure_state(self, keys: Sequence[str]) -> None:
        for key in keys:
            if key not in self.state:
                self.state[key] = self.zeros()

    def scratch(self, rows: int) -> torch.Tensor:
        if self.workspace is None or self.workspace.shape[0] < rows:
            self.workspace = torch.empty(rows, self.size, dtype=torch.float32, device=self.device)
        return self.workspace

    def apply_mask(self) -> None:
        """Zero the pruned entries of the parameters and of every state buffer."""
        if self.mask is None:
            return
        keep = self.mask if self.mask.dtype == torch.float32 else self.mask.float()
        self.param.mul_(keep)
        for buf in self.state.values():
            buf.mul_(keep)


def _is_channels_last(p: torch.Tensor) -> bool:
    """A 4-D tensor with the channels-last strides (exactly: a tensor with one channel
    is contiguous either way, and only its strides tell which layout it was given)."""
    if p.dim() != 4:
        return False
    n, c, h, w = p.shape
    return p.stride() == (h * w * c, 1, w * c, c) != (c * h * w, h * w, w, 1)


def check_masks_arg(name: str, items: Sequence[Any] | None, count: int) -> Sequence[Any]:
    if items is None or isinstance(items, torch.Tensor) or not isinstance(items, Sequence):
        raise ValueError(f"{name}: expected a sequence with one entry per parameter ({count})")
    if len(items) != count:
        raise ValueError(f"{name}: expected {count} entries (one per parameter), got {len(items)}")
    return items


def padded(n: int) -> int:
    """Flat buffers are padded to a multiple of 16 entries (see ``FlatBuffers``)."""
    return -(-n // 16) * 16
