"""The Flower app that ``flwr run`` is given, and the run-config file it reads.

``flwr run DIR`` builds a Flower App Bundle from ``DIR/pyproject.toml`` (its
``[tool.flwr.app]`` table: publisher, components and the run-config defaults) and
the code files beside it, and every Flower process then loads the components by
import. Bonsai's components (``server.app:app``, ``clients.app:app``) are part of
the installed package, a wheel or an editable checkout alike, so the app folder
needs nothing but that pyproject.toml: :func:`write_app` writes one into a run's
private folder from the package's metadata and the experiment schema's defaults
(:mod:`fl.config`). No run depends on a checkout, on the current directory or on
a writable site-packages; a deployment ships a bundle of one small file and each
SuperNode runs the code of the Bonsai it has installed.

The checkout's own pyproject.toml carries the same ``[tool.flwr.app]`` table, so
``flwr run .`` works there too (tests/test_flowerapp.py keeps the two in step).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import tomli_w

from fl.config import ExperimentConfig, to_flat
from fl.dotted import nest

__all__ = ["APP_TABLE", "COMPONENTS", "PUBLISHER", "app_pyproject",
           "run_config_toml", "write_app", "write_run_config"]

PUBLISHER = "bonsai"
COMPONENTS = {"serverapp": "server.app:app", "clientapp": "clients.app:app"}
DISTRIBUTION = "bonsai-fl"
#: keys of the app's ``[tool.flwr.app]`` table that :func:`app_pyproject` writes
APP_TABLE = ("publisher", "components", "config")


def _version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "0.0.0"


def app_pyproject() -> str:
    """The pyproject.toml of Bonsai's Flower app (TOML text)."""
    return tomli_w.dumps({
        "project": {
            "name": PUBLISHER, "version": _version(), "license": "Apache-2.0",
            "description": "Bonsai: AutoFLIP and FedLD on Flower (components from the "
                           f"installed {DISTRIBUTION} package)",
        },
        "tool": {"flwr": {"app": {
            "publisher": PUBLISHER,
            "components": dict(COMPONENTS),
            "config": nest(to_flat(ExperimentConfig())),
        }}},
    })


def write_app(folder: str | Path) -> Path:
    """Write the Flower app into ``folder`` (created); return it, for ``flwr run``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(app_pyproject())
    return folder


def run_config_toml(cfg: ExperimentConfig) -> str:
    """``cfg`` as the TOML file ``flwr run --run-config`` reads (every key, nested)."""
    return tomli_w.dumps(nest(to_flat(cfg)))


def write_run_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write :func:`run_config_toml` of ``cfg`` to ``path``; return the path."""
    path = Path(path)
    path.write_text(run_config_toml(cfg))
    return path
