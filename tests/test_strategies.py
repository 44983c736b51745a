"""Strategies with real ClientApp handlers, in process (no Ray): the message
contract, the sparse wire, masks that travel only when they change, pruned
entries that stay zero, and bad replies that are rejected, not aggregated."""

import math

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from clients.app import decompose_handler, explore_handler, train_handler
from fl import config as c
from fl import contract, wire
from fl.data import load_federated
from fl.models import build_model
from fl.pruning import count_flops
from strategies import AutoFLIP, FedLD, PrunedStrategy, SeededFedAvg, build_strategy

pytestmark = pytest.mark.usefixtures("flower_task")

NODES = [101, 102, 103]


def experiment(*overrides):
    cfg = c.load(None, ["partition.num_clients=3", "strategy.min_train_clients=2",
                        "model=mlp", "train.local_epochs=1", *overrides])
    fd = load_federated(cfg)
    theta0 = build_model(cfg.model, fd.input_shape, fd.num_classes, seed=cfg.seed).state_dict()
    strategy = build_strategy(cfg, theta0, fd.input_shape, fd.num_classes)
    strategy.set_population(NODES)
    contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(),
                           node_config={"partition-id": i, "num-partitions": 3},
                           run_config=c.to_flat(cfg)) for i, n in enumerate(NODES)}
    return cfg, strategy, contexts


class LoopbackGrid:
    """Delivers each message to the real ClientApp handler of its node."""

    def __init__(self, contexts):
        self.contexts = contexts

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            ctx = self.contexts[m.metadata.dst_node_id]
            kind = m.metadata.message_type
            handler = (explore_handler if kind.endswith(contract.EXPLORE_ACTION) else
                       decompose_handler if kind.endswith(contract.DECOMPOSE_ACTION)
                       else train_handler)
            out.append(handler(m, ctx))
        return out


def one_round(strategy, grid, rnd):
    msgs = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord({}), grid))
    replies = grid.send_and_receive(msgs)
    arrays, metrics = strategy.aggregate_train(rnd, replies)
    return msgs, replies, arrays


def test_autoflip_rounds_mask_travels_once_and_pruned_entries_stay_zero():
    _, s, contexts = experiment("strategy.name=autoflip", "pruning.mask_every=2",
                                "pruning.structured_ratio=0.5", "pruning.schedule_rounds=2",
                                "pruning.schedule_start=0.5")
    grid = LoopbackGrid(contexts)
    cost = s.prepare(grid, timeout=60)
    assert cost.clients == 3 and cost.bytes_down > 0 and cost.train_flops > 0
    assert s.policy.guidance is not None
    m1, _, a1 = one_round(s, grid, 1)
    assert s.mask_version == 1
    assert all(contract.STRUCTURE in m.content[contract.CONFIG] for m in m1)
    m2, _, _ = one_round(s, grid, 2)  # mask_every=2: same mask, sent against it
    assert s.mask_version == 1
    assert not any(contract.STRUCTURE in m.content[contract.CONFIG] for m in m2)
    size = lambda m: wire.message_nbytes(m.content)  # noqa: E731
    # bitmap of the 8-bit-per-entry mask is gone: smaller by about n/8 bytes
    n_prunable = sum(s.theta[n].numel() for n in s.prunable)
    assert size(m1[0]) - size(m2[0]) >= 0.9 * n_prunable / 8
    m3, r3, a3 = one_round(s, grid, 3)  # new mask (t=2=T: final targets)
    assert s.mask_version == 2 and s.density() < 0.5
    theta = a3.to_torch_state_dict()
    for name, mask in s.masks.items():
        assert torch.count_nonzero(theta[name][~mask]) == 0, name
    # the clients trained a physically smaller model
    fc1_small = r3[0].content  # the reply carries the update of the small model
    upd, _ = wire.decode(wire.from_record(fc1_small[contract.PAYLOAD]),
                         known_masks=s.view.small_masks, known_mask_version=2)
    assert upd["fc1.weight"].shape[0] == len(s.structure["fc1"]) < 128
    info = s.round_info()
    assert info["flops_per_example"] < 2 * (64 * 128 + 128 * 64 + 64 * 10)
    assert info["kept_units"].startswith("fc1:")


