"""run_simulation leaves STOPPING in the results folder whenever it is stopped, also
while its runtime is still starting (a `bonsai sweep --parallel` cell killed then):
the marker tells the ServerApp to record no further round and --resume what to redo."""

from pathlib import Path

import pytest

from fl import simulation
from fl.config import load
from fl.results import STOPPING

ROOT = Path(__file__).resolve().parent.parent


def test_stopped_while_the_runtime_starts_leaves_stopping(tmp_path, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulation.SimulationRuntime, "__enter__", interrupted)
    cfg = load(ROOT / "simulations" / "quickstart.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(KeyboardInterrupt):
        simulation.run_simulation(cfg, live=False)
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / STOPPING).is_file()
