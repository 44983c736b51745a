"""One process, a plain PyTorch loop: the compute floor of a federated round without
vectorisation (benchmarks/scale.py --mode cohort runs it beside Bonsai and Flower).

    python benchmarks/plain_loop.py --data digits.npz --clients 1000 --sampled 100 \\
        --rounds 3 --out times.json

Each round: sample ``--sampled`` of ``--clients`` clients (seeded), train each one
after another from the global weights (the plain-Flower baseline's own data split,
model and SGD loop, benchmarks/plain_flower/plainfl/task.py), average the
weights by example count (FedAvg), evaluate on the central test split. No
messages, no serialisation, no Ray: what is left is the training, the averaging
and the evaluation that every federated round of this setup does. Writes the
seconds of every round (as plain Flower's server measures them: from the end of
one evaluation to the end of the next) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "plain_flower"))
sys.path.insert(0, str(ROOT))

from plainfl import task  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--sampled", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while training (1: as each simulated client of the "
                        "other systems); the evaluation runs with torch's default, as the "
                        "other systems' ServerApps do")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    eval_threads = torch.get_num_threads()
    _, _, xte, yte = task.load(a.data, 0.2, 0)
    torch.manual_seed(0)
    model = task.net(xte)
    global_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    rng = np.random.default_rng(0)
    task.evaluate(model, xte, yte)
    ends = [time.perf_counter()]
    accs = []
    for _ in range(a.rounds):
        chosen = np.sort(rng.choice(a.clients, size=min(a.sampled, a.clients), replace=False))
        total, acc_state = 0, None
        torch.set_num_threads(a.threads)
        for pid in chosen:
            x, y = task.partition(a.data, 0.2, 0, int(pid), a.clients)
            model.load_state_dict(global_state)
            task.train(model, x, y, a.epochs, 16, 0.05, 0.9, seed=int(pid))
            w = len(y)
            state = model.state_dict()
            if acc_state is None:
                acc_state = {n: t.detach().double() * w for n, t in state.items()}
            else:
                for n, t in state.items():
                    acc_state[n] += t.detach().double() * w
            total += w
        global_state = {n: (t / total).to(global_state[n].dtype) for n, t in acc_state.items()}
        model.load_state_dict(global_state)
        torch.set_num_threads(eval_threads)
        accs.append(task.evaluate(model, xte, yte)[1])
        ends.append(time.perf_counter())
    seconds = [b - e for e, b in zip(ends, ends[1:])]
    Path(a.out).write_text(json.dumps({"round_seconds": seconds, "accuracy": accs, "ends": ends,
                                       "train_threads": a.threads,
                                       "eval_threads": eval_threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
