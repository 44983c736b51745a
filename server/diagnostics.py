"""The loss-decomposition diagnostic, for any strategy (docs/ALGORITHMS.md §2.1).

After a round, each participating client evaluates every client model of the
round and the new global model on its own data (K^2 + K evaluations, one
message per client); fl.decomposition splits the global loss into local,
distribution-shift and aggregation terms, which sum to it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl import contract
from fl.decomposition import decompose_loss


def decompose_round(
    grid: Grid, clients: Sequence[tuple[int, dict[str, torch.Tensor]]],
    global_arrays: ArrayRecord, server_round: int, timeout: float,
) -> dict[str, Any]:
    """Measure the K x K loss matrix on the round's clients and decompose the global loss."""
    if len(clients) < 2:
        return {}
    content = RecordDict({contract.GLOBAL_MODEL: global_arrays,
                          contract.CONFIG: ConfigRecord({contract.SERVER_ROUND: server_round})})
    for i, (_, state) in enumerate(clients):
        content[f"{contract.CLIENT_MODEL_PREFIX}{i}"] = ArrayRecord(state)
    msgs = [Message(content, dst_node_id=n,
                    message_type=f"{MessageType.EVALUATE}.{contract.DECOMPOSE_ACTION}")
            for n, _ in clients]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs, timeout=timeout)}
    K = len(clients)
    matrix, global_losses = np.zeros((K, K)), np.zeros(K)
    for j, (node, _) in enumerate(clients):
        r = replies.get(node)
        if r is None or r.has_error():
            log(WARNING, "round %d: loss decomposition skipped: node %d did not evaluate (%s)",
                server_round, node, r.error.reason if r is not None else "no reply")
            return {}
        m = r.content[contract.METRICS]
        matrix[j] = [float(m[f"{contract.LOSS_PREFIX}{i}"]) for i in range(K)]
        global_losses[j] = float(m[f"{contract.LOSS_PREFIX}{contract.GLOBAL_MODEL}"])
    d = decompose_loss(matrix, global_losses)
    return {"loss_global": d.global_loss, "loss_local": d.local,
            "loss_shift": d.distribution_shift, "loss_aggregation": d.aggregation}
