"""Discover the federation: which nodes are connected and which partition each holds
(or, in cohort mode, which worker each is)."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl import contract


class FederationError(RuntimeError):
    """The federation cannot run the experiment (too few nodes, no replies)."""


def _wait_for(grid: Grid, expected: int, timeout: float, stall: float, what: str,
              hint: str) -> list[int]:
    """Node ids once ``expected`` are connected; FederationError after ``timeout`` s, or
    ``stall`` s without a new node (a simulation registers all its SuperNodes at once)."""
    start = last_change = time.monotonic()
    seen = -1
    while len(nodes := list(grid.get_node_ids())) < expected:
        now = time.monotonic()
        if len(nodes) != seen:
            seen, last_change = len(nodes), now
            log(INFO, "waiting for nodes: %d of %d connected", len(nodes), expected)
        if now - start > timeout or now - last_change > stall:
            raise FederationError(f"only {len(nodes)} of {what}={expected} nodes connected "
                                  f"(waited {now - start:.0f} s); {hint}")
        time.sleep(0.5)
    return nodes


def _query(grid: Grid, nodes: list[int], config: dict, timeout: float) -> list[Message]:
    """One query per node; the replies that came without an error (others are logged)."""
    msgs = [Message(RecordDict({contract.CONFIG: ConfigRecord(dict(config))}), dst_node_id=nid,
                    message_type=MessageType.QUERY) for nid in nodes]
    ok = []
    for r in grid.send_and_receive(msgs, timeout=timeout):
        if r.has_error():
            log(INFO, "node %d did not answer the discovery query: %s",
                r.metadata.src_node_id, r.error.reason)
        else:
            ok.append(r)
    return ok


def discover(grid: Grid, expected: int, timeout: float, stall: float = 30.0) -> list[int]:
    """Wait for ``expected`` nodes, ask each its partition id, return node ids in
    partition-id order (ties broken by node id).

    Gives up after ``timeout`` seconds, or after ``stall`` seconds without a new
    node (a simulation registers all its SuperNodes at once).
    """
    nodes = _wait_for(grid, expected, timeout, stall, "partition.num_clients",
                      f'in a simulation pass --federation-config "num-supernodes={expected}" '
                      "to flwr run (bonsai run does this)")
    ranked: list[tuple[int, int]] = []
    for r in _query(grid, nodes, {}, timeout):
        pid = int(r.content[contract.METRICS][contract.PARTITION_ID])
        ranked.append((pid, r.metadata.src_node_id))
    if not ranked:
        raise FederationError("no node answered the discovery query")
    ranked.sort()
    log(INFO, "discovered %d nodes (partitions %d..%d)", len(ranked), ranked[0][0], ranked[-1][0])
    return [nid for _, nid in ranked]


def discover_workers(grid: Grid, expected: int | None, timeout: float,
                     stall: float = 30.0) -> list[int]:
    """Cohort mode: the worker nodes' ids in worker-index order (index = the worker's
    ``partition-id`` in Flower's simulation node config). One query per worker; no
    client data is loaded and no per-client query is made.

    ``expected``: the number of workers (``simulation.workers``), or None to take
    the count the workers report (``num-partitions``: Flower's number of
    SuperNodes, which ``bonsai run`` sets from the hardware). Raises
    FederationError when workers are missing or two report the same index.
    """
    hint = ("bonsai run starts them; with flwr run pass --federation-config "
            '"num-supernodes=W" and set simulation.workers=W')
    nodes = _wait_for(grid, expected or 1, timeout, stall, "simulation.workers", hint)
    index: dict[int, int] = {}  # node id -> worker index
    count = expected
    asked: set[int] = set()
    while True:
        fresh = [n for n in nodes if n not in asked]
        asked.update(fresh)
        for r in _query(grid, fresh, {contract.COHORT_QUERY: True}, timeout):
            m = r.content[contract.METRICS]
            index[r.metadata.src_node_id] = int(m[contract.WORKER_INDEX])
            count = count or int(m[contract.NUM_WORKERS])
        if count is None:
            raise FederationError("no worker answered the discovery query")
        if len(index) >= count:
            break
        nodes = _wait_for(grid, count, timeout, stall, "simulation.workers", hint)
        if all(n in asked for n in nodes):
            raise FederationError(f"only {len(index)} of {count} workers answered the "
                                  "discovery query")
    ranked = sorted((i, nid) for nid, i in index.items())
    if len({i for i, _ in ranked}) != len(ranked):
        raise FederationError(f"two workers report the same index: {[i for i, _ in ranked]}")
    log(INFO, "discovered %d workers", len(ranked))
    return [nid for _, nid in ranked]
