"""Test helper: a Grid that delivers each message to the real ClientApp handler of its
node, in this process (no Ray), and contexts for one node per client or for workers."""

from __future__ import annotations

import contextlib

from flwr.app import Context, Message, MessageType, RecordDict

from clients.app import (
    decompose_handler,
    evaluate_handler,
    explore_handler,
    query,
    train_handler,
)
from fl import config as c
from fl import contract


def handler_for(kind: str):
    """The ClientApp handler Flower routes a message of type ``kind`` to."""
    if kind == MessageType.QUERY:
        return query
    if kind.startswith(MessageType.EVALUATE):
        return decompose_handler if kind.endswith(contract.DECOMPOSE_ACTION) else \
            evaluate_handler
    return explore_handler if kind.endswith(contract.EXPLORE_ACTION) else train_handler


def contexts(cfg: c.ExperimentConfig, node_ids: list[int]) -> dict[int, Context]:
    """One Context per node, as Flower's simulation gives them: node ``i`` of the list has
    ``partition-id`` i of ``len(node_ids)`` (a client, or in cohort mode a worker)."""
    return {n: Context(run_id=1, node_id=n, state=RecordDict(),
                       node_config={"partition-id": i, "num-partitions": len(node_ids)},
                       run_config=c.to_flat(cfg)) for i, n in enumerate(node_ids)}


class Loopback:
    """Delivers each message to the real ClientApp handler of its node; keeps them."""

    def __init__(self, node_contexts: dict[int, Context]):
        self.contexts = node_contexts
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            out.append(handler_for(m.metadata.message_type)(
                m, self.contexts[m.metadata.dst_node_id]))
        return out


def run_in_process(cfg: c.ExperimentConfig, run_dir) -> dict:
    """``server.app.run_experiment`` over a Loopback grid: one node per client, or in
    cohort mode ``simulation.workers`` worker nodes; returns the summary."""
    from server.app import run_experiment

    cfg.run_dir = str(run_dir)
    count = cfg.simulation.workers if cfg.simulation.cohort_size else cfg.partition.num_clients
    with task_identity():
        return run_experiment(Loopback(contexts(cfg, [7000 + i for i in range(count)])), cfg)


@contextlib.contextmanager
def task_identity():
    """Flower's task identity set as a ServerApp has it (a Message needs one), then put
    back."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
