"""AutoFLIP: federated hybrid pruning guided by loss-landscape exploration.

Interno et al., "Federated Hybrid Model Pruning through Loss Landscape
Exploration", arXiv 2405.10271, as specified in docs/ALGORITHMS.md §1 (which
adds structured pruning and physical shrinking; the public reference code has
neither and its masking never activates). This module holds the one thing
AutoFLIP adds to a pruned strategy: the exploration phase before round 1 (§1.1),
whose squared deviations become the guidance
(strategies.mask_policy.AutoFLIPPolicy, fl.pruning.guidance). The mask rule is
fl.pruning.plan_masks; the wire and aggregation strategies.sparse.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl import contract, wire
from fl.config import PruningConfig
from fl.sampling import sample_clients
from strategies.base import PhaseCost
from strategies.mask_policy import AutoFLIPPolicy
from strategies.pruned import PrunedStrategy
from strategies.sparse import ModelSpec, ServerRule

__all__ = ["AutoFLIP"]

_EXPLORE_SALT = 2  #: sampling salt of the explorers (training uses 0, evaluation 1)


class AutoFLIP(PrunedStrategy):
    """AutoFLIP around ``rule`` (weighted mean, or FedLD's principal gradient).

    Parameters are those of :class:`~strategies.pruned.PrunedStrategy` less
    ``policy``; ``pruning.explore_fraction`` and ``pruning.explore_epochs`` set
    the exploration phase.
    """

    policy: AutoFLIPPolicy

    def __init__(self, *, model: ModelSpec, initial_state: Mapping[str, torch.Tensor],
                 pruning: PruningConfig, rule: ServerRule | None = None,
                 min_train_nodes: int = 2, seed: int = 0, sample_fraction: float = 1.0,
                 evaluate_fraction: float = 0.0) -> None:
        super().__init__(model=model, initial_state=initial_state, pruning=pruning,
                         policy=AutoFLIPPolicy.name, rule=rule, min_train_nodes=min_train_nodes,
                         seed=seed, sample_fraction=sample_fraction,
                         evaluate_fraction=evaluate_fraction)

    def prepare(self, grid: Grid, timeout: float) -> PhaseCost:
        """Exploration (docs/ALGORITHMS.md §1.1): the sampled explorers train theta_0 for
        ``explore_epochs`` and reply (theta_k - theta_0)^2 of every prunable weight; the
        example-weighted mean, min-max scaled per tensor, is the guidance. Skipped when
        the guidance exists (a resumed run). Returns what it cost."""
        if self.policy.guidance is not None:
            return PhaseCost()
        explorers = sample_clients(self.population, self.pruning.explore_fraction, 1,
                                   self.seed, 0, _EXPLORE_SALT)
        config = ConfigRecord({contract.LOCAL_EPOCHS: self.pruning.explore_epochs,
                               contract.SERVER_ROUND: 0})
        content = RecordDict({contract.PAYLOAD: wire.to_record(self.payload(send_mask=True)),
                              contract.CONFIG: config})
        kind = f"{MessageType.TRAIN}.{contract.EXPLORE_ACTION}"
        msgs = [Message(content, dst_node_id=n, message_type=kind) for n in explorers]
        replies = self.order(grid.send_and_receive(msgs, timeout=timeout))
        down = wire.message_nbytes(content) * len(msgs)
        up = sum(wire.message_nbytes(r.content) for r in replies if not r.has_error())
        deviations, counts, flops = [], [], 0
        shapes = {n: tuple(self.theta[n].shape) for n in self.prunable}
        for r in replies:
            dev, reason = self.decode(r, shapes, known=None)
            if dev is None:
                log(WARNING, "exploration reply from node %d rejected: %s",
                    r.metadata.src_node_id, reason)
                continue
            metrics = r.content[contract.METRICS]
            deviations.append(dev)
            counts.append(int(metrics[contract.NUM_EXAMPLES]))
            flops += int(metrics.get(contract.TRAIN_FLOPS, 0))
        if not deviations:
            raise RuntimeError("AutoFLIP exploration: no explorer replied with a valid update")
        self.policy.start(deviations, counts)
        log(INFO, "exploration: %d explorers, guidance built", len(deviations))
        return PhaseCost(clients=len(deviations), train_flops=flops, bytes_down=down,
                         bytes_up=up)
