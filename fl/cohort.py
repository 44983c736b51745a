"""Train a cohort of clients in one process: one after another, or vectorised.

A simulated worker that receives several sampled clients in one message trains
them here and answers for each exactly what :func:`fl.train.train` answers for
one client (a :class:`fl.train.TrainResult`) plus the trained state dict. Two
execution paths compute the same thing:

``sequential``
    One client after another with :func:`fl.train.train` itself, so each
    client's state and result are bitwise those of the one-client-per-message
    path. ``auto`` takes it on a CPU: a run reproduces today's numbers exactly,
    and on the 2-core host the digits CNN gains nothing from vectorising
    (0.96x in issue 14's probe, 1.04-1.14x in ``benchmarks/cohort.py``), though
    ResNet-8, a step of many small ops, gains 2-3x there (docs/RESULTS.md):
    ``mode="vectorised"`` asks for it.
``vectorised``
    Every parameter stacked on a leading client axis ``[K, *shape]`` (views of
    one ``[K, size]`` buffer, :class:`fl.optim.CohortSGD` /
    :class:`~fl.optim.CohortAdamW`), the forward and backward of all clients
    at once with ``torch.func.vmap(torch.func.grad(...))`` over
    ``torch.func.functional_call``, and one stacked fused optimizer launch per
    step. This is for the GPU, where a small model's step is launch-bound and
    K clients cost about what one does.

The vectorised path reproduces the sequential one step for step. Each client's
batches come from its own ``torch.Generator().manual_seed(seed)`` and one
``torch.randperm(n)`` per epoch, as in fl.train; the per-client schedules are
padded to the cohort's longest, and a client with no batch at a step is
inactive there: it is not computed, and its parameters, optimizer state and
buffers stay exactly as they are. At each step the active clients are grouped
by batch length and each group is one vmapped call, so a client's partial last
batch is a batch of its real examples only (the mean, BatchNorm's batch
statistics and FedLD's margin term see exactly what the sequential path sees).
BatchNorm running statistics are stacked buffers updated in place per client
under vmap. The results equal the sequential path's up to float32 reduction
order (vmap runs batched kernels, e.g. a grouped convolution, that sum in
another order, and in the default layout, where the sequential path on a CPU
trains conv models channels-last: see docs/RESULTS.md on ResNet-8's BatchNorm);
tests/test_cohort.py measures and bounds that.

Models that vmap cannot batch (random ops such as dropout, data-dependent
control flow), or batches only by looping over the clients (an op without a
batching rule, e.g. the CPU LSTM kernel), are detected once per model class by
a small probe and trained sequentially, with one log line.

Why one module of this length: one algorithm, the two execution paths of the cohort
trainer and the batch schedule and state stacking they share.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fl.config import TrainConfig
from fl.data import Arrays
from fl.models import build_model
from fl.objectives import margin_loss
from fl.optim import CohortAdamW, CohortSGD
from fl.train import TrainResult, train
from fl.transforms import AugmentDraw

__all__ = ["MODES", "ClientTraining", "choose_mode", "train_cohort", "vectorisable"]

Mode = Literal["auto", "sequential", "vectorised"]
MODES: tuple[str, ...] = ("auto", "sequential", "vectorised")

_log = logging.getLogger("fl.cohort")
_VMAP_OK: dict[tuple, bool] = {}  # (model class, parameter shapes, device type) -> probe verdict


@dataclass(frozen=True)
class ClientTraining:
    """One client's outcome: its trained state dict (CPU tensors, the model's
    ``state_dict`` keys) and what :func:`fl.train.train` reports."""

    state: dict[str, torch.Tensor]
    result: TrainResult


def choose_mode(model: nn.Module, device: torch.device, example: torch.Tensor,
                mode: Mode = "auto", clients: int = 2) -> str:  # fmt: skip
    """The path :func:`train_cohort` takes: ``sequential`` or ``vectorised``.

    ``auto`` picks by device: one after another on a CPU (bitwise fl.train; the
    module docstring has the measurements), vectorised on a GPU when there are
    ``clients`` > 1 (a cohort of one has nothing to vectorise). Either way a
    model that vmap cannot batch is trained sequentially (:func:`vectorisable`,
    probed on ``example`` inputs).
    """
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "sequential" or (mode == "auto" and (device.type == "cpu" or clients < 2)):
        return "sequential"
    return "vectorised" if vectorisable(model, device, example) else "sequential"


def _split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trained parameters, and of everything else functional_call needs
    (frozen parameters, buffers)."""
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    others = [n for n, p in model.named_parameters() if not p.requires_grad]
    others += [n for n, _ in model.named_buffers()]
    return trained, others