def _reply(msg, payload_tensors, n=10, **encode_kw):
    data = wire.encode(payload_tensors, **encode_kw)
    metrics = MetricRecord({contract.NUM_EXAMPLES: n})
    return Message(RecordDict({contract.PAYLOAD: wire.to_record(data), contract.METRICS: metrics}),
                   reply_to=msg)


def test_bad_replies_are_rejected_and_the_rest_aggregated(caplog):
    _, s, _ = experiment("strategy.name=fedld", "partition.num_clients=3")
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord({}), None))
    before = {n: t.clone() for n, t in s.theta.items()}
    good = {n: torch.full_like(t, 0.01) if t.is_floating_point() else torch.zeros_like(t)
            for n, t in s.theta.items()}
    nan = dict(good, **{"fc1.weight": torch.full_like(good["fc1.weight"], math.nan)})
    wrong = dict(good, **{"fc1.weight": torch.zeros(3, 3)})
    replies = [
        _reply(msgs[0], good),
        Message(Error(code=0, reason="client crashed"), reply_to=msgs[1]),
        _reply(msgs[2], nan),
    ]
    with caplog.at_level("WARNING"):
        arrays, _ = s.aggregate_train(1, replies)
    assert arrays is None  # 1 valid < min_train_clients=2: round ends, model unchanged
    assert "fewer than strategy.min_train_clients=2" in caplog.text
    assert "client crashed" in caplog.text and "NaN or Inf" in caplog.text
    assert all(torch.equal(before[n], s.theta[n]) for n in before)
    replies = [_reply(msgs[0], good), _reply(msgs[1], good), _reply(msgs[2], wrong)]
    with caplog.at_level("WARNING"):
        arrays, _ = s.aggregate_train(1, replies)
    assert "fc1.weight" in caplog.text and arrays is not None
    # first round of FedLD: the weighted mean; identical updates -> theta + 0.01
    w = arrays.to_torch_state_dict()["fc2.weight"]
    assert torch.allclose(w, before["fc2.weight"] + 0.01, atol=1e-6)


def test_unknown_mask_version_is_rejected(caplog):
    _, s, contexts = experiment("strategy.name=magnitude", "pruning.mask_every=1")
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord({}), None))
    small = s.view.small_masks
    update = {n: torch.zeros(shape) for n, shape in s.view.small_shapes.items()}
    update["fc1.num_batches_tracked"] = None
    update = {n: t for n, t in update.items() if t is not None}
    stale = _reply(msgs[0], update, masks=small, mask_version=99, send_mask=False)
    with caplog.at_level("WARNING"):
        s.aggregate_train(1, [stale])
    assert "mask version" in caplog.text.lower()


def test_fedld_rounds_move_the_model_with_the_principal_gradient():
    _, s, contexts = experiment("strategy.name=fedld", "strategy.k_proportion=0.5")
    assert isinstance(s, FedLD) and s.rule.aggregation == "fedld"
    grid = LoopbackGrid(contexts)
    accs = []
    for rnd in (1, 2, 3):
        _, replies, arrays = one_round(s, grid, rnd)
        assert arrays is not None and all(not r.has_error() for r in replies)
        accs.append(arrays.to_torch_state_dict())
    assert not torch.equal(accs[0]["fc1.weight"], accs[2]["fc1.weight"])


def _mean_train_loss(*overrides):
    _, s, contexts = experiment(*overrides)
    _, replies, _ = one_round(s, LoopbackGrid(contexts), 1)
    return np.mean([r.content[contract.METRICS][contract.TRAIN_LOSS] for r in replies])


def test_margin_lambda_reaches_the_client_objective():
    loss_margin = _mean_train_loss("strategy.name=fedld", "objective.margin_lambda=0.5")
    loss_plain = _mean_train_loss("strategy.name=fedld", "objective.margin_lambda=0")
    # log(1 + ||softmax||_F^2) >= log(1 + B/C) > 0: the reported objective is larger
    assert loss_margin > loss_plain


