"""Discover the federation: which nodes are connected and which partition each holds."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl import contract as k


class FederationError(RuntimeError):
    """The federation cannot run the experiment (too few nodes, no replies)."""


def discover(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Wait for ``expected`` nodes, ask each its partition id, return node ids in
    partition-id order (ties broken by node id)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of partition.num_clients={expected} nodes connected "
                f"within {timeout:.0f} s"
            )
        time.sleep(0.5)
    msgs = [Message(RecordDict({k.CONFIG: ConfigRecord({})}), dst_node_id=nid,
                    message_type=MessageType.QUERY) for nid in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    ranked: list[tuple[int, int]] = []
    for r in replies:
        if r.has_error():
            log(INFO, "node %d did not answer the discovery query: %s",
                r.metadata.src_node_id, r.error.reason)
            continue
        ranked.append((int(r.content[k.METRICS]["partition-id"]), r.metadata.src_node_id))
    if not ranked:
        raise FederationError("no node answered the discovery query")
    ranked.sort()
    log(INFO, "discovered %d nodes (partitions %d..%d)", len(ranked), ranked[0][0], ranked[-1][0])
    return [nid for _, nid in ranked]
