"""Plain Flower ServerApp: Flower's FedAvg with centralized evaluation; writes the
end time of every round (after its evaluation) to ``times-path`` as JSON."""

import json
import time

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from plainfl import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    _, _, xte, yte = task.load(str(rc["data-path"]), float(rc["test-fraction"]), int(rc["seed"]))
    torch.manual_seed(int(rc["seed"]))
    model = task.net(xte)
    ends: list[float] = []
    accs: list[float] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = task.evaluate(model, xte, yte)
        ends.append(time.perf_counter())
        accs.append(acc)
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy = FedAvg(fraction_train=float(rc["fraction-train"]), fraction_evaluate=0.0)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                   num_rounds=int(rc["num-server-rounds"]), evaluate_fn=evaluate_fn)
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    with open(str(rc["times-path"]), "w") as f:
        # ends: perf_counter (CLOCK_MONOTONIC, one clock for every process of the machine)
        json.dump({"round_seconds": seconds, "accuracy": accs, "ends": ends}, f)
