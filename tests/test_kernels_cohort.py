"""Stacked (cohort) optimizer steps: a ``[rows, n]`` buffer, one row per client.

Three claims, each with its comparison (fl/kernels/testing.py):

- the stacked reference is the single-client reference applied row by row, with
  each row's learning rate, clip bound, step count, mask row and anchor row, and
  an inactive row untouched (parameters and state): bitwise, since the project
  controls both sides;
- the stacked Triton kernel (under TRITON_INTERPRET=1, or compiled with
  BONSAI_TEST_DEVICE=cuda) is the single-client Triton kernel row by row,
  bitwise: the same per-entry code (shared ``@triton.jit`` helpers) and the same
  host-computed scalars;
- the stacked Triton kernel against the stacked reference: SGD within
  ``SGD_ULPS`` (the interpreter rounds ``tl.fma`` twice from Triton 3.7 on),
  AdamW within 1e-6 + 1e-5 relative (a different order of operations than
  torch's fused AdamW), as for the single-client kernels
  (tests/test_kernels_optim.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_checks import SGD_ULPS, assert_close, assert_exact, assert_ulp, generator

from fl.kernels.adamw import masked_adamw_step
from fl.kernels.sgd import masked_sgd_step

pytestmark = pytest.mark.usefixtures("on_test_device")

ROWS, STEPS = 3, 3
LRS = [0.05, 0.02, 0.1]
CLIPS = [1.5, 0.7, 3.0]
# which rows step at each step: all, then row 1 finished, then row 0 finished
ACTIVE = [[True, True, True], [True, False, True], [False, True, True]]
MASKS = ["none", "rows", "shared"]


def _problem(n: int, seed: int, masks: str) -> dict:
    g = generator(seed)
    if masks == "rows":
        mask = (torch.rand(ROWS, n, generator=g) < 0.6).float()
    elif masks == "shared":
        mask = (torch.rand(n, generator=g) < 0.6).float()
    else:
        mask = None
    param = torch.randn(ROWS, n, generator=g)
    if mask is not None:
        param *= mask  # the optimizer zeroes pruned entries when the mask is set
    return {
        "param": param,
        "anchor": torch.randn(ROWS, n, generator=g),
        "grads": torch.randn(STEPS, ROWS, n, generator=g) * 3,
        "mask": mask,
    }


def _row(t: torch.Tensor | None, r: int) -> torch.Tensor | None:
    return t if t is None or t.dim() == 1 else t[r]


SGD_OPTIONS = [
    dict(momentum=m, nesterov=nest, weight_decay=wd, prox_mu=mu, clip=clip)
    for ((m, nest), wd, mu), clip in zip(
        itertools.product([(0.0, False), (0.9, False), (0.9, True)], [0.0, 1e-2], [0.0, 0.1]),
        itertools.cycle([None, "rows", 1.5]),
    )
]


def _sgd_stacked(backend: str, prob: dict, opts: dict) -> tuple:
    param = prob["param"].clone()
    buf = torch.zeros_like(param) if opts["momentum"] else None
    clip = CLIPS if opts["clip"] == "rows" else opts["clip"]
    for s in range(STEPS):
        masked_sgd_step(
            param, prob["grads"][s], buf, prob["mask"],
            prob["anchor"] if opts["prox_mu"] else None, lr=LRS, active=ACTIVE[s],
            backend=backend, **{**opts, "clip": clip},
        )  # fmt: skip
    return param, buf


def _sgd_row_by_row(backend: str, prob: dict, opts: dict) -> tuple:
    """The single-client call on each row, written here independently of the kernels'
    row loop: skip a row whose flag is off, else step it with its own values."""
    param = prob["param"].clone()
    buf = torch.zeros_like(param) if opts["momentum"] else None
    for s in range(STEPS):
        for r in range(ROWS):
            if not ACTIVE[s][r]:
                continue
            clip = CLIPS[r] if opts["clip"] == "rows" else opts["clip"]
            masked_sgd_step(
                param[r], prob["grads"][s][r], None if buf is None else buf[r],
                _row(prob["mask"], r), prob["anchor"][r] if opts["prox_mu"] else None,
                lr=LRS[r], backend=backend, **{**opts, "clip": clip},
            )  # fmt: skip
    return param, buf


def _ids(o: dict) -> str:
    return "-".join(f"{v}" for v in o.values())


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=_ids)
def test_sgd_stacked_is_single_client_row_by_row(masks: str, opts: dict) -> None:
    prob = _problem(1025, seed=7, masks=masks)
    for backend in ("torch", "triton"):
        stacked = _sgd_stacked(backend, prob, opts)
        rows = _sgd_row_by_row(backend, prob, opts)
        for name, a, e in zip(("param", "momentum"), stacked, rows, strict=True):
            if e is not None:
                assert_exact(a, e, f"{backend} {name} {opts}")


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=_ids)
def test_sgd_stacked_triton_matches_reference(masks: str, opts: dict) -> None:
    prob = _problem(1025, seed=8, masks=masks)
    ref_p, ref_b = _sgd_stacked("torch", prob, opts)
    tri_p, tri_b = _sgd_stacked("triton", prob, opts)
    assert_ulp(tri_p, ref_p, SGD_ULPS["param"], f"param {opts}", floor=1.0)
    if ref_b is not None:
        assert_ulp(tri_b, ref_b, SGD_ULPS["momentum"], f"momentum {opts}", floor=1.0)
    if prob["mask"] is not None:
        pruned = (prob["mask"] == 0).expand_as(ref_p)
        for name, t in (("ref", ref_p), ("triton", tri_p), ("ref buf", ref_b), ("tri buf", tri_b)):
            if t is not None:
                assert int((t[pruned] != 0).sum()) == 0, f"{name}: pruned entries moved"


ADAMW_OPTIONS = [
    dict(weight_decay=wd, prox_mu=mu, clip=clip, beta1=b1)
    for (wd, mu, b1), clip in zip(
        itertools.product([0.0, 1e-2], [0.0, 0.1], [0.9, 0.3]),
        itertools.cycle([None, "rows", 1.5]),
    )
]
START = [0, 5, 2]  # rows start at different step counts (bias correction per row)


def _adamw_stacked(backend: str, prob: dict, opts: dict) -> tuple:
    param = prob["param"].clone()
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    clip = CLIPS if opts["clip"] == "rows" else opts["clip"]
    counts = list(START)
    for s in range(STEPS):
        counts = [c + a for c, a in zip(counts, ACTIVE[s], strict=True)]
        masked_adamw_step(
            param, prob["grads"][s], m, v, prob["mask"],
            prob["anchor"] if opts["prox_mu"] else None, step=counts, lr=LRS,
            active=ACTIVE[s], backend=backend, **{**opts, "clip": clip},
        )  # fmt: skip
    return param, m, v


def _adamw_row_by_row(backend: str, prob: dict, opts: dict) -> tuple:
    param = prob["param"].clone()
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    for r in range(ROWS):
        count = START[r]
        for s in range(STEPS):
            if not ACTIVE[s][r]:
                continue
            count += 1
            clip = CLIPS[r] if opts["clip"] == "rows" else opts["clip"]
            masked_adamw_step(
                param[r], prob["grads"][s][r], m[r], v[r], _row(prob["mask"], r),
                prob["anchor"][r] if opts["prox_mu"] else None, step=count, lr=LRS[r],
                backend=backend, **{**opts, "clip": clip},
            )  # fmt: skip
    return param, m, v


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("opts", ADAMW_OPTIONS, ids=_ids)
def test_adamw_stacked_is_single_client_row_by_row(masks: str, opts: dict) -> None:
    prob = _problem(1025, seed=9, masks=masks)
    for backend in ("torch", "triton"):
        stacked = _adamw_stacked(backend, prob, opts)
        rows = _adamw_row_by_row(backend, prob, opts)
        for name, a, e in zip(("param", "exp_avg", "exp_avg_sq"), stacked, rows, strict=True):
            assert_exact(a, e, f"{backend} {name} {opts}")


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("opts", ADAMW_OPTIONS, ids=_ids)
def test_adamw_stacked_triton_matches_reference(masks: str, opts: dict) -> None:
    prob = _problem(1025, seed=10, masks=masks)
    ref = _adamw_stacked("torch", prob, opts)
    tri = _adamw_stacked("triton", prob, opts)
    # m / (sqrt(v) + eps) amplifies a 1-ulp moment difference where v is tiny: 1e-5 relative
    for name, r, t in zip(("param", "exp_avg", "exp_avg_sq"), ref, tri, strict=True):
        assert_close(t, r, 1e-6, 1e-5, f"{name} {opts}")
    if prob["mask"] is not None:
        pruned = (prob["mask"] == 0).expand_as(ref[0])
        for t in ref + tri:
            assert int((t[pruned] != 0).sum()) == 0, "pruned entries moved"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inactive_rows_keep_parameters_and_state_exactly(backend: str) -> None:
    """An inactive row is not touched: not even a multiply by 1 or an add of 0 (a NaN
    gradient there stays out), for both optimizers and every option on."""
    prob = _problem(37, seed=11, masks="rows")
    grad = prob["grads"][0].clone()
    grad[1] = float("nan")  # row 1 is inactive: its (garbage) gradient must not be read
    active = torch.tensor([True, False, True])
    p, b = prob["param"].clone(), torch.randn(ROWS, 37, generator=generator(12))
    p0, b0 = p.clone(), b.clone()
    masked_sgd_step(p, grad, b, prob["mask"], prob["anchor"], lr=LRS, momentum=0.9,
                    nesterov=True, weight_decay=1e-2, prox_mu=0.1, clip=CLIPS, active=active,
                    backend=backend)  # fmt: skip
    assert_exact(p[1], p0[1], "sgd param row 1")
    assert_exact(b[1], b0[1], "sgd momentum row 1")
    assert bool((p[0] != p0[0]).any()) and bool((p[2] != p0[2]).any())
    m, v = b.clone(), b.abs()
    m0, v0 = m.clone(), v.clone()
    p = p0.clone()
    masked_adamw_step(p, grad, m, v, prob["mask"], prob["anchor"], step=[3, 0, 1], lr=LRS,
                      weight_decay=1e-2, prox_mu=0.1, clip=CLIPS, active=active,
                      backend=backend)  # fmt: skip
    for name, t, t0 in (("param", p, p0), ("exp_avg", m, m0), ("exp_avg_sq", v, v0)):
        assert_exact(t[1], t0[1], f"adamw {name} row 1")
        assert bool((t[0] != t0[0]).any()), f"adamw {name} row 0 did not step"


def test_one_row_and_tensor_valued_rows() -> None:
    """A 1-entry row, and per-row values given as tensors on the test device: the same
    result as the same values given as Python lists."""
    prob = _problem(1, seed=13, masks="rows")
    out = {}
    for kind in ("list", "tensor"):
        p, b = prob["param"].clone(), torch.zeros(ROWS, 1)
        lr = torch.tensor(LRS) if kind == "tensor" else LRS
        clip = torch.tensor(CLIPS) if kind == "tensor" else CLIPS
        active = torch.tensor(ACTIVE[1]) if kind == "tensor" else ACTIVE[1]
        for backend in ("torch", "triton"):
            q, c = p.clone(), b.clone()
            masked_sgd_step(q, prob["grads"][0], c, prob["mask"], lr=lr, momentum=0.9,
                            clip=clip, active=active, backend=backend)  # fmt: skip
            out[kind, backend] = q
    assert_exact(out["tensor", "torch"], out["list", "torch"], "reference")
    assert_exact(out["tensor", "triton"], out["list", "triton"], "triton")
    assert_ulp(out["list", "triton"], out["list", "torch"], SGD_ULPS["param"], "t vs r",
               floor=1.0)


def test_flat_call_is_unchanged_by_the_row_axis() -> None:
    """A 1-D buffer is today's single-client call: ``active`` is refused there."""
    p, g = torch.zeros(8), torch.ones(8)
    masked_sgd_step(p, g, lr=0.5)
    assert_exact(p, torch.full((8,), -0.5), "flat step")
    with pytest.raises(ValueError, match=r"^active:"):
        masked_sgd_step(p, g, lr=0.5, active=[True])


