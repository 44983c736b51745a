"""Nodes that stall, leave and come back, in process (real ClientApp handlers, no
Flower runtime): AutoFLIP sends a rejoined node the current mask, a node back under
a new id takes its partition's place, rounds record who took part. The real
deployment (SIGSTOP/SIGCONT, SIGKILL and restart) is in tests/test_deploy_e2e.py."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from test_strategies import LoopbackGrid, experiment

from fl import contract
from fl.results import RunRecorder, read_rounds
from fl.sampling import sample_clients
from server.guard import NodeGuard
from server.population import Membership
from server.rounds import run_rounds

pytestmark = pytest.mark.usefixtures("flower_task")


class FlakyGrid(LoopbackGrid):
    """Delivers like LoopbackGrid, except to the nodes in ``down`` (no reply: stalled
    or dead); a handler that raises becomes an error reply, as Flower sends it."""

    def __init__(self, contexts):
        super().__init__(contexts)
        self.down: set[int] = set()
        self.sent: list[Message] = []

    def get_node_ids(self):
        return [n for n in self.contexts if n not in self.down]

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            if m.metadata.dst_node_id in self.down:
                continue
            try:
                out += super().send_and_receive([m], timeout)
            except Exception as e:  # noqa: BLE001 - the ClientApp's failure, as a reply
                out.append(Message(Error(code=1, reason=str(e)), reply_to=m))
        return out


def _restart(contexts, node_id):
    """The node's process starts again: same node config, empty state (no mask)."""
    old = contexts[node_id]
    contexts[node_id] = Context(run_id=1, node_id=node_id, state=RecordDict(),
                                node_config=dict(old.node_config), run_config=old.run_config)


def _round(s, grid, rnd):
    msgs = list(s.configure_train(rnd, ArrayRecord(), ConfigRecord({}), grid))
    replies = grid.send_and_receive(msgs)
    arrays, _ = s.aggregate_train(rnd, replies)
    sent = {m.metadata.dst_node_id: contract.STRUCTURE in m.content[contract.CONFIG]
            for m in msgs}
    return sent, replies


def _autoflip():
    # the mask is computed in round 1 and stays (mask_every=10): only a node that lacks
    # it needs it again
    _, s, contexts = experiment("strategy.name=autoflip", "pruning.mask_every=10",
                                "pruning.schedule_rounds=1", "pruning.structured_ratio=0.5")
    grid = FlakyGrid(contexts)
    s.prepare(grid, timeout=60)
    return s, contexts, grid


def test_stalled_and_restarted_nodes_get_the_current_mask_and_nothing_else_changes():
    s, contexts, grid = _autoflip()
    fresh, replies = _round(s, grid, 1)
    assert fresh == {101: True, 102: True, 103: True} and s.mask_version == 1
    assert s.node_version == {101: 1, 102: 1, 103: 1}
    # round 2: 102 stalls (no reply), 103 crashes; both miss the round
    grid.down = {102, 103}
    fresh, replies = _round(s, grid, 2)
    assert fresh == {101: False, 102: False, 103: False} and len(replies) == 1
    assert s.node_version == {101: 1}  # what 102 and 103 hold is no longer known
    # round 3: 102 resumes (its state still holds the mask), 103 restarted (state empty)
    grid.down = set()
    _restart(contexts, 103)
    fresh, replies = _round(s, grid, 3)
    assert fresh == {101: False, 102: True, 103: True}  # the mask again, to those two only
    assert all(not r.has_error() for r in replies) and len(replies) == 3
    assert s.node_version == {101: 1, 102: 1, 103: 1} and s.mask_version == 1
    fresh, _ = _round(s, grid, 4)
    assert fresh == {101: False, 102: False, 103: False}


def test_a_restart_the_server_did_not_see_costs_that_node_one_round():
    """A node restarted between two rounds (no round failed meanwhile) lacks the mask
    the server thinks it holds: its reply is an error, the next round sends the mask."""
    s, contexts, grid = _autoflip()
    _round(s, grid, 1)
    _restart(contexts, 102)
    fresh, replies = _round(s, grid, 2)
    assert not any(fresh.values())
    errors = [r.metadata.src_node_id for r in replies if r.has_error()]
    assert errors == [102] and 102 not in s.node_version
    fresh, replies = _round(s, grid, 3)
    assert fresh == {101: False, 102: True, 103: False}
    assert all(not r.has_error() for r in replies)


