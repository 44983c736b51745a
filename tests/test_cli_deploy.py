"""``bonsai deploy ...`` (fl/cli/deploy.py): every bad input is one line and exit code 2
with nothing started; keys and dry runs print what they do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
from datafiles import write_npz
from processes import leftovers

ROOT = Path(__file__).resolve().parent.parent


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
    good = write_npz(tmp_path / "good.npz", np.zeros((3, 1, 8, 8), np.float32), np.array([0, 1, 2]))
    wrong = write_npz(tmp_path / "wrong.npz", np.zeros((3, 64), np.float32), np.array([0, 1, 2]))
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
        write_npz(d / f"n{i}.npz", np.zeros((3, *shape), np.float32), np.array([0, 1, 2]))
    return d


def test_cli_keys_and_dry_run(tmp_path):
    out, _ = _bonsai("keys", "--out", str(tmp_path / "k"), "--nodes", "2", "--host", "10.0.0.9")
    assert out.returncode == 0, out.stderr
    assert "10.0.0.9" in out.stdout and (tmp_path / "k" / "nodes" / "node-1.pub").is_file()
    data = write_npz(tmp_path / "d.npz", np.zeros((3, 1, 8, 8), np.float32), np.array([0, 1, 2]))
    out, _ = _bonsai("supernode", "--superlink", "10.0.0.9:9092", "--keys", str(tmp_path / "k"),
                     "--name", "node-1", "--data", str(data), "--threads", "1", "--device",
                     "cpu", "--experiment", "simulations/quickstart.yaml", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "--auth-supernode-private-key" in out.stdout and "partition-id=1" in out.stdout
    assert "threads=1" in out.stdout and 'device="cpu"' in out.stdout
