"""fl.msgsize against Flower's own serialiser: the sizes must be equal, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import serde

from fl import packing, wire
from fl.models import build_model
from fl.msgsize import recorddict_nbytes


def _serde(content: RecordDict) -> int:
    return serde.recorddict_to_proto(content).ByteSize()


def _records():
    cnn = build_model("cnn", (1, 8, 8), 10, seed=0).state_dict()
    rng = np.random.default_rng(0)
    payload = wire.encode({"w": torch.randn(300, 70)}, masks={"w": torch.rand(300, 70) > 0.3},
                          mask_version=3, send_mask=True)
    yield "a model and metrics", RecordDict({
        "arrays": ArrayRecord(cnn), "metrics": MetricRecord({"num-examples": 144, "loss": 0.5,
                                                              "flops": 2 ** 40})})
    yield "a wire payload and a config", RecordDict({
        "payload": wire.to_record(payload),
        "config": ConfigRecord({"server-round": 3, "structure": '{"conv1": [0, 2]}',
                                "mask-version": 3, "flags": [True, False]})})
    yield "empty", RecordDict()
    yield "an empty ArrayRecord under an empty key", RecordDict({"": ArrayRecord()})
    yield "0-d, empty and unicode-named arrays", RecordDict({"arrays": ArrayRecord({
        "scalar": Array(np.array(1.5, np.float32)), "none": Array(np.zeros((0, 3), np.float32)),
        "gewichte-ü": Array(rng.standard_normal((2, 3, 4)).astype(np.float64)),
        "i8": Array(rng.integers(-5, 5, size=20_000, dtype=np.int8)),
        "big": Array(np.zeros((1 << 21) + 3, np.uint8))})})
    yield "raw bytes with empty dtype, shape and stype", RecordDict({"raw": ArrayRecord(
        {"x": Array(dtype="", shape=(), stype="", data=b"abc"),
         "y": Array(dtype="u1", shape=(), stype="", data=b""),
         "z": Array(dtype="u1", shape=(200, 70000), stype="numpy.ndarray", data=b"\0" * 5)})})
    clients = [(i, RecordDict({"arrays": ArrayRecord(cnn), "metrics": MetricRecord({"n": i})}))
               for i in range(5)]
    yield "a packed message of five clients", packing.pack(clients)


@pytest.mark.parametrize("name,content", list(_records()), ids=[n for n, _ in _records()])
def test_size_equals_flowers_serialiser(name, content):
    assert recorddict_nbytes(content) == _serde(content)
    assert wire.message_nbytes(content) == _serde(content)