def _grad_fn(model: nn.Module, margin_lambda: float):  # noqa: ANN202
    """vmap(grad) of the training objective: per client (gradients, loss)."""

    def objective(params: dict, others: dict, x: torch.Tensor, y: torch.Tensor) -> tuple:
        loss = margin_loss(functional_call(model, (params, others), (x,)), y, margin_lambda)
        return loss, loss.detach()

    return vmap(grad(objective, has_aux=True), randomness="error")


def vectorisable(model: nn.Module, device: torch.device | str, example: torch.Tensor) -> bool:
    """Whether vmap can batch ``model``'s training step: a probe with two stacked
    copies and a batch of (up to) two ``example`` inputs, run once per model class,
    parameter shapes and device type. A rejection is logged once."""
    device = torch.device(device)
    key = (type(model), tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
           device.type)  # fmt: skip
    if key in _VMAP_OK:
        return _VMAP_OK[key]
    probe = copy.deepcopy(model).to(device).train()
    trained, others = _split(probe)
    tensors = dict(probe.named_parameters()) | dict(probe.named_buffers())
    params = {n: tensors[n].detach().unsqueeze(0).repeat(2, *[1] * tensors[n].dim())
              for n in trained}  # fmt: skip
    rest = {n: tensors[n].detach().unsqueeze(0).repeat(2, *[1] * tensors[n].dim())
            for n in others}  # fmt: skip
    why = ""
    try:
        x = example[:2].to(device)
        x = torch.stack([x, x])
        with torch.no_grad():
            classes = int(probe(example[:2].to(device)).shape[-1])
        y = torch.arange(x.shape[1], device=device).remainder(classes).expand(2, -1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _grad_fn(probe, 0.0)(params, rest, x, y)
        # an op without a batching rule runs once per client in a Python-level loop
        # (torch warns "There is a performance drop ..."): correct, but no faster
        slow = [str(w.message) for w in caught if "batching rule" in str(w.message)]
        if slow:
            why = slow[0]
    # Any failure means "not batchable": vmap raises RuntimeError, NotImplementedError,
    # ValueError or others depending on the op it rejects; the caller falls back.
    except Exception as exc:  # noqa: BLE001
        why = str(exc).strip() or type(exc).__name__
    if why:
        _log.warning("fl.cohort: %s cannot be vectorised with torch.func.vmap (%s); its "
                     "clients train one after another", type(model).__name__,
                     why.splitlines()[0][:200])  # fmt: skip
    _VMAP_OK[key] = not why
    return not why


def _per_client(name: str, value: object, count: int, default: object) -> list:
    if value is None:
        return [default] * count
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) != count:
            raise ValueError(f"{name}: expected {count} entries (one per client), got {len(value)}")
        return list(value)
    return [value] * count


