"""The edge profile of a node (fl.node.EdgeProfile, PeakMemory; clients/edge.py): device,
threads, peak memory in train replies, the node-local log."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fl.node import EdgeProfile, PeakMemory

ROOT = Path(__file__).resolve().parent.parent


# --- edge profile ---------------------------------------------------------------------------
def test_edge_profile_and_peak_memory(tmp_path):
    p = EdgeProfile.from_node_config({"device": "cpu", "threads": 1,
                                      "metrics-path": str(tmp_path / "m.jsonl")})
    assert (p.device, p.threads) == ("cpu", 1)
    before = torch.get_num_threads()
    try:
        assert p.apply_threads(4) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        EdgeProfile.from_node_config({"threads": 0})
    with pytest.raises(ValueError, match="device"):
        EdgeProfile.from_node_config({"device": "tpu"})
    with PeakMemory() as small:
        pass
    with PeakMemory() as big:
        t = torch.ones(64 * 2**20 // 4 * 4)  # 256 MB of float32, touched
        del t
    assert big.rss_mb - small.rss_mb > 200


def test_measured_adds_peak_memory_and_logs_on_the_node(tmp_path):
    from clients.edge import measured

    class Reply:
        def __init__(self):
            self.content = {"metrics": {"num-examples": 5, "train-seconds": 0.5}}

        def has_error(self):
            return False

    @measured
    def handler(msg, context):
        return Reply()

    log = tmp_path / "node.jsonl"
    msg = SimpleNamespace(content={"config": {"server-round": 3}},
                          metadata=SimpleNamespace(message_type="train"))
    ctx = SimpleNamespace(node_config={"metrics-path": str(log), "partition-id": 2})
    reply = handler(msg, ctx)
    assert reply.content["metrics"]["peak-memory-mb"] > 0
    import json

    (line,) = [json.loads(s) for s in log.read_text().splitlines()]
    assert line["round"] == 3 and line["partition-id"] == 2 and line["train-seconds"] == 0.5