def test_bad_stacked_input_names_the_argument() -> None:
    p, g = torch.zeros(3, 8), torch.zeros(3, 8)
    m = torch.zeros(3, 8)
    cases = [
        (lambda: masked_sgd_step(p, g, lr=[0.1, 0.2]), "lr"),
        (lambda: masked_sgd_step(p, g, lr=0.1, active=[True, False]), "active"),
        (lambda: masked_sgd_step(p, g, None, torch.ones(2, 8), lr=0.1), "mask"),
        (lambda: masked_sgd_step(p, g, None, torch.ones(7), lr=0.1), "mask"),
        (lambda: masked_sgd_step(p, g, None, torch.full((3, 8), 2.0), lr=0.1), "mask"),
        (lambda: masked_sgd_step(p, g, lr=0.1, prox_mu=0.1, anchor=torch.ones(4, 8)), "anchor"),
        (lambda: masked_sgd_step(p, g, lr=0.1, clip=[1.0, -1.0, 1.0]), "clip"),
        (lambda: masked_sgd_step(p, g[:2], lr=0.1), "grad"),
        (lambda: masked_adamw_step(p, g, m, m.clone(), step=[1, 0, 1], lr=0.1), "step"),
        (lambda: masked_adamw_step(p, g, m, m.clone(), step=[1, 2], lr=0.1), "step"),
        (lambda: masked_adamw_step(p, g, m, m[:2].clone(), step=1, lr=0.1), "exp_avg_sq"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fn()
    # an inactive row may carry step 0 (it has not stepped yet)
    masked_adamw_step(p, g, m, m.clone(), step=[1, 0, 1], lr=0.1, active=[True, False, True])
