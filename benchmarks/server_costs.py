"""The server's own work between two rounds of the cohort benchmark.

    python benchmarks/server_costs.py [--replies 100] [--test 36000] [--repeats 5]

What the workers of ``benchmarks/scale.py --mode cohort`` wait for while the server
works, at that benchmark's sizes (100 replies of the digits CNN, a 36,000-image test
split), timed round-robin with :func:`common.interleaved`:

- counting the bytes of the round's replies: Flower's serialiser (``recorddict_to_proto``
  and ``ByteSize``, what ``fl.wire.message_nbytes`` did before) against
  :func:`fl.msgsize.recorddict_nbytes` (what it does now); both give the same total,
  which is checked;
- the server's central evaluation (:func:`fl.train.evaluate`) in the default
  (contiguous) layout, in the channels-last layout (``fl.train.channels_last_helps``),
  both on one thread, and, as ``server.app`` calls it, channels-last on
  :func:`fl.train.spare_cores` threads (torch on one thread, as in that benchmark:
  every core of this machine), with its default batch of 256 images and with 512
  (the default until the kernel's share of that evaluation was seen); the threaded
  result is checked equal to one thread's to the last bit, the two layouts' within
  float32 summation order. For the two batch sizes it also records the user and
  system (kernel) CPU seconds of one threaded evaluation, from ``os.times``.

Appends a record to benchmarks/results/server-costs-cpu.json.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from common import append_record, interleaved, machine
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common import serde

from fl.data import Arrays
from fl.models import build_model
from fl.msgsize import recorddict_nbytes
from fl.train import evaluate, spare_cores


def cpu_seconds(fn: Callable[[], object]) -> dict[str, float]:
    """User and system CPU seconds of this process over one call of ``fn``."""
    before = os.times()
    fn()
    after = os.times()
    return {"user": round(after.user - before.user, 3),
            "system": round(after.system - before.system, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replies", type=int, default=100)
    p.add_argument("--test", type=int, default=36_000, help="test images (8x8, 1 channel)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    replies = [RecordDict({"arrays": ArrayRecord({k: v + i for k, v in
                                                  model.state_dict().items()}),
                           "metrics": MetricRecord({"num-examples": 144, "train-loss": 0.5})})
               for i in range(a.replies)]
    flower = sum(serde.recorddict_to_proto(r).ByteSize() for r in replies)
    ours = sum(recorddict_nbytes(r) for r in replies)
    assert ours == flower, (ours, flower)
    gen = torch.Generator().manual_seed(0)
    test = Arrays(torch.rand(a.test, 1, 8, 8, generator=gen),
                  torch.randint(0, 10, (a.test,), generator=gen))
    threads = spare_cores()
    assert evaluate(model, test, cpu) == evaluate(model, test, cpu, threads=threads)
    loss_cl, acc_cl = evaluate(model, test, cpu)
    loss_c, acc_c = evaluate(model, test, cpu, channels_last=False)
    assert abs(loss_cl - loss_c) <= 1e-5 * loss_c, (loss_cl, loss_c)
    times = interleaved({
        "bytes_flower_serialiser": lambda: [serde.recorddict_to_proto(r).ByteSize()
                                            for r in replies],
        "bytes_fl_msgsize": lambda: [recorddict_nbytes(r) for r in replies],
        "central_evaluation_contiguous": lambda: evaluate(model, test, cpu,
                                                          channels_last=False),
        "central_evaluation_threads_batch512": lambda: evaluate(model, test, cpu,
                                                                threads=threads,
                                                                batch_size=512),
        "central_evaluation": lambda: evaluate(model, test, cpu),
        "central_evaluation_threads": lambda: evaluate(model, test, cpu, threads=threads),
    }, a.repeats, cpu, warmup=1)
    split = {f"batch_{b}": cpu_seconds(lambda b=b: evaluate(model, test, cpu, threads=threads,
                                                            batch_size=b))
             for b in (256, 512)}
    for name, t in times.items():
        print(f"{name:26s} min {t['min']:.4f} s  median {t['median']:.4f} s")
    ratio = times["bytes_flower_serialiser"]["min"] / times["bytes_fl_msgsize"]["min"]
    print(f"byte count of {a.replies} replies ({ours} B): fl.msgsize {ratio:.0f}x faster")
    speedup = times["central_evaluation"]["min"] / times["central_evaluation_threads"]["min"]
    print(f"central evaluation on {threads} threads: {speedup:.2f}x one thread")
    batch = (times["central_evaluation_threads_batch512"]["min"]
             / times["central_evaluation_threads"]["min"])
    print(f"threaded central evaluation, batches of 256: {batch:.2f}x batches of 512")
    for name, cpu_s in split.items():
        print(f"threaded evaluation, {name}: user {cpu_s['user']:.2f} s, "
              f"system {cpu_s['system']:.2f} s")
    layout = times["central_evaluation_contiguous"]["min"] / times["central_evaluation"]["min"]
    print(f"central evaluation channels-last: {layout:.2f}x the contiguous layout "
          f"(accuracy {acc_cl:.4f} vs {acc_c:.4f})")
    append_record({"machine": machine(cpu), "replies": a.replies, "reply_bytes": ours,
                   "test_images": a.test, "threads": 1, "evaluation_threads": threads,
                   "seconds": times, "bytes_speedup": round(ratio, 1),
                   "evaluation_speedup": round(speedup, 2),
                   "channels_last_speedup": round(layout, 2),
                   "batch256_speedup": round(batch, 2), "threaded_evaluation_cpu": split,
                   "accuracy": {"channels_last": acc_cl, "contiguous": acc_c}},
                  "server-costs", cpu, None)


if __name__ == "__main__":
    main()
