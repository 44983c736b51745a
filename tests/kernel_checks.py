"""Kernel tests' helpers (test code, so it lives in tests/): assertions whose failures
say how many entries differ and where, and the device the tests make their tensors on.

Three strengths of comparison, each for its case: :func:`assert_exact` where the
project controls both sides (a reference against itself, or against the obvious
code written in the test), :func:`assert_ulp` where two correct implementations
may round differently (a Triton kernel under the interpreter, whose ``tl.fma``
rounds twice from Triton 3.7 on, against torch's fused multiply-add; our
interpolation against another torch version's), and :func:`assert_close` for
different orders of operations compounded over steps (AdamW).

``BONSAI_TEST_DEVICE`` (default ``cpu``) picks that device: on CPU the Triton
kernels run under TRITON_INTERPRET=1; with ``cuda`` (and TRITON_INTERPRET=0) the
same tests compile them for the GPU (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import os

import torch

TEST_DEVICE = os.environ.get("BONSAI_TEST_DEVICE", "cpu")

#: Triton SGD (under the interpreter) vs the reference over 3 steps of the kernel tests,
#: in ulps of max(|expected|, 1): each step rounds up to three fused multiply-adds
#: differently (the interpreter rounds ``tl.fma`` twice from Triton 3.7 on; torch's CPU
#: kernels fuse it), and the momentum buffer sums gradients of up to ~12 (randn * 3),
#: 8 ulps of 1.0 each. Worst seen (Triton 3.8, 3 seeds, 1k to 1M entries): 5 for the
#: parameters, 12 for the momentum buffer.
SGD_ULPS = {"param": 16, "momentum": 32}


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


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s dtype at ``|x|`` (distance to the next representable value
    away from zero), in float64."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def assert_ulp(
    actual: torch.Tensor, expected: torch.Tensor, ulps: float, what: str = "",
    floor: float = 0.0,
) -> None:
    """``|actual - expected| <= ulps * ulp(max(|expected|, floor))`` entrywise.

    ``floor`` is the magnitude of the terms that were summed: where ``expected``
    is small because large terms cancelled, a rounding difference in a term is
    an ulp of the term, not of the (tiny) result.
    """
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.reshape(-1), expected.reshape(-1)
    scale = ulp(torch.clamp(e.abs(), min=floor)) if floor else ulp(e)
    err = (a.double() - e.double()).abs()
    both_nan = a.isnan() & e.isnan()
    differ = ~both_nan & ~(err <= ulps * scale)
    bad = int(differ.sum())
    if bad:
        idx = differ.nonzero()[:5, 0].tolist()
        worst = float((err[~both_nan] / scale[~both_nan]).max())
        raise AssertionError(
            f"{what}: {bad} of {a.numel()} entries more than {ulps} ulp apart (worst "
            f"{worst:.1f} ulp); first at {idx}: got {a[idx].tolist()}, expected "
            f"{e[idx].tolist()}"
        )


def linear_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The obvious ``q``-quantile ('linear'): sort, the rank ``q (n - 1)`` in float64,
    ``lerp`` between its two neighbours with the fractional part in ``x``'s dtype.
    What :func:`fl.kernels.quantile` computes, written independently of it."""
    srt = torch.sort(x.reshape(-1)).values
    rank = q * (srt.numel() - 1)  # a Python float: float64
    lo = int(rank)
    if lo + 1 >= srt.numel() or rank == lo:
        return srt[lo]
    return torch.lerp(srt[lo], srt[lo + 1], torch.tensor(rank - lo, dtype=x.dtype))
