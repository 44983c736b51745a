"""Masked SGD, one fused pass over a flat buffer (parameters, gradient, momentum, mask).

Per entry, in this order::

    d = clamp(g, -c, c)              optional coordinate-wise clipping
    d = d + mu * (w - w_anchor)      optional FedProx proximal term
    d = d + weight_decay * w         (coupled, as torch.optim.SGD)
    d = d * mask                     a pruned entry gets no update ...
    buf = momentum * buf + d         ... and its momentum stays 0
    d = d + momentum * buf  (Nesterov) or d = buf
    w = w - lr * d

Clipping acts on the raw gradient, so it equals ``clip_grad_value_`` before a
plain step. Pruned entries stay exactly 0 because :class:`fl.optim.MaskedSGD`
zeroes them (and their momentum) when the mask is set and no update reaches
them afterwards. With no options the op order is torch.optim.SGD's (momentum
buffer starts at 0, so the first step equals torch's clone), and the
reference matches it bitwise. The Triton kernel rounds as those torch ops do:
an explicit fused multiply-add where torch adds with an alpha (``add(x, y,
alpha=a)``), two roundings for ``mul_`` then ``add_``, with the compiler's own
fusion off, so it too matches bitwise (tests/test_kernels_optim.py, on the
interpreter and on a GPU). ``g`` may be fp16/bf16; maths is fp32.

A ``[rows, n]`` ``param`` is a stacked step (a cohort of clients, fl/cohort.py):
row ``r`` is stepped exactly as a single-client call on row ``r`` would step it,
with its own learning rate, clip bound, mask row and anchor row (or one shared
``[n]`` mask / anchor), and rows whose ``active`` flag is off are not touched at
all (parameters and momentum). The Triton kernel does all rows in one launch;
the reference runs the single-client reference row by row, which makes it the
oracle by construction (tests/test_kernels_cohort.py).

The reference runs the same torch ops as torch.optim.SGD on one flat buffer,
writing temporaries into a caller-owned ``workspace`` instead of allocating
a fresh gradient-sized tensor each step; that is what keeps the masked step
within reach of torch's unmasked foreach step on CPU (benchmarks/kernels.py).

Why one module of this length: the house rule for kernels (docs/ARCHITECTURE.md,
Kernels) keeps the Triton kernels, their launchers, the PyTorch reference and the
dispatching function of one op together, since they are read and changed together.
"""

from __future__ import annotations

import torch

from fl.kernels._dispatch import block_size, use_triton
from fl.kernels._optim_common import (
    GRAD_DTYPES,
    MASK_DTYPES,
    OPTIM_GPU_BLOCK,
    RowValues,
    block_offsets,
    check_clip,
    check_like,
    check_param,
    check_row_clip,
    check_row_mask,
    check_row_operand,
    check_row_values,
    check_rows_param,
    check_step_mask,
    clip_tensor,
    device_rows,
    host_active,
    host_rows,
    load_direction,
    per_row,
    row_of,
    row_stride,
    workspace_rows,
)
from fl.kernels._triton import tl, triton

# --- PyTorch reference ---------------------------------------------------------


