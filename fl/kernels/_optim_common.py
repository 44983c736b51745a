"""What the fused optimizer kernels share: input checks, workspace handling, and
the start of each Triton step (the clipped, proximal update direction)."""

from __future__ import annotations

import torch

from fl.kernels._dispatch import check_flat, check_same_device, check_tensor
from fl.kernels._triton import tl, triton

GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8, torch.float32)
# Entries per program on a GPU. On an H200, BLOCK 1024 with Triton's default 4 warps ran
# SGD at 96% and AdamW at 95% of a copy's bandwidth, within noise of the best of BLOCK
# 512-4096 x 2-8 warps; AdamW fell to 40% at Triton's usual 4096. Measured by
# benchmarks/kernels.py --sweep-launch (docs/RESULTS.md).
OPTIM_GPU_BLOCK = 1024


def check_param(param: object) -> torch.Tensor:
    param = check_flat("param", param)
    if param.dtype != torch.float32:
        raise ValueError(f"param: expected float32 parameters, got {param.dtype}")
    return param


def check_like(name: str, t: object, param: torch.Tensor, dtypes: tuple) -> torch.Tensor:
    """Same shape and device as ``param``, contiguous, one of ``dtypes``."""
    t = check_flat(name, t)
    if t.shape != param.shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} != param shape {tuple(param.shape)}")
    check_same_device(name, t, "param", param)
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected one of {dtypes}, got {t.dtype}")
    return t


def check_step_mask(mask: object, param: torch.Tensor) -> torch.Tensor:
    mask = check_like("mask", mask, param, MASK_DTYPES)
    if mask.dtype != torch.bool and mask.numel():
        bad = int(((mask != 0) & (mask != 1)).sum())
        if bad:
            raise ValueError(f"mask: entries must be 0 or 1 ({bad} entries are not)")
    return mask


def check_clip(clip: object, param: torch.Tensor) -> torch.Tensor | float | None:
    if clip is None:
        return None
    if isinstance(clip, torch.Tensor):
        check_tensor("clip", clip)
        if clip.numel() != 1:
            raise ValueError(f"clip: expected a scalar, got shape {tuple(clip.shape)}")
        return clip
    if isinstance(clip, bool) or not isinstance(clip, int | float) or not clip >= 0:
        raise ValueError(f"clip: expected a non-negative float, got {clip!r}")
    return float(clip)


def clip_tensor(clip: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """The clip bound as a 1-element fp32 tensor on ``device`` (a kernel pointer)."""
    return torch.as_tensor(clip, dtype=torch.float32).reshape(1).to(device)


def workspace_rows(workspace: torch.Tensor | None, param: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` fp32 scratch rows shaped like flat ``param`` (allocated if not given)."""
    n = param.numel()
    if workspace is None:
        return torch.empty(rows, n, dtype=torch.float32, device=param.device)
    if (
        workspace.dtype != torch.float32
        or workspace.dim() != 2
        or workspace.shape[0] < rows
        or workspace.shape[1] != n
        or not workspace.is_contiguous()
        or workspace.device != param.device
    ):
        raise ValueError(
            f"workspace: expected a contiguous float32 tensor of shape (>={rows}, {n}) "
            f"on {param.device}, got {workspace.dtype} {tuple(workspace.shape)}"
        )
    return workspace


# --- Triton: the start of both fused steps ----------------------------------------


@triton.jit
def block_offsets(n, BLOCK: tl.constexpr):
    """This program's ``BLOCK`` entries (int64 offsets: buffers above 2^31) and which
    of them lie inside ``n``."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return offs, offs < n


@triton.jit
def load_direction(
    w, g_ptr, anchor_ptr, clip_ptr, offs, inb, prox_mu,
    HAS_PROX: tl.constexpr, HAS_CLIP: tl.constexpr,
):  # fmt: skip
    """d = clamp(g, -c, c) + mu (w - w_anchor), in fp32 whatever ``g``'s dtype; the
    options are compile-time flags, so a step without them pays nothing."""
    d = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_CLIP:
        c = tl.load(clip_ptr)
        d = tl.minimum(tl.maximum(d, -c), c)
    if HAS_PROX:
        a = tl.load(anchor_ptr + offs, mask=inb, other=0.0)
        d = tl.fma(w - a, prox_mu, d)  # torch.add(d, w - a, alpha=mu): one rounding
    return d
