"""Local training and evaluation of one client's model on its own examples."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fl.config import TrainConfig
from fl.data import Arrays
from fl.objectives import margin_loss
from fl.optim import MaskedAdamW, MaskedSGD
from fl.scaleout import machine_resources


@dataclass(frozen=True)
class TrainResult:
    """What a client reports after local training."""

    loss: float  #: mean training objective over the last epoch
    num_examples: int
    seconds: float
    steps: int


def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("resources.device: got 'cuda' but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, *, masks: Mapping[str, torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> torch.optim.Optimizer:
    """The local optimizer: the project's fused masked SGD/AdamW (fl/optim).

    ``masks`` maps parameter names to 0/1 masks: those entries stay exactly zero,
    and so does their optimizer state. ``proximal_mu > 0`` adds the FedProx term
    mu (w - w_global) to the gradient in the same fused pass, anchored at the
    weights the model has now (Li et al., MLSys 2020).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    mask_list = [masks.get(n) if masks else None for n, _ in named]
    if cfg.optimizer == "sgd":
        return MaskedSGD(params, lr=cfg.lr, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay, prox_mu=proximal_mu, masks=mask_list)
    return MaskedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, prox_mu=proximal_mu,
                       masks=mask_list)


def train(
    model: nn.Module,
    data: Arrays,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    margin_lambda: float = 0.0,
    proximal_mu: float = 0.0,
    masks: Mapping[str, torch.Tensor] | None = None,
    epochs: int | None = None,
    channels_last: bool | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` (default ``cfg.local_epochs``) on ``data``.

    Mini-batches are drawn with a generator seeded by ``seed``: the same seed
    gives the same batches, so a rerun reproduces the run. Each batch becomes the
    model's input through ``data.transform`` (fl.transforms: uint8 images scaled and
    normalised on ``device``, augmented with draws seeded from ``seed``; the identity
    for data used as stored). The objective is
    cross-entropy plus FedLD's margin control when ``margin_lambda > 0``
    (fl.objectives.margin_loss); pruned entries (``masks``) never move. With
    ``channels_last`` (default: :func:`channels_last_helps`, conv models on a CPU) it
    trains in the channels-last layout and hands ``model`` back in the default one,
    also when training fails (the same values up to float32 summation order).
    """
    if len(data) == 0:
        raise ValueError("data: this client has no examples to train on")
    model.to(device).train()
    if channels_last is None:
        channels_last = channels_last_helps(model, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dev_masks = {n: m.to(device) for n, m in masks.items()} if masks else None
    try:
        opt = make_optimizer(model, cfg, masks=dev_masks, proximal_mu=proximal_mu)
        gen = torch.Generator().manual_seed(seed)
        transform = data.transform
        augment = transform.generator(seed)
        x, y = data.x.to(device), data.y.to(device)
        n = len(data)
        t0 = time.perf_counter()
        steps, last_epoch_loss = 0, 0.0
        for _ in range(cfg.local_epochs if epochs is None else epochs):
            order = torch.randperm(n, generator=gen).to(device)
            # summed on the device, in float64 as a Python float would be: reading the loss
            # each step would make the host wait for the GPU at every batch
            total = torch.zeros((), dtype=torch.float64, device=device)
            count = 0
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = margin_loss(model(transform(x[idx], augment, train=True)), y[idx],
                                   margin_lambda)
                loss.backward()
                opt.step()
                total += loss.detach().double() * len(idx)
                count += len(idx)
                steps += 1
            last_epoch_loss = float(total) / count
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    return TrainResult(last_epoch_loss, n, time.perf_counter() - t0, steps)


def channels_last_helps(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` runs faster in the channels-last layout on ``device``: on a CPU,
    for a model with 2-D convolutions and no GroupNorm. oneDNN's convolutions and
    max-pooling then work in their native layout instead of reordering every
    activation; torch's CPU GroupNorm is slower in it (``benchmarks/layout.py`` times
    every conv model in both layouts, ``benchmarks/server_costs.py`` the evaluation).
    On a GPU the default layout stays: cuDNN picks its own for float32."""
    if device.type != "cpu":
        return False
    modules = list(model.modules())
    return (any(isinstance(m, nn.Conv2d) for m in modules)
            and not any(isinstance(m, nn.GroupNorm) for m in modules))


def evaluate(
    model: nn.Module, data: Arrays, device: torch.device, batch_size: int = 256,
    threads: int = 1, channels_last: bool | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``data`` (each batch through
    ``data.transform``, without augmentation).

    ``batch_size`` 256 by default: with 512 the digits CNN's activations of a batch
    (8 MB a layer) are large enough that glibc returns them to the kernel after each
    batch and faults them in again, and over a third of the CPU time of the server's
    threaded evaluation went to the kernel (``benchmarks/server_costs.py`` times both).

    ``threads`` > 1 (CPU only): contiguous runs of batches go to that many Python
    threads (torch releases the GIL inside its kernels), for a caller whose torch uses
    fewer threads than it has cores, as the server's central evaluation does beside
    one-thread workers. The batches and the order their sums are added in are those of
    one thread, so the result is the same to the last bit. The threads share ``model``
    in eval mode, which changes nothing in it (BatchNorm reads its running statistics).

    ``channels_last`` (default: :func:`channels_last_helps`) evaluates a channels-last
    copy of ``model`` on channels-last batches; ``model`` itself is left as it is. The
    values equal the default layout's up to float32 summation order.
    """
    model.to(device).eval()
    if channels_last is None:
        channels_last = channels_last_helps(model, device)
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    starts = list(range(0, len(data), batch_size))

    @torch.no_grad()
    def run(chunk: list[int]) -> list[tuple[float, int]]:
        out = []
        for start in chunk:
            xb = data.transform(data.x[start:start + batch_size].to(device), None,
                                train=False)
            if channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = data.y[start:start + batch_size].to(device)
            logits = model(xb)
            out.append((float(F.cross_entropy(logits, yb, reduction="sum")),
                        int((logits.argmax(1) == yb).sum())))
        return out

    threads = max(1, min(threads, len(starts))) if device.type == "cpu" else 1
    if threads == 1:
        sums = run(starts)
    else:
        per = -(-len(starts) // threads)
        chunks = [starts[i:i + per] for i in range(0, len(starts), per)]
        with ThreadPoolExecutor(len(chunks), thread_name_prefix="bonsai-evaluate") as pool:
            sums = [s for part in pool.map(run, chunks) for s in part]
    loss_sum = 0.0
    for loss, _ in sums:  # batch order: the sum of one thread
        loss_sum += loss
    n = max(1, len(data))
    return loss_sum / n, sum(c for _, c in sums) / n


def spare_cores() -> int:
    """Threads a CPU evaluation can run side by side without oversubscribing: the
    cores this process may use over torch's threads per operation (2 cores and
    OMP_NUM_THREADS=1: 2; torch's default of one thread per core: 1)."""
    return max(1, machine_resources()[0] // torch.get_num_threads())
