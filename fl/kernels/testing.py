"""Kernel tests' helpers: assertions whose failures say how many entries differ and
where, and the device the tests make their tensors on.

``BONSAI_TEST_DEVICE`` (default ``cpu``) picks that device: on CPU the Triton
kernels run under TRITON_INTERPRET=1; with ``cuda`` (and TRITON_INTERPRET=0) the
same tests compile them for the GPU (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import os

import torch

TEST_DEVICE = os.environ.get("BONSAI_TEST_DEVICE", "cpu")


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the test device (random tensors are made there)."""
    return torch.Generator(device=TEST_DEVICE).manual_seed(seed)


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bitwise-equal values (NaN == NaN), same dtype and shape."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.reshape(-1), expected.reshape(-1)
    differ = (a != e) & ~(a.isnan() & e.isnan()) if a.is_floating_point() else a != e
    bad = int(differ.sum())
    if bad:
        idx = differ.nonzero()[:5, 0].tolist()
        raise AssertionError(
            f"{what}: {bad} of {a.numel()} entries differ; first at {idx}: "
            f"got {a[idx].tolist()}, expected {e[idx].tolist()}"
        )


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""
) -> None:
    """|actual - expected| <= atol + rtol |expected| entrywise, with a count of violations."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.reshape(-1).double(), expected.reshape(-1).double()
    err = (a - e).abs()
    differ = err > atol + rtol * e.abs()
    bad = int(differ.sum())
    if bad:
        idx = differ.nonzero()[:5, 0].tolist()
        raise AssertionError(
            f"{what}: {bad} of {a.numel()} entries outside atol={atol} rtol={rtol} "
            f"(max abs err {float(err.max()):.3g}); first at {idx}: got {a[idx].tolist()}, "
            f"expected {e[idx].tolist()}"
        )
