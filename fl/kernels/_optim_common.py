"""What the fused optimizer kernels share: input checks, workspace handling, the
per-row values of a stacked (cohort) step, and the start of each Triton step (the
clipped, proximal update direction).

A stacked step works on a ``[rows, n]`` buffer: one row per client of a cohort
(fl/cohort.py), each row exactly what a single-client step would see. Values
that may differ per row (learning rate, clip bound, step count, ``active``) are
given as a number (every row), a sequence or a 1-D tensor of ``rows`` entries;
masks and FedProx anchors as ``[rows, n]`` or one ``[n]`` row shared by all.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def check_rows_param(param: object) -> torch.Tensor:
    """A stacked step's parameters: a contiguous fp32 ``[rows, n]`` tensor."""
    param = check_param(param)
    if param.dim() != 2:
        raise ValueError(f"param: expected a [rows, n] tensor, got shape {tuple(param.shape)}")
    return param


def check_row_operand(
    name: str, t: object, param: torch.Tensor, dtypes: tuple, *, shared_ok: bool = True
) -> tuple[torch.Tensor, int]:
    """``[rows, n]`` like ``param`` (row stride ``n``) or, with ``shared_ok``, one ``[n]``
    row every row reads (row stride 0). Returns the tensor and its row stride."""
    t = check_flat(name, t)
    rows, n = param.shape
    if shared_ok and t.dim() == 1 and t.shape[0] == n:
        check_same_device(name, t, "param", param)
        if t.dtype not in dtypes:
            raise ValueError(f"{name}: expected one of {dtypes}, got {t.dtype}")
        return t, 0
    if t.shape != param.shape:
        allowed = f"{tuple(param.shape)}" + (f" or ({n},)" if shared_ok else "")
        raise ValueError(f"{name}: shape {tuple(t.shape)}; allowed: {allowed}")
    return check_like(name, t, param, dtypes), n


def check_row_mask(mask: object, param: torch.Tensor, check_values: bool) -> tuple:
    mask, stride = check_row_operand("mask", mask, param, MASK_DTYPES)
    if check_values and mask.dtype != torch.bool and mask.numel():
        bad = int(((mask != 0) & (mask != 1)).sum())
        if bad:
            raise ValueError(f"mask: entries must be 0 or 1 ({bad} entries are not)")
    return mask, stride


RowValues = float | int | Sequence[float] | Sequence[int] | Sequence[bool] | torch.Tensor


def check_row_values(name: str, value: object, rows: int) -> RowValues:
    """A number, or a sequence / 1-D tensor with one entry per row."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name}: expected a number or {rows} values (one per row), got {value!r}")
    if isinstance(value, int | float):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value
        if value.dim() != 1 or value.shape[0] != rows:
            raise ValueError(f"{name}: expected {rows} values (one per row), got shape "
                             f"{tuple(value.shape)}")  # fmt: skip
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != rows:
            raise ValueError(f"{name}: expected {rows} values (one per row), got {len(value)}")
        return value
    raise ValueError(f"{name}: expected a number or {rows} values (one per row), got {value!r}")


def host_rows(value: RowValues, rows: int) -> list:
    """Per-row values as a host list (a CUDA tensor is read back: the reference and the
    host-computed AdamW scalars need numbers)."""
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.dim() else [value.item()] * rows
    if isinstance(value, int | float):
        return [value] * rows
    return list(value)


def device_rows(
    value: RowValues | list, rows: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Per-row values as a ``[rows]`` tensor on ``device``. From the host they travel
    through pinned memory without blocking: a blocking copy would make the host wait
    for the GPU at every step (what fl/train.py avoids for the loss too)."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=dtype)
        return t.expand(rows).contiguous() if t.dim() == 0 else t
    host = torch.tensor(host_rows(value, rows), dtype=dtype, device="cpu")
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def host_active(active: object, rows: int) -> list[bool] | None:
    """``active`` as a host list of bools (None: every row steps)."""
    if active is None:
        return None
    if isinstance(active, torch.Tensor):
        if active.dim() != 1 or active.shape[0] != rows:
            raise ValueError(f"active: expected {rows} flags (one per row), got shape "
                             f"{tuple(active.shape)}")  # fmt: skip
        return [bool(a) for a in active.tolist()]
    if isinstance(active, Sequence) and not isinstance(active, str) and len(active) == rows:
        return [bool(a) for a in active]
    raise ValueError(f"active: expected {rows} flags (one per row), got {active!r}")


def per_row(value: object) -> bool:
    """True for per-row values (a sequence or 1-D tensor), False for one value."""
    return not isinstance(value, int | float) and not (
        isinstance(value, torch.Tensor) and value.dim() == 0
    )


def row_of(t: torch.Tensor | None, r: int) -> torch.Tensor | None:
    """Row ``r`` of a ``[rows, n]`` operand; a shared ``[n]`` one as it is."""
    return t if t is None or t.dim() == 1 else t[r]


def row_stride(t: torch.Tensor | None) -> int:
    """Row stride of a per-row operand: its row length, or 0 for a shared row."""
    return 0 if t is None or t.dim() == 1 else t.shape[1]


def check_row_clip(clip: object, param: torch.Tensor) -> RowValues | None:
    """None, one bound for every row, or one bound per row (each >= 0)."""
    rows = param.shape[0]
    if clip is None or isinstance(clip, int | float | bool):
        return check_clip(clip, param)
    if isinstance(clip, torch.Tensor) and clip.dim() == 0:
        return check_clip(clip, param)
    clip = check_row_values("clip", clip, rows)
    if not isinstance(clip, torch.Tensor) and not all(
        isinstance(c, int | float) and not isinstance(c, bool) and c >= 0 for c in clip
    ):
        raise ValueError(f"clip: expected non-negative floats, got {list(clip)!r}")
    return clip


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
