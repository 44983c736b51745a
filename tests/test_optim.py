"""MaskedSGD / MaskedAdamW against torch.optim, on a small model with several tensors.

With masks all ones (or None) and options off the CPU (reference) step runs
torch's own ops in torch's order on the flat buffer, so it is compared
bitwise with torch.optim.SGD / AdamW (single-tensor, the CPU default), state
included. The Triton SGD kernel rounds as torch's ops do and is compared
bitwise too; the Triton AdamW kernel orders its maths differently from torch's
fused CPU kernel and is compared with a tolerance. Every expectation below
is computed with torch.optim, never with fl.kernels.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from kernel_checks import SGD_ULPS, assert_close, assert_exact, assert_ulp, linear_quantile
from torch import nn

import fl.kernels.adamw as _adamw_module
from fl.optim import MaskedAdamW, MaskedSGD

STEPS = 12


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.Linear(7, 3)
    )


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]  # fmt: skip


def _masks(model: nn.Module, density: float = 0.5, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(p.shape, generator=g) < density for p in model.parameters()]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, grad_hook=None) -> None:  # noqa: ANN001
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if grad_hook is not None:
            grad_hook()
        opt.step()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


def _assert_params_exact(a: nn.Module, b: nn.Module, what: str) -> None:
    for i, (p, q) in enumerate(zip(_params(a), _params(b), strict=True)):
        assert_exact(p, q, f"{what}: parameter {i}")


def _assert_state_exact(ours: torch.optim.Optimizer, ref: torch.optim.Optimizer, keys) -> None:  # noqa: ANN001
    so, sr = ours.state_dict()["state"], ref.state_dict()["state"]
    assert sorted(so) == sorted(sr)
    for i in sr:
        for key in keys:
            assert_exact(so[i][key].reshape(-1), sr[i][key].reshape(-1), f"state {i} {key}")


SGD_CASES = [
    dict(momentum=m, nesterov=nest, weight_decay=wd)
    for (m, nest), wd in itertools.product([(0.0, False), (0.9, False), (0.9, True)], [0.0, 5e-3])
]


@pytest.mark.parametrize("opts", SGD_CASES, ids=str)
@pytest.mark.parametrize("masks", ["none", "ones"])
def test_sgd_matches_torch_bitwise(opts: dict, masks: str) -> None:
    ref_model, our_model = _model(), _model()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, **opts)
    ones = [torch.ones_like(p, dtype=torch.bool) for p in our_model.parameters()]
    ours = MaskedSGD(our_model.parameters(), lr=0.05, masks=ones if masks == "ones" else None,
                     **opts)  # fmt: skip
    batches = _batches(STEPS)
    _train(ref_model, ref, batches)
    _train(our_model, ours, batches)
    _assert_params_exact(our_model, ref_model, f"MaskedSGD {opts}")
    if opts["momentum"]:
        _assert_state_exact(ours, ref, ["momentum_buffer"])


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("masks", ["none", "ones"])
@pytest.mark.parametrize("path", [
    pytest.param("fused", marks=pytest.mark.skipif(
        _adamw_module._fused_adamw is None, reason="this torch has no fused CPU AdamW")),
    "ops",
])
def test_adamw_matches_torch_bitwise(
    weight_decay: float, masks: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU reference runs torch's fused AdamW kernel on the flat buffer; without it,
    torch's single-tensor op sequence, bitwise AdamW(foreach=False).

    The fused kernel is vectorised with FMA in its body and scalar in each tensor's
    tail; on one flat buffer the tails of torch's per-tensor run land in our vector
    body, so a handful of tail entries differ by an ulp per step (12 steps: 1e-6)."""
    import fl.kernels.adamw as adamw

    if path == "ops":
        monkeypatch.setattr(adamw, "_fused_adamw", None)
    ref_model, our_model = _model(), _model()
    variant = dict(fused=True) if path == "fused" else dict(foreach=False)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3, weight_decay=weight_decay, **variant)
    ones = [torch.ones_like(p) for p in our_model.parameters()]  # float 0/1 masks work too
    ours = MaskedAdamW(our_model.parameters(), lr=3e-3, weight_decay=weight_decay,
                       masks=ones if masks == "ones" else None)  # fmt: skip
    batches = _batches(STEPS)
    _train(ref_model, ref, batches)
    _train(our_model, ours, batches)
    if path == "ops":
        _assert_params_exact(our_model, ref_model, "MaskedAdamW")
        _assert_state_exact(ours, ref, ["exp_avg", "exp_avg_sq", "step"])
        return
    for i, (p, q) in enumerate(zip(_params(our_model), _params(ref_model), strict=True)):
        assert_close(p, q, 1e-7, 1e-6, f"parameter {i}")
    so, sr = ours.state_dict()["state"], ref.state_dict()["state"]
    for i in sr:
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(so[i][key], sr[i][key], 1e-9, 1e-5, f"state {i} {key}")