@pytest.mark.parametrize("strategy", [("strategy.name=fedld",),
                                      ("strategy.name=random", "strategy.aggregation=fedld")])
def test_fedld_trains_with_margin_control_unless_it_is_set(strategy):
    """docs/ALGORITHMS.md §2.2: FedLD's clients add lambda = 0.1 unless the user sets it."""
    auto = _mean_train_loss(*strategy)
    assert auto == _mean_train_loss(*strategy, "objective.margin_lambda=0.1")
    assert auto > _mean_train_loss(*strategy, "objective.margin_lambda=0")


def test_mask_is_sent_again_only_when_it_changed():
    """After the schedule ends the recomputed mask is the same: no new version, no bitmap,
    no structure JSON (docs/ALGORITHMS.md §1.3)."""
    _, s, contexts = experiment("strategy.name=random", "pruning.mask_every=1",
                                "pruning.schedule_rounds=2", "pruning.structured_ratio=0.5")
    grid = LoopbackGrid(contexts)
    versions, sizes, with_structure = [], [], []
    for rnd in range(1, 6):
        msgs, replies, arrays = one_round(s, grid, rnd)
        assert arrays is not None
        versions.append(s.mask_version)
        sizes.append(wire.message_nbytes(msgs[0].content))
        with_structure.append(all(contract.STRUCTURE in m.content[contract.CONFIG]
                                  for m in msgs))
    assert versions == [1, 2, 3, 3, 3]  # rising targets at t = 0, 1; final from t = 2 = T
    assert with_structure == [True, True, True, False, False]
    n_prunable = sum(s.theta[n].numel() for n in s.prunable)
    assert sizes[2] - sizes[3] >= 0.9 * n_prunable * s.density() / 8  # no bitmap in round 4
    assert sizes[3] == sizes[4]


@pytest.mark.parametrize("overrides, mu", [
    (("strategy.name=autoflip",), 0.0),  # FedProx stays off unless asked
    (("strategy.name=autoflip", "strategy.prox=true", "strategy.proximal_mu=0.3"), 0.3),
    (("strategy.name=magnitude", "strategy.prox=true"), 0.01),
    (("strategy.name=fedld", "strategy.prox=true", "strategy.proximal_mu=0.2"), 0.2),
    (("strategy.name=fedprox", "strategy.proximal_mu=0.2"), 0.2),
    (("strategy.name=fedavg", "strategy.prox=true", "strategy.proximal_mu=0.2"), 0.2),
    (("strategy.name=fedavgm", "strategy.prox=true", "strategy.proximal_mu=0.2"), 0.2),
    (("strategy.name=fedavg",), None),
])
def test_every_strategy_sends_the_proximal_mu_it_is_configured_with(overrides, mu):
    cfg, s, contexts = experiment(*overrides)
    grid = LoopbackGrid(contexts)
    if isinstance(s, AutoFLIP):
        s.prepare(grid, 60)
    theta = ArrayRecord(build_model(cfg.model, (1, 8, 8), 10, seed=0).state_dict())
    msgs = list(s.configure_train(1, theta, ConfigRecord({}), grid))
    assert {m.content[contract.CONFIG].get(contract.PROXIMAL_MU) for m in msgs} == {mu}


def _plain_sgd(model, x, y, steps, lr, mu, masks):
    """Full-batch gradient descent on CE + mu/2 ||w - w_0||^2 in plain torch (autograd),
    masked entries held at zero: the independent check of the client's FedProx step."""
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(steps):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss = loss + mu / 2 * sum(((p - anchor[n]) ** 2).sum()
                                   for n, p in model.named_parameters())
        loss.backward()
        with torch.no_grad():
            for n, p in model.named_parameters():
                step = p.grad * masks[n] if n in masks else p.grad
                p -= lr * step
    return {n: p.detach() - anchor[n] for n, p in model.named_parameters()}


