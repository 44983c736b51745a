"""Encode and decode named (masked, optionally int8-quantised) tensors to bytes.

The byte format is the ``TensorPayload`` protobuf of ``protos/bonsai_tensor.proto``
(package ``bonsai.wire.v1``). Per tensor, one of three encodings:

- DENSE: every entry, raw little-endian bytes.
- BITMAP_VALUES: the mask as a bitmap (``ceil(n / 8)`` bytes) and the kept
  entries only. This is how a mask travels: the receiver stores it.
- VALUES_AGAINST_MASK: the kept entries only, against a mask the receiver
  already holds at a named ``mask_version`` (AutoFLIP's download when the mask
  did not change, and every upload of a masked update; docs/ALGORITHMS.md §1.3).

Cost per tensor of n entries, k kept, itemsize b (plus ~10-20 bytes of protobuf
framing and the name): DENSE ``n*b``; BITMAP_VALUES ``ceil(n/8) + k*b``;
VALUES_AGAINST_MASK ``k*b``. With int8 quantisation (float tensors only) the
``k*b`` (or ``n*b``) term becomes ``k + 4*ceil(k/block)``.

The decoder is strict: anything malformed raises :class:`WireError`, naming the
tensor, before large allocations happen. ``to_record``/``from_record`` carry the
bytes inside a Flower ``RecordDict``; ``message_nbytes`` counts serialised bytes.

Why one module of this length: it is the whole wire format; each layout's encoder
and decoder sit side by side, so that a change to one shows the other.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from google.protobuf.message import DecodeError

from fl import contract
from fl.kernels import (
    dequantize_int8_blocks,
    gather_kept,
    pack_bits,
    quantize_int8_blocks,
    scatter_kept,
    unpack_bits,
)
from fl.msgsize import recorddict_nbytes
from protos import bonsai_tensor_pb2 as pb

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message, RecordDict

__all__ = [
    "FORMAT_VERSION",
    "WIRE_STYPE",
    "WireError",
    "decode",
    "encode",
    "from_record",
    "message_nbytes",
    "to_record",
]

#: Version written into (and required of) every payload.
FORMAT_VERSION = 1
#: ``Array.stype`` of the payload inside its ArrayRecord. Not "numpy.ndarray", so
#: Flower's own aggregators refuse it (``Array.numpy()`` raises) instead of
#: averaging payload bytes.
WIRE_STYPE = "bonsai.wire.v1"

_UINT32_MAX = 2**32 - 1
_MAX_DIMS = 64

_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.int64: pb.DTYPE_INT64,
    torch.int32: pb.DTYPE_INT32,
    torch.int16: pb.DTYPE_INT16,
    torch.int8: pb.DTYPE_INT8,
    torch.uint8: pb.DTYPE_UINT8,
    torch.bool: pb.DTYPE_BOOL,
}
_FROM_WIRE: dict[int, torch.dtype] = {v: k for k, v in _TO_WIRE.items()}
_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
# Entries are moved through an integer view of the same width, so gather/scatter
# copy bit patterns exactly (NaN payloads, -0.0) whatever the dtype.
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class WireError(ValueError):
    """A payload (or input to :func:`encode`) is malformed; the message says how."""


# --- helpers ----------------------------------------------------------------


def _check_host() -> None:
    """The format is little-endian and bytes are copied raw: refuse other hosts."""
    if sys.byteorder != "little":
        raise NotImplementedError("fl.wire supports little-endian hosts only")


def _to_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor, flattened in C order."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A fresh 1-D tensor of ``dtype`` over a copy of ``data`` (length already checked)."""
    if not data:
        return torch.empty(0, dtype=dtype)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(dtype)


