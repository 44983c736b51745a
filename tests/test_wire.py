"""fl.wire: round trips, strict validation, byte costs and Flower records.

Expected values are computed here from the format's definition (bit layout,
byte formulas, per-block scales), not by calling the code under test.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl import contract
from fl.wire import (
    FORMAT_VERSION,
    WireError,
    decode,
    encode,
    from_record,
    message_nbytes,
    to_record,
)
from protos import bonsai_tensor_pb2 as pb

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
DTYPES = FLOATS + INTS + [torch.bool]
MODES = ["dense", "bitmap", "against"]
# Half ulp of the decoded dtype, relative: dequantised float32 values are rounded
# to the tensor's dtype after the int8 error, so that rounding adds on top.
HALF_ULP = {
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def _random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int, exp: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype in FLOATS:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**exp).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def _random_mask(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.rand(shape, generator=gen) < density


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return t
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype))


def _encode_mode(tensors, masks, mode, **kw) -> bytes:
    if mode == "dense":
        return encode(tensors, **kw)
    return encode(tensors, masks=masks, mask_version=5, send_mask=mode == "bitmap", **kw)


def _decode_mode(data, masks, mode):
    if mode == "against":
        return decode(data, known_masks=masks, known_mask_version=5)
    return decode(data)


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    mode=st.sampled_from(MODES),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
    exp=st.integers(-3, 3),
)
def test_round_trip_is_exact(shape, dtype, mode, density, seed, exp):
    """Without quantisation every kept entry comes back bit for bit, pruned ones as 0."""
    t = _random_tensor(shape, dtype, seed, exp)
    mask = None if mode == "dense" else _random_mask(shape, density, seed)
    masks = {} if mask is None else {"t": mask}
    out, got_masks = _decode_mode(_encode_mode({"t": t}, masks, mode), masks, mode)
    assert list(out) == ["t"]
    assert out["t"].dtype == dtype and tuple(out["t"].shape) == shape
    assert torch.equal(out["t"], _masked(t, mask))
    if mode == "bitmap":
        assert torch.equal(got_masks["t"], mask)
    else:
        assert got_masks == {}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    mode=st.sampled_from(MODES),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
    exp=st.integers(-3, 3),
    block=st.sampled_from([1, 7, 64, 256]),
)
def test_round_trip_int8(shape, dtype, mode, density, seed, exp, block):
    """int8 blocks: |error| <= scale/2 per entry, scale = max|block of kept values| / 127
    (plus the half-ulp rounding back to fp16/bf16); non-float tensors stay exact."""
    t = _random_tensor(shape, dtype, seed, exp)
    mask = None if mode == "dense" else _random_mask(shape, density, seed)
    masks = {} if mask is None else {"t": mask}
    data = _encode_mode({"t": t}, masks, mode, quantize=True, block=block)
    out, _ = _decode_mode(data, masks, mode)
    got = out["t"]
    assert got.dtype == dtype and tuple(got.shape) == shape
    if dtype not in FLOATS:
        assert torch.equal(got, _masked(t, mask))
        return
    flat_mask = torch.ones(t.numel(), dtype=torch.bool) if mask is None else mask.reshape(-1)
    x = t.reshape(-1)[flat_mask].double()
    y = got.reshape(-1)[flat_mask].double()
    assert torch.all(got.reshape(-1)[~flat_mask] == 0)
    if x.numel() == 0:
        return
    n_blocks = math.ceil(x.numel() / block)
    pad = torch.zeros(n_blocks * block - x.numel(), dtype=torch.float64)
    scale = torch.cat([x.abs(), pad]).reshape(n_blocks, block).amax(1) / 127
    per_entry = scale.repeat_interleave(block)[: x.numel()]
    tol = per_entry / 2 * (1 + 1e-5) + x.abs() * HALF_ULP[dtype] + 1e-30
    err = (y - x).abs()
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} of {x.numel()} entries off, worst {err.max()}"


def test_many_tensors_mixed_encodings():
    tensors = {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "conv.bias": torch.randn(4),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.weight": torch.randn(10, 8, dtype=torch.bfloat16),
    }
    masks = {"conv.weight": torch.rand(4, 3, 3, 3) > 0.7, "fc.weight": torch.rand(10, 8) > 0.2}
    out, got = decode(encode(tensors, masks=masks, mask_version=9))
    assert list(out) == list(tensors)
    assert set(got) == set(masks)
    for name, t in tensors.items():
        assert torch.equal(out[name], _masked(t, masks.get(name)))
    # The receiver now holds the masks: the next payload sends values only.
    again = encode(tensors, masks=masks, mask_version=9, send_mask=False)
    out2, got2 = decode(again, known_masks=got, known_mask_version=9)
    assert got2 == {}
    for name in tensors:
        assert torch.equal(out2[name], out[name])


# --- byte costs --------------------------------------------------------------

N, K = 10_000, 1_000  # 10% density
FRAMING = 32  # bound on protobuf tags, lengths, name, shape and dtype bytes per tensor


@pytest.fixture
def sparse():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(N, generator=gen)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[torch.randperm(N, generator=gen)[:K]] = True
    return {"w": t}, {"w": mask}


@pytest.mark.parametrize(
    ("kw", "payload_bytes"),
    [
        ({}, 4 * N),  # dense float32
        ({"masks": True}, N // 8 + 4 * K),  # bitmap + kept values
        ({"masks": True, "send_mask": False}, 4 * K),  # kept values only
        ({"quantize": True}, N + 4 * math.ceil(N / 256)),  # int8 + scales
        ({"masks": True, "quantize": True}, N // 8 + K + 4 * math.ceil(K / 256)),
        ({"masks": True, "send_mask": False, "quantize": True}, K + 4 * math.ceil(K / 256)),
    ],
)
def test_encoded_size_follows_formula(sparse, kw, payload_bytes):
    tensors, masks = sparse
    kw = dict(kw)
    if kw.pop("masks", False):
        kw["masks"] = masks
    size = len(encode(tensors, **kw))
    assert payload_bytes <= size <= payload_bytes + FRAMING, (size, payload_bytes)


def test_sparse_is_smaller_than_dense_by_formula(sparse):
    tensors, masks = sparse
    dense = len(encode(tensors))
    bitmap = len(encode(tensors, masks=masks))
    # 4n against n/8 + 0.4n: 40000 -> 5250 bytes at 10% density.
    assert dense - bitmap == pytest.approx(4 * N - (N // 8 + 4 * K), abs=FRAMING)


def test_golden_bytes():
    """The byte layout is the format: pin it with hand-built protobuf."""
    dense = encode({"a": torch.tensor([1.0, 2.0])})
    assert dense.hex() == (
        "0801"  # format_version = 1
        "1214"  # tensors, 20 bytes
        "0a0161"  # name "a"
        "120102"  # shape [2]
        "1801"  # dtype FLOAT32
        "2001"  # encoding DENSE
        "2a08"  # values, 8 bytes:
        "0000803f00000040"  # 1.0, 2.0
    )
    masked = encode(
        {"a": torch.tensor([1.0, 2.0, 3.0])},
        masks={"a": torch.tensor([True, False, True])},
        mask_version=7,
    )
    assert masked.hex() == (
        "0801"  # format_version = 1
        "1219"  # tensors, 25 bytes
        "0a0161"  # name "a"
        "120103"  # shape [3]
        "1801"  # dtype FLOAT32
        "2002"  # encoding BITMAP_VALUES
        "2a08"  # kept values, 8 bytes:
        "0000803f00004040"  # 1.0, 3.0
        "320105"  # bitmap 0b101 (entry i -> bit i)
        "3807"  # mask_version 7
    )


# --- validation ----------------------------------------------------------------


def _payload(**tensor_fields) -> pb.TensorPayload:
    fields = {
        "name": "w",
        "shape": [2, 2],
        "dtype": pb.DTYPE_FLOAT32,
        "encoding": pb.ENCODING_DENSE,
        "values": torch.arange(4, dtype=torch.float32).numpy().tobytes(),
    }
    fields.update(tensor_fields)
    quant = fields.pop("quant", None)
    tensor = pb.Tensor(**fields)
    if quant is not None:
        tensor.quant.block, tensor.quant.scales = quant
    return pb.TensorPayload(format_version=FORMAT_VERSION, tensors=[tensor])


def _raises(data: bytes, problem: str, **kw) -> None:
    with pytest.raises(WireError, match=re.compile(problem, re.IGNORECASE)) as info:
        decode(data, **kw)
    assert isinstance(info.value, ValueError)
    assert "'w'" in str(info.value) or problem.startswith("unknown format")


F32 = lambda *xs: torch.tensor(xs, dtype=torch.float32).numpy().tobytes()  # noqa: E731
MASK_W = {"w": torch.tensor([[True, False], [True, True]])}


def test_valid_base_payload_decodes():
    out, _ = decode(_payload().SerializeToString())
    assert torch.equal(out["w"], torch.arange(4.0).reshape(2, 2))


@pytest.mark.parametrize(
    ("payload", "problem", "kw"),
    [
        (pb.TensorPayload(format_version=2), "unknown format version 2", {}),
        (pb.TensorPayload(), "unknown format version 0", {}),
        (_payload(encoding=99), "unknown encoding", {}),
        (_payload(encoding=pb.ENCODING_UNSPECIFIED), "unknown encoding", {}),
        (_payload(dtype=99), "unknown dtype", {}),
        (_payload(dtype=pb.DTYPE_UNSPECIFIED), "unknown dtype", {}),
        (_payload(shape=[2, 3]), "values hold 16 bytes, expected 6 x 4", {}),
        (_payload(shape=[3]), "values hold 16 bytes, expected 3 x 4", {}),
        (_payload(dtype=pb.DTYPE_FLOAT64), "values hold 16 bytes, expected 4 x 8", {}),
        (_payload(shape=[2**40, 2**40]), "declares 1208925819614629174706176 entries", {}),
        (_payload(shape=[100, 100]), "at most max_elements=1000", {"max_elements": 1000}),
        (_payload(shape=[-1, 2]), "negative dimension", {}),
        (_payload(shape=[1] * 65), "65 dimensions", {}),
        (
            _payload(encoding=pb.ENCODING_BITMAP_VALUES, bitmap=b"\x0d\x00", values=F32(1, 2, 3)),
            "bitmap has 2 bytes, shape \\(2, 2\\) needs 1",
            {},
        ),
        (
            _payload(encoding=pb.ENCODING_BITMAP_VALUES, bitmap=b"", values=b""),
            "bitmap has 0 bytes",
            {},
        ),
        (
            _payload(encoding=pb.ENCODING_BITMAP_VALUES, bitmap=b"\x1d", values=F32(1, 2, 3, 4)),
            "bits past the last entry",
            {},
        ),
        (
            _payload(encoding=pb.ENCODING_BITMAP_VALUES, bitmap=b"\x0d", values=F32(1, 2)),
            "values hold 8 bytes, expected 3 x 4",
            {},
        ),
        (_payload(bitmap=b"\x0f"), "DENSE encoding carries a bitmap", {}),
        (
            _payload(encoding=pb.ENCODING_VALUES_AGAINST_MASK, mask_version=3, values=F32(1, 2, 3)),
            "unknown mask",
            {},
        ),
        (
            _payload(encoding=pb.ENCODING_VALUES_AGAINST_MASK, mask_version=3, values=F32(1, 2, 3)),
            "unknown mask",
            {"known_masks": {"other": MASK_W["w"]}, "known_mask_version": 3},
        ),
        (
            _payload(encoding=pb.ENCODING_VALUES_AGAINST_MASK, mask_version=3, values=F32(1, 2, 3)),
            "mask version mismatch: values follow mask version 3, the receiver holds version 2",
            {"known_masks": MASK_W, "known_mask_version": 2},
        ),
        (
            _payload(encoding=pb.ENCODING_VALUES_AGAINST_MASK, mask_version=3, values=F32(1, 2, 3)),
            "mask version mismatch",
            {"known_masks": MASK_W},
        ),
        (
            _payload(
                encoding=pb.ENCODING_VALUES_AGAINST_MASK, shape=[4], mask_version=3, values=F32(1)
            ),
            "differs from the known mask",
            {"known_masks": MASK_W, "known_mask_version": 3},
        ),
        (
            _payload(encoding=pb.ENCODING_VALUES_AGAINST_MASK, mask_version=3, values=F32(1, 2)),
            "values hold 8 bytes, expected 3 x 4",
            {"known_masks": MASK_W, "known_mask_version": 3},
        ),
        (_payload(values=F32(1, float("nan"), 3, 4)), "1 of 4 values are NaN or Inf", {}),
        (_payload(values=F32(1, float("inf"), 3, -float("inf"))), "2 of 4 values", {}),
        (
            _payload(
                dtype=pb.DTYPE_FLOAT16,
                values=torch.tensor([1, 2, 3, float("nan")], dtype=torch.float16).numpy().tobytes(),
            ),
            "NaN or Inf",
            {},
        ),
        (
            _payload(values=b"\x01\x02\x03\x04", quant=(256, F32(float("nan")))),
            "NaN or Inf",
            {},
        ),
        (_payload(values=b"\x01\x02\x03\x04", quant=(256, F32(-1.0))), "negative scales", {}),
        (_payload(values=b"\x01\x02\x03\x04", quant=(0, b"")), "block size 0", {}),
        (
            _payload(values=b"\x01\x02\x03\x04", quant=(2, F32(1.0))),
            "scales hold 4 bytes, expected 2 float32",
            {},
        ),
        (
            _payload(values=b"\x01\x02\x03", quant=(256, F32(1.0))),
            "values hold 3 bytes, expected 4 int8",
            {},
        ),
        (
            _payload(dtype=pb.DTYPE_INT8, values=b"\x01\x02\x03\x04", quant=(256, F32(1.0))),
            "non-float dtype",
            {},
        ),
        (_payload(dtype=pb.DTYPE_BOOL, values=b"\x00\x01\x02\x01"), "bool values other", {}),
    ],
)
def test_malformed_payload_raises(payload, problem, kw):
    _raises(payload.SerializeToString(), problem, **kw)


def test_nonfinite_allowed_when_asked():
    data = _payload(values=F32(1, float("nan"), float("inf"), 4)).SerializeToString()
    out, _ = decode(data, allow_nonfinite=True)
    assert torch.isnan(out["w"][0, 1]) and torch.isinf(out["w"][1, 0])


def test_duplicate_and_empty_names_raise():
    payload = _payload()
    payload.tensors.append(payload.tensors[0])
    _raises(payload.SerializeToString(), "appears twice")
    payload = _payload(name="")
    with pytest.raises(WireError, match="empty name"):
        decode(payload.SerializeToString())


def test_total_size_is_bounded():
    payload = _payload(shape=[4])
    payload.tensors.append(
        pb.Tensor(
            name="w2",
            shape=[4],
            dtype=pb.DTYPE_FLOAT32,
            encoding=pb.ENCODING_DENSE,
            values=F32(1, 2, 3, 4),
        )
    )
    with pytest.raises(WireError, match="'w2'.*max_elements=6 in all"):
        decode(payload.SerializeToString(), max_elements=6)


def test_garbage_and_non_bytes_raise():
    with pytest.raises(WireError, match="not a bonsai.wire.v1 TensorPayload"):
        decode(b"\xff\xff\xff\xff")
    with pytest.raises(WireError, match="must be bytes"):
        decode("text")  # type: ignore[arg-type]


def test_encode_rejects_bad_input():
    t = {"w": torch.randn(2, 2)}
    with pytest.raises(WireError, match="'w'.*not supported"):
        encode({"w": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(WireError, match="'w'.*mask must be a bool tensor"):
        encode(t, masks={"w": torch.ones(2, 2)})
    with pytest.raises(WireError, match="'w'.*mask shape \\(4,\\) differs"):
        encode(t, masks={"w": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(WireError, match="not sent: \\['v'\\]"):
        encode(t, masks={"v": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(WireError, match="mask_version"):
        encode(t, mask_version=-1)
    with pytest.raises(WireError, match="block"):
        encode(t, quantize=True, block=0)
    with pytest.raises(WireError, match="non-empty strings"):
        encode({"": torch.zeros(1)})


# --- Flower records and byte accounting ---------------------------------------


def test_record_round_trip_and_message_nbytes():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict
    from flwr.common.serde import message_to_proto, recorddict_to_proto

    data = encode({"w": torch.randn(1000)}, masks={"w": torch.rand(1000) > 0.9})
    record = to_record(data)
    assert from_record(record) == data
    content = RecordDict(
        {
            contract.PAYLOAD: record,
            contract.CONFIG: ConfigRecord({contract.SERVER_ROUND: 3, contract.MARGIN_LAMBDA: 0.1}),
            contract.METRICS: MetricRecord({contract.NUM_EXAMPLES: 12}),
        }
    )
    nbytes = message_nbytes(content)
    assert nbytes == len(recorddict_to_proto(content).SerializeToString())
    assert len(data) < nbytes < len(data) + 256  # payload plus Flower's record framing

    from flwr.app import Message, Metadata
    from flwr.app.message.message import make_message

    meta = Metadata(
        run_id=1,
        message_id="",
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    message = make_message(meta, content)
    assert isinstance(message, Message)
    assert message_nbytes(message) == len(message_to_proto(message).SerializeToString())
    assert message_nbytes(message) > nbytes
    with pytest.raises(WireError):
        message_nbytes(record)  # type: ignore[arg-type]


def test_record_survives_flower_object_transport():
    """Deployment ships records as deflated objects, an Array in 5 MiB chunks."""
    from flwr.app import ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    data = encode({"w": torch.randn(1_600_000)})  # 6.4 MB: more than one chunk
    record = to_record(data)
    objects = get_all_nested_objects(record)
    assert len(objects) >= 4  # record, array, >= 2 chunks
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    back = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(back, ArrayRecord)
    assert from_record(back) == data


def test_from_record_rejects_foreign_records():
    from flwr.app import Array, ArrayRecord, ConfigRecord

    with pytest.raises(WireError, match="must be an ArrayRecord"):
        from_record(ConfigRecord({contract.PAYLOAD_BYTES: b"x"}))  # type: ignore[arg-type]
    with pytest.raises(WireError, match="no 'wire-bytes' entry"):
        from_record(ArrayRecord())
    numpy_array = Array(dtype="uint8", shape=(1,), stype="numpy.ndarray", data=b"x")
    with pytest.raises(WireError, match="expected uint8/bonsai.wire.v1"):
        from_record(ArrayRecord({contract.PAYLOAD_BYTES: numpy_array}))
    # Flower's own aggregators cannot mistake the payload for numbers.
    with pytest.raises(TypeError):
        to_record(b"abc")[contract.PAYLOAD_BYTES].numpy()