def test_fedprox_term_is_added_inside_autoflip():
    """docs/ALGORITHMS.md §3: AutoFLIP's clients train CE + mu/2 ||w - theta_g||^2 on the
    shrunk, masked model. Their update differs from mu = 0 and equals plain autograd
    gradient descent on that objective."""
    from fl.nodedata import node_data
    from fl.pruning import shrink_model, structure_from_json

    mu, lr, epochs = 2.0, 0.1, 3
    cfg, s, contexts = experiment(
        "strategy.name=autoflip", "strategy.prox=true", f"strategy.proximal_mu={mu}",
        f"train.lr={lr}", "train.momentum=0", "train.batch_size=100000",
        f"train.local_epochs={epochs}", "pruning.schedule_start=1.0")
    grid = LoopbackGrid(contexts)
    s.prepare(grid, 60)
    msg = list(s.configure_train(1, ArrayRecord(), ConfigRecord({}), grid))[0]
    conf = msg.content[contract.CONFIG]
    assert conf[contract.PROXIMAL_MU] == mu
    node = msg.metadata.dst_node_id
    without = RecordDict({contract.PAYLOAD: msg.content[contract.PAYLOAD],
                          contract.CONFIG: ConfigRecord({**dict(conf),
                                                         contract.PROXIMAL_MU: 0.0})})
    msg0 = Message(without, dst_node_id=node, message_type=msg.metadata.message_type)
    state, masks = wire.decode(wire.from_record(msg.content[contract.PAYLOAD]))
    assert masks  # a pruned, masked model

    def reply_delta(m):
        reply = train_handler(m, contexts[node])
        delta, _ = wire.decode(wire.from_record(reply.content[contract.PAYLOAD]),
                               known_masks=masks, known_mask_version=s.mask_version)
        return delta

    data = node_data(cfg, contexts[node].node_config).data
    expected = {}
    for m in (0.0, mu):
        model = shrink_model(cfg.model, (1, 8, 8), 10, structure_from_json(
            str(conf[contract.STRUCTURE])))
        model.load_state_dict(state)
        expected[m] = _plain_sgd(model, data.x, data.y, epochs, lr, m,
                                 {n: t.float() for n, t in masks.items()})
    got = {0.0: reply_delta(msg0), mu: reply_delta(msg)}
    for m in (0.0, mu):
        for name, want in expected[m].items():
            torch.testing.assert_close(got[m][name], want, rtol=0, atol=2e-6)
    gap = max(float((got[mu][n] - got[0.0][n]).abs().max()) for n in expected[mu])
    assert gap > 1e-3  # the term changes the update by far more than the tolerance


def test_baseline_builders():
    _, s, _ = experiment("strategy.name=fedavg")
    assert isinstance(s, SeededFedAvg)
    _, s, _ = experiment("strategy.name=random", "strategy.aggregation=fedld")
    assert isinstance(s, PrunedStrategy) and s.policy.name == "random"
    assert s.rule.aggregation == "fedld"


def _loss(model, state, data):
    """Mean cross-entropy of ``model`` with ``state`` on ``data``, in plain torch."""
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(data.x), data.y))


