"""Strategies with real ClientApp handlers, in process (no Ray): the message
contract, the sparse wire, masks that travel only when they change, pruned
entries that stay zero, and bad replies that are rejected, not aggregated."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import decompose_handler, explore_handler, train_handler
from fl import config as c
from fl import contract, wire
from fl.data import load_federated
from fl.models import build_model
from fl.pruning import count_flops
from strategies import FedLD, PrunedStrategy, SeededFedAvg, build_strategy

NODES = [101, 102, 103]


@pytest.fixture(autouse=True)
def task_identity():
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


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


def test_margin_lambda_reaches_the_client_objective():
    cfg, s, contexts = experiment("strategy.name=fedld", "objective.margin_lambda=0.5")
    grid = LoopbackGrid(contexts)
    _, replies, _ = one_round(s, grid, 1)
    loss_margin = np.mean([r.content[contract.METRICS][contract.TRAIN_LOSS] for r in replies])
    cfg, s, contexts = experiment("strategy.name=fedld")
    _, replies, _ = one_round(s, LoopbackGrid(contexts), 1)
    loss_plain = np.mean([r.content[contract.METRICS][contract.TRAIN_LOSS] for r in replies])
    # log(1 + ||softmax||_F^2) >= log(1 + B/C) > 0: the reported objective is larger
    assert loss_margin > loss_plain


def test_baseline_builders():
    _, s, _ = experiment("strategy.name=fedavg")
    assert isinstance(s, SeededFedAvg)
    _, s, _ = experiment("strategy.name=random", "strategy.aggregation=fedld")
    assert isinstance(s, PrunedStrategy) and s.policy.name == "random"
    assert s.rule.aggregation == "fedld"


@pytest.mark.parametrize("strategy", ["fedavg", "autoflip"])
def test_loss_decomposition_sums_to_the_measured_global_loss(strategy):
    from fl.train import evaluate
    from server.diagnostics import decompose_round

    cfg, s, contexts = experiment(f"strategy.name={strategy}", "diagnostics.decomposition_every=1")
    grid = LoopbackGrid(contexts)
    s.track_client_states(True)
    if strategy == "autoflip":
        s.prepare(grid, 60)
        theta = ArrayRecord(s.theta)
    else:
        theta = ArrayRecord(build_model("mlp", (1, 8, 8), 10, seed=0).state_dict())
    msgs = list(s.configure_train(1, theta, ConfigRecord({}), grid))
    replies = grid.send_and_receive(msgs)
    arrays, _ = s.aggregate_train(1, replies)
    d = decompose_round(grid, s.client_states(), arrays, 1, 60)
    assert d["loss_local"] + d["loss_shift"] + d["loss_aggregation"] == pytest.approx(
        d["loss_global"], abs=1e-12)
    # independently: the global model's mean loss over the three clients' data
    fd = load_federated(cfg)
    model = build_model("mlp", (1, 8, 8), 10)
    model.load_state_dict(arrays.to_torch_state_dict())
    direct = np.mean([evaluate(model, fd.client(i), torch.device("cpu"))[0] for i in range(3)])
    assert d["loss_global"] == pytest.approx(direct, rel=1e-9)
    assert d["loss_local"] < d["loss_global"]  # each model fits its own data best


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
