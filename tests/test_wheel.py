"""Bonsai as an installed package: the wheel, installed into a new virtual
environment, runs its commands from an empty directory far from any checkout.

The venv is made with ``--system-site-packages`` (less the setuptools it bundles)
and the wheel installed with ``--no-deps``: the venv sees this environment's
site-packages for the dependencies (torch, Flower, Ray: reinstalling gigabytes per
test run would not fit the suite's time), and ``pip check`` there confirms that
their versions satisfy the ranges the wheel declares. It sees nothing of the
checkout: the checkout's editable-install finder is removed at start-up (a
``sitecustomize`` in the venv), so every ``import fl``, ``server``, ``clients`` ...
comes from the wheel, and Flower's own commands run with the venv's interpreter
(console scripts written into the venv, first on PATH), which is what each Flower
process (SuperLink, SuperExec, ServerApp, ClientApps, Ray's workers) then starts
with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from importlib import metadata
from pathlib import Path

import pytest
from processes import MARK_ENV, wait_gone

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fl", "clients", "server", "strategies", "protos", "simulations")
pytestmark = pytest.mark.slow

SITECUSTOMIZE = """\
# test_wheel.py: hide the checkout's editable install from this venv
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p.rstrip("/") != {root!r}]
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding the freshly built wheel (no checkout on its path)."""
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "results", ".venv", ".whl",
        ".pytest_cache", ".ruff_cache", ".hypothesis"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("bonsai_fl-*.whl"))
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)],
                   check=True, timeout=300)
    py = env_dir / "bin" / "python"
    # venv's own setuptools (the old one ensurepip bundles) would shadow this environment's,
    # which torch and grpcio-tools require (>= 77, pip check): the venv uses this one's
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], check=True,
                   capture_output=True, timeout=300)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "sitecustomize.py").write_text(SITECUSTOMIZE.format(root=str(ROOT)))
    install = subprocess.run([py, "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    # Flower's commands with this venv's interpreter (pip would write the same shims)
    for ep in metadata.distribution("flwr").entry_points:
        if ep.group == "console_scripts":
            script = env_dir / "bin" / ep.name
            module, _, attr = ep.value.partition(":")
            script.write_text(f"#!{py}\nimport sys\nfrom {module} import {attr}\n"
                              f"sys.exit({attr}())\n")
            script.chmod(0o755)
    return env_dir


def _env(venv: Path, mark: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env[MARK_ENV] = mark
    return env


def _bonsai(venv: Path, cwd: Path, *args: str, timeout: float = 400) -> str:
    mark = uuid.uuid4().hex
    out = subprocess.run([str(venv / "bin" / "bonsai"), *args], cwd=cwd, env=_env(venv, mark),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"bonsai {' '.join(args)}:\n{out.stdout[-2000:]}\n" \
                                f"{out.stderr[-3000:]}"
    assert not (left := wait_gone(mark)), left
    return out.stdout


def test_wheel_holds_every_package_and_the_shipped_files(venv):
    code = textwrap.dedent(f"""
        import importlib, json
        from fl import catalog
        print(json.dumps({{"files": {{p: importlib.import_module(p).__file__
                                      for p in {PACKAGES!r}}},
                          "shipped": catalog.names()}}))
    """)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, cwd=venv.parent, check=True)
    found = json.loads(out.stdout)
    purelib = sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"]
    for pkg, file in found["files"].items():
        assert file.startswith(purelib), f"{pkg} imported from {file}, not the wheel"
    assert {"quickstart", "smoke_study", "noniid_study"} <= set(found["shipped"])


def test_the_installed_versions_satisfy_the_wheels_dependency_ranges(venv):
    """The wheel went in with --no-deps: pip check verifies every requirement it
    declares (and those of everything else the venv sees) is installed in range."""
    check = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"],
                           capture_output=True, text=True, cwd=venv.parent, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]


def test_init_copies_the_shipped_files_into_an_empty_directory(venv, tmp_path):
    _bonsai(venv, tmp_path, "init", "mine")
    shipped = sorted((ROOT / "simulations").glob("*.yaml"))
    copied = sorted((tmp_path / "mine").iterdir())
    assert [p.name for p in copied] == [p.name for p in shipped]
    assert all(c.read_bytes() == s.read_bytes() for c, s in zip(copied, shipped))


def test_run_sweep_export_and_deploy_local_from_an_empty_directory(venv, tmp_path):
    """The commands a user of the package types, from a folder with no Bonsai files."""
    work = tmp_path / "work"
    work.mkdir()
    out = _bonsai(venv, work, "run", "quickstart", "--quiet", "--set", "rounds=2",
                  "--set", "partition.num_clients=4")
    (run_dir,) = (work / "results").iterdir()  # results under the current directory
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and str(run_dir) in out
    assert (run_dir / "structure.json").is_file()  # AutoFLIP pruned the model
    _bonsai(venv, work, "export", str(run_dir), "--format", "torchscript", "--runs", "3")
    assert (run_dir / "model.torchscript.pt").is_file()
    # a study by name: the shipped smoke study, one of its cells
    dry = _bonsai(venv, work, "sweep", "smoke_study", "--dry-run")
    assert "6 pending" in dry
    (work / "mini.yaml").write_text(textwrap.dedent("""\
        # bonsai sweep mini.yaml
        name: mini
        output_dir: studies
        base: {rounds: 1, partition: {num_clients: 3}, strategy: {name: fedavg}}
        grid:
          seed: [0]
    """))
    _bonsai(venv, work, "sweep", "mini.yaml", "--quiet")
    assert (work / "studies" / "mini" / "seed=0" / "summary.json").is_file()
    # a deployment on loopback: TLS, node authentication, two SuperNodes
    _bonsai(venv, work, "deploy", "split", "quickstart", "--out", "nodes",
            "--set", "partition.num_clients=2")
    _bonsai(venv, work, "deploy", "local", "quickstart", "--nodes", "2", "--data", "nodes",
            "--quiet", "--set", "rounds=1", "--set", "name=edge",
            "--set", "strategy.name=fedavg")  # no exploration: one message wave fewer
    (edge,) = (work / "results").glob("edge-*")
    assert json.loads((edge / "summary.json").read_text())["rounds"] == 1
    assert not list(Path(venv).rglob("results"))  # nothing was written into the venv
