"""The serialised size of a Flower RecordDict, without copying its arrays into a proto.

Every round counts the bytes each client's message and reply would take on the wire
(``fl.wire.message_nbytes``). Flower's ``recorddict_to_proto`` copies every array's
bytes into a new protobuf to measure it: at 100 replies of a 600 KB model that is
60 MB copied on the server between two rounds, while the clients wait. An array's
share of the size follows from protobuf's encoding rules alone (a length-delimited
field costs its tag, the varint of its length and the payload), so this module
computes the ArrayRecords' share from their lengths and lets Flower's own
serialiser measure the rest (metrics and configs: a few hundred bytes).

The layout followed is Flower's ``flwr/proto/recorddict.proto``: RecordDict
{repeated Item items = 1}, Item {string key = 1; oneof value {ArrayRecord
array_record = 2; ...}}, ArrayRecord {repeated Item items = 1}, ArrayRecord.Item
{string key = 1; Array value = 2}, Array {string dtype = 1; repeated int32 shape =
2 (packed); string stype = 3; bytes data = 4}. Every field number is below 16, so
each tag is one byte. tests/test_msgsize.py checks the result equals Flower's
serialiser, byte for byte, on every kind of record the platform sends.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, RecordDict

__all__ = ["recorddict_nbytes"]


def _varint(n: int) -> int:
    """Bytes of ``n`` as a protobuf varint (a negative int32 takes 10)."""
    if n < 0:
        return 10
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _field(length: int) -> int:
    """A length-delimited field of ``length`` bytes: tag, length, payload."""
    return 1 + _varint(length) + length


def _string(s: str) -> int:
    """A proto3 string field (absent when empty)."""
    n = len(s.encode())
    return _field(n) if n else 0


def _array(a: Array) -> int:
    packed = sum(_varint(d) for d in a.shape)
    return (_string(a.dtype) + (_field(packed) if packed else 0) + _string(a.stype)
            + (_field(len(a.data)) if a.data else 0))


def _array_record(record: ArrayRecord) -> int:
    return sum(_field(_string(k) + _field(_array(a))) for k, a in record.items())


def recorddict_nbytes(content: RecordDict) -> int:
    """Serialised size in bytes of ``content`` as Flower's ``recorddict_to_proto``
    would write it (its ByteSize), with the ArrayRecords sized from their lengths."""
    from flwr.common import serde

    rest = RecordDict({k: v for k, v in content.items() if not isinstance(v, ArrayRecord)})
    size = serde.recorddict_to_proto(rest).ByteSize()
    for key, value in content.items():
        if isinstance(value, ArrayRecord):
            size += _field(_string(key) + _field(_array_record(value)))
    return size
