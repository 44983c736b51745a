"""Thresholds and exact order statistics over a flat buffer of any size.

``torch.quantile`` refused inputs above 2**24 entries before torch 2.14, is a full
sort (slow on a GPU), and AutoFLIP needs the
exact global ``unstructured-ratio`` quantile of the guidance over the whole
model (docs/ALGORITHMS.md §1.2). ``kth_value`` is exact at any size: the reference
is ``torch.kthvalue`` (a quickselect); the Triton version is a radix select
over order-preserving 32-bit keys, four passes of 8 bits, each a masked
``tl.histogram`` of the next digit among the entries that share the prefix
found so far. ``quantile`` takes the two order statistics around
``q * (n - 1)`` and interpolates with ``torch.quantile(...,
interpolation='linear')``'s rule: the rank in float64 (exact at any size),
its fractional part as the weight in ``x``'s dtype, then ``lerp``. That is
what torch does from 2.14 on (bitwise equal there); torch 2.13 and earlier
round the rank to ``x``'s dtype first and refuse more than 2**24 entries, so
the two can differ by one ulp of the result (tests/test_kernels_compress.py).
NaN sorts last in ``kth_value`` (like torch) and makes ``quantile`` NaN.
"""

from __future__ import annotations

import struct

import torch

from fl.kernels._dispatch import block_size, check_flat, check_float, check_tensor, use_triton
from fl.kernels._triton import tl, triton

# --- PyTorch reference ---------------------------------------------------------