def masked_sgd_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
    *,
    lr: float | RowValues,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    prox_mu: float = 0.0,
    clip: float | RowValues | None = None,
    active: RowValues | None = None,
    workspace: torch.Tensor | None = None,
) -> None:
    """One masked SGD step in place on flat ``param`` (and ``momentum_buffer``); a
    ``[rows, n]`` ``param`` steps each active row as its own single-client call."""
    if param.dim() == 2:
        rows = param.shape[0]
        lrs, flags = host_rows(lr, rows), host_active(active, rows)
        clips = None if clip is None else host_rows(clip, rows) if per_row(clip) else [clip] * rows
        for r in range(rows):
            if flags is not None and not flags[r]:
                continue
            masked_sgd_step_reference(
                param[r], grad[r], None if momentum_buffer is None else momentum_buffer[r],
                row_of(mask, r), row_of(anchor, r), lr=lrs[r], momentum=momentum,
                weight_decay=weight_decay, nesterov=nesterov, prox_mu=prox_mu,
                clip=None if clips is None else clips[r], workspace=workspace,
            )  # fmt: skip
        return
    # With plain momentum the mask folds into the momentum update (addcmul reads it in
    # the pass that exists anyway); otherwise it costs one multiply into the workspace.
    fold_mask = mask is not None and momentum != 0 and not nesterov
    needs_d = (
        clip is not None or prox_mu != 0 or weight_decay != 0
        or (mask is not None and not fold_mask)
        or (momentum != 0 and nesterov) or grad.dtype != torch.float32
    )  # fmt: skip
    rows = 1 + (prox_mu != 0) if needs_d else 0
    ws = workspace_rows(workspace, param, rows) if rows else None
    d = grad
    if ws is not None:
        buf_d = ws[0].view(param.shape)
        if grad.dtype != torch.float32:  # fp16/bf16 gradient: upcast once, then fp32 maths
            d = buf_d.copy_(grad)
        if clip is not None:
            c = float(clip)
            torch.clamp(d, -c, c, out=buf_d)
            d = buf_d
        if prox_mu != 0:
            diff = torch.sub(param, anchor, out=ws[1].view(param.shape))
            torch.add(d, diff, alpha=prox_mu, out=buf_d)
            d = buf_d
        if weight_decay != 0:
            torch.add(d, param, alpha=weight_decay, out=buf_d)
            d = buf_d
        if mask is not None and not fold_mask:
            torch.mul(d, mask, out=buf_d)
            d = buf_d
        elif d is grad:
            buf_d.copy_(grad)
            d = buf_d
    if momentum != 0:
        momentum_buffer.mul_(momentum)
        if fold_mask:  # buf + d * 1 is buf + d exactly; buf + d * 0 is buf (= 0 when pruned)
            momentum_buffer.addcmul_(d, mask if mask.dtype == torch.float32 else mask.float())
        else:
            momentum_buffer.add_(d)
        if nesterov:
            d = d.add_(momentum_buffer, alpha=momentum)
        else:
            d = momentum_buffer
    param.add_(d, alpha=-lr)


# --- Triton kernels ----------------------------------------------------------------


@triton.jit
def _sgd_update(
    w, d, buf_ptr, mask_ptr, offs, inb, lr, momentum, weight_decay,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_WD: tl.constexpr,
):  # fmt: skip
    """Decay, mask, momentum and the update of one block; returns the new weights.

    Rounded as torch's ops round (the launch turns the compiler's own fusion off): one
    fused multiply-add where torch adds with an alpha, two roundings for mul_ then add_.
    """
    if HAS_WD:
        d = tl.fma(w, weight_decay, d)
    if HAS_MASK:
        d = d * tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
    if HAS_MOMENTUM:
        b = tl.load(buf_ptr + offs, mask=inb, other=0.0)
        b = b * momentum + d
        tl.store(buf_ptr + offs, b, mask=inb)
        if NESTEROV:
            d = tl.fma(b, momentum, d)
        else:
            d = b
    return tl.fma(d, -lr, w)


