"""Local training speed: Bonsai's client loop with its fused masked optimizer against the
same loop with torch's optimizer followed by a mask multiply.

    python benchmarks/train_step.py [--device auto] [--widths 16 64] [--repeats 5]

One sample is one epoch of ``fl.train.train`` (2048 synthetic 3x32x32 examples, 10
classes, batch 64: 32 steps) on the project's ResNet-8 at each width, with a
50%-dense mask on every weight matrix and filter (what a pruned client trains).
The two sides differ only in the optimizer ``fl.train.make_optimizer`` returns:
``MaskedSGD`` / ``MaskedAdamW`` (one fused step over a flat buffer), or
``torch.optim.SGD`` / ``AdamW`` with ``foreach=True`` followed by a
``torch._foreach_mul_`` of the masks, the obvious way to keep pruned weights at
zero. Run interleaved; ratios of the minima. Prints a table and appends a JSON
record (host, device, versions) to benchmarks/results/train-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from unittest import mock

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fl.train  # noqa: E402
from benchmarks.common import append_record, interleaved, machine  # noqa: E402
from fl.config import TrainConfig  # noqa: E402
from fl.data import Arrays  # noqa: E402
from fl.models import ResNet8  # noqa: E402

EXAMPLES, BATCH = 2048, 64


class _ThenMask:
    """torch's foreach optimizer, then the masks multiplied in: what a user writes."""

    def __init__(self, opt: torch.optim.Optimizer, params: list, masks: list) -> None:
        self.opt, self.params, self.masks = opt, params, masks

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.opt.step()
        torch._foreach_mul_(self.params, self.masks)


def torch_then_mask(
    model: nn.Module, cfg: TrainConfig, *, masks: Mapping[str, torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> _ThenMask:
    """Stands in for ``fl.train.make_optimizer`` on the torch side (same arguments)."""
    del proximal_mu  # the benchmark trains without FedProx
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, foreach=True)  # fmt: skip
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    named = [(n, p) for n, p in model.named_parameters() if masks and n in masks]
    return _ThenMask(opt, [p for _, p in named], [masks[n].float() for n, _ in named])


def _masks(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < 0.5
            for n, p in model.named_parameters() if p.dim() > 1}  # fmt: skip


def bench(width: int, optimizer: str, device: torch.device, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    data = Arrays(torch.randn(EXAMPLES, 3, 32, 32, generator=g).to(device),
                  torch.randint(0, 10, (EXAMPLES,), generator=g).to(device))  # fmt: skip
    cfg = TrainConfig(local_epochs=1, batch_size=BATCH, optimizer=optimizer,
                      lr=0.05 if optimizer == "sgd" else 1e-3, weight_decay=5e-4)  # fmt: skip
    torch.manual_seed(0)
    models = {side: ResNet8((3, 32, 32), 10, width=width).to(device) for side in ("ours", "torch")}
    models["torch"].load_state_dict(models["ours"].state_dict())
    masks = _masks(models["ours"], seed=1)
    n_params = sum(p.numel() for p in models["ours"].parameters())
    epochs = {"ours": 0, "torch": 0}

    def epoch(side: str) -> None:
        epochs[side] += 1
        kw = dict(seed=epochs[side], device=device, masks=masks)
        if side == "ours":
            fl.train.train(models[side], data, cfg, **kw)
        else:
            with mock.patch.object(fl.train, "make_optimizer", torch_then_mask):
                fl.train.train(models[side], data, cfg, **kw)

    stats = interleaved({s: (lambda s=s: epoch(s)) for s in ("ours", "torch")}, repeats, device,
                         warmup=1)  # fmt: skip
    t = {k: v["min"] for k, v in stats.items()}
    return {
        "model": f"resnet8 width {width}", "optimizer": optimizer, "parameters": n_params,
        "examples": EXAMPLES, "batch_size": BATCH, "steps_per_epoch": EXAMPLES // BATCH,
        "seconds_per_epoch_min": t,
        "seconds_per_epoch_median": {k: v["median"] for k, v in stats.items()},
        "speedup_vs_torch_then_mask": t["torch"] / t["ours"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"],
                        choices=["sgd", "adamw"])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to append to")
    args = parser.parse_args(argv)
    device = fl.train.pick_device(args.device)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the benchmark times real kernels")
    info = machine(device)
    print(f"# {info['device']} | {info['cpu']} x{info['cpu_count']} | torch {info['torch']}"
          f" | load {info['load_average']} | seconds per epoch, min of {args.repeats}")  # fmt: skip
    rows = []
    for width in args.widths:
        for optimizer in args.optimizers:
            r = bench(width, optimizer, device, args.repeats)
            t = r["seconds_per_epoch_min"]
            print(f"{r['model']:<18} {optimizer:<6} {r['parameters'] / 1e6:6.2f}M params"
                  f"  torch+mask {t['torch'] * 1e3:8.1f} ms  ours {t['ours'] * 1e3:8.1f} ms"
                  f"  speedup {r['speedup_vs_torch_then_mask']:.2f}x", flush=True)  # fmt: skip
            rows.append(r)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info, "repeats": args.repeats, "rows": rows,
    }  # fmt: skip
    append_record(record, "train", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
