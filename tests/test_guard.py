"""server/guard.py: a crashed node cannot hang the server, and the server's test split is
the simulation's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl.config import load

ROOT = Path(__file__).resolve().parent.parent


# --- a crashed node cannot hang the server -----------------------------------------------------
def test_node_guard_stops_flowers_sampler_when_too_few_nodes_remain():
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    from server.guard import NodeGuard
    from server.population import FederationError

    class FakeGrid:
        ids = [1, 2, 3]

        def get_node_ids(self):
            return list(self.ids)

    now = [0.0]

    def clock():
        now[0] += 1.5  # every look at the clock: 1.5 s later
        return now[0]

    inner = FakeGrid()
    guard = NodeGuard(inner, min_nodes=3, timeout=2.0, clock=clock)
    assert sorted(sample_nodes(guard, 3, 3)[0]) == [1, 2, 3]
    inner.ids = [1, 2]  # a node was marked offline
    with pytest.raises(FederationError, match="only 2 nodes .*min_train_clients=3"):
        sample_nodes(guard, 3, 3)  # Flower's loop would wait forever
    assert now[0] < 10


def test_server_test_split_is_the_simulation_one_and_shapes_are_known():
    from fl.data import load_federated, load_test
    from fl.nodedata import DIGITS_INFO, SYNTHETIC_INFO

    for name, info, model in (("digits", DIGITS_INFO, "cnn"),
                              ("synthetic", SYNTHETIC_INFO, "mlp")):
        cfg = load(None, [f"dataset.name={name}", f"model={model}", "partition.kind=iid",
                          "partition.num_clients=2", "seed=3"])
        t, fd = load_test(cfg), load_federated(cfg)
        assert torch.equal(t.test.x, fd.test.x) and torch.equal(t.test.y, fd.test.y)
        assert (t.input_shape, t.num_classes) == (fd.input_shape, fd.num_classes) == info