@triton.jit
def _masked_sgd_kernel(
    w_ptr, g_ptr, buf_ptr, mask_ptr, anchor_ptr, clip_ptr,
    n, lr, momentum, weight_decay, prox_mu,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_PROX: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_WD: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs, inb = block_offsets(n, BLOCK)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    d = load_direction(w, g_ptr, anchor_ptr, clip_ptr, offs, inb, prox_mu, HAS_PROX, HAS_CLIP)
    w = _sgd_update(w, d, buf_ptr, mask_ptr, offs, inb, lr, momentum, weight_decay,
                    HAS_MOMENTUM, NESTEROV, HAS_MASK, HAS_WD)  # fmt: skip
    tl.store(w_ptr + offs, w, mask=inb)


@triton.jit
def _masked_sgd_rows_kernel(
    w_ptr, g_ptr, buf_ptr, mask_ptr, anchor_ptr, clip_ptr, lr_ptr, active_ptr,
    n, mask_stride, anchor_stride, clip_stride, momentum, weight_decay, prox_mu,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_PROX: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_WD: tl.constexpr,
    HAS_ACTIVE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The stacked step: program (i, r) does block i of row r. An inactive row's
    programs load and store nothing (every access is masked off)."""
    row = tl.program_id(1).to(tl.int64)
    offs, inb = block_offsets(n, BLOCK)
    if HAS_ACTIVE:
        inb = inb & (tl.load(active_ptr + row) != 0)
    base = row * n
    lr = tl.load(lr_ptr + row)
    w = tl.load(w_ptr + base + offs, mask=inb, other=0.0)
    d = load_direction(w, g_ptr + base, anchor_ptr + row * anchor_stride,
                       clip_ptr + row * clip_stride, offs, inb, prox_mu, HAS_PROX, HAS_CLIP)
    w = _sgd_update(w, d, buf_ptr + base, mask_ptr + row * mask_stride, offs, inb, lr,
                    momentum, weight_decay, HAS_MOMENTUM, NESTEROV, HAS_MASK, HAS_WD)
    tl.store(w_ptr + base + offs, w, mask=inb)  # fmt: skip


def masked_sgd_step_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
    *,
    lr: float | RowValues,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    prox_mu: float = 0.0,
    clip: float | RowValues | None = None,
    active: RowValues | None = None,
    workspace: torch.Tensor | None = None,
    block: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Launch the fused kernel (unchecked; :func:`masked_sgd_step` checks)."""
    del workspace  # the fused kernel needs no scratch
    if param.dim() == 2:
        _launch_rows(param, grad, momentum_buffer, mask, anchor, lr=lr, momentum=momentum,
                     weight_decay=weight_decay, nesterov=nesterov, prox_mu=prox_mu, clip=clip,
                     active=active, block=block, num_warps=num_warps)  # fmt: skip
        return
    n = param.numel()
    if n == 0:
        return
    block = block or block_size(n, param.device, gpu=OPTIM_GPU_BLOCK)
    launch = {"num_warps": num_warps} if num_warps else {}  # Triton's default (4) unless told
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    clip_t = clip_tensor(clip, param.device) if clip is not None else param
    _masked_sgd_kernel[(triton.cdiv(n, block),)](
        param, grad,
        momentum_buffer if momentum != 0 else param,
        mask if mask is not None else param,
        anchor if prox_mu != 0 else param,
        clip_t, n, float(lr), float(momentum), float(weight_decay), float(prox_mu),
        HAS_MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), HAS_MASK=mask is not None,
        HAS_PROX=prox_mu != 0, HAS_CLIP=clip is not None, HAS_WD=weight_decay != 0,
        BLOCK=block, enable_fp_fusion=False, **launch,
    )  # fmt: skip


def _launch_rows(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    mask: torch.Tensor | None,
    anchor: torch.Tensor | None,
    *,
    lr: float | RowValues,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    prox_mu: float,
    clip: float | RowValues | None,
    active: RowValues | None,
    block: int | None,
    num_warps: int | None,
) -> None:
    rows, n = param.shape
    if rows == 0 or n == 0:
        return
    dev = param.device
    block = block or block_size(n, dev, gpu=OPTIM_GPU_BLOCK)
    launch = {"num_warps": num_warps} if num_warps else {}
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if clip is None:
        clip_t, clip_stride = param, 0
    elif per_row(clip):
        clip_t, clip_stride = device_rows(clip, rows, dev, torch.float32), 1
    else:
        clip_t, clip_stride = clip_tensor(clip, dev), 0
    active_t = None if active is None else device_rows(active, rows, dev, torch.uint8)
    _masked_sgd_rows_kernel[(triton.cdiv(n, block), rows)](
        param, grad,
        momentum_buffer if momentum != 0 else param,
        mask if mask is not None else param,
        anchor if prox_mu != 0 else param,
        clip_t, device_rows(lr, rows, dev, torch.float32),
        active_t if active_t is not None else param,
        n, row_stride(mask), row_stride(anchor if prox_mu != 0 else None), clip_stride,
        float(momentum), float(weight_decay), float(prox_mu),
        HAS_MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), HAS_MASK=mask is not None,
        HAS_PROX=prox_mu != 0, HAS_CLIP=clip is not None, HAS_WD=weight_decay != 0,
        HAS_ACTIVE=active_t is not None, BLOCK=block, enable_fp_fusion=False, **launch,
    )  # fmt: skip


# --- public, dispatching -----------------------------------------------------------