def train_cohort(
    model: nn.Module | str,
    states: Sequence[Mapping[str, torch.Tensor]],
    datas: Sequence[Arrays],
    cfg: TrainConfig,
    *,
    seeds: Sequence[int],
    device: torch.device | str,
    margin_lambda: float = 0.0,
    proximal_mu: float = 0.0,
    masks: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
    epochs: int | Sequence[int] | None = None,
    mode: Mode = "auto",
    cohort_size: int | None = None,
    num_classes: int | None = None,
    backend: str = "auto",
) -> list[ClientTraining]:
    """Train K clients from their starting ``states`` on their ``datas``.

    Client ``k`` trains as ``fl.train.train(model_k, datas[k], cfg, seed=seeds[k],
    device=device, margin_lambda=margin_lambda, proximal_mu=proximal_mu,
    masks=masks[k], epochs=epochs[k])`` would, with ``model_k`` the architecture
    of ``model`` loaded with ``states[k]``; the answer is one
    :class:`ClientTraining` per client, in order.

    ``model``: a module (its architecture; its own weights are not used) or a
    registry name, then with ``num_classes`` (the input shape is the data's).
    ``epochs``: one count for all or one per client (default ``cfg.local_epochs``).
    ``masks``: one name-to-mask mapping (or None) per client. ``mode``: ``auto``
    (:func:`choose_mode`), ``sequential`` or ``vectorised``. ``cohort_size``: at
    most this many clients per vectorised cohort (default: all). ``backend``: the
    fused optimizer's (``auto`` | ``torch`` | ``triton``), vectorised path only.

    On the vectorised path ``result.seconds`` is the client's share of the
    cohort's wall time, in proportion to its steps (the shares add up to the
    time the cohort took); the loss is the mean over the last epoch as in
    fl.train, equal up to float32 reduction order.
    """
    count = len(states)
    for name, items in (("datas", datas), ("seeds", seeds)):
        if len(items) != count:
            raise ValueError(f"{name}: expected {count} entries (one per state), got "
                             f"{len(items)}")  # fmt: skip
    masks_l = _per_client("masks", masks, count, None)
    epochs_l = [cfg.local_epochs if e is None else e
                for e in _per_client("epochs", epochs, count, None)]  # fmt: skip
    for k, e in enumerate(epochs_l):
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ValueError(f"epochs: expected ints >= 0, got {e!r} for client {k}")
    for k, d in enumerate(datas):
        if len(d) == 0:
            raise ValueError(f"datas: client {k} has no examples to train on")
    if cohort_size is not None and (isinstance(cohort_size, bool) or not isinstance(
            cohort_size, int) or cohort_size < 1):  # fmt: skip
        raise ValueError(f"cohort_size: expected an int >= 1, got {cohort_size!r}")
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; allowed: {', '.join(MODES)}")
    if count == 0:
        return []
    device = torch.device(device)
    if isinstance(model, str):
        if num_classes is None:
            raise ValueError("num_classes: required when model is given by name")
        model = build_model(model, tuple(datas[0].x.shape[1:]), num_classes)
    transform = datas[0].transform
    if any(d.transform != transform for d in datas):
        raise ValueError("datas: every client's examples must have the same transform")
    # two inputs even if one has one, as the model takes them
    example = transform(torch.cat([d.x[:2] for d in datas[:2]])[:2], None, train=False)
    path = choose_mode(model, device, example, mode, clients=count)
    args = dict(cfg=cfg, device=device, margin_lambda=margin_lambda, proximal_mu=proximal_mu)
    if path == "sequential":
        return _sequential(model, states, datas, seeds, masks_l, epochs_l, **args)
    size = cohort_size or count
    out: list[ClientTraining] = []
    for lo in range(0, count, size):
        hi = min(count, lo + size)
        out += _vectorised(model, states[lo:hi], datas[lo:hi], seeds[lo:hi], masks_l[lo:hi],
                           epochs_l[lo:hi], backend=backend, **args)  # fmt: skip
    return out


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}


def _sequential(
    model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], datas: Sequence[Arrays],
    seeds: Sequence[int], masks: list, epochs: list[int], *, cfg: TrainConfig,
    device: torch.device, margin_lambda: float, proximal_mu: float,
) -> list[ClientTraining]:  # fmt: skip
    """fl.train.train per client, on one working copy of the model (every parameter and
    persistent buffer is overwritten by each client's state)."""
    work = copy.deepcopy(model)
    out = []
    for k in range(len(states)):
        work.load_state_dict(states[k])
        res = train(work, datas[k], cfg, seed=seeds[k], device=device,
                    margin_lambda=margin_lambda, proximal_mu=proximal_mu, masks=masks[k],
                    epochs=epochs[k])  # fmt: skip
        out.append(ClientTraining(_cpu_state(work), res))
    return out


