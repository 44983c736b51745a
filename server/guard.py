"""A Grid that does not let the server wait forever for nodes that are gone.

Flower's strategies sample with ``sample_nodes``, which loops "waiting for nodes
to connect" without a deadline when fewer than ``min_available_nodes`` are
online: in a deployment, a node that crashed (and that the SuperLink has since
marked offline) would hang the ServerApp. :class:`NodeGuard` wraps the Grid
after discovery and raises :class:`~server.population.FederationError` with a
clear message once fewer than ``min_nodes`` nodes have been connected for
longer than ``timeout`` seconds, and gives every message it sends the round's
timeout as its time to live. Everything else is passed through (server/gridproxy.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.gridproxy import GridProxy
from server.population import FederationError


class NodeGuard(GridProxy):
    """Delegate to ``grid``; fail after ``timeout`` s with fewer than ``min_nodes`` nodes."""

    def __init__(self, grid: Grid, min_nodes: int, timeout: float,
                 clock: Any = time.monotonic):
        super().__init__(grid)
        self.min_nodes = min_nodes
        self.timeout = timeout
        self._clock = clock
        self._short_since: float | None = None

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self.grid.get_node_ids())
        if len(ids) >= self.min_nodes:
            self._short_since = None
            return ids
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
            log(WARNING, "only %d nodes connected; strategy.min_train_clients needs %d "
                "(waiting up to %.0f s)", len(ids), self.min_nodes, self.timeout)
        elif now - self._short_since > self.timeout:
            raise FederationError(
                f"only {len(ids)} nodes are still connected and strategy.min_train_clients="
                f"{self.min_nodes} are needed (waited {now - self._short_since:.0f} s, "
                f"strategy.round_timeout); the run stops")
        return ids

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Flower's, with each message's TTL set to ``timeout``: a message lives as long
        as the server waits for its reply, so a node that stalls, or restarts with
        the same id, does not work through rounds that are already over (the
        SuperLink no longer delivers an expired message)."""
        if timeout is not None:
            messages = list(messages)
            for m in messages:
                m.metadata.ttl = float(timeout)
        return self.grid.send_and_receive(messages, timeout=timeout)
