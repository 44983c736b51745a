"""Talking to a running SuperLink: register SuperNode keys, run an experiment on it.

Both go through the ``flwr`` CLI with a private FLWR_HOME holding one connection
(:func:`fl.deploy.processes.connection_toml`): TLS verified with the CA, or
``insecure`` for loopback tests. The ServerApp of ``run_experiment`` runs on the
SuperLink's machine, so the experiment's ``output_dir`` is a path there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fl.config import ExperimentConfig
from fl.deploy.processes import connection_toml, flower_env, register_node, run_foreground
from fl.flowerapp import write_app, write_run_config
from fl.results import RUN_CONFIG_TOML
from fl.runtime import flower_bin

__all__ = ["register_keys", "run_experiment"]

CONNECTION = "target"


@contextmanager
def _home(address: str, ca: str | None, insecure: bool) -> Iterator[Path]:
    """A private FLWR_HOME whose one connection is ``address``."""
    with tempfile.TemporaryDirectory(prefix="bonsai-remote-", ignore_cleanup_errors=True) as h:
        home = Path(h)
        (home / "config.toml").write_text(connection_toml(CONNECTION, address, ca,
                                                          insecure=insecure))
        yield home


def register_keys(public_keys: Sequence[str], address: str, ca: str | None,
                  insecure: bool = False) -> Iterator[tuple[str, str, int]]:
    """``flwr supernode register`` each key with the SuperLink at ``address``; yields
    (name, key path, node id) as each is registered (DeployError on a refusal)."""
    with _home(address, ca, insecure) as home:
        env = {**flower_env(), "FLWR_HOME": str(home)}
        for pub in public_keys:
            name = Path(pub).name.removesuffix(".pub")
            yield name, pub, register_node(pub, CONNECTION, env, name=name)


def run_experiment(cfg: ExperimentConfig, address: str, ca: str | None,
                   insecure: bool = False) -> int:
    """``flwr run`` of ``cfg`` on the SuperLink at ``address`` in the foreground
    (Flower's log streams to our stdout); returns its exit code."""
    with _home(address, ca, insecure) as home:
        run_config = write_run_config(cfg, home / RUN_CONFIG_TOML)
        app = write_app(home / "app")
        cmd = [flower_bin("flwr"), "run", str(app), CONNECTION, "--stream",
               "--run-config", str(run_config)]
        env = {**flower_env(os.urandom(8).hex()), "FLWR_HOME": str(home)}
        return run_foreground("flwr-run", cmd, env, cwd=str(app), remove=(str(home),))
