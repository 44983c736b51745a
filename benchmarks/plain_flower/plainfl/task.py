"""Data and model of the plain-Flower baseline.

The model is Bonsai's ``cnn`` (imported, so both sides train the same network);
everything else is plain: an .npz file split into a test set and an IID pool by a
seeded permutation, the pool cut into equal contiguous chunks, a plain PyTorch
SGD loop.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fl.models import build_model


@lru_cache(maxsize=1)  # one dataset per process
def load(path: str, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """(pool x, pool y, test x, test y) of the .npz file at ``path``."""
    with np.load(path) as f:
        x = torch.from_numpy(f["x"].astype(np.float32))
        y = torch.from_numpy(f["y"].astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def partition(path: str, test_fraction: float, seed: int, pid: int, n: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``pid`` of ``n``: a contiguous chunk of the shuffled pool."""
    x, y, _, _ = load(path, test_fraction, seed)
    bounds = np.linspace(0, len(y), n + 1).astype(int)
    return x[bounds[pid]:bounds[pid + 1]], y[bounds[pid]:bounds[pid + 1]]


def net(x: torch.Tensor, num_classes: int = 10) -> nn.Module:
    return build_model("cnn", tuple(x.shape[1:]), num_classes)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int,
          lr: float, momentum: float, seed: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    total = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch_size):
            idx = order[s:s + batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
    return total / max(1, epochs * len(y))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for s in range(0, len(y), 512):
        out = model(x[s:s + 512])
        loss += float(nn.functional.cross_entropy(out, y[s:s + 512], reduction="sum"))
        correct += int((out.argmax(1) == y[s:s + 512]).sum())
    return loss / len(y), correct / len(y)
