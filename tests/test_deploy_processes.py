"""fl.deploy.processes: the Flower command lines (TLS and node auth by default), the
node-config string Flower parses, the connection file and the port check."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fl.deploy import (
    DeployError,
    SuperLinkSpec,
    SuperNodeSpec,
    check_port_free,
    connection_toml,
    node_config_string,
    superlink_command,
    supernode_command,
)

ROOT = Path(__file__).resolve().parent.parent


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
