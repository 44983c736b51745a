"""`bonsai run --ray-address` on a real Ray cluster of two nodes on this machine
(tests/raycluster.py): the clients are placed on both nodes, and after a run, and
after a run interrupted with SIGINT, both nodes are alive (the same GCS and raylet
processes), no process of Bonsai's is left, and Ray has ended our actors (their
workers are started by the cluster's raylets, not by us: ending our driver ends them).
Then `bonsai sweep --ray-address` of a two-cell study on the same cluster (the README's
recipe): each cell's results land in the study folder, and the cluster is as it was.
The cluster is then ended by the PIDs of the `ray start` sessions we started.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from processes import bonsai, wait_gone
from raycluster import LoopbackCluster, gcs_answers

from fl.proctree import start_time
from fl.results import read_rounds
from fl.scaleout import NODE_DIGITS

pytestmark = pytest.mark.slow

GONE_WITHIN = 15.0  # seconds for Ray to end our actors after our driver (~0.2 s idle)
RUN = ["run", "simulations/quickstart.yaml", "--quiet", "--set", "strategy.name=fedavg",
       "--set", "model=mlp", "--set", "partition.num_clients=4",
       "--set", "strategy.min_train_clients=4", "--set", "train.local_epochs=1"]


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="rct-", dir="/tmp"))
    try:
        with LoopbackCluster(root, nodes=2, cpus=1) as c:
            yield c
            left = c.close()  # by the PIDs of our `ray start` sessions, never `ray stop`
            assert left == [], f"cluster processes survived: {left}"
            assert c.members() == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def private_tmp():
    """bonsai's TMPDIR: its private folders land here, so a leak is visible."""
    d = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def still_alive(ids: dict[int, int]) -> dict[int, int]:
    return {p: st for p, st in ids.items() if start_time(p) == st}


def check_cluster_as_it_was(cluster: LoopbackCluster, daemons: dict[int, int],
                            mark: str, tmp: Path) -> None:
    assert not (left := wait_gone(mark, 10.0)), left  # nothing of Bonsai's
    assert not (left := wait_gone(cluster.actors, GONE_WITHIN)), left  # Ray ended our actors
    assert still_alive(daemons) == daemons  # the same GCS and raylets
    assert len(cluster.node_ids()) == 2 and gcs_answers(cluster.address)
    # the run's private folders are gone (torch may leave its own cache there)
    assert [p.name for p in tmp.iterdir() if p.name.startswith(("bonsai-", "bray-"))] == []


def test_run_places_clients_on_both_nodes_and_leaves_the_cluster_alone(
        cluster, tmp_path, private_tmp):
    daemons = cluster.daemons()
    assert len(daemons) == 3  # one GCS, two raylets
    nodes = sorted(n[:NODE_DIGITS] for n in cluster.node_ids().values())
    mark = uuid.uuid4().hex
    proc = bonsai([*RUN, "--set", "rounds=2", "--set", f"output_dir={tmp_path}",
                   "--ray-address", cluster.address], mark, env={"TMPDIR": str(private_tmp)})
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert f"joining the Ray cluster at {cluster.address}" in out
    (run_dir,) = tmp_path.iterdir()
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:  # 4 clients, 1 CPU each, on two nodes of 1 CPU: both used
        assert r["clients"] == 4 and r["ray_nodes"] == nodes, r
    check_cluster_as_it_was(cluster, daemons, mark, private_tmp)


def test_interrupted_run_leaves_the_cluster_as_it_was(cluster, tmp_path, private_tmp):
    daemons = cluster.daemons()
    mark = uuid.uuid4().hex
    proc = bonsai([*RUN, "--set", "rounds=40", "--set", f"output_dir={tmp_path}"], mark,
                  env={"TMPDIR": str(private_tmp), "RAY_ADDRESS": cluster.address})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # running on the cluster
        dirs = list(tmp_path.iterdir())
        if dirs and read_rounds(dirs[0]) and len(cluster.actors()) == 2:
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert len(cluster.actors()) == 2  # our actors, one on each node
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "joining the Ray cluster at" in out and "(from RAY_ADDRESS)" in out
    assert "interrupted; every process was stopped" in err and "Traceback" not in err
    check_cluster_as_it_was(cluster, daemons, mark, private_tmp)


def test_sweep_runs_each_cell_on_the_cluster_and_leaves_it_alone(cluster, tmp_path,
                                                                  private_tmp):
    """`bonsai sweep STUDY --ray-address` (the README's one command for a study): two
    one-round cells, one after the other, each on the whole cluster."""
    daemons = cluster.daemons()
    nodes = {n[:NODE_DIGITS] for n in cluster.node_ids().values()}
    study = tmp_path / "mini.yaml"
    study.write_text(yaml.safe_dump({
        "name": "mini", "output_dir": str(tmp_path / "studies"),
        "base": {"rounds": 1, "model": "mlp", "partition": {"num_clients": 2},
                 "train": {"local_epochs": 1},
                 "strategy": {"name": "fedavg", "min_train_clients": 2}},
        "grid": {"seed": [0, 1]}}))
    mark = uuid.uuid4().hex
    proc = bonsai(["sweep", str(study), "--quiet", "--ray-address", cluster.address], mark,
                  env={"TMPDIR": str(private_tmp)})
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert f"joining the Ray cluster at {cluster.address}" in out
    assert "ran 2, skipped 0 finished earlier, failed 0" in out
    study_dir = tmp_path / "studies" / "mini"
    assert sorted(d.name for d in study_dir.iterdir() if d.is_dir()) == ["seed=0", "seed=1"]
    for cell in ("seed=0", "seed=1"):
        assert (study_dir / cell / "summary.json").is_file()
        rounds = read_rounds(study_dir / cell)
        assert [r["round"] for r in rounds] == [0, 1]
        # trained by actors on the cluster's nodes, not on a private Ray
        used = set(rounds[1].get("ray_nodes", []))
        assert rounds[1]["clients"] == 2 and used and used <= nodes, rounds[1]
    check_cluster_as_it_was(cluster, daemons, mark, private_tmp)
