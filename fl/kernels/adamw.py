"""Masked AdamW, one fused pass over a flat buffer (parameters, gradient, moments, mask).

Per entry, with ``t`` the step count after this step::

    d = clamp(g, -c, c)                optional coordinate-wise clipping
    d = d + mu * (w - w_anchor)        optional FedProx proximal term
    d = d * mask                       pruned entries get no update ...
    w = w * (1 - lr * weight_decay)    decoupled decay, as torch.optim.AdamW
    m = lerp(m, d, 1 - beta1)          ... and their moments stay 0
    v = beta2 * v + (1 - beta2) * d * d
    w = w - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

Bias correction is torch.optim.AdamW's. A pruned entry stays 0: it is 0
when the mask is set, decay keeps 0 at 0, and its update is ``0 / eps``.

The reference writes the prepared (clipped, proximal, masked) gradient into
a workspace row and hands the whole flat buffer to torch's own fused AdamW
kernel (``torch._fused_adamw_``, what ``torch.optim.AdamW(fused=True)``
runs): one pass instead of foreach's seven, and bitwise equal to
``AdamW(fused=True)`` over one buffer. Over a model's separate tensors torch's
kernel can round a few entries differently: 3 of 192,555 by 1 ulp after 20
steps at 0.2M parameters, none at 1M (the agreement rows of
``benchmarks/kernels.py --sizes 2e5``). Where that private op is missing or
fails, it runs torch's single-tensor op sequence instead, bitwise equal to
``AdamW(foreach=False)``. (The two torch variants differ by about an ulp.)
Measured on the 10M-entry flat buffer of benchmarks/kernels.py, 2-core
EPYC, loaded host, best of 11: 121 ms fused vs 1003 ms op sequence.

A ``[rows, n]`` ``param`` is a stacked step (a cohort of clients,
fl/cohort.py): row ``r`` is stepped exactly as a single-client call on row
``r`` would step it, with its own learning rate, step count (bias
correction), clip bound, mask row and anchor row (or one shared ``[n]`` mask /
anchor); an inactive row keeps its parameters and both moments exactly. The
per-row scalars (decay factor, step size, ``sqrt(bias_correction2)``) are
computed on the host by :func:`adamw_scalars`, as the single-client launch
computes them, so a stacked Triton row equals the single-client Triton step
bitwise. The Triton kernel does all rows in one launch; the reference runs the
single-client reference row by row.

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

_fused_adamw: object = getattr(torch, "_fused_adamw_", None)


def adamw_scalars(step: int, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """``(step_size, sqrt(bias_correction2))`` exactly as torch's non-capturable AdamW."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return lr / bias_correction1, bias_correction2**0.5


# --- PyTorch reference ---------------------------------------------------------


