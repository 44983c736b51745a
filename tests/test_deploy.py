"""Deployment pieces that need no running Flower: keys and their checks, command
lines, node-local data, the edge profile, and the CLI's bad-input path (one line,
exit code 2, nothing started)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.config import parse_config_args
from processes import leftovers

from fl.config import load
from fl.data import DataError, node_data
from fl.deploy import (
    DeployError,
    KeyFileError,
    SuperLinkSpec,
    SuperNodeSpec,
    check_node_key,
    check_node_tls,
    check_port_free,
    check_superlink_tls,
    connection_toml,
    make_keys,
    node_config_string,
    superlink_command,
    supernode_command,
)
from fl.node import EdgeProfile, PeakMemory

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), ["10.1.2.3", "link.example.org"], 2)


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("other"), [], 1)


def _digits_cfg(*extra: str):
    return load(None, ["dataset.name=digits", "model=cnn", "partition.num_clients=2", *extra])


def _npz(path: Path, x: np.ndarray, y: np.ndarray, **extra) -> Path:
    np.savez(path, x=x, y=y, **extra)
    return path


# --- keys ------------------------------------------------------------------------------
def test_keys_files_chain_and_flowers_own_loaders(keys):
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(keys.superlink_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)  # self-signed root
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3",
                                                                          "127.0.0.1"}
    for private in (keys.dir / "ca.key", keys.superlink_key, keys.node_key("node-0")):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # what flower-supernode and `flwr supernode register` do with the node keys
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(keys.node_pub("node-1"))
    priv = serialization.load_ssh_private_key(keys.node_key("node-1").read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    check_superlink_tls(keys.ca_cert, keys.superlink_cert, keys.superlink_key)
    check_node_tls(keys.ca_cert, "10.1.2.3", keys.superlink_cert)
    check_node_key(keys.node_key("node-0"))


def test_keys_refuse_to_overwrite_and_bad_hosts(keys, tmp_path):
    with pytest.raises(KeyFileError, match="ca.key' already exists"):
        make_keys(keys.dir, [], 1)
    with pytest.raises(KeyFileError, match="--host"):
        make_keys(tmp_path / "k", ["bad host"], 1)


def test_mismatched_and_missing_certificates_are_named(keys, other_keys, tmp_path):
    with pytest.raises(KeyFileError, match="was not issued by the CA"):
        check_superlink_tls(other_keys.ca_cert, keys.superlink_cert, keys.superlink_key)
    with pytest.raises(KeyFileError, match="does not belong to the certificate"):
        check_superlink_tls(keys.ca_cert, keys.superlink_cert, other_keys.superlink_key)
    with pytest.raises(KeyFileError, match="does not exist"):
        check_superlink_tls(tmp_path / "ca.crt", keys.superlink_cert, keys.superlink_key)
    with pytest.raises(KeyFileError, match="not a PEM certificate"):
        check_node_tls(keys.superlink_key)
    with pytest.raises(KeyFileError, match="valid for"):
        check_node_tls(keys.ca_cert, "other.example.org", keys.superlink_cert)
    with pytest.raises(KeyFileError, match="not an OpenSSH private key"):
        check_node_key(keys.superlink_key)


# --- command lines ------------------------------------------------------------------------
def test_commands_have_tls_and_node_auth_by_default(keys):
    sl = superlink_command(SuperLinkSpec(port=9100, ca_cert=str(keys.ca_cert),
                                         cert=str(keys.superlink_cert),
                                         key=str(keys.superlink_key)))
    assert "--insecure" not in sl and "--enable-supernode-auth" in sl
    assert sl[sl.index("--ssl-certfile") + 1] == str(keys.superlink_cert)
    with pytest.raises(DeployError, match="TLS needs"):
        superlink_command(SuperLinkSpec())
    loose = superlink_command(SuperLinkSpec(insecure=True))
    assert "--insecure" in loose and "--enable-supernode-auth" not in loose
    cfg = {"partition-id": 1, "data-path": "/data/my node.npz", "threads": 2, "device": "cpu"}
    sn = supernode_command(SuperNodeSpec("10.1.2.3:9100", root_cert=str(keys.ca_cert),
                                         auth_key=str(keys.node_key("node-1")), port=9095,
                                         node_config=cfg))
    assert sn[sn.index("--auth-supernode-private-key") + 1] == str(keys.node_key("node-1"))
    assert sn[sn.index("--port") + 1] == "9095"
    assert parse_config_args([sn[sn.index("--node-config") + 1]]) == cfg  # Flower's parser
    with pytest.raises(DeployError, match="TLS needs --ca"):
        supernode_command(SuperNodeSpec("h:1"))


@pytest.mark.parametrize("path", ['/a b/c"d.npz', "C:\\data\\n.npz", "/plain.npz"])
def test_node_config_survives_flowers_parser(path):
    cfg = {"data-path": path, "partition-id": 0}
    assert parse_config_args([node_config_string(cfg)]) == cfg


def test_connection_file_and_port_check(keys):
    text = connection_toml("x", "127.0.0.1:9100", str(keys.ca_cert))
    assert 'default = "x"' in text and "root-certificates" in text and "insecure" not in text
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DeployError, match=f"port {port} .* in use"):
            check_port_free("127.0.0.1", port, "--port")


# --- node-local data ------------------------------------------------------------------------
def test_node_reads_its_own_npz_not_a_partition(tmp_path):
    x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
    y = np.array([0, 1, 2, 3, 4, 5, 6])
    p = _npz(tmp_path / "mine.npz", x, y)
    node = node_data(_digits_cfg(), {"data-path": str(p), "partition-id": 4})
    assert node.partition_id == 4 and len(node.data) == 7
    assert torch.equal(node.data.x, torch.from_numpy(x)) and node.data.y.tolist() == y.tolist()
    assert node.input_shape == (1, 8, 8) and node.num_classes == 10  # digits' 10 classes


def test_node_data_errors_name_the_path(tmp_path):
    cfg = _digits_cfg()
    with pytest.raises(DataError, match="data-path: .* does not exist"):
        node_data(cfg, {"data-path": str(tmp_path / "nope.npz")})
    wrong = _npz(tmp_path / "rgb.npz", np.zeros((3, 3, 8, 8), np.float32), np.zeros(3, int))
    with pytest.raises(DataError, match=r"shape \(3, 8, 8\).*takes \(1, 8, 8\)"):
        node_data(cfg, {"data-path": str(wrong)})
    big = _npz(tmp_path / "big.npz", np.zeros((2, 1, 8, 8), np.float32), np.array([0, 12]))
    with pytest.raises(DataError, match="label 12"):
        node_data(cfg, {"data-path": str(big)})
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="data-path"):
        node_data(cfg, {"data-path": str(tmp_path / "junk.npz")})


def test_class_count_when_the_server_dataset_is_not_here(tmp_path):
    cfg = load(None, ["dataset.name=npz", f"dataset.path={tmp_path / 'server.npz'}",
                      "model=mlp"])
    p = _npz(tmp_path / "n.npz", np.zeros((2, 5), np.float32), np.array([0, 1]),
             num_classes=np.int64(4))
    assert node_data(cfg, {"data-path": str(p)}).num_classes == 4  # from the file
    assert node_data(cfg, {"data-path": str(p), "num-classes": 6}).num_classes == 6


def test_image_folder(tmp_path):
    from PIL import Image

    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            a = np.full((8, 8), 40 * (label + i), dtype=np.uint8)
            Image.fromarray(a, mode="L").save(tmp_path / "imgs" / name / f"{i}.png")
    cfg = _digits_cfg()
    node = node_data(cfg, {"data-path": str(tmp_path / "imgs")})
    assert node.data.y.tolist() == [0, 0, 1, 1]
    assert node.data.x.shape == (4, 1, 8, 8)
    assert torch.allclose(node.data.x[3, 0, 0, 0], torch.tensor(80 / 255))


# --- edge profile ---------------------------------------------------------------------------
def test_edge_profile_and_peak_memory(tmp_path):
    p = EdgeProfile.from_node_config({"device": "cpu", "threads": 1,
                                      "metrics-path": str(tmp_path / "m.jsonl")})
    assert (p.device, p.threads) == ("cpu", 1)
    before = torch.get_num_threads()
    try:
        assert p.apply_threads(4) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        EdgeProfile.from_node_config({"threads": 0})
    with pytest.raises(ValueError, match="device"):
        EdgeProfile.from_node_config({"device": "tpu"})
    with PeakMemory() as small:
        pass
    with PeakMemory() as big:
        t = torch.ones(64 * 2**20 // 4 * 4)  # 256 MB of float32, touched
        del t
    assert big.rss_mb - small.rss_mb > 200


def test_measured_adds_peak_memory_and_logs_on_the_node(tmp_path):
    from clients.edge import measured

    class Reply:
        def __init__(self):
            self.content = {"metrics": {"num-examples": 5, "train-seconds": 0.5}}

        def has_error(self):
            return False

    @measured
    def handler(msg, context):
        return Reply()

    log = tmp_path / "node.jsonl"
    msg = SimpleNamespace(content={"config": {"server-round": 3}},
                          metadata=SimpleNamespace(message_type="train"))
    ctx = SimpleNamespace(node_config={"metrics-path": str(log), "partition-id": 2})
    reply = handler(msg, ctx)
    assert reply.content["metrics"]["peak-memory-mb"] > 0
    import json

    (line,) = [json.loads(s) for s in log.read_text().splitlines()]
    assert line["round"] == 3 and line["partition-id"] == 2 and line["train-seconds"] == 0.5


# --- CLI bad input: one line, exit 2, nothing running ------------------------------------------
def _bonsai(*args: str) -> tuple[subprocess.CompletedProcess, str]:
    mark = uuid.uuid4().hex
    out = subprocess.run([sys.executable, "-m", "fl.cli", "deploy", *args], cwd=ROOT,
                         env={**os.environ, "BONSAI_TEST_MARK": mark}, capture_output=True,
                         text=True, timeout=120)
    return out, mark


def _one_line_exit_2(out: subprocess.CompletedProcess, mark: str, needle: str) -> None:
    assert out.returncode == 2, out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bonsai: error: "), out.stderr
    assert needle in lines[0], lines[0]
    assert leftovers(mark) == []  # nothing started


def _inproc(capsys, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """``bonsai deploy ARGS`` in this process (fast); 'nothing running' = no children."""
    from fl.cli import main
    from fl.proctree import descendants

    capsys.readouterr()
    rc = main(["deploy", *args])
    captured = capsys.readouterr()
    assert descendants(os.getpid()) == []
    return subprocess.CompletedProcess(args, rc, captured.out, captured.err), "none"


def test_cli_bad_inputs(keys, other_keys, tmp_path, capsys):
    good = _npz(tmp_path / "good.npz", np.zeros((3, 1, 8, 8), np.float32), np.array([0, 1, 2]))
    wrong = _npz(tmp_path / "wrong.npz", np.zeros((3, 64), np.float32), np.array([0, 1, 2]))
    node = ["--superlink", "127.0.0.1:9", "--keys", str(keys.dir), "--name", "node-0"]

    def check(needle: str, *args: str) -> None:
        _one_line_exit_2(*_inproc(capsys, *args), needle)

    check("does not exist", "superlink", "--keys", str(tmp_path / "none"))
    check("was not issued by the CA", "superlink", "--ca", str(other_keys.ca_cert), "--cert",
          str(keys.superlink_cert), "--key", str(keys.superlink_key))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        check("in use", "superlink", "--keys", str(keys.dir), "--host", "127.0.0.1",
              "--port", port)
        check("in use", "supernode", *node, "--data", str(good), "--port", port)
    check("does not exist", "supernode", *node, "--data", str(tmp_path / "nope.npz"))
    check("shape (64,)", "supernode", *node, "--data", str(wrong), "--experiment",
          "simulations/quickstart.yaml")
    check("not a PEM certificate", "supernode", "--superlink", "127.0.0.1:9", "--ca",
          str(keys.superlink_key), "--auth-key", str(keys.node_key("node-0")), "--data",
          str(good))
    check("no key for node-1", "local", "simulations/quickstart.yaml", "--nodes", "2",
          "--data", str(_two_nodes(tmp_path, "ok", (1, 8, 8))), "--keys", str(other_keys.dir))
    check("--nodes 3 needs 3", "local", "simulations/quickstart.yaml", "--nodes", "3",
          "--data", str(_two_nodes(tmp_path, "ok", (1, 8, 8))))
    # and once as a user runs it, in its own process
    _one_line_exit_2(*_bonsai("local", "simulations/quickstart.yaml", "--nodes", "2",
                              "--data", str(_two_nodes(tmp_path, "flat", (64,))),
                              "--set", f"output_dir={tmp_path}/r"), "shape (64,)")
    assert not (tmp_path / "r").exists()


def _two_nodes(tmp_path: Path, name: str, shape: tuple[int, ...]) -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    for i in range(2):
        _npz(d / f"n{i}.npz", np.zeros((3, *shape), np.float32), np.array([0, 1, 2]))
    return d


def test_cli_keys_and_dry_run(tmp_path):
    out, _ = _bonsai("keys", "--out", str(tmp_path / "k"), "--nodes", "2", "--host", "10.0.0.9")
    assert out.returncode == 0, out.stderr
    assert "10.0.0.9" in out.stdout and (tmp_path / "k" / "nodes" / "node-1.pub").is_file()
    data = _npz(tmp_path / "d.npz", np.zeros((3, 1, 8, 8), np.float32), np.array([0, 1, 2]))
    out, _ = _bonsai("supernode", "--superlink", "10.0.0.9:9092", "--keys", str(tmp_path / "k"),
                     "--name", "node-1", "--data", str(data), "--threads", "1", "--device",
                     "cpu", "--experiment", "simulations/quickstart.yaml", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "--auth-supernode-private-key" in out.stdout and "partition-id=1" in out.stdout
    assert "threads=1" in out.stdout and 'device="cpu"' in out.stdout


# --- a crashed node cannot hang the server -----------------------------------------------------
def test_node_guard_stops_flowers_sampler_when_too_few_nodes_remain():
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    from server.guard import NodeGuard
    from server.population import FederationError

    class FakeGrid:
        ids = [1, 2, 3]

        def get_node_ids(self):
            return list(self.ids)

    now = [0.0]

    def clock():
        now[0] += 1.5  # every look at the clock: 1.5 s later
        return now[0]

    inner = FakeGrid()
    guard = NodeGuard(inner, min_nodes=3, timeout=2.0, clock=clock)
    assert sorted(sample_nodes(guard, 3, 3)[0]) == [1, 2, 3]
    inner.ids = [1, 2]  # a node was marked offline
    with pytest.raises(FederationError, match="only 2 nodes .*min_train_clients=3"):
        sample_nodes(guard, 3, 3)  # Flower's loop would wait forever
    assert now[0] < 10


def test_server_test_split_is_the_simulation_one_and_shapes_are_known():
    from fl.data import _DIGITS_INFO, _SYNTHETIC_INFO, load_federated, load_test

    for name, info, model in (("digits", _DIGITS_INFO, "cnn"),
                              ("synthetic", _SYNTHETIC_INFO, "mlp")):
        cfg = load(None, [f"dataset.name={name}", f"model={model}", "partition.kind=iid",
                          "partition.num_clients=2", "seed=3"])
        t, fd = load_test(cfg), load_federated(cfg)
        assert torch.equal(t.test.x, fd.test.x) and torch.equal(t.test.y, fd.test.y)
        assert (t.input_shape, t.num_classes) == (fd.input_shape, fd.num_classes) == info
