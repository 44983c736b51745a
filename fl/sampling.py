"""Seeded client sampling: a pure function of (seed, round).

Flower's ``sample_nodes`` draws from the unseeded ``random`` module and node
ids change every run, so the platform samples positions in a population that
the server orders by each node's partition id. Same seed, same round, same
population -> same clients, also after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def round_seed(seed: int, server_round: int, salt: int = 0) -> int:
    """A 63-bit seed derived from (seed, round, salt) (numpy SeedSequence)."""
    ss = np.random.SeedSequence([int(seed), int(server_round), int(salt)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def sample_clients(
    population: Sequence[int], fraction: float, min_clients: int, seed: int, server_round: int,
    salt: int = 0,
) -> list[int]:
    """``max(min_clients, int(len * fraction))`` members of ``population`` (in population order).

    ``salt`` separates independent draws of the same round (training vs
    evaluation). Raises ValueError when the population is smaller than ``min_clients``.
    """
    n = len(population)
    k = max(min_clients, int(n * fraction))
    if k > n:
        raise ValueError(f"sampling: need {k} clients, only {n} are connected")
    rng = np.random.default_rng(round_seed(seed, server_round, salt))
    chosen = np.sort(rng.choice(n, size=k, replace=False))
    return [population[i] for i in chosen]