def test_masked_sgd_is_torch_sgd_on_masked_gradients() -> None:
    """Kept entries follow torch.optim.SGD fed mask * grad from masked weights (bitwise)."""
    ref_model, our_model = _model(), _model()
    masks = _masks(ref_model)
    with torch.no_grad():
        for p, m in zip(ref_model.parameters(), masks, strict=True):
            p.mul_(m)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    ours = MaskedSGD(our_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3,
                     masks=masks)  # fmt: skip

    def mask_grads() -> None:
        for p, m in zip(ref_model.parameters(), masks, strict=True):
            p.grad.mul_(m)

    batches = _batches(STEPS)
    _train(ref_model, ref, batches, mask_grads)
    _train(our_model, ours, batches)
    _assert_params_exact(our_model, ref_model, "masked SGD")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdamW])
def test_pruned_entries_stay_exactly_zero(backend: str, cls: type) -> None:
    model = _model()
    masks = _masks(model)
    kw = dict(momentum=0.9, nesterov=True) if cls is MaskedSGD else {}
    opt = cls(model.parameters(), lr=0.05, weight_decay=1e-2, prox_mu=0.01, clip_value=0.5,
              masks=masks, backend=backend, **kw)  # fmt: skip
    opt.set_anchor([torch.randn_like(p) for p in model.parameters()])  # dense anchor: still 0
    _train(model, opt, _batches(40))
    for i, (p, m) in enumerate(zip(model.parameters(), masks, strict=True)):
        assert int((p[~m] != 0).sum()) == 0, f"parameter {i}: pruned entries moved"
        assert int((p[m] == 0).sum()) == 0, f"parameter {i}: kept entries are zero"
        for key, buf in opt.state[p].items():
            if key != "step":
                assert int((buf[~m] != 0).sum()) == 0, f"parameter {i}: {key} of pruned moved"


@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdamW])
def test_triton_backend_matches_reference(cls: type) -> None:
    models = {b: _model() for b in ("torch", "triton")}
    masks = _masks(models["torch"])
    kw = dict(momentum=0.9) if cls is MaskedSGD else {}
    opts = {b: cls(m.parameters(), lr=0.02, weight_decay=1e-2, prox_mu=0.05, masks=masks,
                   clip_quantile=0.9, backend=b, **kw) for b, m in models.items()}  # fmt: skip
    batches = _batches(6)
    for b in models:
        _train(models[b], opts[b], batches)
    for i, (p, q) in enumerate(zip(_params(models["triton"]), _params(models["torch"]),
                                   strict=True)):  # fmt: skip
        if cls is MaskedSGD:  # fused multiply-adds rounded twice by the interpreter (3.7+)
            assert_ulp(p, q, SGD_ULPS["param"], f"parameter {i}", floor=1.0)
        else:  # AdamW: a different order of operations, compounded through 6 steps
            assert_close(p, q, 1e-5, 1e-4, f"parameter {i}")


def test_clip_value_is_clip_grad_value() -> None:
    ref_model, our_model = _model(), _model()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    ours = MaskedSGD(our_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3,
                     clip_value=0.01)  # fmt: skip
    batches = _batches(STEPS)
    _train(ref_model, ref, batches, lambda: nn.utils.clip_grad_value_(ref_model.parameters(), 0.01))
    _train(our_model, ours, batches)
    _assert_params_exact(our_model, ref_model, "clip_value")


def test_clip_quantile_is_the_quantile_of_kept_gradients() -> None:
    ref_model, our_model = _model(), _model()
    masks = _masks(ref_model)
    with torch.no_grad():
        for p, m in zip(ref_model.parameters(), masks, strict=True):
            p.mul_(m)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    ours = MaskedSGD(our_model.parameters(), lr=0.05, clip_quantile=0.8, masks=masks)

    def clip() -> None:
        kept = torch.cat([p.grad[m].abs() for p, m in zip(ref_model.parameters(), masks,
                                                             strict=True)])  # fmt: skip
        c = float(linear_quantile(kept, 0.8))
        for p, m in zip(ref_model.parameters(), masks, strict=True):
            p.grad.clamp_(-c, c).mul_(m)

    batches = _batches(STEPS)
    _train(ref_model, ref, batches, clip)
    _train(our_model, ours, batches)
    for i, (p, q) in enumerate(zip(_params(our_model), _params(ref_model), strict=True)):
        # c is the same number; clamp-then-mask equals mask-after-clamp entrywise
        assert_close(p, q, 0.0, 0.0, f"parameter {i}")


