"""Thin, checked wrappers over ``flower-superlink``, ``flower-supernode`` and the
``flwr`` CLI: command lines, the CLI's connection file, readiness, registration.

Every builder is a pure function of its arguments (so tests and ``--dry-run``
can show the exact command); a :class:`fl.procgroup.ProcessGroup` starts them as
our children and ends them (and whatever they spawned) by PID, also when this
process dies first.

Flower 1.42 facts this relies on (docs/ARCHITECTURE.md, Deployment):
- the SuperLink serves nodes, the ``flwr`` CLI and the ServerApp on one port;
  ``/health`` answers there (HTTPS when TLS is on);
- a SuperNode's own API port (``--port``) must differ per node on one host;
- an unregistered SuperNode exits with code 305 when auth is on.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl import interrupts
from fl.procgroup import ProcessGroup
from fl.proctree import MARKER_ENV
from fl.runtime import FLOWER_ENV, flower_bin, toml_value

__all__ = [
    "REFUSED_EXIT_CODE",
    "DeployError",
    "SuperLinkSpec",
    "SuperNodeSpec",
    "check_port_free",
    "connection_toml",
    "flower_env",
    "node_config_string",
    "register_node",
    "run_foreground",
    "superlink_command",
    "supernode_command",
    "wait_node",
    "wait_superlink",
]

#: flower-supernode's exit code when the SuperLink refuses it (e.g. unregistered key)
REFUSED_EXIT_CODE = 305
DEFAULT_SUPERLINK_PORT = 8000
DEFAULT_NODE_PORT = 9094


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and what to check."""


@dataclass(frozen=True)
class SuperLinkSpec:
    """How to start a SuperLink.

    TLS (``ca_cert``, ``cert``, ``key``) and SuperNode authentication are on
    unless ``insecure`` (loopback tests only: no TLS, hence no node auth).
    """

    host: str = "0.0.0.0"
    port: int = DEFAULT_SUPERLINK_PORT
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    node_auth: bool = True
    insecure: bool = False
    database: str | None = None  #: persist state (registered nodes, runs) in this file


@dataclass(frozen=True)
class SuperNodeSpec:
    """How to start a SuperNode: where its SuperLink is, its key and its node config."""

    superlink: str  #: host:port
    root_cert: str | None = None
    auth_key: str | None = None
    port: int = DEFAULT_NODE_PORT
    node_config: Mapping[str, Any] = field(default_factory=dict)
    insecure: bool = False
    max_wait: float | None = None  #: give up connecting after this many seconds


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    """The ``flower-superlink`` command line for ``spec``."""
    cmd = [flower_bin("flower-superlink"), "--host", spec.host, "--port", str(spec.port),
           "--isolation", "subprocess", "--disable-runtime-dependency-installation"]
    if spec.insecure:
        cmd.append("--insecure")
    else:
        if not (spec.ca_cert and spec.cert and spec.key):
            raise DeployError("TLS needs --ca, --cert and --key (create them with "
                              "`bonsai deploy keys`), or --insecure for a loopback test")
        cmd += ["--ssl-ca-certfile", spec.ca_cert, "--ssl-certfile", spec.cert,
                "--ssl-keyfile", spec.key]
        if spec.node_auth:
            cmd.append("--enable-supernode-auth")
    if spec.database:
        cmd += ["--database", spec.database]
    return cmd


def _node_value(key: str, v: Any) -> str:
    if not isinstance(v, str):
        return toml_value(v)
    # Flower splits --node-config with a regex that knows no escapes: quote without them
    if '"' not in v and "\\" not in v:
        return f'"{v}"'
    if "'" not in v:
        return f"'{v}'"
    raise DeployError(f"node config {key}: {v!r} holds both quote characters; Flower's "
                      "--node-config cannot carry it (rename the path)")


def node_config_string(node_config: Mapping[str, Any]) -> str:
    """``{"data-path": "/d.npz", "partition-id": 0}`` -> ``data-path="/d.npz" partition-id=0``."""
    for k in node_config:
        if not k or any(c.isspace() or c == "=" for c in k):
            raise DeployError(f"node config: {k!r} is not a valid key")
    return " ".join(f"{k}={_node_value(k, v)}" for k, v in node_config.items())


def supernode_command(spec: SuperNodeSpec) -> list[str]:
    """The ``flower-supernode`` command line for ``spec``."""
    cmd = [flower_bin("flower-supernode"), "--superlink", spec.superlink, "--port", str(spec.port),
           "--isolation", "subprocess"]
    if spec.insecure:
        cmd.append("--insecure")
    else:
        if not spec.root_cert:
            raise DeployError("TLS needs --ca (the CA certificate that signed the SuperLink's), "
                              "or --insecure for a loopback test")
        cmd += ["--root-certificates", spec.root_cert]
        if spec.auth_key:
            cmd += ["--auth-supernode-private-key", spec.auth_key]
    if spec.node_config:
        cmd += ["--node-config", node_config_string(spec.node_config)]
    if spec.max_wait is not None:
        cmd += ["--max-wait-time", str(spec.max_wait)]
    return cmd