class _QueryGrid:
    """Node ids that answer the partition query from a table; records the queries."""

    def __init__(self, partitions: dict[int, int], connected: list[int]):
        self.partitions, self.connected, self.queried = partitions, connected, []

    def get_node_ids(self):
        return list(self.connected)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import MetricRecord

        out = []
        for m in messages:
            nid = m.metadata.dst_node_id
            self.queried.append(nid)
            out.append(Message(RecordDict({contract.METRICS: MetricRecord(
                {"partition-id": self.partitions[nid]})}), reply_to=m))
        return out


def test_a_node_back_under_a_new_id_takes_its_partitions_place():
    members = Membership({101: 0, 102: 1, 103: 2, 104: 3})
    before = [sample_clients(members.order, 0.5, 1, 0, rnd) for rnd in range(1, 6)]
    grid = _QueryGrid({101: 0, 202: 1, 103: 2, 104: 3}, [101, 103, 104])
    assert members.refresh(grid, 10) == {} and grid.queried == []  # nothing new: no query
    grid.connected = [101, 202, 103, 104]  # 102 restarted without node auth: a new id
    assert members.refresh(grid, 10) == {102: 202}
    assert members.order == [101, 202, 103, 104] and members.partition_id(202) == 1
    assert members.partition_id(102) is None
    after = [sample_clients(members.order, 0.5, 1, 0, rnd) for rnd in range(1, 6)]
    swap = {102: 202}
    assert after == [[swap.get(n, n) for n in b] for b in before]  # the same partitions
    # a new id for a partition whose node is still connected, or an unknown partition
    grid.partitions.update({303: 2, 404: 9})
    grid.connected += [303, 404]
    assert members.refresh(grid, 10) == {}
    assert members.order == [101, 202, 103, 104]


def test_rounds_record_participants_and_failed_partitions(tmp_path):
    _, s, contexts = experiment("strategy.name=fedld")
    grid = FlakyGrid(contexts)
    members = Membership({101: 0, 102: 1, 103: 2})
    down = {2: {102}, 3: {102, 103}}

    def start(rnd):
        grid.down = down.get(rnd, set())

    run_rounds(grid, s, ArrayRecord(s.theta), 4, ConfigRecord({}),
               lambda rnd, arrays: {"accuracy": 0.5, "loss": 1.0}, RunRecorder(tmp_path), 60,
               on_round_start=start, partition_of=members.partition_id)
    rounds = read_rounds(tmp_path)
    got = [(r["participants"], r["failed"], r["clients"], r["failures"]) for r in rounds[1:]]
    assert got == [([0, 1, 2], [], 3, 0), ([0, 2], [1], 2, 1), ([0], [1, 2], 1, 2),
                   ([0, 1, 2], [], 3, 0)]
    assert "participants" not in rounds[0]


def test_node_guard_gives_each_message_the_round_timeout_as_ttl():
    seen = []

    class Inner:
        def send_and_receive(self, messages, timeout=None):
            seen.extend((m.metadata.ttl, timeout) for m in messages)
            return []

    guard = NodeGuard(Inner(), min_nodes=1, timeout=60)
    msgs = [Message(RecordDict({}), dst_node_id=n, message_type="train") for n in (1, 2)]
    assert msgs[0].metadata.ttl > 3600  # Flower's default: hours
    guard.send_and_receive(msgs, timeout=17.5)
    assert seen == [(17.5, 17.5), (17.5, 17.5)]


@pytest.mark.parametrize("strategy", ["fedavg", "autoflip"])
def test_an_undisturbed_run_is_unchanged_by_the_bookkeeping(tmp_path, strategy):
    """Identical final weights with and without membership tracking and participants."""
    finals = []
    for i, tracked in enumerate((False, True)):
        cfg, s, contexts = experiment(f"strategy.name={strategy}", "pruning.mask_every=1",
                                      "pruning.schedule_rounds=2")
        from fl.models import build_model

        theta = build_model(cfg.model, (1, 8, 8), 10, seed=cfg.seed).state_dict()
        members = Membership({101: 0, 102: 1, 103: 2})
        grid = FlakyGrid(contexts)
        kw = dict(on_round_start=lambda rnd, m=members, g=grid: m.refresh(g, 60),
                  partition_of=members.partition_id) if tracked else {}
        final = run_rounds(grid, s, ArrayRecord(theta), 3, ConfigRecord({}),
                           lambda rnd, arrays: {"accuracy": 0.5, "loss": 1.0},
                           RunRecorder(tmp_path / str(i)), 60, **kw)
        finals.append(final.to_torch_state_dict())
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])
