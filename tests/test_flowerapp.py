"""The Flower app Bonsai hands to ``flwr run``, and the shipped experiment files."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fl import catalog
from fl.config import ExperimentConfig, load
from fl.flowerapp import APP_TABLE, app_pyproject, run_config_toml, write_app

ROOT = Path(__file__).resolve().parent.parent


def test_written_app_matches_the_checkouts_flower_app(tmp_path):
    """`bonsai run` (a written app) and `flwr run .` in a checkout run the same app."""
    written = tomllib.loads((write_app(tmp_path / "app") / "pyproject.toml").read_text())
    checkout = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for key in APP_TABLE:
        assert written["tool"]["flwr"]["app"][key] == checkout["tool"]["flwr"]["app"][key], key
    assert written["project"]["name"] and written["project"]["version"]
    assert [p.name for p in (tmp_path / "app").iterdir()] == ["pyproject.toml"]


def test_app_passes_flowers_own_validation(tmp_path):
    from flwr.common.config import validate_config

    app = write_app(tmp_path / "app")
    ok, errors, _ = validate_config(tomllib.loads(app_pyproject()), check_module=True,
                                    project_dir=app)
    assert ok, errors


def test_run_config_holds_every_key_nested():
    cfg = ExperimentConfig()
    cfg.partition.alpha = 0.1
    data = tomllib.loads(run_config_toml(cfg))
    assert data["partition"]["alpha"] == 0.1 and data["rounds"] == cfg.rounds


def test_shipped_files_by_name_and_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no simulations/ folder here
    assert set(catalog.names()) >= {"quickstart", "smoke_study", "noniid_study"}
    for arg in ("quickstart", "quickstart.yaml", "simulations/quickstart.yaml"):
        assert Path(catalog.resolve(arg)).name == "quickstart.yaml"
        assert load(catalog.resolve(arg)).name == "quickstart"
    own = tmp_path / "quickstart.yaml"
    own.write_text("rounds: 3\n")
    assert catalog.resolve("quickstart.yaml") == "quickstart.yaml"  # a path wins
    with pytest.raises(catalog.CatalogError, match="'nope' does not exist and is not a "
                                                  "shipped name; shipped: .*quickstart"):
        catalog.resolve("nope")


def test_copy_to_never_overwrites(tmp_path):
    copied = catalog.copy_to(tmp_path / "mine")
    assert sorted(p.name for p in copied) == sorted(f"{n}.yaml" for n in catalog.names())
    for p in copied:
        assert p.read_bytes() == catalog.shipped()[p.stem].read_bytes()
    (tmp_path / "mine" / "quickstart.yaml").write_text("rounds: 3\n")
    with pytest.raises(catalog.CatalogError, match="already exists"):
        catalog.copy_to(tmp_path / "mine")
    assert (tmp_path / "mine" / "quickstart.yaml").read_text() == "rounds: 3\n"
    (tmp_path / "file").write_text("")
    with pytest.raises(catalog.CatalogError, match="is a file"):
        catalog.copy_to(tmp_path / "file")