def connection_toml(name: str, address: str, root_cert: str | None,
                    insecure: bool = False, default: bool = True) -> str:
    """A ``$FLWR_HOME/config.toml`` with one SuperLink connection for the ``flwr`` CLI."""
    head = f'[superlink]\ndefault = "{name}"\n\n' if default else ""
    body = f'[superlink.{name}]\naddress = {toml_value(address)}\n'
    if insecure:
        body += "insecure = true\n"
    elif root_cert:
        body += f"root-certificates = {toml_value(str(Path(root_cert).resolve()))}\n"
    return head + body


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise DeployError when ``host:port`` cannot be bound (in use, or not our address)."""
    bind = "" if host in ("0.0.0.0", "::") else host
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError as e:
            reason = "is in use" if e.errno == 98 else f"cannot be used ({e.strerror})"
            raise DeployError(f"{what}: port {port} on {host or '0.0.0.0'} {reason}; choose "
                              "another port") from None


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def wait_superlink(proc: subprocess.Popen, address: str, ca_cert: str | None, log: Path,
                   timeout: float = 60.0) -> None:
    """Wait until the SuperLink's ``/health`` answers (HTTPS verified with ``ca_cert``)."""
    import httpx

    scheme = "https" if ca_cert else "http"
    url = f"{scheme}://{address}/health"
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_cert) if ca_cert else True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"flower-superlink exited with code {proc.returncode}; last lines "
                              f"of {log}:\n{_log_tail(log)}")
        try:
            if httpx.get(url, timeout=1.0, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise DeployError(f"flower-superlink did not answer {url} within {timeout:.0f} s; see {log}")


def wait_node(proc: subprocess.Popen, log: Path, timeout: float = 60.0,
              since: int = 0) -> int | None:
    """Wait until a SuperNode reports its node id (connected); return it.

    Reads ``log`` from byte ``since`` on (a restarted node appends to its old log).
    Returns None when the node exited with :data:`REFUSED_EXIT_CODE` (the
    SuperLink refused it); raises DeployError on any other exit or a timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (log.read_bytes()[since:].decode(errors="replace") if log.exists() else "")
        for line in text.splitlines():
            if "SuperNode ID:" in line:
                return int(line.rsplit(":", 1)[1].strip())
        if proc.poll() is not None:
            if proc.returncode == REFUSED_EXIT_CODE or "Exit Code: 305" in text:
                return None
            raise DeployError(f"flower-supernode exited with code {proc.returncode}; last lines "
                              f"of {log}:\n{_log_tail(log)}")
        time.sleep(0.2)
    raise DeployError(f"flower-supernode did not connect within {timeout:.0f} s; see {log}")


def register_node(public_key: str | Path, connection: str, env: Mapping[str, str],
                  name: str | None = None, timeout: float = 60.0) -> int:
    """``flwr supernode register KEY.pub CONNECTION``; return the new node id."""
    cmd = [flower_bin("flwr"), "supernode", "register", str(public_key), connection,
           "--format", "json"]
    if name:
        cmd += ["--name", name]
    try:
        out = subprocess.run(cmd, env=dict(env), capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeployError(f"`flwr supernode register {public_key}` did not finish within "
                          f"{timeout:.0f} s") from None
    text = out.stdout.strip()
    start = text.rfind("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if out.returncode != 0 or not data.get("success"):
        msg = data.get("error-message") or (out.stderr or text).strip().splitlines()[-1:]
        raise DeployError(f"registering {public_key} failed: {msg}")
    return int(data["node-id"])


def flower_env(marker: str | None = None) -> dict[str, str]:
    """This environment plus Flower's offline settings (fl.runtime.FLOWER_ENV) and, when
    given, the marker every child inherits (fl.proctree)."""
    env = {**os.environ, **FLOWER_ENV}
    if marker:
        env[MARKER_ENV] = marker
    return env


def run_foreground(name: str, cmd: Sequence[str], env: Mapping[str, str],
                   cwd: str | None = None, remove: Sequence[str | Path] = ()) -> int:
    """Run a Flower process in the foreground (its log on our stdout/stderr) and return its
    exit code. Ctrl-C or SIGTERM ends it and its children (KeyboardInterrupt is raised
    after they are gone), and so does a watchdog when this process is killed (it then
    removes ``remove``); raises TeardownFailure when a process survived."""
    interrupts.install()
    procs = ProcessGroup(env, env.get(MARKER_ENV), remove=remove)
    try:
        return procs.start(name, cmd, None, cwd=cwd).wait()
    finally:
        procs.close()
