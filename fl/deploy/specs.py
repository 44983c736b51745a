"""What each deployment command starts, checked before anything starts.

The ``bonsai deploy superlink|supernode|register|run`` commands take certificate
and key files, addresses, ports and a node's data; every problem with them is a
:class:`~fl.deploy.processes.DeployError` or :class:`~fl.deploy.keys.KeyFileError`
(one line, exit code 2 in the CLI) raised here, before a process is started,
instead of a gRPC handshake failure minutes later.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fl.config import ExperimentConfig, shown
from fl.data import check_model_fit
from fl.deploy.keys import (
    CA_CERT,
    NODES_DIR,
    SL_CERT,
    SL_KEY,
    check_node_key,
    check_node_tls,
    check_superlink_tls,
)
from fl.deploy.processes import DeployError, SuperLinkSpec, SuperNodeSpec, check_port_free
from fl.node import DATA_PATH, DEVICE, METRICS_PATH, NUM_CLASSES, PARTITION_ID, THREADS
from fl.nodedata import node_data
from fl.userdata import load_local

__all__ = ["check_address", "check_port", "client_ca", "default_partition_id", "key_file",
           "superlink_spec", "supernode_spec"]


def check_port(port: int, flag: str = "--port") -> None:
    """A TCP port: 1..65535."""
    if not 1 <= port <= 65535:
        raise DeployError(f"{flag}: got {port}; allowed: 1..65535")


def check_address(text: str, flag: str = "--superlink") -> None:
    """``HOST:PORT`` (``[::1]:9092`` for IPv6) with PORT in 1..65535."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DeployError(f"{flag}: got {shown(text)}; expected HOST:PORT with PORT in "
                          "1..65535")


def key_file(explicit: str | None, keys_dir: str | None, name: str) -> str | None:
    """A certificate or key given by its own flag, else ``keys_dir/name``, else None."""
    if explicit:
        return str(Path(explicit).expanduser())
    if keys_dir:
        return str(Path(keys_dir).expanduser() / name)
    return None


def client_ca(ca: str | None, keys_dir: str | None, insecure: bool) -> str | None:
    """The CA certificate a client of the SuperLink (a SuperNode, the ``flwr`` CLI)
    verifies it with, checked; None with ``insecure`` (loopback tests only)."""
    if insecure:
        return None
    path = key_file(ca, keys_dir, CA_CERT)
    if not path:
        raise DeployError("--keys or --ca is required (the CA that signed the SuperLink's "
                          "certificate); --insecure only for loopback tests")
    check_node_tls(path)
    return path


def superlink_spec(*, host: str, port: int, keys_dir: str | None = None,
                   ca: str | None = None, cert: str | None = None, key: str | None = None,
                   insecure: bool = False, node_auth: bool = True,
                   database: str | None = None) -> SuperLinkSpec:
    """A SuperLink on ``host:port`` with TLS from ``keys_dir`` (or the explicit files)
    and SuperNode authentication; the port must be free here."""
    check_port(port)
    if insecure:
        spec = SuperLinkSpec(host=host, port=port, insecure=True, database=database)
    else:
        ca_path, cert_path, key_path = (key_file(ca, keys_dir, CA_CERT),
                                        key_file(cert, keys_dir, SL_CERT),
                                        key_file(key, keys_dir, SL_KEY))
        if not (ca_path and cert_path and key_path):
            raise DeployError("--keys (or --ca, --cert and --key) is required for TLS; create "
                              "them with `bonsai deploy keys --out DIR --host HOST`")
        check_superlink_tls(ca_path, cert_path, key_path)
        spec = SuperLinkSpec(host=host, port=port, ca_cert=ca_path, cert=cert_path,
                             key=key_path, node_auth=node_auth, database=database)
    check_port_free(spec.host, spec.port, "--port")
    return spec


def default_partition_id(key_path: str | None) -> int:
    """``node-3`` -> 3: a node's place in the population order from its key name."""
    m = re.search(r"(\d+)$", Path(key_path).name) if key_path else None
    return int(m.group(1)) if m else 0


def supernode_spec(*, superlink: str, data: str, port: int, keys_dir: str | None = None,
                   name: str | None = None, auth_key: str | None = None,
                   ca: str | None = None, insecure: bool = False,
                   partition_id: int | None = None, num_classes: int | None = None,
                   device: str | None = None, threads: int | None = None,
                   metrics_file: str | None = None,
                   experiment: ExperimentConfig | None = None) -> SuperNodeSpec:
    """A SuperNode on this machine training on its own ``data`` (an .npz or image
    folder), authenticated by its key; with ``experiment`` the data is checked
    against that experiment's model before it connects."""
    check_port(port)
    check_address(superlink)
    if threads is not None and threads < 1:
        raise DeployError(f"--threads: got {threads}; allowed: >= 1")
    data = str(Path(data).expanduser().resolve())
    key = None
    if auth_key:
        key = str(Path(auth_key).expanduser())
    elif keys_dir and not insecure:
        key = str(Path(keys_dir).expanduser() / NODES_DIR / (name or "node-0"))
    pid = partition_id if partition_id is not None else default_partition_id(key or name)
    node_config: dict[str, Any] = {PARTITION_ID: pid, DATA_PATH: data}
    for value, key_name in ((num_classes, NUM_CLASSES), (device, DEVICE), (threads, THREADS)):
        if value is not None:
            node_config[key_name] = value
    if metrics_file:
        node_config[METRICS_PATH] = str(Path(metrics_file).expanduser().resolve())
    if experiment is not None:  # the data exists, loads and fits the experiment's model
        node = node_data(experiment, node_config)
        check_model_fit(experiment.model, node.input_shape, node.num_classes,
                        f"data-path: {data!r}")
    else:
        load_local(data)
    root_cert = client_ca(ca, keys_dir, insecure)
    if not insecure:
        if key is None:
            raise DeployError("--keys with --name, or --auth-key, is required: the SuperLink "
                              "authenticates nodes by their key")
        check_node_key(key)
    check_port_free("127.0.0.1", port, "--port")
    return SuperNodeSpec(superlink=superlink, root_cert=root_cert, auth_key=key, port=port,
                         node_config=node_config, insecure=insecure)
