"""Discover the federation: which nodes are connected and which partition each holds."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl import contract


class FederationError(RuntimeError):
    """The federation cannot run the experiment (too few nodes, no replies)."""


def discover(grid: Grid, expected: int, timeout: float, stall: float = 30.0) -> list[int]:
    """Wait for ``expected`` nodes, ask each its partition id, return node ids in
    partition-id order (ties broken by node id).

    Gives up after ``timeout`` seconds, or after ``stall`` seconds without a new
    node (a simulation registers all its SuperNodes at once).
    """
    start = last_change = time.monotonic()
    seen = -1
    while len(nodes := list(grid.get_node_ids())) < expected:
        now = time.monotonic()
        if len(nodes) != seen:
            seen, last_change = len(nodes), now
            log(INFO, "waiting for nodes: %d of %d connected", len(nodes), expected)
        if now - start > timeout or now - last_change > stall:
            raise FederationError(
                f"only {len(nodes)} of partition.num_clients={expected} nodes connected "
                f"(waited {now - start:.0f} s); in a simulation pass --federation-config "
                f'"num-supernodes={expected}" to flwr run (bonsai run does this)'
            )
        time.sleep(0.5)
    msgs = [Message(RecordDict({contract.CONFIG: ConfigRecord({})}), dst_node_id=nid,
                    message_type=MessageType.QUERY) for nid in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    ranked: list[tuple[int, int]] = []
    for r in replies:
        if r.has_error():
            log(INFO, "node %d did not answer the discovery query: %s",
                r.metadata.src_node_id, r.error.reason)
            continue
        pid = int(r.content[contract.METRICS][contract.PARTITION_ID])
        ranked.append((pid, r.metadata.src_node_id))
    if not ranked:
        raise FederationError("no node answered the discovery query")
    ranked.sort()
    log(INFO, "discovered %d nodes (partitions %d..%d)", len(ranked), ranked[0][0], ranked[-1][0])
    return [nid for _, nid in ranked]