def _gather(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    iview = _INT_VIEW[flat.element_size()]
    return gather_kept(flat.view(iview), mask).view(flat.dtype)


def _scatter(kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    iview = _INT_VIEW[kept.element_size()]
    return scatter_kept(kept.view(iview), mask).view(kept.dtype)


# --- encode -----------------------------------------------------------------


def encode(
    tensors: Mapping[str, torch.Tensor],
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    mask_version: int = 0,
    send_mask: bool = True,
    quantize: bool = False,
    block: int = 256,
) -> bytes:
    """Serialise named tensors to a ``bonsai.wire.v1.TensorPayload``.

    Parameters
    ----------
    tensors
        Name -> tensor (any device; copied to CPU). Supported dtypes: float32,
        float16, bfloat16, float64, int64, int32, int16, int8, uint8, bool.
    masks
        Name -> bool mask of the same shape. A tensor without a mask is sent
        DENSE; with one, only its kept entries are sent.
    mask_version
        Version of ``masks`` (uint32), written into every masked tensor.
    send_mask
        True: BITMAP_VALUES (the mask travels too). False: VALUES_AGAINST_MASK
        (the receiver must hold the mask at ``mask_version``).
    quantize
        Send float values as int8 with one float32 scale per ``block`` values
        (symmetric, scale = max|x| / 127). Integer and bool tensors stay exact.
    """
    _check_host()
    masks = {} if masks is None else masks
    if not 0 <= mask_version <= _UINT32_MAX:
        raise WireError(f"mask_version must be a uint32, got {mask_version}")
    if quantize and not 1 <= block <= _UINT32_MAX:
        raise WireError(f"block must be a positive uint32, got {block}")
    stray = sorted(set(masks) - set(tensors))
    if stray:
        raise WireError(f"masks given for tensors that are not sent: {stray}")
    payload = pb.TensorPayload(format_version=FORMAT_VERSION)
    for name, tensor in tensors.items():
        payload.tensors.append(
            _encode_one(
                name,
                tensor,
                masks.get(name),
                mask_version=mask_version,
                send_mask=send_mask,
                quantize=quantize,
                block=block,
            )
        )
    return payload.SerializeToString()


def _encode_one(
    name: str,
    tensor: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    mask_version: int,
    send_mask: bool,
    quantize: bool,
    block: int,
) -> pb.Tensor:
    if not isinstance(name, str) or not name:
        raise WireError(f"tensor names must be non-empty strings, got {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise WireError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _TO_WIRE:
        raise WireError(f"tensor {name!r}: dtype {tensor.dtype} is not supported on the wire")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    msg = pb.Tensor(name=name, shape=list(tensor.shape), dtype=_TO_WIRE[tensor.dtype])
    if mask is None:
        msg.encoding = pb.ENCODING_DENSE
        values = flat
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise WireError(f"tensor {name!r}: its mask must be a bool tensor")
        if mask.shape != tensor.shape:
            raise WireError(
                f"tensor {name!r}: mask shape {tuple(mask.shape)} differs from "
                f"tensor shape {tuple(tensor.shape)}"
            )
        flat_mask = mask.detach().to("cpu").contiguous().reshape(-1)
        values = _gather(flat, flat_mask)
        msg.mask_version = mask_version
        if send_mask:
            msg.encoding = pb.ENCODING_BITMAP_VALUES
            msg.bitmap = _to_bytes(pack_bits(flat_mask))
        else:
            msg.encoding = pb.ENCODING_VALUES_AGAINST_MASK
    if quantize and tensor.dtype in _FLOATS:
        if values.numel() == 0:
            q, scales = torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.float32)
        else:
            q, scales = quantize_int8_blocks(values.float(), block=block)
        msg.values = _to_bytes(q.to(torch.int8))
        msg.quant.block = block
        msg.quant.scales = _to_bytes(scales.to(torch.float32))
    else:
        msg.values = _to_bytes(values)
    return msg


# --- decode -----------------------------------------------------------------


def decode(
    data: bytes,
    *,
    known_masks: Mapping[str, torch.Tensor] | None = None,
    known_mask_version: int | None = None,
    max_elements: int = 2**31,
    allow_nonfinite: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parse and validate a payload made by :func:`encode`.

    Returns ``(tensors, masks)``: every tensor dense, in its declared shape and
    dtype, with zeros at pruned entries; and the masks the payload carried
    (BITMAP_VALUES tensors), as bool tensors. ``known_masks`` at
    ``known_mask_version`` resolve VALUES_AGAINST_MASK tensors. ``max_elements``
    bounds the entries the whole payload may declare (checked before any
    allocation). Float values must be finite unless ``allow_nonfinite``.

    Raises
    ------
    WireError
        On anything malformed, naming the tensor and the problem.
    """
    _check_host()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"payload must be bytes, got {type(data).__name__}")
    payload = pb.TensorPayload()
    try:
        payload.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise WireError(f"payload is not a bonsai.wire.v1 TensorPayload: {exc}") from exc
    if payload.format_version != FORMAT_VERSION:
        raise WireError(
            f"unknown format version {payload.format_version} (this decoder reads {FORMAT_VERSION})"
        )
    tensors: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    budget = max_elements
    for msg in payload.tensors:
        name = msg.name
        if not name:
            raise WireError("a tensor in the payload has an empty name")
        if name in tensors:
            raise WireError(f"tensor {name!r}: appears twice in the payload")
        shape, numel = _declared_shape(msg, budget, max_elements)
        budget -= numel
        tensor, mask = _decode_one(
            msg,
            shape,
            numel,
            known_masks=known_masks,
            known_mask_version=known_mask_version,
            allow_nonfinite=allow_nonfinite,
        )
        tensors[name] = tensor
        if mask is not None:
            masks[name] = mask
    return tensors, masks


def _err(name: str, problem: str) -> WireError:
    return WireError(f"tensor {name!r}: {problem}")


def _declared_shape(msg: pb.Tensor, budget: int, max_elements: int) -> tuple[tuple[int, ...], int]:
    """The declared shape and entry count, refused when negative or too large."""
    if len(msg.shape) > _MAX_DIMS:
        raise _err(msg.name, f"declares {len(msg.shape)} dimensions (at most {_MAX_DIMS})")
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise _err(msg.name, f"declares a negative dimension in shape {shape}")
    numel = 1
    for d in shape:
        numel *= d
    if numel > budget:
        raise _err(
            msg.name,
            f"declares {numel} entries (shape {shape}); the payload may hold at most "
            f"max_elements={max_elements} in all",
        )
    return shape, numel


def _decode_one(
    msg: pb.Tensor,
    shape: tuple[int, ...],
    numel: int,
    *,
    known_masks: Mapping[str, torch.Tensor] | None,
    known_mask_version: int | None,
    allow_nonfinite: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    name = msg.name
    dtype = _FROM_WIRE.get(msg.dtype)
    if dtype is None:
        raise _err(name, f"unknown dtype code {msg.dtype}")
    received: torch.Tensor | None = None
    if msg.encoding == pb.ENCODING_DENSE:
        if msg.bitmap:
            raise _err(name, "DENSE encoding carries a bitmap")
        mask = None
        count = numel
    elif msg.encoding == pb.ENCODING_BITMAP_VALUES:
        mask = _read_bitmap(msg, numel)
        received = mask
        count = int(torch.count_nonzero(mask))
    elif msg.encoding == pb.ENCODING_VALUES_AGAINST_MASK:
        if msg.bitmap:
            raise _err(name, "VALUES_AGAINST_MASK encoding carries a bitmap")
        mask = _known_mask(msg, shape, known_masks, known_mask_version)
        count = int(torch.count_nonzero(mask))
    else:
        raise _err(name, f"unknown encoding code {msg.encoding}")

    values = _read_values(msg, dtype, count)
    if dtype in _FLOATS and not allow_nonfinite:
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise _err(name, f"{bad} of {count} values are NaN or Inf")
    dense = values if mask is None else _scatter(values, mask)
    out_mask = None if received is None else received.reshape(shape)
    return dense.reshape(shape), out_mask


def _read_bitmap(msg: pb.Tensor, numel: int) -> torch.Tensor:
    expected = (numel + 7) // 8
    if len(msg.bitmap) != expected:
        raise _err(
            msg.name,
            f"bitmap has {len(msg.bitmap)} bytes, shape {tuple(msg.shape)} needs {expected}",
        )
    tail = numel % 8
    if tail and msg.bitmap[-1] >> tail:
        raise _err(msg.name, "bitmap sets bits past the last entry")
    return unpack_bits(_from_bytes(msg.bitmap, torch.uint8), numel)


def _known_mask(
    msg: pb.Tensor,
    shape: tuple[int, ...],
    known_masks: Mapping[str, torch.Tensor] | None,
    known_mask_version: int | None,
) -> torch.Tensor:
    name = msg.name
    if known_masks is None or name not in known_masks:
        raise _err(
            name,
            f"values are sent against mask version {msg.mask_version}, but the receiver "
            "holds no mask for this tensor (unknown mask)",
        )
    if known_mask_version != msg.mask_version:
        raise _err(
            name,
            f"mask version mismatch: values follow mask version {msg.mask_version}, "
            f"the receiver holds version {known_mask_version}",
        )
    mask = known_masks[name]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise _err(name, "the known mask is not a bool tensor")
    if tuple(mask.shape) != shape:
        raise _err(
            name, f"declared shape {shape} differs from the known mask's {tuple(mask.shape)}"
        )
    return mask.detach().to("cpu").contiguous().reshape(-1)


def _read_values(msg: pb.Tensor, dtype: torch.dtype, count: int) -> torch.Tensor:
    name = msg.name
    if msg.HasField("quant"):
        if dtype not in _FLOATS:
            raise _err(name, f"int8 quantisation declared for non-float dtype {dtype}")
        block = msg.quant.block
        if block == 0:
            raise _err(name, "int8 quantisation with block size 0")
        n_blocks = (count + block - 1) // block
        if len(msg.values) != count:
            raise _err(name, f"values hold {len(msg.values)} bytes, expected {count} int8 values")
        if len(msg.quant.scales) != 4 * n_blocks:
            raise _err(
                name,
                f"scales hold {len(msg.quant.scales)} bytes, expected {n_blocks} float32 "
                f"({count} values in blocks of {block})",
            )
        if count == 0:
            return torch.empty(0, dtype=dtype)
        scales = _from_bytes(msg.quant.scales, torch.float32)
        if bool((scales < 0).any()):
            raise _err(name, "int8 quantisation has negative scales")
        q = _from_bytes(msg.values, torch.int8)
        return dequantize_int8_blocks(q, scales, block=block).to(dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(msg.values) != count * itemsize:
        raise _err(
            name,
            f"values hold {len(msg.values)} bytes, expected {count} x {itemsize} "
            f"({dtype}, {count} entries)",
        )
    if dtype == torch.bool:
        raw = _from_bytes(msg.values, torch.uint8)
        if bool((raw > 1).any()):
            raise _err(name, "bool values other than 0 and 1")
        return raw.view(torch.bool)
    return _from_bytes(msg.values, dtype)


# --- Flower records and byte accounting --------------------------------------


def to_record(data: bytes) -> ArrayRecord:
    """Wrap an encoded payload as a Flower record (put it under ``contract.PAYLOAD``).

    An ArrayRecord holding one uint8 ``Array`` of the raw bytes, not a
    ConfigRecord (which also accepts bytes): Flower 1.42 ships an Array in
    5 MiB content-addressed ArrayChunks, while a ConfigRecord is one object,
    i.e. one gRPC message for the whole payload (capped at 2 GiB), and
    ConfigRecord's own docs point high-dimensional data to ArrayRecord.
    """
    from flwr.app import Array, ArrayRecord

    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"payload must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    array = Array(dtype="uint8", shape=(len(raw),), stype=WIRE_STYPE, data=raw)
    return ArrayRecord({contract.PAYLOAD_BYTES: array})


def from_record(record: ArrayRecord) -> bytes:
    """The payload bytes inside a record made by :func:`to_record`."""
    from flwr.app import ArrayRecord

    if not isinstance(record, ArrayRecord):
        raise WireError(f"payload record must be an ArrayRecord, got {type(record).__name__}")
    array = record.get(contract.PAYLOAD_BYTES)
    if array is None:
        raise WireError(f"payload record has no {contract.PAYLOAD_BYTES!r} entry")
    if array.stype != WIRE_STYPE or array.dtype != "uint8":
        raise WireError(
            f"payload record entry is {array.dtype}/{array.stype}, expected uint8/{WIRE_STYPE}"
        )
    if tuple(array.shape) != (len(array.data),):
        raise WireError(
            f"payload record declares shape {tuple(array.shape)} for {len(array.data)} bytes"
        )
    return bytes(array.data)


def message_nbytes(content: RecordDict | Message) -> int:
    """Serialised size in bytes of a Flower RecordDict or Message.

    What Flower's own protobuf serialisation (``flwr.common.serde``) writes: a
    RecordDict ``recorddict_to_proto`` (sized by :func:`fl.msgsize.recorddict_nbytes`
    without building the arrays' proto), a Message ``message_to_proto`` (content plus
    metadata; built, so copied once). This is what bytes-down/bytes-up report.
    """
    from flwr.app import Message, RecordDict
    from flwr.common import serde

    if isinstance(content, Message):
        return serde.message_to_proto(content).ByteSize()
    if isinstance(content, RecordDict):  # sized without copying its arrays (fl.msgsize)
        return recorddict_nbytes(content)
    raise WireError(f"expected a RecordDict or Message, got {type(content).__name__}")
