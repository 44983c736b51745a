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

The reference runs the same torch ops as torch.optim.SGD on one flat buffer,
writing temporaries into a caller-owned ``workspace`` instead of allocating
a fresh gradient-sized tensor each step; that is what keeps the masked step
within reach of torch's unmasked foreach step on CPU (benchmarks/kernels.py).
"""

from __future__ import annotations

import torch

from fl.kernels._dispatch import block_size, use_triton
from fl.kernels._optim_common import (
    GRAD_DTYPES,
    OPTIM_GPU_BLOCK,
    block_offsets,
    check_clip,
    check_like,
    check_param,
    check_step_mask,
    clip_tensor,
    load_direction,
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
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    prox_mu: float = 0.0,
    clip: float | torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> None:
    """One masked SGD step in place on flat ``param`` (and ``momentum_buffer``)."""
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


# --- Triton kernel ---------------------------------------------------------------


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
    # Rounded as torch's ops round (the launch turns the compiler's own fusion off): one
    # fused multiply-add where torch adds with an alpha, two roundings for mul_ then add_
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
    w = tl.fma(d, -lr, w)
    tl.store(w_ptr + offs, w, mask=inb)


def masked_sgd_step_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    prox_mu: float = 0.0,
    clip: float | torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    block: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Launch the fused kernel (unchecked; :func:`masked_sgd_step` checks)."""
    del workspace  # the fused kernel needs no scratch
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


# --- public, dispatching -----------------------------------------------------------


def masked_sgd_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    prox_mu: float = 0.0,
    clip: float | torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One fused masked SGD step, in place on contiguous flat buffers.

    ``param`` fp32; ``grad`` fp32/fp16/bf16; ``momentum_buffer`` fp32 (needed
    when ``momentum != 0``); ``mask`` bool/uint8/fp32 0-1; ``anchor`` fp32
    (the FedProx ``w_global``, needed when ``prox_mu != 0``); ``clip`` a
    bound ``c`` for ``clamp(g, -c, c)``. All shaped like ``param``.
    ``workspace``: optional fp32 scratch of shape ``(2, n)`` for the reference.
    """
    param = check_param(param)
    grad = check_like("grad", grad, param, GRAD_DTYPES)
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer: required when momentum != 0")
        momentum_buffer = check_like("momentum_buffer", momentum_buffer, param, (torch.float32,))
    if nesterov and momentum == 0:
        raise ValueError("nesterov: requires momentum != 0")
    if mask is not None:
        mask = check_step_mask(mask, param)
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