@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdamW])
def test_prox_term_is_fedprox(cls: type) -> None:
    """prox_mu adds mu (w - w_global) to the gradient, w_global = weights at construction."""
    mu = 0.3
    ref_model, our_model = _model(), _model()
    anchor = [p.detach().clone() for p in ref_model.parameters()]
    ref_cls = torch.optim.SGD if cls is MaskedSGD else torch.optim.AdamW
    kw = dict(lr=0.05, weight_decay=1e-2)
    ref, ours = ref_cls(ref_model.parameters(), **kw), cls(our_model.parameters(), prox_mu=mu, **kw)

    def prox() -> None:
        for p, a in zip(ref_model.parameters(), anchor, strict=True):
            p.grad.add_(p.detach() - a, alpha=mu)

    batches = _batches(STEPS)
    _train(ref_model, ref, batches, prox)
    _train(our_model, ours, batches)
    if cls is MaskedSGD:
        _assert_params_exact(our_model, ref_model, "FedProx")
        return
    for i, (p, q) in enumerate(zip(_params(our_model), _params(ref_model), strict=True)):
        # fused AdamW on the flat buffer vs torch's single-tensor AdamW: an ulp per step,
        # which m / sqrt(v) amplifies where v is small (12 steps: 3e-7 on a 0.04 weight)
        assert_close(p, q, 1e-6, 1e-5, f"parameter {i}")


def test_set_anchor_replaces_the_default() -> None:
    model = _model()
    opt = MaskedSGD(model.parameters(), lr=0.5, prox_mu=1.0)
    target = [torch.full_like(p, 2.0) for p in model.parameters()]
    opt.set_anchor(target)
    for p in model.parameters():
        p.grad.zero_()
    for _ in range(60):  # pure prox: w <- w - lr mu (w - 2) halves the distance to 2
        opt.step()
    for p in model.parameters():
        assert_close(p.detach(), torch.full_like(p, 2.0), 1e-4, 0.0, "anchor")


@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdamW])
def test_state_dict_round_trip(cls: type) -> None:
    batches = _batches(8)
    a_model = _model()
    masks = _masks(a_model)
    a = cls(a_model.parameters(), lr=0.01, masks=masks)
    _train(a_model, a, batches[:4])
    saved_model, saved_opt = copy.deepcopy(a_model.state_dict()), copy.deepcopy(a.state_dict())
    b_model = _model(seed=5)
    b_model.load_state_dict(saved_model)
    b = cls(b_model.parameters(), lr=0.01, masks=masks)
    b.load_state_dict(saved_opt)
    _train(a_model, a, batches[4:])
    _train(b_model, b, batches[4:])
    _assert_params_exact(b_model, a_model, "after reload")


def test_loads_a_torch_sgd_state_dict() -> None:
    batches = _batches(8)
    ref_model = _model()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    _train(ref_model, ref, batches[:4])
    our_model = copy.deepcopy(ref_model)
    ours = MaskedSGD(our_model.parameters(), lr=0.05, momentum=0.9)
    ours.load_state_dict(ref.state_dict())
    _train(ref_model, ref, batches[4:])
    _train(our_model, ours, batches[4:])
    _assert_params_exact(our_model, ref_model, "continued from torch state")


def test_flat_views_and_replaced_grads() -> None:
    model = _model()
    opt = MaskedSGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_model = _model()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    flat = opt._flats[0]
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert min(ptrs) == flat.param.data_ptr() and len(flat.params) == 6
    for m, o in ((model, opt), (ref_model, ref)):
        for x, y in _batches(3):
            m.zero_grad(set_to_none=True)  # replaces our gradient views
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    _assert_params_exact(model, ref_model, "after model.zero_grad")
    opt.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdamW])
def test_padding_of_flat_buffers_stays_zero(cls: type) -> None:
    """Flat buffers are padded to a multiple of 16 entries (vectorised Triton loads); the
    padding never moves and never enters the clip quantile."""
    model = _model()
    n = sum(p.numel() for p in model.parameters())
    assert n % 16 != 0  # the model must need padding for this test to mean anything
    kw = dict(momentum=0.9) if cls is MaskedSGD else {}
    opt = cls(model.parameters(), lr=0.05, weight_decay=1e-2, prox_mu=0.1, clip_quantile=0.5,
              **kw)  # fmt: skip
    flat = opt._flats[0]
    assert flat.size % 16 == 0 and flat.size - n == (-n) % 16
    _train(model, opt, _batches(4))
    pads = [flat.param[n:], flat.grad[n:], *(s[n:] for s in flat.state.values())]
    assert all(int((t != 0).sum()) == 0 for t in pads)
    # no mask: the bound is the quantile of the n real gradients, not of the padding too
    flat.grad[:n].copy_(torch.arange(1, n + 1, dtype=torch.float32))
    assert float(opt._clip_bound(flat)) == float(torch.quantile(flat.grad[:n], 0.5))


