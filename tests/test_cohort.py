"""The cohort trainer (fl/cohort.py) against K runs of fl.train.train.

Every expectation is computed by fl.train.train, one client at a time, from the
same starting state, data, seed, masks and options.

- The sequential path *is* fl.train.train: bitwise.
- The vectorised path (torch.func.vmap over stacked parameters, the stacked fused
  optimizer) computes the same per-client trajectories, but vmap's batched
  kernels (a batched matmul, a grouped convolution, BatchNorm over a client
  axis) sum in another order than the per-client kernels, so the states agree to
  float32 rounding compounded over the steps: ``STATE_ATOL``/``STATE_RTOL``
  (by optimizer) below. Step counts, example counts and integer buffers (BatchNorm's
  ``num_batches_tracked``) are exact, and so are pruned entries (exactly 0).

The clients differ in size (7, 33, 50 examples, batch 16: a last batch of 7, 1
and 2 examples), epochs (2, 1, 2: the padded schedule has 8 steps and the
33-example client is finished after 3) and masks (random 0/1 masks on the
weight matrices and filters of clients 0 and 2, none for client 1), and start
from different weights.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from kernel_checks import assert_close, assert_exact
from torch import nn

from fl.cohort import choose_mode, train_cohort, vectorisable
from fl.config import TrainConfig
from fl.data import Arrays
from fl.models import build_model
from fl.train import train

SHAPE, CLASSES = (1, 8, 8), 10  # digits-sized images
SIZES, EPOCHS, SEEDS = (7, 33, 50), (2, 1, 2), (11, 12, 13)
CPU = torch.device("cpu")
# Vectorised vs sequential after at most 8 steps, entrywise over every float tensor of
# every client's state dict (parameters and BatchNorm statistics), worst seen over 4 data
# seeds x 3 clients (CPU, torch 2.14):
#   SGD   1.25e-6 (resnet8), 3.0e-8 (cnn), 7.5e-9 (mlp)        bound 1e-5 (8x)
#   AdamW 5.4e-6 (cnn), 5.1e-6 (resnet8), 1.5e-8 (mlp)          bound 5e-5 (9x; lr / 20)
# AdamW's step is about lr whatever the gradient's scale, so where a gradient is mostly
# cancellation (a sum of terms ~1e7 times larger) a rounding difference turns its
# direction: the bound is a fraction of lr. Train losses: worst relative difference
# 1.6e-7, bound 1e-5.
STATE_ATOL = {"sgd": 1e-5, "adamw": 5e-5}
STATE_RTOL, LOSS_RTOL = 1e-5, 1e-5


def _cfg(optimizer: str) -> TrainConfig:
    return TrainConfig(local_epochs=2, batch_size=16, optimizer=optimizer, momentum=0.9,
                       lr=0.05 if optimizer == "sgd" else 1e-3, weight_decay=5e-4)  # fmt: skip


def _clients(name: str, seed: int = 0) -> tuple[nn.Module, list, list, list]:
    g = torch.Generator().manual_seed(seed)
    model = build_model(name, SHAPE, CLASSES, seed=seed)
    datas = [Arrays(torch.randn(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,),
                                                                      generator=g))
             for n in SIZES]  # fmt: skip
    states = [build_model(name, SHAPE, CLASSES, seed=seed + 1 + k).state_dict()
              for k in range(len(SIZES))]  # fmt: skip
    masks = [None if k == 1 else
             {n: torch.rand(p.shape, generator=g) < 0.6
              for n, p in model.named_parameters() if p.dim() > 1}
             for k in range(len(SIZES))]  # fmt: skip
    return model, states, datas, masks


def _one_by_one(model: nn.Module, states, datas, masks, cfg, **kw) -> list:  # noqa: ANN001
    out = []
    for k in range(len(states)):
        m = copy.deepcopy(model)
        m.load_state_dict(states[k])
        res = train(m, datas[k], cfg, seed=SEEDS[k], device=CPU, masks=masks[k],
                    epochs=EPOCHS[k], **kw)  # fmt: skip
        out.append((m.state_dict(), res))
    return out


OPTIONS = dict(margin_lambda=0.1, proximal_mu=0.1)


def test_sequential_path_is_fl_train_bitwise() -> None:
    model, states, datas, masks = _clients("cnn")
    cfg = _cfg("sgd")
    got = train_cohort(model, states, datas, cfg, seeds=SEEDS, device=CPU, masks=masks,
                       epochs=list(EPOCHS), mode="sequential", **OPTIONS)  # fmt: skip
    want = _one_by_one(model, states, datas, masks, cfg, **OPTIONS)
    for k, (client, (state, res)) in enumerate(zip(got, want, strict=True)):
        assert list(client.state) == list(state)
        for n, t in state.items():
            assert_exact(client.state[n], t, f"client {k} {n}")
        assert (client.result.loss, client.result.num_examples, client.result.steps) == \
            (res.loss, res.num_examples, res.steps)  # fmt: skip


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8"])
def test_vectorised_path_matches_one_client_at_a_time(name: str, optimizer: str) -> None:
    model, states, datas, masks = _clients(name)
    cfg = _cfg(optimizer)
    assert choose_mode(model, CPU, datas[0].x, "vectorised") == "vectorised"
    got = train_cohort(model, states, datas, cfg, seeds=SEEDS, device=CPU, masks=masks,
                       epochs=list(EPOCHS), mode="vectorised", **OPTIONS)  # fmt: skip
    want = _one_by_one(model, states, datas, masks, cfg, **OPTIONS)
    for k, (client, (state, res)) in enumerate(zip(got, want, strict=True)):
        assert (client.result.num_examples, client.result.steps) == (res.num_examples, res.steps)
        assert abs(client.result.loss - res.loss) <= LOSS_RTOL * abs(res.loss), (k, client, res)
        assert list(client.state) == list(state)
        for n, t in state.items():
            what = f"{name} {optimizer} client {k} {n}"
            if not t.is_floating_point():
                assert_exact(client.state[n], t, what)
                continue
            assert_close(client.state[n], t, STATE_ATOL[optimizer], STATE_RTOL, what)
            if masks[k] is not None and n in masks[k]:
                pruned = ~masks[k][n]
                assert int((client.state[n][pruned] != 0).sum()) == 0, f"{what}: pruned moved"
        # the weights moved well beyond the bound (an untrained state would prove nothing)
        assert any(float((client.state[n] - states[k][n]).abs().max()) > 10 * STATE_ATOL[
            optimizer] for n in state if state[n].is_floating_point())  # fmt: skip


def test_finished_and_idle_clients_keep_their_state() -> None:
    """A client with 0 epochs is inactive at every step: its state is its start (with
    the mask applied, as the optimizer does at construction), as fl.train gives."""
    model, states, datas, masks = _clients("resnet8")
    cfg = _cfg("adamw")
    epochs = [1, 0, 1]
    got = train_cohort(model, states, datas, cfg, seeds=SEEDS, device=CPU, masks=masks,
                       epochs=epochs, mode="vectorised")  # fmt: skip
    m = copy.deepcopy(model)
    m.load_state_dict(states[1])
    res = train(m, datas[1], cfg, seed=SEEDS[1], device=CPU, epochs=0)
    assert (got[1].result.loss, got[1].result.steps) == (res.loss, res.steps) == (0.0, 0)
    for n, t in m.state_dict().items():
        assert_exact(got[1].state[n], t, f"idle client {n}")


def test_cohort_size_splits_into_cohorts() -> None:
    model, states, datas, masks = _clients("mlp")
    cfg = _cfg("sgd")
    kw = dict(seeds=SEEDS, device=CPU, masks=masks, epochs=list(EPOCHS), mode="vectorised")
    whole = train_cohort(model, states, datas, cfg, **kw)
    split = train_cohort(model, states, datas, cfg, cohort_size=2, **kw)
    for a, b in zip(whole, split, strict=True):
        assert a.result.steps == b.result.steps
        for n in a.state:
            assert_close(b.state[n], a.state[n], STATE_ATOL["sgd"], STATE_RTOL, n)


class _Dropout(nn.Module):
    """vmap refuses random ops in its default randomness mode: not vectorisable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, CLASSES)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(x, 1)))


