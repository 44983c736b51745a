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
