"""Squared-deviation accumulation ``acc += weight * (a - b)**2`` on flat buffers.

AutoFLIP's exploration (docs/ALGORITHMS.md §1.1 step 3-4) and adaptive guidance
(1.3) sum ``n_k (theta_k - theta_0)**2`` over clients: one fused pass per
client instead of a subtraction, a square and an add over the whole model.
Arithmetic is fp32 whatever the dtype of ``a`` and ``b``.
"""

from __future__ import annotations

import torch

from fl.kernels._dispatch import (
    block_size,
    check_flat,
    check_float,
    check_same_device,
    use_triton,
)
from fl.kernels._triton import tl, triton

# --- PyTorch reference ---------------------------------------------------------


def sq_dev_accumulate_reference(
    acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: float
) -> torch.Tensor:
    """In place: ``acc += weight * (a - b)**2``; returns ``acc``."""
    if a.dtype != torch.float32:
        a, b = a.float(), b.float()
    d = torch.sub(a, b)
    return acc.addcmul_(d, d, value=weight)


# --- Triton kernel ---------------------------------------------------------------


@triton.jit
def _sq_dev_kernel(acc_ptr, a_ptr, b_ptr, n, weight, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    a = tl.load(a_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    acc = tl.load(acc_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    d = a - b
    acc = acc + weight * d * d
    tl.store(acc_ptr + offs, acc.to(acc_ptr.dtype.element_ty), mask=inb)


def _sq_dev_triton(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: float) -> None:
    n = acc.numel()
    if n:
        bs = block_size(n, acc.device)
        _sq_dev_kernel[(triton.cdiv(n, bs),)](acc, a, b, n, float(weight), BLOCK=bs)


# --- public, dispatching -----------------------------------------------------------


def sq_dev_accumulate(
    acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: float, *, backend: str = "auto"
) -> torch.Tensor:
    """In place ``acc += weight * (a - b)**2`` over same-shaped contiguous buffers.

    ``a`` and ``b`` share a floating dtype (fp16/bf16/fp32); ``acc`` is floating.
    Returns ``acc``.
    """
    acc = check_flat("acc", acc)
    a = check_flat("a", a)
    b = check_flat("b", b)
    for name, t in (("acc", acc), ("a", a), ("b", b)):
        check_float(name, t)
    if a.shape != acc.shape:
        raise ValueError(f"a: shape {tuple(a.shape)} != acc shape {tuple(acc.shape)}")
    if b.shape != acc.shape:
        raise ValueError(f"b: shape {tuple(b.shape)} != acc shape {tuple(acc.shape)}")
    if b.dtype != a.dtype:
        raise ValueError(f"b: dtype {b.dtype} != a dtype {a.dtype}")
    check_same_device("a", a, "acc", acc)
    check_same_device("b", b, "acc", acc)
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        raise ValueError(f"weight: expected a float, got {type(weight).__name__}")
    if use_triton(backend, acc.device):
        _sq_dev_triton(acc, a, b, weight)
        return acc
    return sq_dev_accumulate_reference(acc, a, b, weight)
