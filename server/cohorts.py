"""Cohort mode: the strategies address clients, a few worker nodes train them.

With ``simulation.cohort_size`` set, the simulated federation has a few worker
SuperNodes (``simulation.workers``), not one node per client. :class:`CohortGrid`
wraps the Grid so that no strategy notices:

- it presents the K clients as nodes, with pseudo node ids = partition ids
  ``0..K-1`` (the population the server sets on the strategy instead of the
  discovery result), so the seeded sampler draws clients exactly as it draws
  nodes in the one-client-per-message mode;
- ``send_and_receive`` groups the strategy's per-client messages by worker and
  message type into one Flower message per worker (fl/packing.py: a record
  shared by several clients, like the global model, travels once) and unpacks
  each worker's reply into one reply per client, from that client's pseudo id;
- where clients keep state between rounds (``sticky``, the strategy's
  ``clients_keep_state``: AutoFLIP's masks, which strategies/sparse.py sends only
  to clients whose copy is stale, and the worker holds, clients/app.py
  ``_WorkerMasks``), a client always goes to the same worker, ``workers[client %
  W]``; otherwise each round's clients are dealt to the connected workers in turn,
  so no worker trains more than one client more than another (with W = 2 and 100
  of 1000 clients sampled, sticky shares are about 55/45, and the round waits for
  the 55).

Every strategy (FedAvg family, FedLD, AutoFLIP's exploration, guidance and
masks, the loss decomposition) therefore sees one message and one reply per
client, as before. The round loop measures the per-client messages before they
are packed: bytes are what the one-client-per-message protocol sends (what a
deployment pays); :meth:`CohortGrid.packed_bytes` counts what the packed messages
measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import WARNING

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl import packing
from fl.wire import message_nbytes
from server.gridproxy import GridProxy

__all__ = ["CohortGrid"]


class CohortGrid(GridProxy):
    """Clients ``0..num_clients-1`` as nodes, trained by ``workers`` (node ids in
    worker-index order); see the module docstring."""

    def __init__(self, grid: Grid, workers: Sequence[int], num_clients: int,
                 sticky: bool = True):
        if not workers:
            raise ValueError("workers: at least one worker node is needed")
        super().__init__(grid)
        self.workers = list(workers)
        self.num_clients = num_clients
        self.sticky = sticky
        self._down = self._up = 0

    # --- the clients and their workers ----------------------------------------------
    def clients(self) -> list[int]:
        """The population: every client's pseudo node id (= its partition id)."""
        return list(range(self.num_clients))

    def worker_of(self, client: int) -> int:
        """The worker node that trains ``client`` when clients are sticky (the same one
        every round)."""
        return self.workers[client % len(self.workers)]

    def _live_workers(self) -> list[int]:
        connected = set(self.grid.get_node_ids())
        return [w for w in self.workers if w in connected]

    def packed_bytes(self) -> tuple[int, int]:
        """Serialised bytes of every packed message sent and received so far (down, up)."""
        return self._down, self._up

    def get_node_ids(self) -> Iterable[int]:
        """The clients whose worker is connected (not sticky: every client while any
        worker is)."""
        live = set(self._live_workers())
        if not self.sticky:
            return self.clients() if live else []
        return [c for c in self.clients() if self.worker_of(c) in live]

    # --- packing --------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Send each worker one message per message type holding its clients' messages;
        return one reply per client (an error reply where the client or its worker
        failed; none where the worker did not answer in time)."""
        msgs = list(messages)
        out: list[Message] = []
        groups: dict[tuple[int, str], list[Message]] = {}
        # not sticky: the i-th message of each type goes to the i-th live worker in turn
        # (all workers when none is live: their messages then fail as sticky ones would)
        turn = [] if self.sticky else (self._live_workers() or self.workers)
        dealt: dict[str, int] = {}
        for m in msgs:
            client, kind = m.metadata.dst_node_id, m.metadata.message_type
            if not 0 <= client < self.num_clients:
                out.append(_error(m, f"no client {client} in this federation of "
                                     f"{self.num_clients}"))
                continue
            if self.sticky:
                worker = self.worker_of(client)
            else:
                dealt[kind] = dealt.get(kind, -1) + 1
                worker = turn[dealt[kind] % len(turn)]
            groups.setdefault((worker, kind), []).append(m)
        packs = []
        for (worker, kind), members in groups.items():
            content = packing.pack([(m.metadata.dst_node_id, m.content) for m in members])
            self._down += message_nbytes(content)
            pack = Message(content, dst_node_id=worker, message_type=kind)
            if timeout is not None:  # as NodeGuard does for each client's message
                pack.metadata.ttl = float(timeout)
            packs.append(pack)
        answered: dict[tuple[int, str], Message] = {}
        for r in self.grid.send_and_receive(packs, timeout=timeout):
            answered[(r.metadata.src_node_id, r.metadata.message_type)] = r
        for key, members in groups.items():
            reply = answered.get(key)
            if reply is None:
                log(WARNING, "worker %d sent no reply in time: its %d clients have none",
                    key[0], len(members))
                continue
            out += self._unpack(reply, members)
        return out

    def _unpack(self, reply: Message, members: list[Message]) -> list[Message]:
        worker = reply.metadata.src_node_id
        if reply.has_error():
            return [_error(m, f"worker {worker}: {reply.error.reason}") for m in members]
        self._up += message_nbytes(reply.content)
        try:
            entries = dict(packing.unpack(reply.content))
        except packing.PackError as e:
            return [_error(m, f"worker {worker}: {e}") for m in members]
        out = []
        for m in members:
            content = entries.get(m.metadata.dst_node_id)
            if content is None:
                out.append(_error(m, f"worker {worker} sent no reply for this client"))
            elif isinstance(content, str):
                out.append(_error(m, content))
            else:
                out.append(Message(content, reply_to=m))
        return out

    # --- per-client push/pull: not possible ----------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("CohortGrid packs clients' messages in send_and_receive; "
                                  "push/pull of per-client messages is not supported")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("CohortGrid packs clients' messages in send_and_receive; "
                                  "push/pull of per-client messages is not supported")


def _error(msg: Message, reason: str) -> Message:
    """The error reply of the client ``msg`` was addressed to."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=msg)