def test_models_vmap_rejects_fall_back_to_sequential(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = _Dropout()
    g = torch.Generator().manual_seed(1)
    datas = [Arrays(torch.randn(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,),
                                                                      generator=g))
             for n in (5, 9)]  # fmt: skip
    states = [model.state_dict(), {n: t + 0.01 for n, t in model.state_dict().items()}]
    cfg = _cfg("sgd")
    with caplog.at_level(logging.WARNING, logger="fl.cohort"):
        assert not vectorisable(model, CPU, datas[0].x)
        assert not vectorisable(model, CPU, datas[0].x)  # decided once
        torch.manual_seed(5)
        got = train_cohort(model, states, datas, cfg, seeds=[1, 2], device=CPU,
                           mode="vectorised")  # fmt: skip
    lines = [r for r in caplog.records if "cannot be vectorised" in r.getMessage()]
    assert len(lines) == 1 and "_Dropout" in lines[0].getMessage()
    torch.manual_seed(5)  # dropout draws from the global generator, as in fl.train
    for k in range(2):
        m = copy.deepcopy(model)
        m.load_state_dict(states[k])
        res = train(m, datas[k], cfg, seed=k + 1, device=CPU)
        assert got[k].result.loss == res.loss
        for n, t in m.state_dict().items():
            assert_exact(got[k].state[n], t, f"fallback client {k} {n}")