def masked_sgd_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
    *,
    lr: float | RowValues,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    prox_mu: float = 0.0,
    clip: float | RowValues | None = None,
    active: RowValues | None = None,
    workspace: torch.Tensor | None = None,
    backend: str = "auto",
    check_mask_values: bool = True,
) -> None:
    """One fused masked SGD step, in place on contiguous flat buffers.

    ``param`` fp32; ``grad`` fp32/fp16/bf16; ``momentum_buffer`` fp32 (needed
    when ``momentum != 0``); ``mask`` bool/uint8/fp32 0-1; ``anchor`` fp32
    (the FedProx ``w_global``, needed when ``prox_mu != 0``); ``clip`` a
    bound ``c`` for ``clamp(g, -c, c)``. All shaped like ``param``.
    ``workspace``: optional fp32 scratch of shape ``(2, n)`` for the reference.

    Stacked (a cohort): ``param`` ``[rows, n]``; ``grad``, ``momentum_buffer``
    likewise; ``mask`` and ``anchor`` ``[rows, n]`` or one shared ``[n]``;
    ``lr`` and ``clip`` one value or one per row; ``active`` one flag per row
    (None: all), an inactive row keeps its parameters and momentum exactly.
    ``check_mask_values=False`` skips the 0/1 scan of the mask (a caller that
    checked it once, as fl.optim does when the mask is set).
    """
    if isinstance(param, torch.Tensor) and param.dim() == 2:
        _check_rows(param, grad, momentum_buffer, mask, anchor, lr=lr, momentum=momentum,
                    nesterov=nesterov, prox_mu=prox_mu, clip=clip, active=active,
                    backend=backend, check_mask_values=check_mask_values,
                    weight_decay=weight_decay, workspace=workspace)  # fmt: skip
        return
    if active is not None:
        raise ValueError("active: only for a stacked [rows, n] param")
    param = check_param(param)
    grad = check_like("grad", grad, param, GRAD_DTYPES)
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer: required when momentum != 0")
        momentum_buffer = check_like("momentum_buffer", momentum_buffer, param, (torch.float32,))
    if nesterov and momentum == 0:
        raise ValueError("nesterov: requires momentum != 0")
    if mask is not None:
        mask = check_step_mask(mask, param) if check_mask_values else \
            check_like("mask", mask, param, MASK_DTYPES)
    if prox_mu != 0:
        if anchor is None:
            raise ValueError("anchor: required when prox_mu != 0")
        anchor = check_like("anchor", anchor, param, (torch.float32,))
    clip = check_clip(clip, param)
    kwargs = dict(
        lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
        prox_mu=prox_mu, clip=clip, workspace=workspace,
    )  # fmt: skip
    if use_triton(backend, param.device):
        masked_sgd_step_triton(param, grad, momentum_buffer, mask, anchor, **kwargs)
    else:
        masked_sgd_step_reference(param, grad, momentum_buffer, mask, anchor, **kwargs)


def _check_rows(
    param: torch.Tensor,
    grad: object,
    momentum_buffer: object,
    mask: object,
    anchor: object,
    *,
    lr: object,
    momentum: float,
    nesterov: bool,
    prox_mu: float,
    clip: object,
    active: object,
    backend: str,
    check_mask_values: bool,
    **kwargs: object,
) -> None:
    """Check a stacked call's arguments, then run it on the chosen backend."""
    param = check_rows_param(param)
    rows = param.shape[0]
    grad = check_like("grad", grad, param, GRAD_DTYPES)
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer: required when momentum != 0")
        momentum_buffer = check_like("momentum_buffer", momentum_buffer, param, (torch.float32,))
    if nesterov and momentum == 0:
        raise ValueError("nesterov: requires momentum != 0")
    if mask is not None:
        mask, _ = check_row_mask(mask, param, check_mask_values)
    if prox_mu != 0:
        if anchor is None:
            raise ValueError("anchor: required when prox_mu != 0")
        anchor, _ = check_row_operand("anchor", anchor, param, (torch.float32,))
    lr = check_row_values("lr", lr, rows)
    clip = check_row_clip(clip, param)
    if active is not None:
        check_row_values("active", active, rows)
    kwargs.update(lr=lr, momentum=momentum, nesterov=nesterov, prox_mu=prox_mu, clip=clip,
                  active=active)  # fmt: skip
    if use_triton(backend, param.device):
        masked_sgd_step_triton(param, grad, momentum_buffer, mask, anchor, **kwargs)
    else:
        masked_sgd_step_reference(param, grad, momentum_buffer, mask, anchor, **kwargs)
