"""Real deployments on 127.0.0.1: SuperLink with TLS and node authentication,
SuperNodes each on its own .npz, ``flwr run`` of the Bonsai app; ports chosen
free at run time; every process gone afterwards.

Deployment rounds are slow (nodes and server poll about every 3 s and each
message starts a ClientApp process), so the runs are 2 rounds of a small MLP.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from loopback import run_in_process
from processes import bonsai, leftovers, wait_gone
from test_tracking import F32, mlflow_artifacts, mlflow_history, mlflow_runs, tb_scalars

from fl.config import load
from fl.deploy import LocalNode
from fl.deploy.local import plan_local, run_local
from fl.deploy.split import write_split
from fl.export import export_run
from fl.proctree import marked
from fl.results import read_rounds

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

EXPERIMENT = """\
# bonsai deploy local THIS_FILE --nodes 2 --data DIR
name: deploy-test
rounds: 2
model: mlp
dataset:
  name: digits
partition:
  kind: iid
  num_clients: 2
train:
  local_epochs: 1
  batch_size: 32
strategy:
  name: autoflip
  min_train_clients: 2
  round_timeout: 60
pruning:
  structured_ratio: 0.5
  unstructured_ratio: 0.5
  schedule_rounds: 2
  mask_every: 1
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An experiment file and one .npz per node (4 nodes' worth)."""
    d = tmp_path_factory.mktemp("deploy")
    exp = d / "exp.yaml"
    exp.write_text(EXPERIMENT)
    write_split(load(exp, ["partition.num_clients=4"]), d / "data")
    return exp, d / "data"


def test_deploy_local_two_nodes_tls_auth_own_data(setup, tmp_path):
    """Two nodes over TLS with node authentication, each on its own file; the ServerApp
    (its own process, started by the SuperLink) also writes to MLflow and TensorBoard as
    a simulation's does (tests/test_tracking.py)."""
    exp, data = setup
    mark = uuid.uuid4().hex
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    proc = bonsai(["deploy", "local", str(exp), "--nodes", "2", "--data", str(data),
                    "--threads", "1", "--device", "cpu", "--set", f"output_dir={tmp_path}/r",
                    "--set", f"tracking.mlflow_uri={uri}", "--set", "tracking.tensorboard=true"],
                   mark)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert not (left := wait_gone(mark)), left
    (run_dir,) = (tmp_path / "r").iterdir()
    assert f"results: {run_dir}" in out and "accuracy" in out  # the live table, then summary
    for f in ("config.json", "rounds.jsonl", "rounds.csv", "summary.json", "final_model.pt"):
        assert (run_dir / f).is_file(), f
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients"] == 2 and r["failures"] == 0 for r in rounds[1:])
    assert rounds[2]["accuracy"] > rounds[0]["accuracy"] + 0.1
    # TLS on the SuperLink, node authentication on, nodes on their own files
    assert "https://127.0.0.1" in (run_dir / "superlink.log").read_text()
    for i in range(2):
        log = (run_dir / "nodes" / f"node-{i}.log").read_text()
        assert "SuperNode ID" in log
        lines = [json.loads(s) for s in (run_dir / "nodes" / f"node-{i}.jsonl").read_text()
                 .splitlines()]
        assert [(r["message"], r["round"]) for r in lines] == [
            ("train.explore", 0), ("train", 1), ("train", 2)]  # AutoFLIP explores first
        assert all(r["peak-memory-mb"] > 10 and r["threads"] == 1 and r["train-seconds"] > 0
                   for r in lines)
        assert all(r["partition-id"] == i for r in lines)
    # AutoFLIP's structure -> an edge model without the removed units, same predictions
    assert (run_dir / "structure.json").is_file()
    r = export_run(run_dir, "torchscript", runs=3)
    assert r.structured and r.params < 0.8 * r.full_params
    assert r.equal_predictions == r.test_examples
    # the trackers got every round (the experiment is named after the run)
    (run,) = mlflow_runs(uri, "deploy-test")
    assert run.info.status == "FINISHED"
    for key in ("accuracy", "loss", "cum_bytes"):
        assert mlflow_history(uri, run.info.run_id, key) == [
            (r["round"], float(r[key])) for r in rounds], key
    assert mlflow_artifacts(uri, run.info.run_id) == {"final_model.pt", "structure.json",
                                                     "summary.json"}
    assert tb_scalars(run_dir / "tensorboard")["accuracy"] == pytest.approx(
        {r["round"]: r["accuracy"] for r in rounds}, rel=F32)


def test_ctrl_c_stops_every_process(setup, tmp_path):
    exp, data = setup
    mark = uuid.uuid4().hex
    proc = bonsai(["deploy", "local", str(exp), "--nodes", "2", "--data", str(data),
                    "--quiet", "--set", "rounds=50", "--set", f"output_dir={tmp_path}/r"], mark)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list((tmp_path / "r").glob("*/nodes/node-1.log"))
        if logs and "SuperNode ID" in logs[0].read_text():
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert len(leftovers(mark)) >= 4  # SuperLink, its SuperExec, 2 SuperNodes, ...
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130 and "interrupted" in err
    assert not (left := wait_gone(mark)), left


REJOIN = ["strategy.name=autoflip", "model=cnn", "rounds=6", "partition.kind=iid",
          "partition.num_clients=3", "train.local_epochs=3", "strategy.min_train_clients=1",
          "pruning.mask_every=1", "pruning.schedule_rounds=4"]


def test_paused_and_restarted_nodes_rejoin_and_train(setup, tmp_path):
    """3 nodes, AutoFLIP with a new mask every round, and a fourth node whose key is not
    registered (refused, exit code 305). After round 1, node-1 is paused (SIGSTOP) past
    the round timeout and resumed (SIGCONT); node-2 is killed (SIGKILL) and restarted
    with the same key and data. Round 2 ends at its timeout with node-0 alone (a dead
    node does not hang the server); both train again in later rounds (with the current
    mask: no reply rejected), node-2 under its old node id (Flower reuses an
    authenticated key's id), and the final accuracy is within 1 point of the same
    experiment undisturbed: the same seeded run with one in-process node per client
    (tests/loopback.py), which is the same run as a deployment while every node replies
    (rounds 0 and 1: the same accuracy, the loss to float rounding)."""
    exp, data = setup
    timeout = 25.0  # an undisturbed round here takes 10-20 s (3 nodes, 2 shared cores)
    cfg = load(exp, [*REJOIN, f"strategy.round_timeout={timeout}", f"output_dir={tmp_path}/r"])
    write_split(cfg, tmp_path / "data")
    nodes = plan_local(cfg, tmp_path / "data", 3, device="cpu", threads=1)
    nodes.append(LocalNode("node-3", str(data / "node-3.npz"), 3, register=False))
    seen: dict[str, object] = {}

    def restart(fed):
        seen["restarted_id"] = fed.restart_node("node-2")
        seen["restarted_after"] = len(read_rounds(seen["run_dir"])) - 1

    def on_poll(fed, run_dir):
        seen["marker"], seen["run_dir"] = fed.marker, run_dir
        done = len(read_rounds(run_dir)) - 1  # rounds recorded after round 0
        if "paused" not in seen and done >= 1:
            seen["ids"] = {n.name: n.node_id for n in fed.nodes}
            fed.pause_node("node-1")
            seen["paused"] = time.monotonic()
            fed.kill_node("node-2")
            seen["thread"] = threading.Thread(target=restart, args=(fed,), daemon=True)
            seen["thread"].start()
        elif ("paused" in seen and "resumed_after" not in seen and done >= 2
              and time.monotonic() - seen["paused"] > timeout):
            fed.resume_node("node-1")
            seen["resumed_after"] = done

    summary = run_local(cfg, nodes, live=False, on_poll=on_poll)
    seen["thread"].join(timeout=30)
    assert not (left := wait_gone(lambda: marked(str(seen["marker"])))), left
    run_dir = Path(summary["run_dir"])
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == list(range(7))
    assert rounds[2]["participants"] == [0] and rounds[2]["failed"] == [1, 2]
    assert rounds[2]["seconds"] > timeout - 1  # waited for the two, not past the timeout
    back1 = [r["round"] for r in rounds[1:] if 1 in r["participants"]]
    back2 = [r["round"] for r in rounds[1:] if 2 in r["participants"]]
    assert [r for r in back1 if r > seen["resumed_after"]], rounds
    assert [r for r in back2 if r > seen["restarted_after"]], rounds
    assert rounds[-1]["participants"] == [0, 1, 2] and rounds[-1]["failed"] == []
    # node-2 came back under its old id; it trained again (its own log says so)
    assert seen["restarted_id"] == seen["ids"]["node-2"] == summary["nodes"]["node-2"]
    assert summary["nodes"]["node-3"] == "refused"  # its key is not registered
    assert "Exit Code: 305" in (run_dir / "nodes" / "node-3.log").read_text()
    trained = [json.loads(s)["round"] for s in
               (run_dir / "nodes" / "node-2.jsonl").read_text().splitlines()]
    assert max(trained) == 6 and 2 not in trained
    # every reply that came decoded against the mask it was sent; the only ones rejected
    # are the SuperLink's "Node Unavailable" answers for node-2 while it was down
    log = (run_dir / "flower.log").read_text()
    rejected = [line for line in log.splitlines() if "rejected" in line]
    assert all("client error" in line and "Node Unavailable" in line for line in rejected), \
        rejected
    # a new mask version only when the mask changed (one log line each), the last in use
    versions = [int(v) for v in re.findall(r"mask v(\d+):", log)]
    assert versions == list(range(1, len(versions) + 1)) and versions, versions
    assert rounds[-1]["mask_version"] == versions[-1]

    # the same experiment undisturbed, in this process
    run_in_process(load(exp, [*REJOIN, f"strategy.round_timeout={timeout}"]), tmp_path / "ref")
    sim = read_rounds(tmp_path / "ref")
    if rounds[1]["participants"] == [0, 1, 2]:  # before the disturbance: the same run
        assert [r["accuracy"] for r in rounds[:2]] == [r["accuracy"] for r in sim[:2]]
        assert [r["loss"] for r in rounds[:2]] == pytest.approx([r["loss"] for r in sim[:2]],
                                                                rel=1e-5)  # float rounding
    assert abs(rounds[-1]["accuracy"] - sim[-1]["accuracy"]) <= 0.01, (
        [r["accuracy"] for r in rounds], [r["accuracy"] for r in sim])
