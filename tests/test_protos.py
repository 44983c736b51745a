"""protos/: the checked-in generated Python matches the .proto and loads.

Regeneration uses the same command as protos/README.md, into a temporary
folder. Lines that only record which protoc/protobuf version generated the
file are normalised, so a newer grpcio-tools does not fail the test by itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROTOS = Path(__file__).resolve().parent.parent / "protos"
SOURCES = sorted(p.name for p in PROTOS.glob("*.proto"))
_VERSION_COMMENT = re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE)
# _runtime_version.ValidateProtobufRuntimeVersion(<domain>, major, minor, patch, suffix, file)
_VERSION_CHECK = re.compile(
    r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"
)


def _normalise(text: str) -> str:
    text = _VERSION_COMMENT.sub("# Protobuf Python Version: <normalised>", text)
    return _VERSION_CHECK.sub(r"\1 <version>,", text)


def test_sources_present():
    assert SOURCES == ["bonsai_tensor.proto"]


@pytest.mark.parametrize("source", SOURCES)
def test_generated_python_is_up_to_date(source: str, tmp_path: Path):
    pytest.importorskip("grpc_tools")
    shutil.copy(PROTOS / source, tmp_path / source)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        "--python_out=.",
        "--pyi_out=.",
        source,
    ]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    stem = source.removesuffix(".proto")
    for suffix in ("_pb2.py", "_pb2.pyi"):
        fresh = (tmp_path / f"{stem}{suffix}").read_text()
        checked_in = (PROTOS / f"{stem}{suffix}").read_text()
        assert _normalise(fresh) == _normalise(checked_in), (
            f"protos/{stem}{suffix} is stale: regenerate it (see protos/README.md)"
        )


def test_generated_module_loads_with_installed_runtime():
    from protos import bonsai_tensor_pb2 as pb

    assert pb.TensorPayload.DESCRIPTOR.full_name == "bonsai.wire.v1.TensorPayload"
    assert pb.Tensor.DESCRIPTOR.fields_by_name["quant"].message_type.full_name == (
        "bonsai.wire.v1.Int8Blocks"
    )


def test_wire_numbers_are_stable():
    """Field and enum numbers are the format: renumbering breaks old peers."""
    from protos import bonsai_tensor_pb2 as pb

    assert [(v.name, v.number) for v in pb.DType.DESCRIPTOR.values] == [
        ("DTYPE_UNSPECIFIED", 0),
        ("DTYPE_FLOAT32", 1),
        ("DTYPE_FLOAT16", 2),
        ("DTYPE_BFLOAT16", 3),
        ("DTYPE_FLOAT64", 4),
        ("DTYPE_INT64", 5),
        ("DTYPE_INT32", 6),
        ("DTYPE_INT16", 7),
        ("DTYPE_INT8", 8),
        ("DTYPE_UINT8", 9),
        ("DTYPE_BOOL", 10),
    ]
    assert [(v.name, v.number) for v in pb.Encoding.DESCRIPTOR.values] == [
        ("ENCODING_UNSPECIFIED", 0),
        ("ENCODING_DENSE", 1),
        ("ENCODING_BITMAP_VALUES", 2),
        ("ENCODING_VALUES_AGAINST_MASK", 3),
    ]
    fields = {f.name: f.number for f in pb.Tensor.DESCRIPTOR.fields}
    assert fields == {
        "name": 1,
        "shape": 2,
        "dtype": 3,
        "encoding": 4,
        "values": 5,
        "bitmap": 6,
        "mask_version": 7,
        "quant": 8,
    }
    assert {f.name: f.number for f in pb.TensorPayload.DESCRIPTOR.fields} == {
        "format_version": 1,
        "tensors": 2,
    }
    assert {f.name: f.number for f in pb.Int8Blocks.DESCRIPTOR.fields} == {"block": 1, "scales": 2}