@dataclass
class _Group:
    """The clients of one step that have a batch of the same length."""

    rows: torch.Tensor  #: client indices (device, int64)
    idx: torch.Tensor  #: [G, L] indices into the cohort's concatenated examples
    weight: torch.Tensor  #: [G] float64: L where the batch is in the client's last epoch
    full: bool  #: every client of the cohort, in order (no gather/scatter needed)
    clients: list[int]  #: ``rows`` on the host (the batch transform draws per client)


def _schedule(
    datas: Sequence[Arrays], seeds: Sequence[int], epochs: list[int], batch: int,
    device: torch.device,
) -> tuple[list[list[_Group]], list[list[bool]], list[int]]:  # fmt: skip
    """Per step: the groups of clients by batch length, and which clients are active.

    Each client's batches are what fl.train draws: its own generator, one randperm per
    epoch, ``batch``-sized slices (the last one shorter). The schedules are padded to
    the longest; index tensors travel to the device in one copy."""
    count = len(datas)
    per_client: list[list[tuple[torch.Tensor, bool]]] = []
    offset = 0
    for k in range(count):
        gen = torch.Generator().manual_seed(seeds[k])
        n = len(datas[k])
        batches = []
        for e in range(epochs[k]):
            order = torch.randperm(n, generator=gen, device="cpu")
            for start in range(0, n, batch):
                batches.append((order[start:start + batch] + offset, e == epochs[k] - 1))
        per_client.append(batches)
        offset += n
    steps = max((len(b) for b in per_client), default=0)
    specs: list[list[tuple[list[int], list[torch.Tensor], list[float]]]] = []
    active = []
    for s in range(steps):
        by_len: dict[int, tuple[list[int], list[torch.Tensor], list[float]]] = {}
        for k in range(count):
            if s < len(per_client[k]):
                idx, last = per_client[k][s]
                rows, idxs, weights = by_len.setdefault(len(idx), ([], [], []))
                rows.append(k)
                idxs.append(idx)
                weights.append(float(len(idx)) if last else 0.0)
        specs.append(list(by_len.values()))
        active.append([s < len(per_client[k]) for k in range(count)])
    # one host-to-device copy for every index of the round
    cpu = torch.device("cpu")
    flat_rows = [torch.tensor(r, dtype=torch.int64, device=cpu) for st in specs for r, _, _ in st]
    flat_idx = [torch.stack(i).reshape(-1) for st in specs for _, i, _ in st]
    flat_w = [torch.tensor(w, dtype=torch.float64, device=cpu) for st in specs for _, _, w in st]
    if not flat_rows:
        return [], active, [len(b) for b in per_client]
    rows_d = torch.cat(flat_rows).to(device)
    idx_d = torch.cat(flat_idx).to(device)
    w_d = torch.cat(flat_w).to(device)
    out: list[list[_Group]] = []
    r0 = i0 = 0
    for step in specs:
        groups = []
        for rows, idxs, _ in step:
            g, length = len(rows), len(idxs[0])
            groups.append(_Group(
                rows=rows_d[r0:r0 + g], idx=idx_d[i0:i0 + g * length].view(g, length),
                weight=w_d[r0:r0 + g], full=rows == list(range(count)), clients=rows,
            ))  # fmt: skip
            r0, i0 = r0 + g, i0 + g * length
        out.append(groups)
    return out, active, [len(b) for b in per_client]


def _stack(items: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype
           ) -> torch.Tensor:  # fmt: skip
    """Stack on the tensors' own device, then move once (one copy per tensor name rather
    than one per client: a cohort of 256 clients' states arrive on the CPU)."""
    if all(t.device == items[0].device for t in items):
        return torch.stack(items).to(device=device, dtype=dtype)
    return torch.stack([t.to(device=device, dtype=dtype) for t in items])


def _stack_states(states: Sequence[Mapping[str, torch.Tensor]], name: str, like: torch.Tensor,
                  device: torch.device) -> torch.Tensor:  # fmt: skip
    """Client states' ``name`` stacked on a new leading axis (the module's tensor
    repeated where the state lacks it: a non-persistent buffer)."""
    items = []
    for k, st in enumerate(states):
        t = st.get(name, like).detach()
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"states: client {k}'s {name} has shape {tuple(t.shape)}, the "
                             f"model's {tuple(like.shape)}")  # fmt: skip
        items.append(t)
    return _stack(items, device, like.dtype)


