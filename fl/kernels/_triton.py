"""Triton, imported only where a kernel can run: ``import fl.kernels`` works anywhere.

Triton kernels run on CUDA/ROCm tensors, or on CPU tensors under the
interpreter (``TRITON_INTERPRET=1``, the tests). Without a visible GPU neither
can happen: a CPU-only build of torch (edge devices), or the CUDA build that pip
installs by default on Linux running on a machine without a GPU (this project's
CI, most laptops). There Triton is not imported: it would cost every process
about 70 MB of resident memory (every Ray actor of a simulation) for kernels
that are never launched. The same holds where Triton is not installed (macOS,
Windows).

Without Triton, ``triton.jit`` is a no-op decorator and ``tl`` a stand-in, so
the kernel modules still import; dispatch never launches a kernel then
(``backend="triton"`` raises and says why).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch


def triton_can_run() -> bool:
    """True where a Triton kernel could be launched: the interpreter, or a GPU build of
    torch that sees a GPU. ``torch.cuda.is_available()`` asks the driver for a device
    count; it creates no CUDA context, so a process that forks later is unaffected."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    gpu_build = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
    return gpu_build and torch.cuda.is_available()


def _why_skipped() -> str:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return "Triton was not imported: torch is a CPU-only build and TRITON_INTERPRET is not 1"
    return "Triton was not imported: no GPU is visible and TRITON_INTERPRET is not 1"


TRITON_SKIPPED = ""  #: why Triton was not imported ("" when it was)
if triton_can_run():
    try:  # pragma: no branch
        import triton
        import triton.language as tl

        HAS_TRITON = True
    except ImportError:  # pragma: no cover - exercised only where Triton is absent
        HAS_TRITON = False
        TRITON_SKIPPED = "Triton is not importable"
else:
    HAS_TRITON = False
    TRITON_SKIPPED = _why_skipped()

if not HAS_TRITON:

    def _jit(fn: Any = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b))  # type: ignore[assignment]
    tl = SimpleNamespace(constexpr=Any)  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "TRITON_SKIPPED", "triton", "tl", "triton_can_run"]
