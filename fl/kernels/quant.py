"""Per-block symmetric int8 quantisation with a bound on the error.

Each block of ``block`` entries gets one fp32 scale ``max|x| / 127``; entries
become ``round(x / scale)`` (round half to even) in [-127, 127]. Dequantised
values are within ``scale / 2`` of the input (plus fp32 rounding of the
division and the product: a few ulp of ``max|x|``). An all-zero block has
scale 0 and decodes to zeros. The kernel rounds with the fp32 magic-number
trick ``(y + 1.5 * 2**23) - 1.5 * 2**23``, which is round-half-even for
``|y| < 2**22`` and so agrees exactly with ``torch.round``.

The kernel divides with ``tl.div_rn`` (IEEE round-to-nearest; Triton's plain
fp32 ``/`` may be approximate on a GPU), so codes and scales agree exactly
with the reference.
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

_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23


def _check_block(block: int) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block: expected a positive int, got {block!r}")
    return block


# --- PyTorch reference ---------------------------------------------------------


def quantize_int8_blocks_reference(
    x: torch.Tensor, block: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8[n], scales float32[ceil(n / block)])`` for flat ``x``."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = (n + block - 1) // block
    if n % block:
        flat = torch.cat([flat, flat.new_zeros(nb * block - n)])
    rows = flat.view(nb, block)
    amax = rows.abs().amax(dim=1)
    # divide by a 127 on the device: torch divides by a Python number on a GPU as a
    # multiply by its reciprocal (1 ulp off the IEEE quotient the kernel computes)
    scales = amax / amax.new_full((), 127.0) if n else flat.new_empty(0)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(-1)[:n], scales


def dequantize_int8_blocks_reference(
    q: torch.Tensor, scales: torch.Tensor, block: int = 256
) -> torch.Tensor:
    """``q * scale`` of each entry's block, as float32 of shape ``(n,)``."""
    n = q.numel()
    nb = scales.numel()
    flat = q.reshape(-1)
    if n % block:
        flat = torch.cat([flat, flat.new_zeros(nb * block - n)])
    out = flat.view(nb, block).float().mul_(scales[:, None].float())
    return out.view(-1)[:n]


# --- Triton kernels --------------------------------------------------------------


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, n, nblocks, block,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    row = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    col = tl.arange(0, COLS).to(tl.int64)
    offs = row[:, None] * block + col[None, :]
    valid = (col[None, :] < block) & (offs < n)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    scale = tl.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
    safe = tl.where(scale > 0.0, scale, 1.0)
    y = tl.div_rn(x, safe[:, None])  # IEEE division, as torch
    q = (y + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=valid)
    tl.store(scale_ptr + row, scale, mask=row < nblocks)


@triton.jit
def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, n, block, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    q = tl.load(q_ptr + offs, mask=inb, other=0).to(tl.float32)
    s = tl.load(scale_ptr + offs // block, mask=inb, other=0.0)
    tl.store(out_ptr + offs, q * s, mask=inb)


def _quantize_triton(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1)
    n = flat.numel()
    nb = (n + block - 1) // block
    q = torch.empty(n, dtype=torch.int8, device=x.device)
    scales = torch.empty(nb, dtype=torch.float32, device=x.device)
    if n:
        cols = triton.next_power_of_2(block)
        rows = max(1, block_size(n, x.device) // cols)
        grid = (triton.cdiv(nb, rows),)
        _quantize_kernel[grid](flat, q, scales, n, nb, block, ROWS=rows, COLS=cols)
    return q, scales


def _dequantize_triton(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    n = q.numel()
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    if n:
        bs = block_size(n, q.device)
        _dequantize_kernel[(triton.cdiv(n, bs),)](q.reshape(-1), scales, out, n, block, BLOCK=bs)
    return out


# --- public, dispatching -----------------------------------------------------------


def quantize_int8_blocks(
    x: torch.Tensor, block: int = 256, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise flat ``x`` to int8 codes with one fp32 scale per ``block`` entries.

    Returns ``(q, scales)``: ``q`` int8 of shape ``(n,)``, ``scales`` float32 of
    shape ``(ceil(n / block),)`` with ``scale = max|x_block| / 127``.
    """
    x = check_flat("x", x)
    check_float("x", x)
    block = _check_block(block)
    if use_triton(backend, x.device):
        return _quantize_triton(x, block)
    return quantize_int8_blocks_reference(x, block)


def dequantize_int8_blocks(
    q: torch.Tensor, scales: torch.Tensor, block: int = 256, *, backend: str = "auto"
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8_blocks`: float32 of shape ``(n,)``."""
    q = check_flat("q", q)
    scales = check_flat("scales", scales)
    block = _check_block(block)
    if q.dtype != torch.int8:
        raise ValueError(f"q: expected int8, got {q.dtype}")
    if scales.dtype != torch.float32:
        raise ValueError(f"scales: expected float32, got {scales.dtype}")
    check_same_device("scales", scales, "q", q)
    if scales.numel() != (q.numel() + block - 1) // block:
        raise ValueError(
            f"scales: {q.numel()} codes in blocks of {block} need "
            f"{(q.numel() + block - 1) // block} scales, got {scales.numel()}"
        )
    if use_triton(backend, q.device):
        return _dequantize_triton(q, scales, block)
    return dequantize_int8_blocks_reference(q, scales, block)
