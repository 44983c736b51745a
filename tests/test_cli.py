"""The ``bonsai`` entry point: every subcommand listed, and ``bonsai run`` kept small."""

import subprocess
import sys
from pathlib import Path

import pytest

from fl.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err


def assert_light_until_flower_starts(argv: list[str]) -> str:
    """Run ``bonsai ARGV`` in a fresh interpreter up to the moment the Flower runtime
    would start; assert that none of the heavy libraries were imported; its stdout."""
    code = (
        "import sys\n"
        "import fl.runtime\n"
        "def stop(self):\n    raise SystemExit(0)\n"
        "fl.runtime.SimulationRuntime.__enter__ = stop\n"
        "from fl.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'sklearn', 'flwr_datasets', 'flwr')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('light')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "light" in out.stdout
    return out.stdout


def test_run_subcommand_does_not_import_torch(tmp_path):
    """``bonsai run`` lives as long as its simulation: torch (about 200 MB) stays out of it,
    and so do the libraries that compute the data split (done in a child process)."""
    assert_light_until_flower_starts(["run", "simulations/quickstart.yaml", "--quiet",
                                      "--set", f"output_dir={tmp_path}"])
    assert [p.name for p in tmp_path.iterdir()]  # the results folder was made: it got there


def test_sweep_subcommand_does_not_import_torch(tmp_path):
    """``bonsai sweep`` runs for hours: its cells' data splits are built in a child process
    (filling the data cache), and the process itself stays free of torch."""
    study = (ROOT / "simulations" / "smoke_study.yaml").read_text()
    study = study.replace("output_dir: results/studies", f"output_dir: {tmp_path}")
    (tmp_path / "study.yaml").write_text(study)
    out = assert_light_until_flower_starts(["sweep", str(tmp_path / "study.yaml"), "--quiet"])
    assert "cell 1/6" in out


def test_wait_run_returns_when_the_summary_appears_or_flwr_exits(tmp_path):
    """The run is over once the ServerApp wrote its summary (its last act), whether or
    not ``flwr run`` has finished shutting down; without one, flwr's exit code counts."""
    from fl.simulation import wait_run

    summary = tmp_path / "summary.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        summary.write_text("{}")
        assert wait_run(sleeper, summary) is None
        assert sleeper.poll() is None  # still shutting down: the caller ends it
    finally:
        sleeper.kill()
        sleeper.wait()
    summary.unlink()
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert wait_run(failing, summary) == 3
