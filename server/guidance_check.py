"""The guidance-quality diagnostic, for any strategy (docs/ALGORITHMS.md §1.5).

Every ``diagnostics.guidance_every`` rounds the server removes, one at a time, a
seeded sample of ``diagnostics.guidance_units`` kept units per group from the
new global model, measures each removal's loss increase on (a seeded slice of)
its test split (the oracle, fl.pruning.oracle), and rank-correlates it with
AutoFLIP's guidance (when the strategy has one), weight magnitude and random
scores. The round record gets the mean rho over groups (``guidance_rho``,
``magnitude_rho``, ``random_rho``); ``guidance.jsonl`` in the results folder
gets every group's units, oracle costs, scores and rho.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from fl.data import Arrays
from fl.models import build_model
from fl.pruning import full_structure, groups_for, structure_from_json
from fl.pruning.oracle import SCORES, guidance_quality
from fl.sampling import round_seed
from strategies.base import BonsaiStrategy

__all__ = ["GUIDANCE_JSONL", "MAX_EXAMPLES", "GuidanceCheck"]

GUIDANCE_JSONL = "guidance.jsonl"
#: at most this many test examples (a seeded slice, the same every round) per evaluation
MAX_EXAMPLES = 1024
_SALT = 91  #: seeds of the unit samples and random scores (clients use 1000 + partition id)


class GuidanceCheck:
    """The diagnostic of one run: the model, the evaluation slice and the side file.

    Parameters
    ----------
    model_name, input_shape, num_classes : the registry model (fl.models)
    test : the server's test split
    every : check after rounds every, 2 every, ... (0: never)
    units : units sampled per group
    seed : the run's seed (the slice, the unit samples and random scores derive from it)
    run_dir : where ``guidance.jsonl`` goes
    """

    def __init__(self, model_name: str, input_shape: tuple[int, ...], num_classes: int,
                 test: Arrays, every: int, units: int, seed: int, run_dir: str | Path) -> None:
        self.every, self.units, self.seed = every, units, seed
        self.model = build_model(model_name, input_shape, num_classes)
        self.groups = groups_for(model_name, input_shape, num_classes)
        gen = torch.Generator().manual_seed(round_seed(seed, 0, salt=_SALT))
        pick = torch.randperm(len(test), generator=gen)[:MAX_EXAMPLES]
        self.x, self.y = test.x[pick], test.y[pick]
        self.path = Path(run_dir) / GUIDANCE_JSONL

    def due(self, server_round: int) -> bool:
        return self.every > 0 and server_round >= 1 and server_round % self.every == 0

    def truncate(self, last_round: int) -> None:
        """Keep the lines up to ``last_round`` (a resumed run redoes the later rounds)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("round", 0) <= last_round]
        self.path.write_text("".join(line + "\n" for line in kept))

    def __call__(self, server_round: int, arrays: ArrayRecord, strategy: BonsaiStrategy
                 ) -> dict[str, Any]:
        """Run the check on the global ``arrays``; return the round record's fields."""
        structure = strategy.structure_json()
        kept = structure_from_json(structure) if structure else full_structure(self.groups)
        guidance = strategy.guidance_scores()
        gen = torch.Generator().manual_seed(round_seed(self.seed, server_round, salt=_SALT))
        q = guidance_quality(self.model, arrays.to_torch_state_dict(), self.groups, kept,
                             self.x, self.y, units_per_group=self.units, generator=gen,
                             guidance=guidance)
        record = {f"{s}_rho": q.overall(s) for s in SCORES}
        line = {"round": server_round, "base_loss": q.base_loss, **record,
                "groups": {name: vars(g) for name, g in q.groups.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record
