"""Cohort mode in process (no Ray): the packed format, the CohortGrid against a
loopback grid of worker nodes that runs the real ClientApp handlers, and the
equivalence with one client per message.

The reference of every comparison is the one-client-per-message path: the same
strategy on a loopback grid of one node per client (as tests/test_strategies.py).
With ``simulation.cohort_mode=sequential`` (what ``auto`` picks on a CPU) each
client's reply is bitwise the reference's: the same payload bytes and the same
metrics, bar the measured seconds and memory.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from loopback import Loopback, contexts

from clients.app import evaluate_handler, query
from fl import config as c
from fl import contract, packing, wire
from fl.data import load_federated
from fl.models import build_model
from server.cohorts import CohortGrid
from server.population import FederationError, discover_workers
from strategies import build_strategy

pytestmark = pytest.mark.usefixtures("flower_task")

CLIENTS, WORKERS = 6, 2
NODE_IDS = [1000 + i for i in range(CLIENTS)]  # the reference: one node per client
WORKER_IDS = [501, 502]
#: measured, not computed: they differ between any two runs
MEASURED = {contract.TRAIN_SECONDS, contract.PEAK_MEMORY_MB}


def experiment(*overrides, mode="sequential"):
    """(cfg, reference strategy and grid, cohort strategy and grid, worker loopback)."""
    base = [f"partition.num_clients={CLIENTS}", "strategy.min_train_clients=2", "model=cnn",
            "train.local_epochs=1", "strategy.fraction_train=0.5", *overrides]
    cfg = c.load(None, base)
    ccfg = c.load(None, [*base, "simulation.cohort_size=4", f"simulation.workers={WORKERS}",
                         f"simulation.cohort_mode={mode}"])
    fd = load_federated(cfg)
    theta0 = build_model(cfg.model, fd.input_shape, fd.num_classes, seed=cfg.seed).state_dict()
    ref = build_strategy(cfg, theta0, fd.input_shape, fd.num_classes)
    ref.set_population(NODE_IDS)
    ref_grid = Loopback(contexts(cfg, NODE_IDS))
    workers = Loopback(contexts(ccfg, WORKER_IDS))
    coh = build_strategy(ccfg, theta0, fd.input_shape, fd.num_classes)
    # as the server builds it: pruned clients stay on their worker, others are dealt out
    grid = CohortGrid(workers, WORKER_IDS, CLIENTS, sticky=coh.clients_keep_state())
    coh.set_population(grid.clients())
    return cfg, (ref, ref_grid), (coh, grid), workers, ArrayRecord(theta0)


def _by_client(replies, population):
    rank = {n: i for i, n in enumerate(population)}
    return {rank[r.metadata.src_node_id]: r for r in replies}


def assert_same_replies(ref_replies, ref_pop, coh_replies, coh_pop, exact=True):
    a, b = _by_client(ref_replies, ref_pop), _by_client(coh_replies, coh_pop)
    assert sorted(a) == sorted(b) and a
    for k in a:
        ra, rb = a[k], b[k]
        assert not ra.has_error() and not rb.has_error(), (k, rb.error if rb.has_error() else "")
        assert set(ra.content.keys()) == set(rb.content.keys())
        ma, mb = ra.content[contract.METRICS], rb.content[contract.METRICS]
        assert {n: v for n, v in ma.items() if n not in MEASURED} == \
            {n: v for n, v in mb.items() if n not in MEASURED}, k
        for name in ra.content.array_records:
            if exact:
                ta, tb = ra.content[name], rb.content[name]
                assert list(ta.keys()) == list(tb.keys())
                assert all(ta[n].data == tb[n].data for n in ta), (k, name)


def _round(strategy, grid, rnd, arrays):
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), grid))
    replies = list(grid.send_and_receive(msgs))
    new, _ = strategy.aggregate_train(rnd, replies)
    return msgs, replies, new


# --- the packed format ---------------------------------------------------------------
def test_pack_sends_each_shared_record_once_and_unpacks_every_client():
    model = ArrayRecord({"w": torch.arange(1000.0)})
    conf = ConfigRecord({contract.SERVER_ROUND: 3})
    shared = RecordDict({contract.ARRAYS: model, contract.CONFIG: conf})
    own = RecordDict({contract.ARRAYS: model, contract.CONFIG: ConfigRecord({"x": 1})})
    packed = packing.pack([(4, shared), (7, shared), (9, own), (11, "it failed")])
    # the model once, both configs once each: three records and the layout
    assert len(packed) == 4 and packing.is_packed(packed)
    single = wire.message_nbytes(shared)
    assert wire.message_nbytes(packed) < 1.2 * single  # not three models
    entries = packing.unpack(packed)
    assert [e[0] for e in entries] == [4, 7, 9, 11]
    assert entries[3][1] == "it failed"
    c4, c7, c9 = (e[1] for e in entries[:3])
    assert c4[contract.ARRAYS] is c7[contract.ARRAYS] is c9[contract.ARRAYS]
    assert c4[contract.CONFIG] is c7[contract.CONFIG]
    assert dict(c9[contract.CONFIG]) == {"x": 1} and int(c4[contract.CONFIG]["server-round"]) == 3
    assert torch.equal(c9[contract.ARRAYS].to_torch_state_dict()["w"], torch.arange(1000.0))
    assert not packing.is_packed(shared)


def test_unpack_refuses_a_layout_that_does_not_match():
    packed = packing.pack([(1, RecordDict({"a": ConfigRecord({"k": 1})}))])
    del packed[f"{contract.COHORT_RECORD_PREFIX}0"]
    with pytest.raises(packing.PackError, match="missing"):
        packing.unpack(packed)
    with pytest.raises(packing.PackError, match="not a packed message"):
        packing.unpack(RecordDict())
    bad = RecordDict({contract.COHORT_LAYOUT: ConfigRecord({"layout": "{not json"})})
    with pytest.raises(packing.PackError, match="unreadable"):
        packing.unpack(bad)


# --- the grid -----------------------------------------------------------------------------
def test_clients_stay_with_their_worker_and_disappear_with_it():
    class Nodes:
        ids = [11, 12, 13]

        def get_node_ids(self):
            return list(self.ids)

    inner = Nodes()
    grid = CohortGrid(inner, [11, 12, 13], 8)
    assert grid.clients() == list(range(8))
    assert [grid.worker_of(k) for k in range(8)] == [11, 12, 13, 11, 12, 13, 11, 12]
    assert list(grid.get_node_ids()) == list(range(8))
    inner.ids = [11, 13]  # worker 12 is gone: so are its clients
    assert list(grid.get_node_ids()) == [0, 2, 3, 5, 6]


def test_clients_that_keep_nothing_are_dealt_evenly_to_the_live_workers():
    class Nodes:
        ids = [11, 12, 13]
        sent: list = []

        def get_node_ids(self):
            return list(self.ids)

        def send_and_receive(self, messages, timeout=None):
            self.sent.append(list(messages))
            return []

    inner = Nodes()
    grid = CohortGrid(inner, [11, 12, 13], 1000, sticky=False)
    sampled = [3, 6, 9, 12, 15, 18, 21, 24]  # sticky: all eight on worker 11
    grid.send_and_receive([Message(RecordDict(), dst_node_id=k, message_type="train")
                           for k in sampled])
    shares = {m.metadata.dst_node_id: len(packing.unpack(m.content)) for m in inner.sent[-1]}
    assert shares == {11: 3, 12: 3, 13: 2}
    inner.ids = [11, 13]  # worker 12 is gone: the others share its clients
    assert list(grid.get_node_ids()) == list(range(1000))
    grid.send_and_receive([Message(RecordDict(), dst_node_id=k, message_type="train")
                           for k in sampled])
    shares = {m.metadata.dst_node_id: len(packing.unpack(m.content)) for m in inner.sent[-1]}
    assert shares == {11: 4, 13: 4}
    inner.ids = []
    assert list(grid.get_node_ids()) == []


def test_fedavg_rounds_equal_one_client_per_message_and_pack_per_worker():
    _, (ref, rg), (coh, cg), workers, theta = experiment("strategy.name=fedavg")
    for rnd in (1, 2):
        m_ref, r_ref, a_ref = _round(ref, rg, rnd, theta)
        sent_before, (down0, up0) = len(workers.sent), cg.packed_bytes()
        m_coh, r_coh, a_coh = _round(coh, cg, rnd, theta)
        assert len(m_coh) == len(m_ref) == 3 and len(r_coh) == 3
        assert len(workers.sent) - sent_before <= WORKERS  # one message per worker
        assert_same_replies(r_ref, NODE_IDS, r_coh, cg.clients())
        # the clients that trained are the same partitions in both modes
        assert sorted(NODE_IDS.index(m.metadata.dst_node_id) for m in m_ref) == \
            sorted(m.metadata.dst_node_id for m in m_coh)
        sa, sb = a_ref.to_torch_state_dict(), a_coh.to_torch_state_dict()
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
        down, up = (b - a for a, b in zip((down0, up0), cg.packed_bytes()))
        per_client = [wire.message_nbytes(m.content) for m in m_coh]
        # the shared model travels once per worker, not once per client
        assert per_client[0] * WORKERS <= down < per_client[0] * WORKERS * 1.01
        replies_bytes = sum(wire.message_nbytes(r.content) for r in r_coh)
        assert replies_bytes <= up < 1.01 * replies_bytes
        theta = a_ref


def test_autoflip_exploration_masks_and_decomposition_equal_one_client_per_message():
    """Exploration (train.explore packs), masks sent once and then held by the worker,
    three rounds with a new mask in round 3, and the loss decomposition's packed
    evaluate.decompose messages: every reply and aggregate as one client per message."""
    from server.diagnostics import decompose_round

    over = ("strategy.name=autoflip", "pruning.mask_every=2", "pruning.schedule_rounds=2",
            "strategy.fraction_train=1.0")
    _, (ref, rg), (coh, cg), workers, theta = experiment(*over)
    ref.track_client_states(True)
    coh.track_client_states(True)
    cost_ref, cost_coh = ref.prepare(rg, 60), coh.prepare(cg, 60)
    assert cost_ref == cost_coh and cost_coh.clients == CLIENTS
    g_ref, g_coh = ref.policy.guidance.guidance, coh.policy.guidance.guidance
    assert g_ref.keys() == g_coh.keys() and all(torch.equal(g_ref[n], g_coh[n]) for n in g_ref)
    for rnd in (1, 2, 3):
        m_ref, r_ref, a_ref = _round(ref, rg, rnd, theta)
        m_coh, r_coh, a_coh = _round(coh, cg, rnd, theta)
        assert_same_replies(r_ref, NODE_IDS, r_coh, cg.clients())
        fresh = [contract.STRUCTURE in m.content[contract.CONFIG] for m in m_coh]
        assert all(fresh) == (rnd != 2) and any(fresh) == (rnd != 2)
        sa, sb = a_ref.to_torch_state_dict(), a_coh.to_torch_state_dict()
        assert all(torch.equal(sa[n], sb[n]) for n in sa), rnd
        d_ref = decompose_round(rg, ref.client_states(), a_ref, rnd, 60)
        d_coh = decompose_round(cg, coh.client_states(), a_coh, rnd, 60)
        assert d_ref == d_coh and "loss_shift" in d_coh
    # each worker holds one mask (version 2) for its three clients: version 1 was dropped
    for ctx in workers.contexts.values():
        held = sorted(n for n in ctx.state.keys() if n.startswith("bonsai-mask-meta-v"))
        assert held == ["bonsai-mask-meta-v2"]
        assert sorted(int(v) for v in ctx.state["bonsai-mask-clients"].values()) == [2, 2, 2]


def test_fedld_with_margin_and_evaluation_equal_one_client_per_message():
    over = ("strategy.name=fedld", "objective.margin_lambda=0.3",
            "strategy.fraction_evaluate=0.5")
    _, (ref, rg), (coh, cg), _, theta = experiment(*over)
    for rnd in (1, 2):
        _, r_ref, a_ref = _round(ref, rg, rnd, theta)
        _, r_coh, a_coh = _round(coh, cg, rnd, theta)
        assert_same_replies(r_ref, NODE_IDS, r_coh, cg.clients())
        e_ref = ref.aggregate_evaluate(rnd, rg.send_and_receive(
            ref.configure_evaluate(rnd, a_ref, ConfigRecord({}), rg)))
        e_coh = coh.aggregate_evaluate(rnd, cg.send_and_receive(
            coh.configure_evaluate(rnd, a_coh, ConfigRecord({}), cg)))
        assert dict(e_ref) == dict(e_coh)
        theta = a_ref


def test_vectorised_workers_agree_within_the_cohort_tolerance():
    """The vectorised trainer on the worker (fl.cohort, stated tolerance: entries within
    1e-5 for SGD) gives the same updates as one client per message."""
    _, (ref, rg), (coh, cg), _, theta = experiment("strategy.name=fedavg",
                                                   "strategy.fraction_train=1.0",
                                                   mode="vectorised")
    _, r_ref, _ = _round(ref, rg, 1, theta)
    _, r_coh, _ = _round(coh, cg, 1, theta)
    a, b = _by_client(r_ref, NODE_IDS), _by_client(r_coh, cg.clients())
    worst = 0.0
    for k in a:
        ma, mb = a[k].content[contract.METRICS], b[k].content[contract.METRICS]
        assert ma[contract.NUM_EXAMPLES] == mb[contract.NUM_EXAMPLES]
        assert ma[contract.TRAIN_FLOPS] == mb[contract.TRAIN_FLOPS]
        assert mb[contract.TRAIN_LOSS] == pytest.approx(ma[contract.TRAIN_LOSS], rel=1e-5)
        sa = a[k].content[contract.ARRAYS].to_torch_state_dict()
        sb = b[k].content[contract.ARRAYS].to_torch_state_dict()
        for n in sa:
            torch.testing.assert_close(sb[n], sa[n], atol=1e-5, rtol=1e-5)
            worst = max(worst, float((sb[n].double() - sa[n].double()).abs().max()))
    assert worst > 0  # vmap's kernels sum in another order: not the sequential path


# --- masks when a client changes worker, and after a resume ---------------------------------
def _magnitude(mask_every=1):
    return experiment("strategy.name=magnitude", f"pruning.mask_every={mask_every}",
                      "pruning.schedule_rounds=4", "strategy.fraction_train=1.0")


def test_a_client_moved_to_a_worker_without_its_mask_gets_an_error_reply_naming_it():
    _, _, (coh, cg), _, theta = _magnitude(mask_every=2)
    _round(coh, cg, 1, theta)  # mask v1 to every client, fresh
    # client 0 now lands on the other worker, which holds v1 for its own clients: fine
    cg.workers.reverse()
    _, replies, arrays = _round(coh, cg, 2, theta)
    assert not any(r.has_error() for r in replies) and arrays is not None
    # a worker that holds no mask at all: the client's reply is an error naming the mask
    for ctx in cg.grid.contexts.values():
        ctx.state = RecordDict()
    msgs = list(coh.configure_train(2, theta, ConfigRecord({}), cg))
    replies = list(cg.send_and_receive(msgs))
    assert len(replies) == CLIENTS and all(r.has_error() for r in replies)
    assert "mask" in replies[0].error.reason.lower()


def test_resumed_strategy_resends_masks_and_the_worker_drops_stale_versions():
    _, _, (coh, cg), workers, theta = _magnitude(mask_every=1)
    for rnd in (1, 2):
        _round(coh, cg, rnd, theta)
    saved = coh.state_dict()
    # a resumed run: a new strategy from the checkpoint, the workers' state as it was
    _, _, (coh2, _), _, _ = _magnitude(mask_every=1)
    coh2.set_population(cg.clients())
    coh2.load_state_dict(saved)
    msgs, replies, arrays = _round(coh2, cg, 3, theta)
    assert all(contract.STRUCTURE in m.content[contract.CONFIG] for m in msgs)  # all fresh
    assert not any(r.has_error() for r in replies) and arrays is not None
    for ctx in workers.contexts.values():
        assert sorted(n for n in ctx.state.keys() if n.startswith("bonsai-mask-meta-v")) == \
            ["bonsai-mask-meta-v3"]


# --- discovery and errors -----------------------------------------------------------------
def test_discover_workers_orders_by_worker_index_and_loads_no_data():
    cfg = c.load(None, ["simulation.cohort_size=4", "partition.num_clients=6"])
    # node config of Flower's simulation: partition-id is the worker's index
    by_index = contexts(cfg, [40, 90, 70])  # worker indexes 0, 1, 2
    grid = Loopback({n: by_index[n] for n in (70, 40, 90)})  # connected in another order
    assert discover_workers(grid, None, timeout=5) == [40, 90, 70]  # count from the workers
    assert discover_workers(grid, 3, timeout=5) == [40, 90, 70]
    with pytest.raises(FederationError, match="only 3 of simulation.workers=4"):
        discover_workers(grid, 4, timeout=1, stall=0.5)


def test_a_failed_worker_fails_its_clients_only():
    _, _, (coh, cg), workers, theta = experiment("strategy.name=fedavg",
                                                 "strategy.fraction_train=1.0")
    real = workers.send_and_receive
    dead = []

    def one_fails(messages, timeout=None):
        replies = real(messages, timeout)
        assert len(messages) == WORKERS and not replies[0].has_error()
        dead.extend(k for k, _ in packing.unpack(messages[0].content))  # its worker "crashed"
        replies[0] = Message(Error(code=2, reason="actor died"), reply_to=messages[0])
        return replies

    workers.send_and_receive = one_fails
    msgs = list(coh.configure_train(1, theta, ConfigRecord({}), cg))
    replies = list(cg.send_and_receive(msgs))
    failed = [r for r in replies if r.has_error()]
    assert len(replies) == CLIENTS and len(failed) == CLIENTS // WORKERS
    assert all("actor died" in r.error.reason for r in failed)
    assert {r.metadata.src_node_id for r in failed} == set(dead)  # that worker's clients


def test_simulation_keys_and_federation_config(monkeypatch):
    from fl.cohort import MODES
    from fl.simulation import cohort_workers, federation_config

    assert c.COHORT_MODES == MODES
    cfg = c.load(None, ["partition.num_clients=50", "simulation.cohort_size=16"])
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("fl.simulation.visible_gpus", lambda: 0)
    assert federation_config(cfg)["num-supernodes"] == 8  # one worker per core
    cfg.resources.client_cpus = 2
    assert cohort_workers(cfg) == 4
    cfg.resources.client_cpus, cfg.resources.client_gpus = 1, 0.25
    monkeypatch.setattr("fl.simulation.visible_gpus", lambda: 1)
    assert cohort_workers(cfg) == 4  # four workers share the card
    cfg.simulation.workers = 3
    assert federation_config(cfg)["num-supernodes"] == 3
    cfg.simulation.cohort_size = 0  # off: one SuperNode per client
    assert federation_config(cfg)["num-supernodes"] == 50
    with pytest.raises(c.ConfigError, match=r"simulation.workers: got 60; allowed: <= "
                                            r"partition.num_clients \(50\)"):
        c.load(None, ["partition.num_clients=50", "simulation.cohort_size=4",
                      "simulation.workers=60"])
    with pytest.raises(c.ConfigError, match="simulation.cohort_mode: got 'fast'"):
        c.load(None, ["simulation.cohort_mode=fast"])


def test_a_whole_run_in_cohort_mode_records_per_client_and_packed_bytes(tmp_path):
    """server.app.run_experiment end to end (discovery of the workers, the CohortGrid, the
    round loop, the summary) over loopback workers: the same rounds as one node per client,
    and the record says what the bytes are."""
    from loopback import run_in_process

    from fl.results import read_rounds

    base = [f"partition.num_clients={CLIENTS}", "rounds=2", "strategy.name=fedavg",
            "strategy.fraction_train=0.5", "train.local_epochs=1"]
    ref = run_in_process(c.load(None, base), tmp_path / "ref")
    coh = run_in_process(c.load(None, [*base, "simulation.cohort_size=8",
                                       "simulation.workers=2"]), tmp_path / "coh")
    r_ref, r_coh = read_rounds(tmp_path / "ref"), read_rounds(tmp_path / "coh")
    for key in ("accuracy", "loss", "train_loss", "bytes_down", "bytes_up", "train_flops",
                "clients"):
        assert [r.get(key) for r in r_coh] == [r.get(key) for r in r_ref], key
    assert all(r["workers"] == 2 for r in r_coh) and "workers" not in r_ref[1]
    for r in r_coh[1:]:  # 3 clients on 2 workers: the global model travels twice, not 3x
        assert r["packed_bytes_down"] < r["bytes_down"] and r["packed_bytes_up"] >= r["bytes_up"]
    assert coh["cohorts"] == {"cohort_size": 8, "workers": 2, "mode": "auto"}
    assert "per client" in coh["bytes_counted"] and "cohorts" not in ref
    assert coh["total_packed_bytes_down"] == sum(r.get("packed_bytes_down", 0) for r in r_coh)
    assert coh["total_bytes_down"] == ref["total_bytes_down"]


def test_a_deployed_node_refuses_to_be_a_worker():
    """A node with its own data (deployment) is one client: a worker query or a packed
    message is refused instead of training other clients on a central dataset."""
    cfg = c.load(None, ["simulation.cohort_size=4"])
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config=c.to_flat(cfg),
                  node_config={"partition-id": 0, "data-path": "/data/node0.npz"})
    q = Message(RecordDict({contract.CONFIG: ConfigRecord({contract.COHORT_QUERY: True})}),
                dst_node_id=5, message_type="query")
    with pytest.raises(ValueError, match="cohort mode .* is for simulations"):
        query(q, ctx)
    packed = packing.pack([(3, RecordDict({contract.CONFIG: ConfigRecord({})}))])
    with pytest.raises(ValueError, match="data-path"):
        evaluate_handler(Message(packed, dst_node_id=5, message_type="evaluate"), ctx)