def masked_adamw_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
    *,
    step: int | RowValues,
    lr: float | RowValues,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    prox_mu: float = 0.0,
    clip: float | RowValues | None = None,
    active: RowValues | None = None,
    workspace: torch.Tensor | None = None,
) -> None:
    """One masked AdamW step in place; ``step`` counts this step (1 on the first). A
    ``[rows, n]`` ``param`` steps each active row as its own single-client call."""
    if param.dim() == 2:
        rows = param.shape[0]
        steps, lrs = host_rows(step, rows), host_rows(lr, rows)
        flags = host_active(active, rows)
        clips = None if clip is None else host_rows(clip, rows) if per_row(clip) else [clip] * rows
        for r in range(rows):
            if flags is not None and not flags[r]:
                continue
            masked_adamw_step_reference(
                param[r], grad[r], exp_avg[r], exp_avg_sq[r], row_of(mask, r), row_of(anchor, r),
                step=int(steps[r]), lr=lrs[r], beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, prox_mu=prox_mu,
                clip=None if clips is None else clips[r], workspace=workspace,
            )  # fmt: skip
        return
    needs_d = clip is not None or prox_mu != 0 or mask is not None
    ws = workspace_rows(workspace, param, 2 + (prox_mu != 0))
    d = grad
    buf_d = ws[0].view(param.shape)
    if grad.dtype != torch.float32:  # fp16/bf16 gradient: upcast once, then fp32 maths
        d = buf_d.copy_(grad)
    if needs_d:
        if clip is not None:
            c = float(clip)
            torch.clamp(d, -c, c, out=buf_d)
            d = buf_d
        if prox_mu != 0:
            diff = torch.sub(param, anchor, out=ws[2].view(param.shape))
            torch.add(d, diff, alpha=prox_mu, out=buf_d)
            d = buf_d
        if mask is not None:
            torch.mul(d, mask, out=buf_d)
            d = buf_d
    if _run_fused(param, d, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
        return
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(d, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(d, d, value=1 - beta2)
    step_size, bias_correction2_sqrt = adamw_scalars(step, lr, beta1, beta2)
    denom = torch.sqrt(exp_avg_sq, out=ws[1].view(param.shape))
    denom.div_(bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _run_fused(
    param: torch.Tensor,
    d: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> bool:
    """torch's fused AdamW on the flat buffer; False (and off for good) if unavailable."""
    global _fused_adamw
    if _fused_adamw is None:
        return False
    try:
        _fused_adamw(
            [param], [d], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step))],
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
            amsgrad=False, maximize=False,
        )  # fmt: skip
    except (RuntimeError, NotImplementedError):  # not built for this device or dtype
        _fused_adamw = None
        return False
    return True


# --- Triton kernels ----------------------------------------------------------------


@triton.jit
def _adamw_update(
    w, d, m_ptr, v_ptr, mask_ptr, offs, inb,
    decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    HAS_MASK: tl.constexpr, HAS_WD: tl.constexpr,
):  # fmt: skip
    """Mask, decay, moments (stored) and the update of one block; returns the weights."""
    if HAS_MASK:
        d = d * tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
    if HAS_WD:
        w = w * decay
    m = tl.load(m_ptr + offs, mask=inb, other=0.0)
    v = tl.load(v_ptr + offs, mask=inb, other=0.0)
    # torch's lerp: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w)
    if one_minus_beta1 < 0.5:
        m = m + one_minus_beta1 * (d - m)
    else:
        m = d - (d - m) * (1.0 - one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * d * d
    # IEEE-rounded sqrt and division (tl.sqrt and / may be approximate on a GPU)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = w + (-step_size) * tl.div_rn(m, denom)
    tl.store(m_ptr + offs, m, mask=inb)
    tl.store(v_ptr + offs, v, mask=inb)
    return w


@triton.jit
def _masked_adamw_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, anchor_ptr, clip_ptr,
    n, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, prox_mu,
    HAS_MASK: tl.constexpr, HAS_PROX: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_WD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, inb = block_offsets(n, BLOCK)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    d = load_direction(w, g_ptr, anchor_ptr, clip_ptr, offs, inb, prox_mu, HAS_PROX, HAS_CLIP)
    w = _adamw_update(w, d, m_ptr, v_ptr, mask_ptr, offs, inb, decay, one_minus_beta1, beta2,
                      one_minus_beta2, step_size, bc2_sqrt, eps, HAS_MASK, HAS_WD)
    tl.store(w_ptr + offs, w, mask=inb)  # fmt: skip


@triton.jit
def _masked_adamw_rows_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, anchor_ptr, clip_ptr, scal_ptr, active_ptr,
    n, rows, mask_stride, anchor_stride, clip_stride,
    one_minus_beta1, beta2, one_minus_beta2, eps, prox_mu,
    HAS_MASK: tl.constexpr, HAS_PROX: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_WD: tl.constexpr, HAS_ACTIVE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The stacked step: program (i, r) does block i of row r; ``scal`` holds the rows'
    (decay, step_size, bc2_sqrt) as a [3, rows] fp32 tensor. An inactive row's programs
    load and store nothing."""
    row = tl.program_id(1).to(tl.int64)
    offs, inb = block_offsets(n, BLOCK)
    if HAS_ACTIVE:
        inb = inb & (tl.load(active_ptr + row) != 0)
    base = row * n
    decay = tl.load(scal_ptr + row)
    step_size = tl.load(scal_ptr + rows + row)
    bc2_sqrt = tl.load(scal_ptr + 2 * rows + row)
    w = tl.load(w_ptr + base + offs, mask=inb, other=0.0)
    d = load_direction(w, g_ptr + base, anchor_ptr + row * anchor_stride,
                       clip_ptr + row * clip_stride, offs, inb, prox_mu, HAS_PROX, HAS_CLIP)
    w = _adamw_update(w, d, m_ptr + base, v_ptr + base, mask_ptr + row * mask_stride, offs,
                      inb, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt,
                      eps, HAS_MASK, HAS_WD)
    tl.store(w_ptr + base + offs, w, mask=inb)  # fmt: skip


def masked_adamw_step_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
    *,
    step: int | RowValues,
    lr: float | RowValues,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    prox_mu: float = 0.0,
    clip: float | RowValues | None = None,
    active: RowValues | None = None,
    workspace: torch.Tensor | None = None,
    block: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Launch the fused kernel (unchecked; :func:`masked_adamw_step` checks)."""
    del workspace  # the fused kernel needs no scratch
    if param.dim() == 2:
        _launch_rows(param, grad, exp_avg, exp_avg_sq, mask, anchor, step=step, lr=lr,
                     beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                     prox_mu=prox_mu, clip=clip, active=active, block=block,
                     num_warps=num_warps)  # fmt: skip
        return
    n = param.numel()
    if n == 0:
        return
    block = block or block_size(n, param.device, gpu=OPTIM_GPU_BLOCK)
    launch = {"num_warps": num_warps} if num_warps else {}  # Triton's default (4) unless told
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    step_size, bc2_sqrt = adamw_scalars(step, lr, beta1, beta2)
    clip_t = clip_tensor(clip, param.device) if clip is not None else param
    _masked_adamw_kernel[(triton.cdiv(n, block),)](
        param, grad, exp_avg, exp_avg_sq,
        mask if mask is not None else param,
        anchor if prox_mu != 0 else param,
        clip_t, n, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2,
        step_size, bc2_sqrt, eps, float(prox_mu),
        HAS_MASK=mask is not None, HAS_PROX=prox_mu != 0, HAS_CLIP=clip is not None,
        HAS_WD=weight_decay != 0, BLOCK=block, **launch,
    )  # fmt: skip


def rows_scalars(
    steps: list, lrs: list, beta1: float, beta2: float, weight_decay: float,
    active: list[bool] | None = None,
) -> list[list[float]]:
    """Per row ``[decay, step_size, bc2_sqrt]`` (transposed: three lists), each computed
    in float64 as the single-client launch computes it; an inactive row's are unused
    (its step count may be 0) and set to 1."""
    out: list[list[float]] = [[], [], []]
    for r, (t, lr) in enumerate(zip(steps, lrs, strict=True)):
        if active is not None and not active[r]:
            vals = (1.0, 1.0, 1.0)
        else:
            vals = (1 - lr * weight_decay, *adamw_scalars(int(t), lr, beta1, beta2))
        for row, v in zip(out, vals, strict=True):
            row.append(v)
    return out


def _launch_rows(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor | None,
    anchor: torch.Tensor | None,
    *,
    step: int | RowValues,
    lr: float | RowValues,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
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
    flags = host_active(active, rows)
    scal = rows_scalars(host_rows(step, rows), host_rows(lr, rows), beta1, beta2, weight_decay,
                        flags)  # fmt: skip
    # float64 -> fp32 as a launch rounds a Python float; built on the host (pinned below)
    scal_t = torch.tensor(scal, dtype=torch.float32, device="cpu")
    scal_t = scal_t if dev.type == "cpu" else scal_t.pin_memory().to(dev, non_blocking=True)
    if clip is None:
        clip_t, clip_stride = param, 0
    elif per_row(clip):
        clip_t, clip_stride = device_rows(clip, rows, dev, torch.float32), 1
    else:
        clip_t, clip_stride = clip_tensor(clip, dev), 0
    active_t = None if active is None else device_rows(active, rows, dev, torch.uint8)
    _masked_adamw_rows_kernel[(triton.cdiv(n, block), rows)](
        param, grad, exp_avg, exp_avg_sq,
        mask if mask is not None else param,
        anchor if prox_mu != 0 else param,
        clip_t, scal_t, active_t if active_t is not None else param,
        n, rows, row_stride(mask), row_stride(anchor if prox_mu != 0 else None), clip_stride,
        1 - beta1, beta2, 1 - beta2, eps, float(prox_mu),
        HAS_MASK=mask is not None, HAS_PROX=prox_mu != 0, HAS_CLIP=clip is not None,
        HAS_WD=weight_decay != 0, HAS_ACTIVE=active_t is not None, BLOCK=block, **launch,
    )  # fmt: skip


# --- public, dispatching -----------------------------------------------------------


def masked_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
    *,
    step: int | RowValues,
    lr: float | RowValues,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    prox_mu: float = 0.0,
    clip: float | RowValues | None = None,
    active: RowValues | None = None,
    workspace: torch.Tensor | None = None,
    backend: str = "auto",
    check_mask_values: bool = True,
) -> None:
    """One fused masked AdamW step, in place on contiguous flat buffers.

    ``param``, ``exp_avg``, ``exp_avg_sq`` fp32; ``grad`` fp32/fp16/bf16;
    ``mask`` bool/uint8/fp32 0-1; ``anchor`` fp32 (needed when ``prox_mu !=
    0``); ``step`` is this step's count (1 on the first). ``workspace``:
    optional fp32 scratch of shape ``(3, n)`` for the reference.

    Stacked (a cohort): ``param`` ``[rows, n]``; ``grad`` and the moments
    likewise; ``mask`` and ``anchor`` ``[rows, n]`` or one shared ``[n]``;
    ``step``, ``lr`` and ``clip`` one value or one per row (``step`` and ``lr``
    are read on the host: pass numbers, not CUDA tensors, to avoid a wait);
    ``active`` one flag per row (None: all), an inactive row keeps its
    parameters and moments exactly. ``check_mask_values=False`` skips the 0/1
    scan of the mask (a caller that checked it once).
    """
    if isinstance(param, torch.Tensor) and param.dim() == 2:
        _check_rows(param, grad, exp_avg, exp_avg_sq, mask, anchor, step=step, lr=lr,
                    prox_mu=prox_mu, clip=clip, active=active, backend=backend,
                    check_mask_values=check_mask_values, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay, workspace=workspace)  # fmt: skip
        return
    if active is not None:
        raise ValueError("active: only for a stacked [rows, n] param")
    param = check_param(param)
    grad = check_like("grad", grad, param, GRAD_DTYPES)
    exp_avg = check_like("exp_avg", exp_avg, param, (torch.float32,))
    exp_avg_sq = check_like("exp_avg_sq", exp_avg_sq, param, (torch.float32,))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step: expected an int >= 1, got {step!r}")
    if mask is not None:
        mask = check_step_mask(mask, param) if check_mask_values else \
            check_like("mask", mask, param, MASK_DTYPES)
    if prox_mu != 0:
        if anchor is None:
            raise ValueError("anchor: required when prox_mu != 0")
        anchor = check_like("anchor", anchor, param, (torch.float32,))
    clip = check_clip(clip, param)
    kwargs = dict(
        step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        prox_mu=prox_mu, clip=clip, workspace=workspace,
    )  # fmt: skip
    if use_triton(backend, param.device):
        masked_adamw_step_triton(param, grad, exp_avg, exp_avg_sq, mask, anchor, **kwargs)
    else:
        masked_adamw_step_reference(param, grad, exp_avg, exp_avg_sq, mask, anchor, **kwargs)


def _check_rows(
    param: torch.Tensor,
    grad: object,
    exp_avg: object,
    exp_avg_sq: object,
    mask: object,
    anchor: object,
    *,
    step: object,
    lr: object,
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
    exp_avg = check_like("exp_avg", exp_avg, param, (torch.float32,))
    exp_avg_sq = check_like("exp_avg_sq", exp_avg_sq, param, (torch.float32,))
    flags = host_active(active, rows)
    steps = host_rows(check_row_values("step", step, rows), rows)
    for r, t in enumerate(steps):
        if (flags is None or flags[r]) and (isinstance(t, bool) or int(t) != t or t < 1):
            raise ValueError(f"step: expected ints >= 1 for the active rows, got {t!r} at row {r}")
    if mask is not None:
        mask, _ = check_row_mask(mask, param, check_mask_values)
    if prox_mu != 0:
        if anchor is None:
            raise ValueError("anchor: required when prox_mu != 0")
        anchor, _ = check_row_operand("anchor", anchor, param, (torch.float32,))
    lr = check_row_values("lr", lr, rows)
    clip = check_row_clip(clip, param)
    kwargs.update(step=steps, lr=lr, prox_mu=prox_mu, clip=clip, active=flags)
    if use_triton(backend, param.device):
        masked_adamw_step_triton(param, grad, exp_avg, exp_avg_sq, mask, anchor, **kwargs)
    else:
        masked_adamw_step_reference(param, grad, exp_avg, exp_avg_sq, mask, anchor, **kwargs)
