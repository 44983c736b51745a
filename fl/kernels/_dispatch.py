"""The one place that chooses a backend, and the input checks every kernel shares.

``auto`` sends CUDA tensors to Triton and everything else to the PyTorch
reference (with one log line the first time); ``triton`` forces the Triton
kernel and raises if it cannot run (no Triton, or CPU tensors without
``TRITON_INTERPRET=1``); ``torch`` forces the reference.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch

from fl.kernels._triton import HAS_TRITON, TRITON_SKIPPED

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

_log = logging.getLogger("fl.kernels")
_logged_fallback = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, device: torch.device) -> bool:
    """True when the call should run the Triton kernel on ``device``."""
    global _logged_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            why = TRITON_SKIPPED or "Triton is not importable"
            raise RuntimeError(f"backend='triton' requested but {why}")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 "
                "(set before triton is imported); use backend='auto' for the reference"
            )
        return True
    if device.type == "cuda" and HAS_TRITON:
        return True
    if not _logged_fallback:
        _logged_fallback = True
        why = (TRITON_SKIPPED or "Triton is not importable") if device.type == "cuda" \
            else f"{device.type} tensors"
        _log.info("fl.kernels: using the PyTorch reference kernels (%s)", why)
    return False


# --- input checks: each raises ValueError naming the argument -----------------


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_flat(name: str, t: object, *, contiguous: bool = True) -> torch.Tensor:
    """A 1-D (or any-shape, read flat) tensor; contiguous unless told otherwise."""
    t = check_tensor(name, t)
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous())")
    return t


def check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: on {t.device}, but {ref_name} is on {ref.device}")


def check_mask(name: str, mask: object, *, validate_values: bool = True) -> torch.Tensor:
    """A contiguous bool or uint8 mask whose entries are 0 or 1."""
    mask = check_flat(name, mask)
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype != torch.uint8:
        raise ValueError(f"{name}: expected a bool or uint8 mask, got {mask.dtype}")
    if validate_values and mask.numel() and bool((mask > 1).any()):
        bad = int((mask > 1).sum())
        raise ValueError(f"{name}: mask entries must be 0 or 1 ({bad} entries are not)")
    return mask


_INTERPRETER_BLOCK = 65536


def block_size(n: int, device: torch.device, gpu: int = 4096) -> int:
    """Entries per program: ``gpu`` on a GPU; on the interpreter (CPU tensors) up to 64K.

    The interpreter runs programs one after another in Python, so fewer, larger
    programs are much faster there; never larger than ``n`` rounded up to a
    power of two. On a GPU the optimizer kernels use a measured ``gpu``
    (``OPTIM_GPU_BLOCK``); the other kernels' defaults are not tuned on a card.
    """
    cap = gpu if device.type == "cuda" else _INTERPRETER_BLOCK
    return max(16, min(cap, 1 << max(0, (n - 1).bit_length())))
