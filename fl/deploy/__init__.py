"""Real Flower deployment: certificates and node keys, SuperLink/SuperNode wrappers,
a loopback federation for one run.

- :mod:`~fl.deploy.keys`: CA, SuperLink certificate, SuperNode key pairs; checks
- :mod:`~fl.deploy.processes`: command lines, connection file, readiness, registration
- :mod:`~fl.deploy.local`: SuperLink + N SuperNodes on 127.0.0.1 for one run

The ClientApp side (node config keys, edge profile, peak memory) is in
:mod:`fl.node`; a node's own data in :func:`fl.nodedata.node_data`.
"""

from fl.deploy.keys import (
    KeyFileError,
    KeySet,
    add_node_key,
    backup_existing,
    cert_hosts,
    check_node_key,
    check_node_tls,
    check_superlink_tls,
    key_files,
    make_keys,
)
from fl.deploy.local import LocalFederation, LocalNode, existing_keys
from fl.deploy.processes import (
    REFUSED_EXIT_CODE,
    DeployError,
    SuperLinkSpec,
    SuperNodeSpec,
    check_port_free,
    connection_toml,
    node_config_string,
    register_node,
    superlink_command,
    supernode_command,
)

__all__ = [
    "REFUSED_EXIT_CODE",
    "DeployError",
    "KeyFileError",
    "KeySet",
    "LocalFederation",
    "LocalNode",
    "SuperLinkSpec",
    "SuperNodeSpec",
    "add_node_key",
    "backup_existing",
    "cert_hosts",
    "check_node_key",
    "check_node_tls",
    "check_port_free",
    "check_superlink_tls",
    "connection_toml",
    "existing_keys",
    "key_files",
    "make_keys",
    "node_config_string",
    "register_node",
    "superlink_command",
    "supernode_command",
]