@pytest.mark.parametrize("strategy", ["fedavg", "autoflip"])
def test_each_recorded_decomposition_term_matches_its_definition(tmp_path, strategy):
    """docs/ALGORITHMS.md §2.1, term by term: the round loop's local, distribution-shift,
    aggregation and global losses against L_i(theta_i), L_j(theta_i) and L_j(theta_g)
    computed here from the clients' own replies (their trained models) and data."""
    from fl.nodedata import node_data
    from fl.pruning import shrink_model, structure_from_json
    from fl.results import RunRecorder, read_rounds
    from server.rounds import run_rounds

    cfg, s, contexts = experiment(f"strategy.name={strategy}", "pruning.mask_every=1")
    exchanges = []  # (train messages, replies) of each round

    class Recording(LoopbackGrid):
        def send_and_receive(self, messages, timeout=None):
            replies = super().send_and_receive(messages, timeout)
            if messages and messages[0].metadata.message_type == MessageType.TRAIN:
                exchanges.append((list(messages), list(replies)))
            return replies

    globals_ = {}

    def evaluate_fn(rnd, arrays):
        globals_[rnd] = arrays.to_torch_state_dict()
        return {"accuracy": 0.5, "loss": 1.0}

    theta0 = build_model(cfg.model, (1, 8, 8), 10, seed=cfg.seed).state_dict()
    run_rounds(Recording(contexts), s, ArrayRecord(theta0), 2, ConfigRecord({}), evaluate_fn,
               RunRecorder(tmp_path), 60, decompose_every=1)
    records = [r for r in read_rounds(tmp_path) if r["round"] >= 1]
    assert [r["round"] for r in records] == [1, 2]
    data = {n: node_data(cfg, ctx.node_config).data for n, ctx in contexts.items()}
    for rec, (msgs, replies) in zip(records, exchanges):
        nodes = [r.metadata.src_node_id for r in replies]
        models = []  # (model, state) of each client after local training
        for m, r in zip(msgs, replies):
            if strategy == "fedavg":  # the reply is the trained model itself
                models.append((build_model(cfg.model, (1, 8, 8), 10),
                               r.content[contract.ARRAYS].to_torch_state_dict()))
                continue
            # AutoFLIP: the small model sent (with a fresh mask every round here) + the update
            small, masks = wire.decode(wire.from_record(m.content[contract.PAYLOAD]))
            delta, _ = wire.decode(wire.from_record(r.content[contract.PAYLOAD]),
                                   known_masks=masks, known_mask_version=rec["mask_version"])
            structure = structure_from_json(str(m.content[contract.CONFIG][contract.STRUCTURE]))
            models.append((shrink_model(cfg.model, (1, 8, 8), 10, structure),
                           {n: small[n] + delta[n] for n in small}))
        K = len(nodes)
        L = np.array([[_loss(*models[i], data[nodes[j]]) for i in range(K)]
                      for j in range(K)])  # L[j, i] = L_j(theta_i)
        full = build_model(cfg.model, (1, 8, 8), 10)
        Lg = np.array([_loss(full, globals_[rec["round"]], data[n]) for n in nodes])
        local = np.mean([L[i, i] for i in range(K)])
        federated = [np.mean(L[:, i]) for i in range(K)]  # L(theta_i) = mean_j L_j(theta_i)
        expect = {"loss_local": local,
                  "loss_shift": np.mean([federated[i] - L[i, i] for i in range(K)]),
                  "loss_aggregation": np.mean(Lg) - np.mean(federated),
                  "loss_global": np.mean(Lg)}
        for key, want in expect.items():
            assert rec[key] == pytest.approx(want, rel=1e-5, abs=1e-6), (rec["round"], key)
        assert K == 3 and local < rec["loss_global"]  # each model fits its own data best


def test_the_round_loop_tells_the_schedule_when_the_loss_fell(tmp_path):
    """pruning.start_when=improved: no mask until the server's test loss has fallen
    pruning.patience rounds in a row; the round loop reports every evaluation."""
    from fl.results import RunRecorder, read_rounds
    from server.rounds import run_rounds

    cfg, s, contexts = experiment("strategy.name=random", "pruning.start_when=improved",
                                  "pruning.patience=2", "pruning.mask_every=1")
    losses = {0: 2.0, 1: 1.9, 2: 2.0, 3: 1.8, 4: 1.7, 5: 1.6, 6: 1.5}  # 2 falls in a row at 4
    theta0 = build_model(cfg.model, (1, 8, 8), 10, seed=cfg.seed).state_dict()
    run_rounds(LoopbackGrid(contexts), s, ArrayRecord(theta0), 6, ConfigRecord({}),
               lambda rnd, arrays: {"accuracy": 0.5, "loss": losses[rnd]},
               RunRecorder(tmp_path), 60)
    rounds = [r for r in read_rounds(tmp_path) if r["round"] >= 1]
    assert [r["mask_version"] for r in rounds] == [0, 0, 0, 0, 1, 2]
    assert [r["density"] < 1.0 for r in rounds] == [False] * 4 + [True] * 2
    assert s.policy.start_round == 5


