"""What fl.train's channels-last layout on the CPU rests on: training speed of each conv
model in both layouts, and how far one step's float32 gradients are from float64 in each.

    python benchmarks/layout.py [--models cnn resnet8] [--clients 8] [--repeats 5]

Speed: seconds of ``fl.train.train`` for one client (32 random images of the model's
usual input shape, 1 epoch at batch 16, SGD with momentum, torch on one thread, as a
simulated client) with its ``channels_last`` argument on and off, timed
interleaved (:func:`common.interleaved`, ratio of the minima), beside what
``channels_last_helps`` picks for the model.

Accuracy: fl.train trains conv models channels-last on a CPU, while the vectorised
cohort path (vmap) computes in the default layout, so ``benchmarks/cohort.py``'s "max
diff" between the two paths also measures how the two layouts round. This part
separates the two: for each of ``--clients`` clients of
``benchmarks/cohort.py``'s setup (its own starting weights, random 1x8x8 images, a 50%
mask on every weight tensor, applied to the weights), one forward and backward of its
first batch of 16 (as fl.train draws it) in training mode, in float32 in each layout
and in float64 in the default layout; it reports the largest absolute difference of any
gradient entry from float64 and the largest gradient entry, with torch on 1 and on 2
threads (its CPU kernels split their sums by thread). Appends a record to
benchmarks/results/layout-cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fl.train  # noqa: E402
from benchmarks.cohort import BATCH, clients  # noqa: E402
from benchmarks.common import append_record, interleaved, machine  # noqa: E402
from fl.config import TrainConfig  # noqa: E402
from fl.data import Arrays  # noqa: E402
from fl.models import build_model  # noqa: E402

SPEED_MODELS = {"cnn": (1, 8, 8), "cnn_fedavg": (1, 28, 28), "cnn_leaf": (1, 28, 28),
                "lenet": (3, 32, 32), "resnet8": (3, 32, 32), "resnet18_gn": (3, 32, 32)}


def speed(name: str, shape: tuple[int, ...], repeats: int) -> dict:
    """Seconds of one client's ``fl.train.train`` in each layout (minima, interleaved)."""
    cpu = torch.device("cpu")
    model = build_model(name, shape, 10, seed=0)
    start = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    data = Arrays(torch.randn(2 * BATCH, *shape, generator=g),
                  torch.randint(0, 10, (2 * BATCH,), generator=g))
    cfg = TrainConfig(local_epochs=1, batch_size=BATCH, optimizer="sgd", lr=0.05,
                      momentum=0.9)

    def client(channels_last: bool) -> None:
        model.load_state_dict(start)
        fl.train.train(model, data, cfg, seed=0, device=cpu, channels_last=channels_last)

    times = interleaved({"default": lambda: client(False),
                         "channels_last": lambda: client(True)}, repeats, cpu, warmup=1)
    return {"model": name, "shape": list(shape),
            "seconds_min": {k: t["min"] for k, t in times.items()},
            "speedup": times["default"]["min"] / times["channels_last"]["min"],
            "picked": fl.train.channels_last_helps(model, cpu)}


def gradients(model: nn.Module, state: dict, mask: dict, x: torch.Tensor, y: torch.Tensor,
              dtype: torch.dtype, channels_last: bool) -> dict[str, torch.Tensor]:
    """Gradients (as float64) of one training-mode step of the masked ``model``."""
    m = copy.deepcopy(model).to(dtype)
    m.load_state_dict(state)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in mask:
                p.mul_(mask[name].to(dtype))
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    m.train()
    nn.functional.cross_entropy(m(x.to(dtype)), y).backward()
    return {n: p.grad.double() for n, p in m.named_parameters()}


def accuracy(name: str, clients_: int, threads: int) -> dict:
    """Largest float32 gradient error against float64, in each layout, over the clients."""
    model, states, datas, masks = clients(name, clients_, 2 * BATCH, (1, 8, 8))
    worst = {"default": 0.0, "channels_last": 0.0}
    largest = 0.0
    for seed, (state, data, mask) in enumerate(zip(states, datas, masks, strict=True)):
        # the client's first batch as fl.train draws it (benchmarks/cohort.py's seeds)
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        x, y = data.x[idx[:BATCH]], data.y[idx[:BATCH]]
        ref = gradients(model, state, mask, x, y, torch.float64, False)
        largest = max(largest, max(float(g.abs().max()) for g in ref.values()))
        for layout, cl in (("default", False), ("channels_last", True)):
            got = gradients(model, state, mask, x, y, torch.float32, cl)
            err = max(float((got[n] - ref[n]).abs().max()) for n in ref)
            worst[layout] = max(worst[layout], err)
    print(f"{name:8s} {threads} thread(s): largest gradient {largest:.3g}; float32 error: "
          f"default layout {worst['default']:.2g}, channels-last {worst['channels_last']:.2g}")
    return {"model": name, "clients": clients_, "batch": BATCH, "threads": threads,
            "largest_gradient": largest, "max_abs_error_vs_float64": worst}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cnn", "resnet8"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    cpu = torch.device("cpu")
    torch.set_num_threads(1)
    speeds = []
    for name, shape in SPEED_MODELS.items():
        row = speed(name, shape, a.repeats)
        print(f"{name:12s} {'x'.join(map(str, shape)):8s} one client: default "
              f"{row['seconds_min']['default'] * 1e3:7.1f} ms, channels-last "
              f"{row['seconds_min']['channels_last'] * 1e3:7.1f} ms ({row['speedup']:.2f}x); "
              f"fl.train picks {'channels-last' if row['picked'] else 'the default'}")
        speeds.append(row)
    rows = []
    for threads in (1, 2):  # torch's CPU kernels split their sums by thread
        torch.set_num_threads(threads)
        for name in a.models:
            rows.append(accuracy(name, a.clients, threads))
    append_record({"machine": machine(cpu), "speed_threads": 1, "repeats": a.repeats,
                   "speed": speeds,
                   "accuracy": rows},
                  "layout", cpu, None)


if __name__ == "__main__":
    main()
