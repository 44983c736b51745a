"""Bitmap pack/unpack: one bit per mask entry, entry i -> byte i // 8, bit i % 8.

This is the wire form of a pruning mask (fl/wire): 8x fewer bytes than a bool
tensor. The reference packs eight mask bytes at once by reading them as one
little-endian int64 and multiplying by a magic constant that moves byte j's
low bit to bit 56 + j (no two partial products collide, so no carries), which
is one vectorised multiply instead of an 8-wide reduction.
"""

from __future__ import annotations

import torch

from fl.kernels._dispatch import block_size, check_mask, check_tensor, use_triton
from fl.kernels._triton import tl, triton

_MAGIC = 0x0102040810204080  # sum of 2**(56 - 7 j), j = 0..7
_SHIFTS = torch.arange(8, dtype=torch.uint8)


# --- PyTorch reference ---------------------------------------------------------


def pack_bits_reference(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool/uint8 0-1 mask of ``n`` entries into ``ceil(n / 8)`` bytes."""
    flat = mask.reshape(-1).view(torch.uint8)
    n = flat.numel()
    nbytes = (n + 7) // 8
    if n % 64:  # pad to whole int64 words
        flat = torch.cat([flat, flat.new_zeros(64 * ((nbytes + 7) // 8) - n)])
    packed = flat.view(torch.int64) * _MAGIC  # one temporary, then in place
    packed.bitwise_right_shift_(56).bitwise_and_(0xFF)
    return packed.to(torch.uint8)[:nbytes]


def unpack_bits_reference(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits_reference`: the first ``n`` bits as a bool tensor."""
    bits = (packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:n].view(torch.bool)


# --- Triton kernels --------------------------------------------------------------


@triton.jit
def _pack_bits_kernel(mask_ptr, out_ptr, n, nbytes, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    bit = tl.arange(0, 8)
    idx = byte[:, None] * 8 + bit[None, :]
    m = tl.load(mask_ptr + idx, mask=idx < n, other=0).to(tl.int32)
    packed = tl.sum(m << bit[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < nbytes)


@triton.jit
def _unpack_bits_kernel(packed_ptr, out_ptr, n, nbytes, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    bit = tl.arange(0, 8)
    p = tl.load(packed_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
    bits = (p[:, None] >> bit[None, :]) & 1
    idx = byte[:, None] * 8 + bit[None, :]
    tl.store(out_ptr + idx, bits.to(tl.uint8), mask=idx < n)


def _pack_bits_triton(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).view(torch.uint8)
    n = flat.numel()
    nbytes = (n + 7) // 8
    out = torch.empty(nbytes, dtype=torch.uint8, device=mask.device)
    if nbytes:
        block = block_size(nbytes, mask.device, gpu=4096) // 8 or 1
        _pack_bits_kernel[(triton.cdiv(nbytes, block),)](flat, out, n, nbytes, BLOCK=block)
    return out


def _unpack_bits_triton(packed: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.bool, device=packed.device)
    nbytes = (n + 7) // 8
    if n:
        block = block_size(nbytes, packed.device, gpu=4096) // 8 or 1
        grid = (triton.cdiv(nbytes, block),)
        _unpack_bits_kernel[grid](packed, out.view(torch.uint8), n, nbytes, BLOCK=block)
    return out


# --- public, dispatching -----------------------------------------------------------


def pack_bits(mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Pack a bool/uint8 0-1 mask (read flat) into ``ceil(n / 8)`` uint8 bytes.

    Entry ``i`` goes to byte ``i // 8``, bit ``i % 8`` (little-endian bit order).
    """
    mask = check_mask("mask", mask)
    if use_triton(backend, mask.device):
        return _pack_bits_triton(mask)
    return pack_bits_reference(mask)


def unpack_bits(packed: torch.Tensor, n: int, *, backend: str = "auto") -> torch.Tensor:
    """Unpack the first ``n`` bits of ``packed`` (from :func:`pack_bits`) to a bool tensor."""
    packed = check_tensor("packed", packed)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected uint8, got {packed.dtype}")
    if not packed.is_contiguous():
        raise ValueError("packed: expected a contiguous tensor (call .contiguous())")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    if packed.numel() != (n + 7) // 8:
        raise ValueError(f"packed: {n} bits need {(n + 7) // 8} bytes, got {packed.numel()}")
    if use_triton(backend, packed.device):
        return _unpack_bits_triton(packed.reshape(-1), n)
    return unpack_bits_reference(packed, n)