@pytest.mark.parametrize("strategy", ["autoflip", "magnitude", "fedavg"])
def test_guidance_quality_is_recorded_every_n_rounds(tmp_path, strategy):
    """docs/ALGORITHMS.md §1.5: the round record gets the mean rho over groups of each
    score (guidance only where the strategy has AutoFLIP's guidance); guidance.jsonl the
    per-group samples, which recompute to the same rho."""
    import json

    from fl.pruning.oracle import rank_correlation
    from fl.results import RunRecorder, read_rounds
    from server.guidance_check import GUIDANCE_JSONL, GuidanceCheck
    from server.rounds import run_rounds

    cfg, s, contexts = experiment(f"strategy.name={strategy}", "diagnostics.guidance_every=2",
                                  "diagnostics.guidance_units=8")
    fd = load_federated(cfg)
    check = GuidanceCheck(cfg.model, fd.input_shape, fd.num_classes, fd.test, 2, 8, cfg.seed,
                          tmp_path)
    theta0 = build_model(cfg.model, (1, 8, 8), 10, seed=cfg.seed).state_dict()
    run_rounds(LoopbackGrid(contexts), s, ArrayRecord(theta0), 4, ConfigRecord({}),
               lambda rnd, arrays: {"accuracy": 0.5, "loss": 1.0}, RunRecorder(tmp_path), 60,
               guidance_check=check)
    rounds = {r["round"]: r for r in read_rounds(tmp_path)}
    assert [r for r in rounds if "magnitude_rho" in rounds[r]] == [2, 4]
    lines = [json.loads(x) for x in (tmp_path / GUIDANCE_JSONL).read_text().splitlines()]
    assert [x["round"] for x in lines] == [2, 4]
    for line in lines:
        rec = rounds[line["round"]]
        assert set(line["groups"]) == {"fc1", "fc2"}
        for score in ("guidance", "magnitude", "random"):
            rhos = [rank_correlation(g["scores"][score], g["oracle"])
                    for g in line["groups"].values() if score in g["scores"]]
            if strategy != "autoflip" and score == "guidance":
                assert rhos == [] and rec["guidance_rho"] is None
                continue
            assert len(rhos) == 2 and rec[f"{score}_rho"] == pytest.approx(sum(rhos) / 2)
        assert all(len(g["units"]) == 8 for g in line["groups"].values())
    if strategy != "fedavg":  # only kept units are sampled (round 4: the last structure)
        for name, g in lines[-1]["groups"].items():
            assert set(g["units"]) <= set(s.structure[name].tolist()), name
    check.truncate(2)  # a run resumed after round 2 redoes round 4
    assert [json.loads(x)["round"] for x in (tmp_path / GUIDANCE_JSONL).read_text()
            .splitlines()] == [2]


def test_pruning_baselines_tighten_nested_masks():
    """Random and magnitude masks along the schedule only ever remove entries."""
    for name in ("random", "magnitude"):
        _, s, _ = experiment(f"strategy.name={name}", "pruning.mask_every=1",
                             "pruning.schedule_rounds=3")
        previous = None
        for rnd in (1, 2, 3, 4):
            s._recompute_mask(rnd)
            current = {n: m.clone() for n, m in s.weight_masks.items()}
            if previous is not None:
                for n, m in current.items():
                    assert not bool((m & ~previous[n]).any()), (name, rnd, n)
            previous = current
        assert s.density() < 0.2


