"""Discover the federation: which nodes are connected and which partition each holds;
keep that map current when a node comes back under a new node id.

Flower 1.42 (checked in its SuperLink): a SuperNode that authenticates with a
registered key gets the node id its key was registered under, on every start;
a node restarted with the same key therefore keeps its id. Without node
authentication (``--insecure``, or a SuperLink without ``--enable-supernode-auth``)
each start self-registers a fresh key pair and gets a new id. :class:`Membership`
handles the second case: a new id that answers with the partition id of a node
that is no longer connected takes that node's place in the population order, so
seeded sampling picks the same partitions as before.

In cohort mode the nodes are workers: :func:`discover_workers` orders them by
worker index.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl import contract


class FederationError(RuntimeError):
    """The federation cannot run the experiment (too few nodes, no replies)."""


def query_partitions(grid: Grid, node_ids: Iterable[int], timeout: float) -> dict[int, int]:
    """Ask each node its partition id: ``{node id: partition id}`` of those that answered."""
    return {r.metadata.src_node_id: int(r.content[contract.METRICS][contract.PARTITION_ID])
            for r in _query(grid, list(node_ids), {}, timeout)}


class Membership:
    """The federation's nodes: node id -> partition id, and the population order
    (node ids sorted by partition id, ties by node id) that seeded sampling uses."""

    def __init__(self, partition_of: Mapping[int, int]):
        self.partition_of = dict(partition_of)

    @property
    def order(self) -> list[int]:
        return [nid for nid, _ in sorted(self.partition_of.items(), key=lambda t: (t[1], t[0]))]

    def partition_id(self, node_id: int) -> int | None:
        return self.partition_of.get(node_id)

    def refresh(self, grid: Grid, timeout: float) -> dict[int, int]:
        """Map connected node ids that are not members yet (a node that came back with
        a new id) to the member that held their partition; return ``{old id: new id}``.

        Only a member that is no longer connected is replaced; a new id whose
        partition is unknown, or whose old node is still connected, is left out
        (logged). Costs one ``get_node_ids`` call when nothing changed.
        """
        connected = set(grid.get_node_ids())
        new = sorted(connected - set(self.partition_of))
        if not new:
            return {}
        replaced: dict[int, int] = {}
        by_partition = {pid: nid for nid, pid in self.partition_of.items()}
        for nid, pid in sorted(query_partitions(grid, new, timeout).items()):
            old = by_partition.get(pid)
            if old is None:
                log(WARNING, "node %d (partition %d) joined after discovery; not in the "
                    "population (partition.num_clients fixes it at the start)", nid, pid)
            elif old in connected:
                log(WARNING, "node %d claims partition %d, which node %d still holds; ignored",
                    nid, pid, old)
            else:
                del self.partition_of[old]
                self.partition_of[nid] = pid
                by_partition[pid] = nid
                replaced[old] = nid
                log(INFO, "partition %d came back as node %d (was node %d)", pid, nid, old)
        return replaced


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


def discover(grid: Grid, expected: int, timeout: float, stall: float = 30.0) -> Membership:
    """Wait for ``expected`` nodes, ask each its partition id, return the membership
    (:attr:`Membership.order`: node ids in partition-id order, ties broken by node id).

    Gives up after ``timeout`` seconds, or after ``stall`` seconds without a new
    node (a simulation registers all its SuperNodes at once).
    """
    nodes = _wait_for(grid, expected, timeout, stall, "partition.num_clients",
                      f'in a simulation pass --federation-config "num-supernodes={expected}" '
                      "to flwr run (bonsai run does this)")
    members = Membership(query_partitions(grid, nodes, timeout))
    if not members.partition_of:
        raise FederationError("no node answered the discovery query")
    pids = sorted(members.partition_of.values())
    log(INFO, "discovered %d nodes (partitions %d..%d)", len(pids), pids[0], pids[-1])
    return members


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