def _vectorised(
    model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], datas: Sequence[Arrays],
    seeds: Sequence[int], masks: list, epochs: list[int], *, cfg: TrainConfig,
    device: torch.device, margin_lambda: float, proximal_mu: float, backend: str,
) -> list[ClientTraining]:  # fmt: skip
    count = len(states)
    work = copy.deepcopy(model).to(device).train()
    trained, others = _split(work)
    tensors = dict(work.named_parameters()) | dict(work.named_buffers())
    for k, st in enumerate(states):
        missing = [n for n in work.state_dict() if n not in st]
        if missing:
            raise ValueError(f"states: client {k}'s state lacks {missing[:3]}")
    params = [_stack_states(states, n, tensors[n], device) for n in trained]
    rest = {n: _stack_states(states, n, tensors[n], device) for n in others}
    mask_list = []
    for n in trained:
        given = [m.get(n) if m else None for m in masks]
        if all(m is None for m in given):
            mask_list.append(None)
            continue
        where = next(m for m in given if m is not None).device
        ones = torch.ones(tensors[n].shape, device=where)
        mask_list.append(_stack([ones if m is None else m.to(where, torch.float32)
                                 for m in given], device, torch.float32))  # fmt: skip
    # the optimizer of fl.train.make_optimizer, for K clients
    if cfg.optimizer == "sgd":
        opt: CohortSGD | CohortAdamW = CohortSGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            prox_mu=proximal_mu, masks=mask_list, backend=backend)  # fmt: skip
    else:
        opt = CohortAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, prox_mu=proximal_mu,
                          masks=mask_list, backend=backend)  # fmt: skip
    xs = torch.cat([d.x for d in datas]).to(device)
    ys = torch.cat([d.y for d in datas]).to(device)
    grad_fn = _grad_fn(work, margin_lambda)
    # the batch transform of fl.train, drawn per client from its own generator in its
    # own batch order (so each client's batches are those of the sequential path)
    transform = datas[0].transform
    augment = [transform.generator(seed) for seed in seeds]
    t0 = time.perf_counter()
    schedule, active, steps = _schedule(datas, seeds, epochs, cfg.batch_size, device)
    totals = torch.zeros(count, dtype=torch.float64, device=device)
    for s, groups in enumerate(schedule):
        for g in groups:
            if g.full:
                p_in = dict(zip(trained, opt.params))
                r_in = rest  # updated in place (BatchNorm running statistics)
            else:
                p_in = {n: p.index_select(0, g.rows) for n, p in zip(trained, opt.params)}
                r_in = {n: t.index_select(0, g.rows) for n, t in rest.items()}
            xb = xs[g.idx]
            if not transform.identity:
                g_count, length = g.idx.shape
                draws = [transform.draw(length, augment[k]) for k in g.clients]
                flat = transform.apply(xb.flatten(0, 1), None if draws[0] is None
                                       else AugmentDraw.concat(draws))
                xb = flat.view(g_count, length, *flat.shape[1:])
            grads, losses = grad_fn(p_in, r_in, xb, ys[g.idx])
            if not g.full:
                for n, t in rest.items():
                    t.index_copy_(0, g.rows, r_in[n])
            opt.set_grads([grads[n] for n in trained], rows=None if g.full else g.rows)
            # as fl.train sums the last epoch's loss: loss (float64) times the batch length
            totals.index_add_(0, g.rows, losses.double() * g.weight)
        opt.step(active=None if all(active[s]) else active[s])
    totals_host = totals.tolist()  # waits for the device: the wall time below is complete
    seconds = time.perf_counter() - t0
    all_steps = max(1, sum(steps))
    names = list(work.state_dict())
    stacked = dict(zip(trained, opt.params)) | rest
    on_cpu = {n: stacked[n].detach().cpu() for n in names}
    out = []
    for k in range(count):
        n_k = len(datas[k])
        loss = totals_host[k] / n_k if epochs[k] > 0 else 0.0
        res = TrainResult(loss, n_k, seconds * steps[k] / all_steps, steps[k])
        out.append(ClientTraining({n: on_cpu[n][k].clone() for n in names}, res))
    return out
