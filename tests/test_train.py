"""Local trainer, evaluation, sampling and result files."""

import json

import numpy as np
import torch

from fl import config as c
from fl.data import load_federated
from fl.models import build_model
from fl.results import RunRecorder, read_rounds
from fl.sampling import round_seed, sample_clients
from fl.train import evaluate, train


def test_training_lowers_the_loss_and_is_reproducible():
    cfg = c.load(None, ["train.local_epochs=5"])
    fd = load_federated(cfg)
    data = fd.client(1)
    cpu = torch.device("cpu")
    m1 = build_model("cnn", fd.input_shape, 10, seed=0)
    before, _ = evaluate(m1, data, cpu)
    r1 = train(m1, data, cfg.train, seed=7, device=cpu)
    after, _ = evaluate(m1, data, cpu)
    assert after < 0.5 * before
    assert r1.num_examples == len(data) and r1.steps == 5 * -(-len(data) // 16)
    m2 = build_model("cnn", fd.input_shape, 10, seed=0)
    train(m2, data, cfg.train, seed=7, device=cpu)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(),
                                                 m2.state_dict().values()))


def test_proximal_term_keeps_weights_closer():
    cfg = c.load(None, ["train.local_epochs=3"])
    fd = load_federated(cfg)
    cpu = torch.device("cpu")
    start = build_model("mlp", fd.input_shape, 10, seed=0)
    w0 = torch.cat([p.detach().flatten() for p in start.parameters()])
    dists = []
    for mu in (0.0, 1.0):
        m = build_model("mlp", fd.input_shape, 10, seed=0)
        train(m, fd.client(0), cfg.train, seed=1, device=cpu, proximal_mu=mu)
        dists.append(float((torch.cat([p.detach().flatten() for p in m.parameters()]) - w0)
                           .norm()))
    assert dists[1] < dists[0]


def test_sampling_is_a_function_of_seed_and_round():
    pop = list(range(100, 120))
    a = sample_clients(pop, 0.25, 2, seed=3, server_round=5)
    assert a == sample_clients(pop, 0.25, 2, seed=3, server_round=5)
    assert len(a) == 5 and a == sorted(a) and set(a) <= set(pop)
    assert a != sample_clients(pop, 0.25, 2, seed=3, server_round=6)
    assert len(sample_clients(pop, 0.01, 4, 0, 1)) == 4
    assert round_seed(1, 2) == round_seed(1, 2) != round_seed(1, 3)