def test_auto_mode_is_sequential_on_a_cpu() -> None:
    model, _, datas, _ = _clients("cnn")
    assert choose_mode(model, CPU, datas[0].x) == "sequential"


def test_bad_arguments_name_themselves() -> None:
    model, states, datas, masks = _clients("mlp")
    cfg = _cfg("sgd")
    empty = Arrays(torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.int64))
    cases = [
        (lambda: train_cohort(model, states, datas[:2], cfg, seeds=SEEDS, device=CPU), "datas"),
        (lambda: train_cohort(model, states, datas, cfg, seeds=SEEDS, device=CPU,
                              masks=masks[:1]), "masks"),  # fmt: skip
        (lambda: train_cohort(model, states, datas, cfg, seeds=SEEDS, device=CPU,
                              epochs=[1, -1, 1]), "epochs"),  # fmt: skip
        (lambda: train_cohort(model, states, datas, cfg, seeds=SEEDS, device=CPU,
                              mode="fast"), "mode"),  # fmt: skip
        (lambda: train_cohort(model, states, datas, cfg, seeds=SEEDS, device=CPU,
                              cohort_size=0), "cohort_size"),  # fmt: skip
        (lambda: train_cohort(model, states, [empty, *datas[1:]], cfg, seeds=SEEDS,
                              device=CPU), "datas"),  # fmt: skip
        (lambda: train_cohort("mlp", states, datas, cfg, seeds=SEEDS, device=CPU),
         "num_classes"),  # fmt: skip
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fn()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_vectorised_path_on_the_triton_kernels(optimizer: str) -> None:
    """The stacked Triton kernels (the interpreter here; compiled on a GPU) in the
    trainer: the same as the reference backend within the kernels' own tolerances,
    compounded over 8 steps (the forward and backward are the same vmap calls); worst
    seen 1.5e-8, far inside the bounds above."""
    model, states, datas, masks = _clients("mlp")
    cfg = _cfg(optimizer)
    kw = dict(seeds=SEEDS, device=CPU, masks=masks, epochs=list(EPOCHS), mode="vectorised",
              **OPTIONS)  # fmt: skip
    ref = train_cohort(model, states, datas, cfg, backend="torch", **kw)
    tri = train_cohort(model, states, datas, cfg, backend="triton", **kw)
    for k, (a, b) in enumerate(zip(tri, ref, strict=True)):
        assert a.result.steps == b.result.steps
        for n, t in b.state.items():
            assert_close(a.state[n], t, STATE_ATOL[optimizer], STATE_RTOL, f"client {k} {n}")
            if masks[k] is not None and n in masks[k]:
                assert int((a.state[n][~masks[k][n]] != 0).sum()) == 0