def test_param_groups_and_lr_scheduler() -> None:
    ref_model, our_model = _model(), _model()

    def groups(m: nn.Module) -> list[dict]:
        ps = list(m.parameters())
        return [{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "weight_decay": 1e-2}]

    ref = torch.optim.SGD(groups(ref_model), lr=0.05, momentum=0.9)
    ours = MaskedSGD(groups(our_model), lr=0.05, momentum=0.9)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (ref, ours)]
    for x, y in _batches(STEPS):
        for m, o, s in zip((ref_model, our_model), (ref, ours), scheds, strict=True):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            s.step()
    _assert_params_exact(our_model, ref_model, "groups + StepLR")


def test_set_masks_rezeroes_params_and_state() -> None:
    model = _model()
    opt = MaskedAdamW(model.parameters(), lr=0.01)
    _train(model, opt, _batches(3))
    masks = _masks(model, density=0.3)
    masks[1] = None  # dense
    opt.set_masks(masks)
    for p, m in zip(model.parameters(), masks, strict=True):
        if m is None:
            assert int((p == 0).sum()) == 0
            continue
        assert int((p[~m] != 0).sum()) == 0
        assert int((opt.state[p]["exp_avg"][~m] != 0).sum()) == 0
        assert int((opt.state[p]["exp_avg_sq"][~m] != 0).sum()) == 0


def test_bad_arguments_name_themselves() -> None:
    model = _model()
    ps = list(model.parameters())
    cases = [
        (lambda: MaskedSGD([nn.Parameter(p.detach().half()) for p in ps], lr=0.1), "params"),
        (lambda: MaskedSGD(ps, lr=-1.0), "lr"),
        (lambda: MaskedSGD(ps, lr=0.1, nesterov=True), "nesterov"),
        (lambda: MaskedSGD(ps, lr=0.1, clip_value=1.0, clip_quantile=0.5), "clip_quantile"),
        (lambda: MaskedSGD(ps, lr=0.1, clip_quantile=1.5), "clip_quantile"),
        (lambda: MaskedSGD(ps, lr=0.1, masks=[None]), "masks"),
        (lambda: MaskedSGD(ps, lr=0.1, masks=[torch.ones(2)] + [None] * 5), "masks"),
        (lambda: MaskedSGD(ps, lr=0.1, masks=[torch.full_like(ps[0], 2)] + [None] * 5), "masks"),
        (lambda: MaskedSGD(ps, lr=0.1, masks=[ps[0].to("meta")] + [None] * 5), "masks"),
        (lambda: MaskedAdamW(ps, betas=(0.9, 1.5)), "betas"),
        (lambda: MaskedAdamW(ps, backend="gpu"), "backend"),
        (lambda: MaskedSGD(ps, lr=0.1).set_anchor([torch.zeros(1)] * 6), "tensors"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fn()


@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdamW])
def test_channels_last_parameters_step_as_their_contiguous_twins(cls: type) -> None:
    """fl.train trains conv models channels-last on a CPU: a 4-D parameter in that layout
    stays so as a view of the flat buffer, and with the same gradients every step, mask,
    FedProx pull and state entry is bitwise what the contiguous layout gives."""
    ref_model = _model()
    cl_model = copy.deepcopy(ref_model).to(memory_format=torch.channels_last)
    conv = cl_model[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    masks = _masks(ref_model)
    kw = dict(momentum=0.9) if cls is MaskedSGD else {}
    ref, ours = (cls(m.parameters(), lr=0.05, weight_decay=1e-2, prox_mu=0.1, masks=masks,
                     **kw) for m in (ref_model, cl_model))  # fmt: skip
    flat = ours._flats[0]
    for x, y in _batches(5):
        ref.zero_grad()
        nn.functional.cross_entropy(ref_model(x), y).backward()
        ours.zero_grad()
        for p, q in zip(cl_model.parameters(), ref_model.parameters(), strict=True):
            p.grad.copy_(q.grad)  # the same gradients, laid out as each parameter
        ours.step()
        ref.step()
    _assert_params_exact(cl_model, ref_model, "channels-last")
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert flat.param.data_ptr() <= conv.data_ptr() < flat.param.data_ptr() + 4 * flat.size
    keys = ("momentum_buffer",) if cls is MaskedSGD else ("exp_avg", "exp_avg_sq")
    _assert_state_exact(ours, ref, keys)
    assert int((conv.detach()[~masks[0]] != 0).sum()) == 0
