"""Cohort mode in a real Flower simulation through Ray, driven by `bonsai run`.

6 clients on 2 worker SuperNodes (`simulation.cohort_size`, `simulation.workers=2`,
`simulation.cohort_mode=sequential`), 2 rounds of AutoFLIP and of FedLD (with the loss
decomposition, 3 clients sampled a round). The reference is the one-client-per-message
path of the same experiment: the same ServerApp (`server.app.run_experiment`) and
ClientApp handlers over an in-process grid with one node per client
(tests/loopback.py), so the reference costs no second Ray start. Every per-round
accuracy, loss, train loss, FLOPs count and byte count (bytes are counted per client in
both) must be equal, not close: the sequential cohort path is `fl.train.train` per
client.
"""

import json
import uuid

import pytest
from loopback import run_in_process
from processes import bonsai, wait_gone

from fl import config as c
from fl.results import read_rounds

pytestmark = pytest.mark.slow

BASE = ["rounds=2", "partition.num_clients=6", "strategy.min_train_clients=2",
        "train.local_epochs=1"]
COHORT = ["simulation.cohort_size=4", "simulation.workers=2",
          "simulation.cohort_mode=sequential"]
COMPARED = ("accuracy", "loss", "train_loss", "train_flops", "bytes_down", "bytes_up",
            "clients", "failures", "density", "loss_local", "loss_shift", "loss_aggregation")


@pytest.mark.parametrize("overrides", [
    ("strategy.name=autoflip", "pruning.mask_every=1", "pruning.schedule_rounds=2"),
    ("strategy.name=fedld", "objective.margin_lambda=0.1", "diagnostics.decomposition_every=1",
     "strategy.fraction_train=0.5"),  # 3 of the 6 clients a round: cohorts of sampled ones
], ids=["autoflip", "fedld"])
def test_cohort_run_equals_one_client_per_message(tmp_path, overrides):
    name = overrides[0].split("=")[1]
    mark = uuid.uuid4().hex
    sets = [a for kv in (*BASE, *overrides, *COHORT) for a in ("--set", kv)]
    proc = bonsai(["run", "simulations/quickstart.yaml", "--quiet", *sets,
                   "--set", f"output_dir={tmp_path}", "--set", f"name={name}"], mark)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert not (left := wait_gone(mark)), left
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith(name)]
    rounds = read_rounds(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["cohorts"] == {"cohort_size": 4, "workers": 2, "mode": "sequential"}
    assert all(r["workers"] == 2 and r["packed_bytes_up"] > 0 for r in rounds[1:])

    ref_cfg = c.load("simulations/quickstart.yaml", [*BASE, *overrides,
                                                      f"output_dir={tmp_path / 'ref'}"])
    run_in_process(ref_cfg, tmp_path / "ref")
    reference = read_rounds(tmp_path / "ref")
    assert [r["round"] for r in rounds] == [r["round"] for r in reference] == [0, 1, 2]
    for key in COMPARED:
        assert [r.get(key) for r in rounds] == [r.get(key) for r in reference], key
    assert rounds[2]["accuracy"] > rounds[0]["accuracy"] + 0.2
    if name == "fedld":
        assert "loss_shift" in rounds[1]
    if name == "autoflip":
        assert rounds[0]["train_flops"] > 0 and rounds[0]["packed_bytes_down"] > 0  # exploration
        assert rounds[2]["density"] < rounds[1]["density"]
