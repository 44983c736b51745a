"""Optional Triton import: ``import fl.kernels`` must work where Triton is absent.

Where Triton is missing (edge devices, macOS, Windows) ``triton.jit`` becomes
a no-op decorator and ``tl`` a stand-in, so the kernel modules still import;
dispatch never launches a kernel then (``backend="triton"`` raises).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

try:  # pragma: no branch
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    HAS_TRITON = False

    def _jit(fn: Any = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b))  # type: ignore[assignment]
    tl = SimpleNamespace(constexpr=Any)  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "triton", "tl"]
