"""Cohort training speed: clients per second of fl.cohort.train_cohort, vectorised
(torch.func.vmap over stacked parameters, one stacked fused optimizer launch per
step) against one client at a time, with torch's optimizer or with ours.

    python benchmarks/cohort.py [--device auto] [--models cnn resnet8]
        [--cohorts 1 8 64 256] [--examples 32] [--image 3 32 32] [--repeats 3]

Each client has ``--examples`` random images (3x32x32 unless ``--image``
says otherwise, e.g. digits-sized 1 8 8 on a CPU; 10 classes, its own seed),
trains ``--epochs`` epochs at batch 16 from its own starting weights, with
its own 50%-dense mask on every weight matrix and filter (what a pruned
AutoFLIP client trains). Three sides, run interleaved (ratios of the minima):

``vectorised``
    ``train_cohort(mode="vectorised")`` over the whole cohort at once.
``one_by_one_fused``
    ``train_cohort(mode="sequential")``: fl.train.train per client with the
    fused MaskedSGD (today's one-client-per-message work, without Flower).
``one_by_one_torch``
    the same loop with ``torch.optim.SGD(foreach=True)`` followed by a mask
    multiply (benchmarks/train_step.py's baseline) instead of MaskedSGD.

One-at-a-time throughput does not depend on the cohort size, so the two
one-by-one sides are timed on ``min(cohort, --one-by-one-clients)`` clients and
reported per client; every side does the same work per client. The record
also holds the largest difference between the vectorised and one-by-one
trained states (float32 reduction order; tests/test_cohort.py bounds it).
Imports nothing from Flower, Ray or scikit-learn: it runs on a GPU machine that
has only torch and Triton. Appends a JSON record (host, device, versions) to
benchmarks/results/cohort-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_step import torch_then_mask  # noqa: E402  (benchmarks/train_step.py)

import fl.train  # noqa: E402
from benchmarks.common import append_record, interleaved, machine  # noqa: E402
from fl.cohort import choose_mode, train_cohort  # noqa: E402
from fl.config import TrainConfig  # noqa: E402
from fl.data import Arrays  # noqa: E402
from fl.models import build_model  # noqa: E402

CLASSES, BATCH = 10, 16


def clients(name: str, count: int, examples: int, shape: tuple[int, ...], seed: int = 0
            ) -> tuple:  # fmt: skip
    """``count`` clients: model, starting states, data and masks (all on the CPU, as a
    worker receives them)."""
    g = torch.Generator().manual_seed(seed)
    model = build_model(name, shape, CLASSES, seed=seed)
    base = model.state_dict()
    states, datas, masks = [], [], []
    for _ in range(count):
        states.append({n: t + 0.01 * torch.randn(t.shape, generator=g)
                       if t.is_floating_point() else t.clone() for n, t in base.items()})
        datas.append(Arrays(torch.randn(examples, *shape, generator=g),
                            torch.randint(0, CLASSES, (examples,), generator=g)))
        masks.append({n: torch.rand(p.shape, generator=g) < 0.5
                      for n, p in model.named_parameters() if p.dim() > 1})  # fmt: skip
    return model, states, datas, masks


def bench(name: str, cohort: int, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = TrainConfig(local_epochs=args.epochs, batch_size=BATCH, optimizer="sgd", lr=0.05,
                      momentum=0.9, weight_decay=5e-4)  # fmt: skip
    model, states, datas, masks = clients(name, cohort, args.examples, tuple(args.image))
    one = min(cohort, args.one_by_one_clients)
    seeds = list(range(cohort))
    # the path "vectorised" really takes (a model vmap cannot batch falls back, logged)
    path = choose_mode(model, device, datas[0].x, "vectorised", clients=cohort)
    out: dict = {}

    def run(side: str) -> None:
        k = cohort if side == "vectorised" else one
        mode = "vectorised" if side == "vectorised" else "sequential"
        kw = dict(seeds=seeds[:k], device=device, masks=masks[:k], mode=mode)
        if side == "one_by_one_torch":
            with mock.patch.object(fl.train, "make_optimizer", torch_then_mask):
                out[side] = train_cohort(model, states[:k], datas[:k], cfg, **kw)
        else:
            out[side] = train_cohort(model, states[:k], datas[:k], cfg, **kw)

    sides = ("vectorised", "one_by_one_fused", "one_by_one_torch")
    stats = interleaved({s: (lambda s=s: run(s)) for s in sides}, args.repeats, device,
                         warmup=1)  # fmt: skip
    clients_timed = {"vectorised": cohort, "one_by_one_fused": one, "one_by_one_torch": one}
    rate = {s: clients_timed[s] / stats[s]["min"] for s in sides}
    worst = max(
        float((a.state[n] - b.state[n]).abs().max())
        for a, b in zip(out["vectorised"][:one], out["one_by_one_fused"], strict=True)
        for n in a.state if a.state[n].is_floating_point()
    )  # fmt: skip
    steps = out["one_by_one_fused"][0].result.steps
    return {
        "model": name, "cohort": cohort, "vectorised_path": path, "image": list(args.image),
        "examples_per_client": args.examples,
        "epochs": args.epochs, "batch_size": BATCH, "steps_per_client": steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "clients_timed": clients_timed, "seconds_min": {s: stats[s]["min"] for s in sides},
        "seconds_median": {s: stats[s]["median"] for s in sides},
        "clients_per_second": rate,
        "speedup_vs_one_by_one_torch": rate["vectorised"] / rate["one_by_one_torch"],
        "speedup_vs_one_by_one_fused": rate["vectorised"] / rate["one_by_one_fused"],
        "max_abs_diff_vectorised_vs_one_by_one": worst,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet8"],
                        choices=["mlp", "cnn", "resnet8"])  # fmt: skip
    parser.add_argument("--cohorts", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--examples", type=int, default=32, help="examples per client")
    parser.add_argument("--image", type=int, nargs=3, default=[3, 32, 32],
                        metavar=("C", "H", "W"), help="input image shape")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--one-by-one-clients", type=int, default=16,
                        help="clients timed on the one-at-a-time sides (per-client rate)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to append to")
    args = parser.parse_args(argv)
    device = fl.train.pick_device(args.device)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the benchmark times real kernels")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(device)
    print(f"# {info['device']} | {info['cpu']} x{info['cpu_count']} | torch {info['torch']}"
          f" | load {info['load_average']} | clients/s, min of {args.repeats}")  # fmt: skip
    rows = []
    for name in args.models:
        for cohort in args.cohorts:
            r = bench(name, cohort, args, device)
            c = r["clients_per_second"]
            if r["vectorised_path"] != "vectorised":
                print(f"# {name}: vmap cannot batch it; 'vectorised' ran one by one")
            print(f"{name:<8} cohort {cohort:>4}  vectorised {c['vectorised']:8.1f}"
                  f"  one-by-one fused {c['one_by_one_fused']:7.1f}"
                  f"  torch {c['one_by_one_torch']:7.1f}"
                  f"  speedup vs torch {r['speedup_vs_one_by_one_torch']:5.2f}x"
                  f"  vs fused {r['speedup_vs_one_by_one_fused']:5.2f}x"
                  f"  max diff {r['max_abs_diff_vectorised_vs_one_by_one']:.1e}",
                  flush=True)  # fmt: skip
            rows.append(r)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info, "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }  # fmt: skip
    append_record(record, "cohort", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