def test_recorder_writes_jsonl_csv_summary(tmp_path):
    rec = RunRecorder(tmp_path / "run")
    rec.write_config('{"a": 1}')
    rec.add_round({"round": 0, "accuracy": 0.1, "loss": 2.3})
    rec.add_round({"round": 1, "accuracy": 0.6, "loss": 1.0, "bytes_down": 10, "bytes_up": 5})
    rec.add_round({"round": 2, "accuracy": 0.5, "loss": 1.1, "bytes_down": 10, "bytes_up": 5})
    assert [r["round"] for r in read_rounds(tmp_path / "run")] == [0, 1, 2]
    csv_lines = (tmp_path / "run" / "rounds.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:3] == ["round", "accuracy", "loss"] and len(csv_lines) == 4
    s = rec.write_summary()
    assert s["final_accuracy"] == 0.5 and s["best_accuracy"] == 0.6 and s["best_round"] == 1
    assert s["total_bytes_down"] == 20 and s["rounds"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == s
    assert np.isclose(s["train_seconds"], 0.0)


def test_char_lstm_trains_on_int64_token_ids_with_pruned_entries_held_at_zero():
    """Text models get their int64 ids as they are (no float conversion); the
    AutoFLIP mask (structured + unstructured, LSTM weights included) holds."""
    from fl.data import Arrays
    from fl.pruning import groups_for, plan_masks, prunable_names, shrink_model, shrink_state

    vocab, seq = 12, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (96, seq), generator=g)
    data = Arrays(x, (x[:, -1] + 1) % vocab)  # next id = last id + 1: learnable
    full = build_model("char_lstm", (seq,), vocab, seed=0)
    state = full.state_dict()
    groups = groups_for("char_lstm", (seq,), vocab)
    scores = {n: torch.rand(state[n].shape, generator=g) for n in prunable_names(full)}
    plan = plan_masks(scores, groups, state, structured_ratio=0.5, unstructured_ratio=0.5)
    model = shrink_model("char_lstm", (seq,), vocab, plan.structure)
    masked = {k: v * plan.masks[k] if k in plan.masks else v for k, v in state.items()}
    model.load_state_dict(shrink_state(masked, groups, plan.structure))
    masks = shrink_state(plan.weight_masks, groups, plan.structure)
    assert set(masks) >= {"lstm1.weight_ih_l0", "lstm2.weight_hh_l0", "fc.weight"}
    cpu = torch.device("cpu")
    before, _ = evaluate(model, data, cpu)
    cfg = c.load(None, ["train.local_epochs=8", "train.batch_size=16", "train.optimizer=adamw",
                        "train.lr=0.01"]).train
    train(model, data, cfg, seed=1, device=cpu, masks=masks)
    after, _ = evaluate(model, data, cpu)
    assert data.x.dtype == torch.int64
    assert after < 0.5 * before, (before, after)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert torch.count_nonzero(params[name].detach()[~m]) == 0, name


def test_groupnorm_resnet_trains_a_step_on_cpu():
    from fl.data import Arrays

    g = torch.Generator().manual_seed(0)
    data = Arrays(torch.randn(8, 3, 8, 8, generator=g), torch.arange(8) % 4)
    model = build_model("resnet18_gn", (3, 8, 8), 4, seed=0)
    w0 = model.layer4[1].gn2.weight.detach().clone()
    cfg = c.load(None, ["train.local_epochs=1", "train.batch_size=8"]).train
    result = train(model, data, cfg, seed=0, device=torch.device("cpu"))
    assert result.steps == 1 and np.isfinite(result.loss)
    assert not torch.equal(model.layer4[1].gn2.weight, w0)


def test_evaluation_on_several_threads_equals_one_thread_bitwise():
    """Batches split over threads are summed in one thread's order: same floats."""
    fd = load_federated(c.load(None, []))
    model = build_model("cnn", fd.input_shape, fd.num_classes, seed=3)
    cpu = torch.device("cpu")
    one = evaluate(model, fd.test, cpu, batch_size=32)
    for threads in (2, 3, 100):  # uneven runs of batches; more threads than batches
        assert evaluate(model, fd.test, cpu, batch_size=32, threads=threads) == one
    assert 0.0 < one[1] < 1.0 and one[0] > 0.0


def test_cpu_training_and_evaluation_in_channels_last_match_the_default_layout():
    """On a CPU, conv models train and evaluate channels-last (fl.train.channels_last_helps):
    the same values as the default layout up to float32 summation order (oneDNN may sum
    a convolution in another order), and the caller's model comes back in the default
    layout. Tolerance: 1e-5 on weights after 2 epochs, 1e-6 relative on the loss."""
    import fl.train

    cfg = c.load(None, ["train.local_epochs=2", "train.momentum=0.9"])
    fd = load_federated(cfg)
    data, cpu = fd.client(0), torch.device("cpu")
    start = build_model("cnn", fd.input_shape, 10, seed=0)
    assert fl.train.channels_last_helps(start, cpu)
    assert not fl.train.channels_last_helps(build_model("mlp", fd.input_shape, 10), cpu)
    # GroupNorm is slower channels-last on a CPU (benchmarks/layout.py)
    assert not fl.train.channels_last_helps(build_model("resnet18_gn", (3, 8, 8), 4), cpu)
    assert fl.train.channels_last_helps(build_model("resnet8", (3, 8, 8), 4), cpu)
    models, results, layouts = [], [], []
    for channels_last in (True, False, None):  # None: what channels_last_helps picks
        model = build_model("cnn", fd.input_shape, 10, seed=0)
        model.conv2.register_forward_pre_hook(lambda m, _: layouts.append(
            not m.weight.is_contiguous()
            and m.weight.is_contiguous(memory_format=torch.channels_last)))
        results.append(train(model, data, cfg.train, seed=3, device=cpu,
                             channels_last=channels_last))
        models.append(model)
    fast, ref, picked = models
    for p, q in zip(picked.state_dict().values(), fast.state_dict().values(), strict=True):
        assert torch.equal(p, q)  # the cnn on a CPU trains channels-last by default
    for (name, p), q in zip(fast.state_dict().items(), ref.state_dict().values(), strict=True):
        assert p.is_contiguous(), name
        assert (p - q).abs().max() <= 1e-5, name
    steps = results[0].steps
    # each run trained in its layout; the default picked channels-last
    assert layouts == [True] * steps + [False] * steps + [True] * steps
    assert abs(results[0].loss - results[1].loss) <= 1e-6 * results[1].loss
    loss, acc = evaluate(ref, fd.test, cpu)
    loss_c, acc_c = evaluate(ref, fd.test, cpu, channels_last=False)
    assert ref.conv2.weight.is_contiguous()  # evaluated on a channels-last copy
    assert abs(loss - loss_c) <= 1e-6 * loss_c and abs(acc - acc_c) <= 1 / len(fd.test)
