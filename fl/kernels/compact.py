"""Gather the values a mask keeps (in index order) and scatter them back.

This is how a sparse update travels (fl/wire): the kept values and the packed
mask. The Triton version is a two-pass stream compaction: per-block counts,
an exclusive prefix sum of those counts (a few thousand entries, done by
torch), then each block writes its kept values at its offset plus an
in-block ``tl.cumsum`` of the mask.
"""

from __future__ import annotations

import torch

from fl.kernels._dispatch import (
    block_size,
    check_flat,
    check_mask,
    check_same_device,
    use_triton,
)
from fl.kernels._triton import tl, triton

# --- PyTorch reference ---------------------------------------------------------


def gather_kept_reference(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The entries of ``values`` where ``mask`` is set, flat, in index order."""
    # boolean indexing (nonzero + index_select) measured faster than masked_select on
    # CPU: 10M entries, 2-core EPYC, loaded host: 146 ms vs 229 ms, best of 9
    return values.reshape(-1)[mask.reshape(-1).view(torch.bool)]


def scatter_kept_reference(kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``mask`` holding ``kept`` where set and zeros elsewhere."""
    out = torch.zeros(mask.shape, dtype=kept.dtype, device=kept.device)
    return out.masked_scatter_(mask.view(torch.bool), kept.reshape(-1))


# --- Triton kernels --------------------------------------------------------------


@triton.jit
def _count_kernel(mask_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = tl.load(mask_ptr + offs, mask=offs < n, other=0).to(tl.int32)
    tl.store(counts_ptr + pid, tl.sum(m, axis=0).to(tl.int64))


@triton.jit
def _gather_kernel(values_ptr, mask_ptr, base_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.int32)  # in-block sums fit 32 bits
    dst = tl.load(base_ptr + pid) + (tl.cumsum(m, axis=0) - m).to(tl.int64)
    v = tl.load(values_ptr + offs, mask=inb)
    tl.store(out_ptr + dst, v, mask=inb & (m != 0))


@triton.jit
def _scatter_kernel(kept_ptr, mask_ptr, base_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.int32)
    src = tl.load(base_ptr + pid) + (tl.cumsum(m, axis=0) - m).to(tl.int64)
    keep = inb & (m != 0)
    v = tl.load(kept_ptr + src, mask=keep, other=0)
    tl.store(out_ptr + offs, v, mask=inb)


def _block_bases(mask_u8: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """Exclusive prefix sum of per-block kept counts, and the total."""
    n = mask_u8.numel()
    nblocks = triton.cdiv(n, block)
    counts = torch.empty(nblocks, dtype=torch.int64, device=mask_u8.device)
    _count_kernel[(nblocks,)](mask_u8, counts, n, BLOCK=block)
    ends = torch.cumsum(counts, 0)
    return ends - counts, int(ends[-1])


def _gather_kept_triton(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.reshape(-1).view(torch.uint8)
    n = m.numel()
    if n == 0:
        return values.new_empty(0)
    block = block_size(n, values.device)
    bases, total = _block_bases(m, block)
    out = values.new_empty(total)
    _gather_kernel[(bases.numel(),)](values.reshape(-1), m, bases, out, n, BLOCK=block)
    return out


def _scatter_kept_triton(kept: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    m = mask.reshape(-1).view(torch.uint8)
    n = m.numel()
    out = torch.empty(mask.shape, dtype=kept.dtype, device=kept.device)
    if n == 0:
        return out
    block = block_size(n, kept.device)
    bases, _ = _block_bases(m, block)
    src = kept.reshape(-1) if kept.numel() else kept.new_zeros(1)
    _scatter_kernel[(bases.numel(),)](src, m, bases, out, n, BLOCK=block)
    return out


# --- public, dispatching -----------------------------------------------------------


def gather_kept(values: torch.Tensor, mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """The entries of ``values`` where ``mask`` (same shape, bool or 0/1 uint8) is set.

    Returns a 1-D tensor of ``mask.sum()`` values in index order, dtype of ``values``.
    """
    values = check_flat("values", values)
    mask = check_mask("mask", mask)
    if values.shape != mask.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
    check_same_device("mask", mask, "values", values)
    if use_triton(backend, values.device):
        return _gather_kept_triton(values, mask)
    return gather_kept_reference(values, mask)


def scatter_kept(kept: torch.Tensor, mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`gather_kept`: ``kept`` placed where ``mask`` is set, zeros elsewhere.

    Returns a tensor shaped like ``mask`` with the dtype of ``kept``.
    """
    kept = check_flat("kept", kept)
    mask = check_mask("mask", mask)
    check_same_device("mask", mask, "kept", kept)
    if kept.dim() != 1:
        raise ValueError(f"kept: expected a 1-D tensor, got shape {tuple(kept.shape)}")
    count = int(torch.count_nonzero(mask))  # 0/1 checked; 20x faster than a uint8 sum
    if kept.numel() != count:
        raise ValueError(f"kept: mask keeps {count} entries, got {kept.numel()} values")
    if use_triton(backend, kept.device):
        return _scatter_kept_triton(kept, mask, count)
    return scatter_kept_reference(kept, mask)
