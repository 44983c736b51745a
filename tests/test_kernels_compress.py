"""Compression kernels: Triton (under TRITON_INTERPRET=1) against the PyTorch references,
and both against obvious torch code written here, independently of fl/kernels.

Exact equality for masks, packing, gather/scatter, order statistics and int8
codes; stated tolerances where the op order differs (sq_dev: torch's addcmul
fuses with FMA on CPU, the interpreter does not).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import (
    TEST_DEVICE,
    assert_close,
    assert_exact,
    assert_ulp,
    generator,
    linear_quantile,
)

import fl.kernels as K

ROOT = Path(__file__).resolve().parent.parent

SIZES = [1, 1023, 1025]
BIG = 1_000_003  # 1M + 3: only for the cheap streaming kernels
BACKENDS = ["torch", "triton"]


pytestmark = pytest.mark.usefixtures("on_test_device")


# --- obvious torch code (also the benchmark's baselines) ----------------------------


def obvious_pack_bits(mask: torch.Tensor) -> torch.Tensor:
    m = mask.reshape(-1).to(torch.uint8)
    m = torch.cat([m, m.new_zeros((-m.numel()) % 8)]).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], device=m.device)
    return (m * weights).sum(dim=1).to(torch.uint8)


def obvious_unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    idx = torch.arange(n, device=packed.device)
    return ((packed.to(torch.int64)[idx // 8] >> (idx % 8)) & 1).bool()


def obvious_gather(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1)[mask.reshape(-1).bool()]


def obvious_scatter(kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.numel(), dtype=kept.dtype, device=kept.device)
    out[mask.reshape(-1).bool().nonzero()[:, 0]] = kept
    return out.view(mask.shape)


def obvious_quantize(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    pad = torch.cat([x.float(), x.new_zeros((-n) % block).float()]).view(-1, block)
    amax = pad.abs().max(dim=1).values
    scale = amax / amax.new_full((), 127.0)  # IEEE quotient: x / 127 multiplies on a GPU
    q = torch.where(scale[:, None] > 0, pad / scale[:, None].clamp_min(1e-45), 0).round()
    return q.to(torch.int8).view(-1)[:n], scale


def obvious_sq_dev(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    return acc.double() + w * (a.double() - b.double()) ** 2


def obvious_segment_minmax(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        seg = x[lo:hi].float()
        if hi == lo:
            continue
        mn, mx = seg.min(), seg.max()
        out[lo:hi] = 1.0 if mx == mn else ((seg - mn) / (mx - mn)).to(x.dtype)
    return out


def obvious_kth(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(x.reshape(-1)).values[k - 1]


# --- pack / unpack ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [*SIZES, 8, 9, 64, 65, BIG])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_pack_unpack_matches_obvious(backend: str, n: int, dtype: torch.dtype) -> None:
    mask = (torch.rand(n, generator=generator(n)) < 0.37).to(dtype)
    packed = K.pack_bits(mask, backend=backend)
    assert_exact(packed, obvious_pack_bits(mask), f"pack_bits n={n}")
    assert_exact(K.unpack_bits(packed, n, backend=backend), mask.bool(), f"unpack_bits n={n}")


def test_pack_bits_bit_order() -> None:
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    for backend in BACKENDS:
        assert K.pack_bits(mask, backend=backend).tolist() == [0b1000_0001, 0b10]


@settings(max_examples=40, deadline=None)
@given(bits=st.lists(st.booleans(), max_size=300), backend=st.sampled_from(BACKENDS))
def test_pack_unpack_round_trip(bits: list[bool], backend: str) -> None:
    mask = torch.tensor(bits, dtype=torch.bool)
    packed = K.pack_bits(mask, backend=backend)
    assert packed.numel() == (len(bits) + 7) // 8
    assert K.unpack_bits(packed, len(bits), backend=backend).tolist() == bits


# --- gather / scatter -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [*SIZES, BIG])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_gather_scatter_match_obvious(backend: str, n: int, density: float) -> None:
    g = generator(n)
    values = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) < density
    kept = K.gather_kept(values, mask, backend=backend)
    assert_exact(kept, obvious_gather(values, mask), f"gather_kept n={n}")
    back = K.scatter_kept(kept, mask, backend=backend)
    assert_exact(back, obvious_scatter(kept, mask), f"scatter_kept n={n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32, torch.float64])
def test_gather_scatter_dtypes_and_shapes(backend: str, dtype: torch.dtype) -> None:
    g = generator(7)
    values = (torch.randn(33, 31, generator=g) * 100).to(dtype)
    mask = (torch.rand(33, 31, generator=g) < 0.5).to(torch.uint8)
    kept = K.gather_kept(values, mask, backend=backend)
    assert_exact(kept, obvious_gather(values, mask), "gather_kept 2-D")
    assert_exact(K.scatter_kept(kept, mask, backend=backend), values * mask.to(dtype), "scatter")


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(-1e6, 1e6, width=32), st.booleans()), max_size=200),
    backend=st.sampled_from(BACKENDS),
)
def test_gather_scatter_round_trip(data: list[tuple[float, bool]], backend: str) -> None:
    values = torch.tensor([v for v, _ in data], dtype=torch.float32)
    mask = torch.tensor([m for _, m in data], dtype=torch.bool)
    kept = K.gather_kept(values, mask, backend=backend)
    assert kept.tolist() == [v for v, m in zip(values.tolist(), mask.tolist(), strict=True) if m]
    assert_exact(K.scatter_kept(kept, mask, backend=backend), values * mask, "round trip")
    assert_exact(K.gather_kept(K.scatter_kept(kept, mask, backend=backend), mask), kept, "again")


# --- int8 blocks ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(  # every size with two block sizes; one big case is enough
    ("n", "block"), [(n, b) for n in SIZES for b in (256, 100)] + [(BIG, 256)])
def test_quantize_matches_obvious_and_bound(backend: str, n: int, block: int) -> None:
    x = torch.randn(n, generator=generator(n)) * torch.logspace(-3, 3, n)
    x[: min(n, block)] = 0.0 if n > 2 * block else x[: min(n, block)]  # an all-zero block
    q, scales = K.quantize_int8_blocks(x, block, backend=backend)
    q_obv, s_obv = obvious_quantize(x, block)
    assert_exact(scales, s_obv, "scales")
    assert_exact(q, q_obv, "int8 codes")
    deq = K.dequantize_int8_blocks(q, scales, block, backend=backend)
    assert_exact(deq, q.float() * scales.repeat_interleave(block)[:n], "dequantize")
    # |x - deq| <= scale / 2, plus fp32 rounding of x / scale and q * scale: each at most
    # an ulp of max|x| = 127 scale, i.e. 127 * 2**-23 scale
    scale = scales.double().repeat_interleave(block)[:n]
    err = (deq.double() - x.double()).abs()
    bad = int((err > scale * (0.5 + 2 * 127 * 2**-23)).sum())
    worst = float((err / scale).max())
    assert bad == 0, f"{bad} of {n} entries exceed scale/2 (max err / scale = {worst})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_half_inputs(dtype: torch.dtype) -> None:
    x = torch.randn(1025, generator=generator(3)).to(dtype)
    ref = K.quantize_int8_blocks(x, backend="torch")
    tri = K.quantize_int8_blocks(x, backend="triton")
    assert_exact(tri[0], ref[0], "codes")
    assert_exact(tri[1], ref[1], "scales")


# --- squared deviation ----------------------------------------------------------------

# (dtype of a and b, atol, rtol): torch's addcmul may fuse with FMA, the interpreter not
SQ_DEV_TOL = [
    (torch.float32, 1e-6, 1e-6),
    (torch.float16, 1e-6, 1e-6),
    (torch.bfloat16, 1e-6, 1e-6),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(  # every size and dtype; one big case (fp32) is enough
    ("n", "dtype", "atol", "rtol"),
    [(n, *tol) for n in SIZES for tol in SQ_DEV_TOL] + [(BIG, *SQ_DEV_TOL[0])])
def test_sq_dev_accumulate(
    backend: str, n: int, dtype: torch.dtype, atol: float, rtol: float
) -> None:
    g = generator(n)
    acc = torch.rand(n, generator=g)
    a, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    expected = obvious_sq_dev(acc, a, b, 0.37)
    out = K.sq_dev_accumulate(acc, a, b, 0.37, backend=backend)
    assert out is acc
    assert_close(acc, expected, atol, rtol, f"sq_dev {dtype} n={n}")


# --- segment min-max -------------------------------------------------------------------


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


SEGMENTS = {
    "one": [1025],
    "many": [1, 1023, 0, 1025, 7, 3 * 65536 + 5, 2],
    "single-entries": [1, 1, 1],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", sorted(SEGMENTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segment_minmax(backend: str, layout: str, dtype: torch.dtype) -> None:
    lengths = SEGMENTS[layout]
    offsets = _offsets(lengths)
    n = int(offsets[-1])
    x = (torch.randn(n, generator=generator(n)) * 5).to(dtype)
    if layout == "many":
        x[offsets[3] : offsets[4]] = 2.5  # a constant segment -> all 1.0
    out = K.segment_minmax_normalize(x, offsets, backend=backend)
    assert_exact(out, obvious_segment_minmax(x, offsets), f"segment_minmax {layout}")
    assert out.min() >= 0 and out.max() <= 1


# --- order statistics and threshold ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [*SIZES, BIG])
def test_kth_value_exact(backend: str, n: int) -> None:
    x = torch.randn(n, generator=generator(n))
    x[: n // 3] = x[n // 2]  # ties
    if n > 2:
        x[1], x[2] = -0.0, float("-inf")
    for k in sorted({1, n, (n + 1) // 2, max(1, n // 7)}):
        assert_exact(K.kth_value(x, k, backend=backend), obvious_kth(x, k), f"k={k} n={n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kth_value_half(backend: str, dtype: torch.dtype) -> None:
    x = torch.randn(1025, generator=generator(5)).to(dtype)
    for k in (1, 500, 1025):
        assert_exact(K.kth_value(x, k, backend=backend), obvious_kth(x, k), f"{dtype} k={k}")


#: our quantile vs torch.quantile, in ulps of the result: the rule is the same, the
#: arithmetic is torch's and changed between versions (torch 2.13 rounds the rank q(n-1)
#: to float32 first; 2.14 interpolates with other roundings). Worst seen: 3 (torch 2.14.1).
TORCH_QUANTILE_ULPS = 8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [*SIZES, BIG])
def test_quantile_is_the_linear_quantile(backend: str, n: int) -> None:
    """Bitwise the obvious sort-and-lerp code; within a few ulps of torch.quantile."""
    x = torch.rand(n, generator=generator(n)) ** 3
    for q in (0.0, 0.1, 0.3, 0.5, 0.9, 0.999, 1.0):
        got = K.quantile(x, q, backend=backend)
        assert_exact(got, linear_quantile(x, q), f"quantile q={q} n={n}")
        assert_ulp(got, torch.quantile(x, q), TORCH_QUANTILE_ULPS, f"torch q={q} n={n}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantile_nan(backend: str) -> None:
    x = torch.randn(1025, generator=generator(1))
    x[17] = float("nan")
    assert torch.isnan(K.quantile(x, 0.3, backend=backend))
    assert torch.isnan(K.kth_value(x, 1025, backend=backend))


def test_above_2_pow_24() -> None:
    """Exact above 2**24 entries (where torch.quantile refused before torch 2.14, and
    a float32 rank can no longer name every entry): checked against a full sort."""
    n = 2**24 + 5
    x = torch.rand(n, generator=generator(24))
    srt = torch.sort(x).values
    q = 0.3
    lo = int(q * (n - 1))
    assert_exact(K.kth_value(x, n - 3, backend="torch"), srt[n - 4], "kth")
    for backend in BACKENDS:  # the Triton quantile runs two radix selects (k = lo+1, lo+2)
        got = K.quantile(x, q, backend=backend)
        assert_exact(got, linear_quantile(x, q), f"quantile {backend}")
        assert srt[lo] <= got <= srt[lo + 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [*SIZES, BIG])
def test_threshold_mask(backend: str, n: int) -> None:
    x = torch.randn(n, generator=generator(n))
    for tau in (0.1, torch.tensor(-0.5), float(x[0])):
        assert_exact(K.threshold_mask(x, tau, backend=backend), x > tau, f"tau={tau}")
    xh = x.to(torch.float16)
    assert_exact(K.threshold_mask(xh, 0.1, backend=backend), xh > 0.1, "fp16")


# --- bad input, dispatch, optional Triton ---------------------------------------------


def test_bad_input_names_the_argument() -> None:
    x = torch.randn(10)
    m = torch.ones(10, dtype=torch.bool)
    cases = [
        (lambda: K.pack_bits(torch.tensor([0, 2], dtype=torch.uint8)), "mask"),
        (lambda: K.pack_bits(torch.ones(10, dtype=torch.float32)), "mask"),
        (lambda: K.pack_bits(m[::2]), "mask"),
        (lambda: K.unpack_bits(torch.zeros(2, dtype=torch.uint8), 20), "packed"),
        (lambda: K.unpack_bits(torch.zeros(2, dtype=torch.uint8), -1), "n"),
        (lambda: K.gather_kept(x, m[:9]), "mask"),
        (lambda: K.gather_kept(x[::2], m[:5]), "values"),
        (lambda: K.gather_kept(x, torch.ones(10, dtype=torch.bool, device="meta")), "mask"),
        (lambda: K.scatter_kept(x[:3], m), "kept"),
        (lambda: K.quantize_int8_blocks(x, 0), "block"),
        (lambda: K.quantize_int8_blocks(torch.arange(10)), "x"),
        (lambda: K.dequantize_int8_blocks(torch.zeros(10, dtype=torch.int8), x[:2], 4), "scales"),
        (lambda: K.sq_dev_accumulate(x.clone(), x, x.half(), 1.0), "b"),
        (lambda: K.sq_dev_accumulate(x.clone(), x[:5], x[:5], 1.0), "a"),
        (lambda: K.sq_dev_accumulate(x.clone(), x, x.to("meta"), 1.0), "b"),
        (lambda: K.segment_minmax_normalize(x, torch.tensor([0, 5, 9])), "offsets"),
        (lambda: K.segment_minmax_normalize(x, torch.tensor([0, 6, 5, 10])), "offsets"),
        (lambda: K.kth_value(x, 0), "k"),
        (lambda: K.kth_value(x, 11), "k"),
        (lambda: K.quantile(x, 1.5), "q"),
        (lambda: K.quantile(x[:0], 0.5), "x"),
        (lambda: K.threshold_mask(x, torch.ones(2)), "tau"),
        (lambda: K.pack_bits(m, backend="cuda"), "backend"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fn()


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="checks the dispatch of CPU tensors")
def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    import fl.kernels._dispatch as dispatch
    import fl.kernels.bitpack as bitpack

    m = torch.ones(9, dtype=torch.bool)

    def boom(*_: object) -> None:
        raise AssertionError("auto on CPU must not launch Triton")

    monkeypatch.setattr(bitpack, "_pack_bits_triton", boom)
    assert K.pack_bits(m).tolist() == [255, 1]  # auto on CPU -> reference
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.pack_bits(m, backend="triton")
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="not importable"):
        K.pack_bits(m, backend="triton")


def test_import_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fl, fl.kernels as K, fl.optim\n"
        "assert not K.HAS_TRITON\n"
        "assert K.pack_bits(torch.ones(3, dtype=torch.bool)).tolist() == [7]\n"
        "try:\n    K.pack_bits(torch.ones(3, dtype=torch.bool), backend='triton')\n"
        "except RuntimeError as e:\n    print('raised', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised" in out.stdout


def test_triton_not_imported_where_it_cannot_run() -> None:
    """No GPU visible and no interpreter: Triton stays out of the process (about 70 MB
    per simulated-client actor), the reference kernels run, and forcing
    ``backend='triton'`` says why it cannot. Holds for both kinds of torch build: a
    CPU-only one, and the CUDA build pip installs by default (CUDA_VISIBLE_DEVICES=""
    hides a GPU where there is one); the message names the kind."""
    code = (
        "import sys, torch\n"
        "import fl.kernels as K, clients.app, server.app\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert K.pack_bits(torch.ones(3, dtype=torch.bool)).tolist() == [7]\n"
        "try:\n    K.pack_bits(torch.ones(3, dtype=torch.bool), backend='triton')\n"
        "except RuntimeError as e:\n    print('raised', e)\n"
    )
    env = {kk: v for kk, v in os.environ.items() if kk != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "raised" in out.stdout and "TRITON_INTERPRET" in out.stdout
    kind = "CPU-only build" if torch.version.cuda is None else "no GPU is visible"
    assert kind in out.stdout


@pytest.mark.parametrize(("cuda", "gpu", "interpret", "expected"), [
    (None, False, "0", False),      # CPU-only torch
    (None, False, "1", True),       # ... under the interpreter (the tests)
    ("13.0", False, "0", False),    # pip's default CUDA build on a machine without a GPU
    ("13.0", True, "0", True),      # a GPU machine
    ("13.0", False, "1", True),
])
def test_triton_can_run_by_build_and_device(monkeypatch: pytest.MonkeyPatch, cuda, gpu,
                                            interpret, expected) -> None:
    from fl.kernels import _triton

    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert _triton.triton_can_run() is expected


def test_segment_minmax_many_segments_path() -> None:
    """More segments than the per-segment loop handles: the vectorised path, same answer."""
    lengths = [3, 0, 1, 5] * 300
    offsets = _offsets(lengths)
    x = torch.randn(int(offsets[-1]), generator=generator(9))
    x[offsets[2] : offsets[3]] = 1.0  # single entries are constant too
    expected = obvious_segment_minmax(x, offsets)
    for backend in BACKENDS:
        assert_exact(K.segment_minmax_normalize(x, offsets, backend=backend), expected, backend)
