"""CohortSGD / CohortAdamW: K clients' optimizers over one stacked buffer.

Each client k also gets its own MaskedSGD / MaskedAdamW (the single-client
optimizer that fl.train uses) fed the same gradients; after every step row k of
the cohort optimizer must hold exactly that optimizer's parameters and state,
on both backends (the stacked reference runs the single-client reference per
row; the stacked Triton kernel shares the single-client kernel's per-entry code
and scalars). Clients that are inactive at a step are skipped by their
single-client twin. Tensors live on BONSAI_TEST_DEVICE (the GPU check compiles the
kernels: benchmarks/gpu_cohort.sh).
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import TEST_DEVICE, assert_exact

from fl.optim import CohortAdamW, CohortSGD, MaskedAdamW, MaskedSGD

K = 3
SHAPES = [(5, 3, 3, 3), (5,), (7, 45), (7,), (3, 7)]  # 665 entries: the rows are padded
STEPS = 4
ACTIVE = [[True, True, True], [True, False, True], [True, False, True], [False, False, True]]
LRS = [0.05, 0.02, 0.1]


def _setup(seed: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]], list]:
    g = torch.Generator().manual_seed(seed)
    params = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(K)]
    masks = [[(torch.rand(s, generator=g) < 0.6) if len(s) > 1 else None for s in SHAPES]
             for _ in range(K)]  # fmt: skip
    grads = [[[torch.randn(s, generator=g) * 2 for s in SHAPES] for _ in range(K)]
             for _ in range(STEPS)]  # fmt: skip
    return _on_device(params), _on_device(masks), _on_device(grads)


def _on_device(x):  # noqa: ANN001, ANN202
    """Nested lists of tensors (or None) moved to the test device."""
    if isinstance(x, torch.Tensor):
        return x.to(TEST_DEVICE)
    return [_on_device(t) for t in x] if isinstance(x, list) else x


def _stack(per_client: list[list[torch.Tensor | None]], i: int) -> torch.Tensor | None:
    items = [c[i] for c in per_client]
    if all(t is None for t in items):
        return None
    return torch.stack([torch.ones(SHAPES[i], device=TEST_DEVICE) if t is None else t.float()
                        for t in items])  # fmt: skip


def _compare(cohort, singles, keys: tuple[str, ...], what: str) -> None:  # noqa: ANN001
    for k, (ps, opt) in enumerate(singles):
        for i, p in enumerate(ps):
            assert_exact(cohort.params[i][k], p.detach(), f"{what}: client {k} param {i}")
            row = cohort.row_state(k)[i]
            for key in keys:
                if key in opt.state[p]:
                    assert_exact(row[key], opt.state[p][key], f"{what}: client {k} {key} {i}")


def _run(cls_single, cls_cohort, opts: dict, backend: str, clip: dict) -> None:  # noqa: ANN001
    params, masks, grads = _setup(seed=3)
    singles = []
    for k in range(K):
        ps = [torch.nn.Parameter(t.clone()) for t in params[k]]
        kw = {key: (v[k] if isinstance(v, list) else v) for key, v in clip.items()}
        singles.append((ps, cls_single(ps, lr=LRS[k], masks=masks[k], backend=backend,
                                       **opts, **kw)))  # fmt: skip
    stacked = [torch.stack([params[k][i] for k in range(K)]) for i in range(len(SHAPES))]
    cohort = cls_cohort(stacked, lr=LRS, masks=[_stack(masks, i) for i in range(len(SHAPES))],
                        backend=backend, **opts, **clip)  # fmt: skip
    keys = cohort._state_keys
    _compare(cohort, singles, keys, "after set_masks")
    for s in range(STEPS):
        for k, (ps, opt) in enumerate(singles):
            if ACTIVE[s][k]:
                for p, gr in zip(ps, grads[s][k], strict=True):
                    p.grad = gr.clone()
                opt.step()
        cohort.set_grads([torch.stack([grads[s][k][i] for k in range(K)])
                          for i in range(len(SHAPES))])  # fmt: skip
        cohort.step(active=ACTIVE[s])
        _compare(cohort, singles, keys, f"step {s}")
    # the padding of every row stays zero (no gradient, mask 0)
    assert int((cohort.param[:, cohort.n :] != 0).sum()) == 0


SGD_OPTS = [
    dict(momentum=0.9, weight_decay=5e-3, prox_mu=0.1),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.0, weight_decay=1e-2),
]
CLIPS = [{}, {"clip_value": [1.0, 0.5, 2.0]}, {"clip_quantile": 0.8}]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("opts", SGD_OPTS, ids=str)
@pytest.mark.parametrize("clip", CLIPS, ids=str)
def test_cohort_sgd_rows_are_masked_sgd_bitwise(backend: str, opts: dict, clip: dict) -> None:
    _run(MaskedSGD, CohortSGD, opts, backend, clip)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("opts", [dict(weight_decay=1e-2, prox_mu=0.1), dict(betas=(0.5, 0.9))],
                         ids=str)  # fmt: skip
@pytest.mark.parametrize("clip", CLIPS, ids=str)
def test_cohort_adamw_rows_are_masked_adamw_bitwise(backend: str, opts: dict, clip: dict) -> None:
    _run(MaskedAdamW, CohortAdamW, opts, backend, clip)


def test_set_grads_for_a_subset_of_rows_and_shared_masks() -> None:
    params, _, grads = _setup(seed=4)
    stacked = [torch.stack([params[k][i] for k in range(K)]) for i in range(len(SHAPES))]
    shared = [(torch.rand(s, generator=torch.Generator().manual_seed(i)) < 0.5).to(TEST_DEVICE)
              for i, s in enumerate(SHAPES)]  # fmt: skip
    opt = CohortSGD(stacked, lr=0.1, masks=shared)
    rows = torch.tensor([0, 2], device=TEST_DEVICE)
    opt.set_grads([torch.stack([grads[0][k][i] for k in (0, 2)]) for i in range(len(SHAPES))],
                  rows=rows)  # fmt: skip
    for i in range(len(SHAPES)):
        assert_exact(opt.view(opt.grad, i)[2], grads[0][2][i], f"grad row 2 param {i}")
        assert int((opt.view(opt.grad, i)[1] != 0).sum()) == 0
        pruned = ~shared[i].expand(K, *SHAPES[i])
        assert int((opt.params[i][pruned] != 0).sum()) == 0, "shared mask not applied"


def test_bad_arguments_name_themselves() -> None:
    ps = [torch.zeros(K, 4), torch.zeros(K, 2, 2)]
    cases = [
        (lambda: CohortSGD([torch.zeros(K, 4), torch.zeros(2, 4)], lr=0.1), "params"),
        (lambda: CohortSGD([torch.zeros(K, 4).half()], lr=0.1), "params"),
        (lambda: CohortSGD([torch.zeros(0, 4)], lr=0.1), "params"),
        (lambda: CohortSGD(ps, lr=[0.1, 0.2]), "lr"),
        (lambda: CohortSGD(ps, lr=0.1, nesterov=True), "nesterov"),
        (lambda: CohortSGD(ps, lr=0.1, clip_value=1.0, clip_quantile=0.5), "clip_quantile"),
        (lambda: CohortSGD(ps, lr=0.1, clip_value=[1.0, 0.0, 1.0]), "clip_value"),
        (lambda: CohortSGD(ps, lr=0.1, masks=[None]), "masks"),
        (lambda: CohortSGD(ps, lr=0.1, masks=[torch.ones(2, 4), None]), "masks"),
        (lambda: CohortSGD(ps, lr=0.1, masks=[torch.full((4,), 2.0), None]), "masks"),
        (lambda: CohortSGD(ps, lr=0.1).step(active=[True]), "active"),
        (lambda: CohortAdamW(ps, betas=(0.9, 1.5)), "betas"),
        (lambda: CohortAdamW(ps, backend="gpu"), "backend"),
        (lambda: CohortSGD(ps, lr=0.1).set_anchor([torch.zeros(4), None]), "tensors"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fn()
