"""Fused optimizer kernels: Triton (under TRITON_INTERPRET=1) against the PyTorch reference.

The reference uses torch's own ops in torch's order. The SGD kernel rounds as
those ops do on a GPU (an explicit fused multiply-add where torch adds with an
alpha, compiler fusion off): benchmarks/gpu_check.sh records it bitwise equal to
``torch.optim.SGD`` per card and version (benchmarks/results/kernels-*.json).
Under the interpreter that cannot be asserted on every supported Triton: from
Triton 3.7 on the interpreter rounds ``tl.fma`` twice (a multiply, then an add)
while torch's CPU kernels fuse it, so each fused step can be one rounding apart.
The tests bound that: SGD_ULPS below. The AdamW kernel orders its maths
differently from torch's fused AdamW, hence a relative tolerance: a few fp32 ulps
per step. Pruned entries must be exactly 0 in both.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_checks import SGD_ULPS, assert_close, assert_exact, assert_ulp, generator

from fl.kernels.adamw import masked_adamw_step
from fl.kernels.sgd import masked_sgd_step

SIZES = [1, 1025]  # option grids: a 1-entry buffer and a masked tail past a power of two
STEPS = 3
# (grad dtype, atol, rtol) for AdamW: grads are upcast exactly, so every dtype gets fp32's
# tolerance; the slack is a different order of operations over STEPS steps (a few ulps)
GRAD_TOL = [
    (torch.float32, 1e-6, 1e-5),
    (torch.float16, 1e-6, 1e-5),
    (torch.bfloat16, 1e-6, 1e-5),
]


pytestmark = pytest.mark.usefixtures("on_test_device")


def _problem(n: int, seed: int, masked: bool) -> dict[str, torch.Tensor | None]:
    g = generator(seed)
    mask = (torch.rand(n, generator=g) < 0.6).float() if masked else None
    param = torch.randn(n, generator=g)
    if mask is not None:
        param *= mask  # the optimizer zeroes pruned entries when the mask is set
    return {
        "param": param,
        "anchor": torch.randn(n, generator=g),
        "grads": torch.randn(STEPS, n, generator=g) * 3,
        "mask": mask,
    }


SGD_OPTIONS = [
    dict(momentum=m, nesterov=nest, weight_decay=wd, prox_mu=mu, clip=clip)
    for (m, nest), wd, mu, clip in itertools.product(
        [(0.0, False), (0.9, False), (0.9, True)], [0.0, 1e-2], [0.0, 0.1], [None, 1.5]
    )
]


def _run_sgd(backend: str, prob: dict, grad_dtype: torch.dtype, opts: dict) -> tuple:
    param = prob["param"].clone()
    buf = torch.zeros_like(param) if opts["momentum"] else None
    mask = prob["mask"]
    for s in range(STEPS):
        masked_sgd_step(
            param, prob["grads"][s].to(grad_dtype), buf, mask,
            prob["anchor"] if opts["prox_mu"] else None, lr=0.05, backend=backend, **opts,
        )  # fmt: skip
    return param, buf


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_masked_sgd_triton_matches_reference(n: int, masked: bool, opts: dict) -> None:
    prob = _problem(n, seed=n, masked=masked)
    ref_p, ref_b = _run_sgd("torch", prob, torch.float32, opts)
    tri_p, tri_b = _run_sgd("triton", prob, torch.float32, opts)
    assert_ulp(tri_p, ref_p, SGD_ULPS["param"], f"param {opts}", floor=1.0)
    if ref_b is not None:
        assert_ulp(tri_b, ref_b, SGD_ULPS["momentum"], f"momentum {opts}", floor=1.0)
    if masked:
        pruned = prob["mask"] == 0
        for name, t in (("ref param", ref_p), ("triton param", tri_p)):
            assert int((t[pruned] != 0).sum()) == 0, f"{name}: pruned entries moved"
        if ref_b is not None:
            assert int((ref_b[pruned] != 0).sum()) == 0 and int((tri_b[pruned] != 0).sum()) == 0


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32])
def test_masked_sgd_grad_and_mask_dtypes(grad_dtype: torch.dtype, mask_dtype: torch.dtype) -> None:
    prob = _problem(1023, seed=1, masked=True)  # 1023: a tail one short of a power of two
    prob["mask"] = prob["mask"].to(mask_dtype)
    opts = dict(momentum=0.9, nesterov=False, weight_decay=1e-2, prox_mu=0.1, clip=1.5)
    ref_p, _ = _run_sgd("torch", prob, grad_dtype, opts)
    tri_p, _ = _run_sgd("triton", prob, grad_dtype, opts)
    assert_ulp(tri_p, ref_p, SGD_ULPS["param"], f"grad {grad_dtype} mask {mask_dtype}",
               floor=1.0)


def test_masked_sgd_big_flat_buffer() -> None:
    """1M+3 entries, the whole option set on: exercises many programs and a masked tail."""
    prob = _problem(1_000_003, seed=3, masked=True)
    opts = dict(momentum=0.9, nesterov=True, weight_decay=1e-2, prox_mu=0.1, clip=1.5)
    ref_p, ref_b = _run_sgd("torch", prob, torch.float32, opts)
    tri_p, tri_b = _run_sgd("triton", prob, torch.float32, opts)
    assert_ulp(tri_p, ref_p, SGD_ULPS["param"], "param", floor=1.0)
    assert_ulp(tri_b, ref_b, SGD_ULPS["momentum"], "momentum", floor=1.0)


ADAMW_OPTIONS = [
    dict(weight_decay=wd, prox_mu=mu, clip=clip, beta1=b1)
    for wd, mu, clip, b1 in itertools.product([0.0, 1e-2], [0.0, 0.1], [None, 1.5], [0.9, 0.3])
]


def _run_adamw(backend: str, prob: dict, grad_dtype: torch.dtype, opts: dict) -> tuple:
    param = prob["param"].clone()
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    opts = dict(opts)
    for s in range(STEPS):
        masked_adamw_step(
            param, prob["grads"][s].to(grad_dtype), m, v, prob["mask"],
            prob["anchor"] if opts["prox_mu"] else None, step=s + 1, lr=0.01, backend=backend,
            **opts,
        )  # fmt: skip
    return param, m, v


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("opts", ADAMW_OPTIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_masked_adamw_triton_matches_reference(n: int, masked: bool, opts: dict) -> None:
    prob = _problem(n, seed=n + 1, masked=masked)
    ref = _run_adamw("torch", prob, torch.float32, opts)
    tri = _run_adamw("triton", prob, torch.float32, opts)
    # m / (sqrt(v) + eps) amplifies a 1-ulp moment difference where v is tiny: 1e-5 relative
    for name, r, t in zip(("param", "exp_avg", "exp_avg_sq"), ref, tri, strict=True):
        assert_close(t, r, 1e-6, 1e-5, f"{name} {opts}")
    if masked:
        pruned = prob["mask"] == 0
        for name, t in zip(("param", "exp_avg", "exp_avg_sq") * 2, ref + tri, strict=True):
            assert int((t[pruned] != 0).sum()) == 0, f"{name}: pruned entries moved"


@pytest.mark.parametrize(("grad_dtype", "atol", "rtol"), GRAD_TOL)
def test_masked_adamw_grad_dtypes(grad_dtype: torch.dtype, atol: float, rtol: float) -> None:
    prob = _problem(1023, seed=2, masked=True)
    opts = dict(weight_decay=1e-2, prox_mu=0.1, clip=1.5, beta1=0.9)
    ref = _run_adamw("torch", prob, grad_dtype, opts)
    tri = _run_adamw("triton", prob, grad_dtype, opts)
    for name, r, t in zip(("param", "exp_avg", "exp_avg_sq"), ref, tri, strict=True):
        assert_close(t, r, atol, rtol, f"{name} grad {grad_dtype}")


def test_several_tensors_in_one_flat_buffer_match_torch() -> None:
    """One flat step over four tensors equals torch's per-tensor SGD: the reference
    bitwise (torch's own ops on both sides), Triton within SGD_ULPS."""
    shapes = [(33, 17), (5,), (1025,), (7, 3, 3, 3)]
    g = generator(11)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(STEPS)]
    torch_params = [p.clone() for p in params]
    opt = torch.optim.SGD(torch_params, lr=0.05, momentum=0.9, weight_decay=1e-2)
    flat = {b: torch.cat([p.reshape(-1) for p in params]) for b in ("torch", "triton")}
    bufs = {b: torch.zeros_like(flat[b]) for b in flat}
    for s in range(STEPS):
        for p, gr in zip(torch_params, grads[s], strict=True):
            p.grad = gr
        opt.step()
        gflat = torch.cat([gr.reshape(-1) for gr in grads[s]])
        for b in flat:
            masked_sgd_step(
                flat[b], gflat, bufs[b], lr=0.05, momentum=0.9, weight_decay=1e-2, backend=b
            )
    expected = torch.cat([p.reshape(-1) for p in torch_params])
    assert_exact(flat["torch"], expected, "reference vs torch.optim.SGD")
    assert_ulp(flat["triton"], expected, SGD_ULPS["param"], "triton vs torch.optim.SGD",
               floor=1.0)


