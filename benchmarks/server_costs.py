"""The server's own work between two rounds of the cohort benchmark, on one thread.

    python benchmarks/server_costs.py [--replies 100] [--test 36000] [--repeats 5]

What the workers of ``benchmarks/scale.py --mode cohort`` wait for while the server
works, at that benchmark's sizes (100 replies of the digits CNN, a 36,000-image test
split), timed round-robin with :func:`common.interleaved`:

- counting the bytes of the round's replies: Flower's serialiser (``recorddict_to_proto``
  and ``ByteSize``, what ``fl.wire.message_nbytes`` did before) against
  :func:`fl.msgsize.recorddict_nbytes` (what it does now); both give the same total,
  which is checked;
- the server's central evaluation (:func:`fl.train.evaluate`) on one thread and, as
  ``server.app`` now calls it, on :func:`fl.train.spare_cores` threads (torch on one
  thread, as in that benchmark: every core of this machine); the two results are
  checked equal to the last bit.

Appends a record to benchmarks/results/server-costs-cpu.json.
"""

from __future__ import annotations

import argparse

import torch
from common import append_record, interleaved, machine
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common import serde

from fl.data import Arrays
from fl.models import build_model
from fl.msgsize import recorddict_nbytes
from fl.train import evaluate, spare_cores


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
    times = interleaved({
        "bytes_flower_serialiser": lambda: [serde.recorddict_to_proto(r).ByteSize()
                                            for r in replies],
        "bytes_fl_msgsize": lambda: [recorddict_nbytes(r) for r in replies],
        "central_evaluation": lambda: evaluate(model, test, cpu),
        "central_evaluation_threads": lambda: evaluate(model, test, cpu, threads=threads),
    }, a.repeats, cpu, warmup=1)
    for name, t in times.items():
        print(f"{name:26s} min {t['min']:.4f} s  median {t['median']:.4f} s")
    ratio = times["bytes_flower_serialiser"]["min"] / times["bytes_fl_msgsize"]["min"]
    print(f"byte count of {a.replies} replies ({ours} B): fl.msgsize {ratio:.0f}x faster")
    speedup = times["central_evaluation"]["min"] / times["central_evaluation_threads"]["min"]
    print(f"central evaluation on {threads} threads: {speedup:.2f}x one thread")
    append_record({"machine": machine(cpu), "replies": a.replies, "reply_bytes": ours,
                   "test_images": a.test, "threads": 1, "evaluation_threads": threads,
                   "seconds": times, "bytes_speedup": round(ratio, 1),
                   "evaluation_speedup": round(speedup, 2)}, "server-costs", cpu, None)


if __name__ == "__main__":
    main()
