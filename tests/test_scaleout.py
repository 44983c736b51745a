"""fl/scaleout.py: where a simulation's Ray runs (a private one, a share of this machine,
a cluster), the cluster address checks, and the Ray node id in train metrics; the CLI's
--ray-address and --parallel refusals (one line, exit 2, nothing started)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
from flwr.app import MetricRecord, RecordDict

from fl import contract
from fl.cli import main
from fl.scaleout import (
    RayTarget,
    address_problem,
    current_ray_node,
    local_shares,
    machine_resources,
    node_label,
    node_number,
    reachable_problem,
    resolve_address,
)
from fl.simulation import federation_config
from server.rounds import ray_nodes_of

FED = {"num-supernodes": 5, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.25}


def test_the_default_target_changes_nothing():
    assert RayTarget().federation(FED) == FED


def test_a_share_of_this_machine_sizes_the_private_ray():
    out = RayTarget(num_cpus=3, num_gpus=1).federation(FED)
    assert out == {**FED, "init-args-num-cpus": 3, "init-args-num-gpus": 1}
    # never smaller than one client: a Ray of 1 CPU could place no client of 2
    two = RayTarget(num_cpus=1, num_gpus=0).federation({**FED, "client-resources-num-cpus": 2})
    assert two["init-args-num-cpus"] == 2 and two["init-args-num-gpus"] == 0


def test_a_cluster_is_joined_unsized():  # Ray refuses num_cpus/num_gpus when joining
    assert RayTarget(address="10.0.0.5:6379").federation(FED) == FED
    assert RayTarget(address="10.0.0.5:6379", num_cpus=2).federation(FED) == FED


def test_federation_config_is_extended_not_replaced():
    from fl.config import load

    cfg = load(None, ["partition.num_clients=4", "resources.client_cpus=2"])
    out = RayTarget(num_cpus=1, num_gpus=0).federation(federation_config(cfg))
    assert out == {"num-supernodes": 4, "client-resources-num-cpus": 2,
                   "client-resources-num-gpus": 0.0, "init-args-num-cpus": 2,
                   "init-args-num-gpus": 0}


def test_environment_sets_or_removes_ray_address():
    env = {"RAY_ADDRESS": "old:1", "PATH": "/bin"}
    assert RayTarget(address="h:2").environment(env) == {"RAY_ADDRESS": "h:2", "PATH": "/bin"}
    assert RayTarget().environment(env) == {"PATH": "/bin"}
    assert RayTarget(cuda_devices="1").environment({})["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in RayTarget(num_cpus=1).environment({})


def test_resolve_address_flag_wins_then_environment():
    assert resolve_address("a:1", {"RAY_ADDRESS": "b:2"}) == ("a:1", "--ray-address")
    assert resolve_address(None, {"RAY_ADDRESS": "b:2"}) == ("b:2", "RAY_ADDRESS")
    assert resolve_address(None, {}) == (None, "")
    assert resolve_address(None, {"RAY_ADDRESS": "local"}) == (None, "")
    assert RayTarget.from_env({"RAY_ADDRESS": " b:2 "}) == RayTarget(address="b:2")


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "head-node.lan:1", "[::1]:6379",
                                     "auto"])
def test_good_addresses(address):
    assert address_problem(address) is None


@pytest.mark.parametrize("address,words", [
    ("foo", "got 'foo'; allowed: HOST:PORT"), ("h:0", "port 1..65535"),
    ("h:70000", "port 1..65535"), (":6379", "allowed: HOST:PORT"),
    ("ray://h:10001", "Ray Client address (ray://) is not supported"),
])
def test_bad_addresses_are_one_line_naming_the_source(address, words):
    problem = address_problem(address, "RAY_ADDRESS")
    assert problem.startswith("RAY_ADDRESS: ") and words in problem and "\n" not in problem


def test_reachable_problem_probes_the_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert reachable_problem(f"127.0.0.1:{port}") is None
    problem = reachable_problem(f"127.0.0.1:{port}")
    assert problem == (f"--ray-address: no Ray cluster answers at 127.0.0.1:{port} (Connection "
                       f"refused); start its head with `ray start --head --port {port}` or "
                       "give the address it printed")
    assert reachable_problem("auto") is None


def test_local_shares_divide_cpus_and_cards():
    assert local_shares(2, 2, []) == [RayTarget(num_cpus=1, num_gpus=0)] * 2
    assert local_shares(3, 2, []) == [RayTarget(num_cpus=1, num_gpus=0)] * 3  # at least 1
    four = local_shares(2, 16, ["0", "1", "2", "3"])
    assert four == [RayTarget(num_cpus=8, num_gpus=2, cuda_devices="0,1"),
                    RayTarget(num_cpus=8, num_gpus=2, cuda_devices="2,3")]
    shared = local_shares(3, 6, ["0", "1"])  # fewer cards than cells: cells share them
    assert [(t.cuda_devices, t.num_gpus) for t in shared] == [("0", 1), ("1", 1), ("0", 1)]


def test_machine_resources_honour_cuda_visible_devices():
    cpus, gpus = machine_resources({"CUDA_VISIBLE_DEVICES": "2, 3"})
    assert cpus >= 1 and gpus == ["2", "3"]
    assert machine_resources({"CUDA_VISIBLE_DEVICES": ""})[1] == []
    assert machine_resources({"CUDA_VISIBLE_DEVICES": "-1"})[1] == []


def test_node_ids_travel_as_numbers_and_come_back_as_their_digits():
    node = "37973d83d7093eb27b03524081deb7a39f6db4bc332d569dc8ce396d"
    n = node_number(node)
    assert 0 <= n < 2 ** 63  # a MetricRecord int64
    assert node_label(n) == node[:14] and node_label(float(n)) == node[:14]
    assert node_label(node_number("00000000000001ff")) == "00000000000001"
    assert current_ray_node() is None  # not under Ray here


def test_round_records_name_the_ray_nodes_of_the_replies():
    def reply(**metrics):  # only the content is read
        return SimpleNamespace(content=RecordDict({contract.METRICS: MetricRecord(
            {contract.NUM_EXAMPLES: 1, **metrics})}))

    a, b = node_number("aa" * 28), node_number("0b" * 28)
    replies = [reply(**{contract.RAY_NODE_ID: a}), reply(**{contract.RAY_NODE_ID: b}),
               reply(**{contract.RAY_NODE_ID: a}), reply()]
    assert ray_nodes_of(replies) == ["0b0b0b0b0b0b0b", "aaaaaaaaaaaaaa"]
    assert ray_nodes_of([reply()]) == []


@pytest.mark.parametrize("args,line", [
    (["run", "quickstart", "--ray-address", "nohost"],
     "bonsai: error: --ray-address: got 'nohost'; allowed: HOST:PORT"),
    (["sweep", "smoke_study", "--parallel", "0"],
     "bonsai: error: --parallel: got 0; allowed: >= 1"),
    (["sweep", "smoke_study", "--ray-address", "ray://h:1"],
     "bonsai: error: --ray-address: got 'ray://h:1'; a Ray Client address"),
    (["sweep", "smoke_study", "--parallel", "2", "--ray-address", "127.0.0.1:6379"],
     "bonsai: error: --parallel: got 2 with --ray-address 127.0.0.1:6379; allowed: 1 with a "
     "Ray cluster (Flower sizes each simulation's actor pool to the whole cluster"),
])
def test_cli_refuses_bad_scale_out_flags(tmp_path, monkeypatch, capsys, args, line):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_names_ray_address_from_the_environment(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert main(["run", "quickstart", "--set", f"output_dir={tmp_path}/out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bonsai: error: RAY_ADDRESS: no Ray cluster answers at 127.0.0.1:{port}")
    assert list(tmp_path.iterdir()) == []