def test_bad_input_names_the_argument() -> None:
    p = torch.zeros(8)
    g = torch.zeros(8)
    cases = [
        (lambda: masked_sgd_step(p.half(), g, lr=0.1), "param"),
        (lambda: masked_sgd_step(p, g[:7], lr=0.1), "grad"),
        (lambda: masked_sgd_step(p, g.double(), lr=0.1), "grad"),
        (lambda: masked_sgd_step(p, g.to("meta"), lr=0.1), "grad"),
        (lambda: masked_sgd_step(torch.zeros(8, 2)[:, 0], g, lr=0.1), "param"),
        (lambda: masked_sgd_step(p, g, lr=0.1, momentum=0.9), "momentum_buffer"),
        (lambda: masked_sgd_step(p, g, None, torch.full((8,), 2.0), lr=0.1), "mask"),
        (lambda: masked_sgd_step(p, g, None, torch.ones(8, dtype=torch.int32), lr=0.1), "mask"),
        (lambda: masked_sgd_step(p, g, lr=0.1, prox_mu=0.1), "anchor"),
        (lambda: masked_sgd_step(p, g, lr=0.1, clip=-1.0), "clip"),
        (lambda: masked_sgd_step(p, g, lr=0.1, nesterov=True), "nesterov"),
        (lambda: masked_adamw_step(p, g, p.clone(), p[:4].clone(), step=1, lr=0.1), "exp_avg_sq"),
        (lambda: masked_adamw_step(p, g, p.clone(), p.clone(), step=0, lr=0.1), "step"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fn()