def test_pruned_fedld_aggregates_kept_entries_with_the_principal_gradient():
    """AutoFLIP's mask around FedLD's rule: rounds run, pruned entries stay zero."""
    _, s, contexts = experiment("strategy.name=autoflip", "strategy.aggregation=fedld",
                                "pruning.mask_every=1", "pruning.schedule_rounds=2")
    grid = LoopbackGrid(contexts)
    s.prepare(grid, timeout=60)
    for rnd in (1, 2, 3):
        _, replies, arrays = one_round(s, grid, rnd)
        assert arrays is not None and all(not r.has_error() for r in replies)
    theta = arrays.to_torch_state_dict()
    for name, mask in s.masks.items():
        assert torch.count_nonzero(theta[name][~mask]) == 0, name
    assert all(torch.isfinite(t).all() for t in theta.values())


def test_a_round_cut_by_the_shutdown_is_neither_recorded_nor_checkpointed(tmp_path):
    """Ctrl-C stops the clients with the server: the round that was open then has
    replies that failed because of the shutdown; it must not become the checkpoint."""
    from fl.checkpoint import load as load_checkpoint
    from fl.results import RunRecorder, read_rounds
    from server.rounds import RunStopped, run_rounds

    cfg, s, contexts = experiment("strategy.name=fedavg")
    sent = []

    class ShutdownInRound2(LoopbackGrid):
        def send_and_receive(self, messages, timeout=None):
            sent.append(len(messages))
            return super().send_and_receive(messages, timeout)

    theta = build_model(cfg.model, (1, 8, 8), 10, seed=cfg.seed).state_dict()
    recorder = RunRecorder(tmp_path)
    with pytest.raises(RunStopped, match="during round 2"):
        run_rounds(ShutdownInRound2(contexts), s, ArrayRecord(theta), 4, ConfigRecord({}),
                   lambda rnd, arrays: {"accuracy": 0.5, "loss": 1.0}, recorder, 60,
                   config_json="{}", stopping=lambda: len(sent) >= 2)
    assert [r["round"] for r in read_rounds(tmp_path)] == [0, 1]
    assert load_checkpoint(tmp_path, "{}").round == 1
    sent.clear()
    with pytest.raises(RunStopped, match="before round 1"):  # nothing starts after a stop
        run_rounds(ShutdownInRound2(contexts), s, ArrayRecord(theta), 4, ConfigRecord({}),
                   lambda rnd, arrays: {"accuracy": 0.5, "loss": 1.0},
                   RunRecorder(tmp_path / "b"), 60, stopping=lambda: True)
    assert sent == []


@pytest.mark.parametrize("model, shape", [("lenet", (3, 16, 16)), ("resnet18_gn", (3, 8, 8))])
def test_autoflip_shrinks_literature_models_through_real_client_handlers(tmp_path, model, shape):
    """Exploration, a structured + unstructured mask, clients training the shrunk model
    (GroupNorm groups removed whole for resnet18_gn), updates expanded on the server."""
    rng = np.random.default_rng(0)
    npz = tmp_path / "images.npz"
    np.savez(npz, x=rng.random((60, *shape), dtype=np.float32), y=np.arange(60) % 4)
    cfg, s, contexts = experiment(
        f"model={model}", "dataset.name=npz", f"dataset.path={npz}", "partition.kind=iid",
        "strategy.name=autoflip", "pruning.mask_every=1", "pruning.schedule_start=1.0",
        "train.batch_size=8")
    grid = LoopbackGrid(contexts)
    s.prepare(grid, timeout=60)
    _, replies, arrays = one_round(s, grid, 1)
    assert len(replies) == 3 and not any(r.has_error() for r in replies)
    full = build_model(model, shape, 4)
    assert all(len(s.structure[g.name]) == max(1, g.n_units // 2) for g in s.groups)
    assert s.round_info()["flops_per_example"] < 0.5 * count_flops(full, shape)
    theta = arrays.to_torch_state_dict()
    for name, mask in s.masks.items():
        assert torch.count_nonzero(theta[name][~mask]) == 0, name
    if model == "resnet18_gn":  # a unit is a GroupNorm group: 32 channels of the stem
        assert s.groups[0].name == "conv1" and s.groups[0].block == 32
        kept = int(s.masks["gn1.weight"].sum())
        assert kept == 32
