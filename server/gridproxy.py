"""A Grid that hands every call to the Grid it wraps: the base of the server's Grid
wrappers (server/guard.py NodeGuard, server/cohorts.py CohortGrid), which override
only what they change."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["GridProxy"]


class GridProxy(Grid):
    """Delegate every Grid method, and anything a Grid subclass adds, to ``grid``."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_nodes(self) -> Any:
        return self.grid.get_nodes()

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:  # anything a Grid subclass adds
        if name == "grid":  # not set yet (unpickling, a failed __init__)
            raise AttributeError(name)
        return getattr(self.grid, name)