def threshold_mask_reference(x: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """``x > tau`` as a bool tensor shaped like ``x``."""
    return torch.gt(x, tau)


def kth_value_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th smallest entry of flat ``x`` (1-based), as a 0-d tensor."""
    return torch.kthvalue(x.reshape(-1), k).values


def _quantile_from(x: torch.Tensor, q: float, kth) -> torch.Tensor:  # noqa: ANN001
    """torch.quantile's 'linear' rule on top of an exact k-th value function."""
    n = x.numel()
    if bool(torch.isnan(x).any()):
        return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    # the rank in float64: exact for any n this can hold (torch >= 2.14 does the same)
    rank = torch.tensor(q, dtype=torch.float64) * (n - 1)
    below = int(rank)  # rank >= 0: truncation is floor, like torch's toType(kLong)
    above = int(torch.ceil(rank))
    weight = (rank - below).to(x.dtype if x.dtype == torch.float64 else torch.float32)
    lo = kth(x, below + 1)
    if above == below:
        return lo
    hi = kth(x, above + 1)
    if lo.dtype != weight.dtype:
        lo32, hi32 = lo.float(), hi.float()
        return torch.lerp(lo32, hi32, weight.to(lo.device)).to(x.dtype)
    return torch.lerp(lo, hi, weight.to(lo.device))


def quantile_reference(x: torch.Tensor, q: float) -> torch.Tensor:
    """The exact ``q``-quantile of flat ``x`` ('linear', as torch.quantile), any size."""
    return _quantile_from(x.reshape(-1), q, kth_value_reference)


# --- Triton kernels --------------------------------------------------------------


@triton.jit
def _threshold_kernel(
    x_ptr, out_ptr, tau_ptr, tau, n_body, n, TAU_PTR: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """``out = x > tau`` over a body of ``n_body`` entries (a multiple of 16, so Triton
    vectorises the bounds-checked loads and byte stores) and, in program 0, the tail."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tau_ptr) if TAU_PTR else tau
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n_body
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x > t).to(tl.uint8), mask=inb)
    if pid == 0:  # (new names: a Triton variable keeps its shape across an if)
        tail = n_body + tl.arange(0, 16).to(tl.int64)
        tail_in = tail < n
        x_tail = tl.load(x_ptr + tail, mask=tail_in, other=0.0).to(tl.float32)
        tl.store(out_ptr + tail, (x_tail > t).to(tl.uint8), mask=tail_in)


@triton.jit
def _radix_hist_kernel(
    x_ptr, hist_ptr, n, prefix,
    SHIFT: tl.constexpr, HAS_PREFIX: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    # order-preserving key: flip all bits of negatives, only the sign bit of positives;
    # every constant is built as int32 so nothing is promoted to int64 on a GPU
    sign = tl.full([BLOCK], -2147483648, tl.int32)
    ikey = tl.where(x != x, tl.full([BLOCK], -1, tl.int32), bits ^ ((bits >> 31) | sign))
    key = ikey.to(tl.uint32, bitcast=True)  # NaN -> 0xFFFFFFFF: sorts last
    digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
    sel = inb
    if HAS_PREFIX:
        sel = sel & ((key >> (SHIFT + 8)).to(tl.int32) == prefix)
    hist = tl.histogram(digit, 256, mask=sel)
    tl.atomic_add(hist_ptr + tl.arange(0, 256), hist.to(tl.int64))


def _key_to_float(key: int) -> float:
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _kth_value_triton(x: torch.Tensor, k: int) -> torch.Tensor:
    flat = x.reshape(-1)
    n = flat.numel()
    block = block_size(n, x.device, gpu=8192)
    grid = (triton.cdiv(n, block),)
    hist = torch.empty(256, dtype=torch.int64, device=x.device)
    prefix, rank = 0, k  # rank: 1-based position among entries matching prefix
    for shift in (24, 16, 8, 0):
        hist.zero_()
        _radix_hist_kernel[grid](
            flat, hist, n, prefix, SHIFT=shift, HAS_PREFIX=shift != 24, BLOCK=block
        )
        cum = torch.cumsum(hist, 0)
        digit = int((cum < rank).sum())
        if digit:
            rank -= int(cum[digit - 1])
        prefix = (prefix << 8) | digit
    value = _key_to_float(prefix)
    return torch.tensor(value, dtype=torch.float32, device=x.device).to(x.dtype)


def _threshold_triton(x: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """``tau``: a 1-element fp32 tensor on ``x``'s device, or a float already rounded to
    ``x``'s dtype (passed by value: no copy to the device)."""
    out = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    n = x.numel()
    if n:
        body = n - n % 16
        bs = block_size(max(body, 1), x.device)
        is_ptr = isinstance(tau, torch.Tensor)
        _threshold_kernel[(max(1, triton.cdiv(body, bs)),)](
            x.reshape(-1), out.view(torch.uint8).reshape(-1), tau if is_ptr else x,
            0.0 if is_ptr else tau, body, n, TAU_PTR=is_ptr, BLOCK=bs,
        )  # fmt: skip
    return out


# --- public, dispatching -----------------------------------------------------------

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_select_input(x: object) -> torch.Tensor:
    x = check_flat("x", x)
    check_float("x", x)
    if x.numel() == 0:
        raise ValueError("x: expected at least one entry")
    return x


def kth_value(x: torch.Tensor, k: int, *, backend: str = "auto") -> torch.Tensor:
    """The exact ``k``-th smallest entry (1-based, like ``torch.kthvalue``) of flat ``x``.

    Works at any size (also above 2**24 entries). Returns a 0-d tensor of ``x``'s dtype.
    """
    x = _check_select_input(x)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= x.numel():
        raise ValueError(f"k: expected an int in [1, {x.numel()}], got {k!r}")
    if use_triton(backend, x.device):
        if x.dtype not in _TRITON_DTYPES:
            raise ValueError(f"x: the Triton kernel takes {_TRITON_DTYPES}, got {x.dtype}")
        return _kth_value_triton(x, k)
    return kth_value_reference(x, k)


def quantile(x: torch.Tensor, q: float, *, backend: str = "auto") -> torch.Tensor:
    """The exact ``q``-quantile of flat ``x`` with torch.quantile's 'linear' interpolation.

    Works where ``torch.quantile`` refuses (more than 2**24 entries). Returns a
    0-d tensor of ``x``'s dtype; NaN if ``x`` holds a NaN.
    """
    x = _check_select_input(x)
    if isinstance(q, torch.Tensor):
        q = float(q)
    if not isinstance(q, int | float) or isinstance(q, bool) or not 0.0 <= q <= 1.0:
        raise ValueError(f"q: expected a float in [0, 1], got {q!r}")
    if use_triton(backend, x.device):
        if x.dtype not in _TRITON_DTYPES:
            raise ValueError(f"x: the Triton kernel takes {_TRITON_DTYPES}, got {x.dtype}")
        return _quantile_from(x.reshape(-1), float(q), _kth_value_triton)
    return quantile_reference(x, float(q))


def threshold_mask(
    x: torch.Tensor, tau: float | torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``x > tau`` as a bool tensor shaped like ``x`` (tau compared in ``x``'s dtype)."""
    x = check_flat("x", x)
    check_float("x", x)
    if isinstance(tau, torch.Tensor):
        tau = check_tensor("tau", tau)
        if tau.numel() != 1:
            raise ValueError(f"tau: expected a scalar, got shape {tuple(tau.shape)}")
    elif isinstance(tau, bool) or not isinstance(tau, int | float):
        raise ValueError(f"tau: expected a float or a 0-d tensor, got {type(tau).__name__}")
    if use_triton(backend, x.device):
        if x.dtype not in _TRITON_DTYPES:
            raise ValueError(f"x: the Triton kernel takes {_TRITON_DTYPES}, got {x.dtype}")
        if isinstance(tau, torch.Tensor):
            tau_t = tau.to(device=x.device).reshape(1).to(x.dtype).float()
        else:  # rounded to x's dtype here, on the host
            tau_t = float(torch.tensor(float(tau), dtype=x.dtype))
        return _threshold_triton(x, tau_t)
    if isinstance(tau, torch.Tensor):
        tau = tau.reshape(()).to(x.device)
    return threshold_mask_reference(x, tau)
