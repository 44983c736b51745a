"""ONNX models in onnxruntime: sessions pinned to a thread count, and post-training
int8 quantisation for inference.

:func:`quantize_int8` runs onnxruntime's static quantiser
(``onnxruntime.quantization.quantize_static``) on an exported float model:

- pre-processing first (``quant_pre_process``: shape inference and graph
  optimisation, what onnxruntime's documentation asks for before quantising);
- calibration with min-max ranges over the examples it is given (the caller
  passes a slice of the run's test split);
- QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantised
  operator, which onnxruntime's CPU provider fuses into integer kernels), int8
  weights per output channel, uint8 activations (the U8S8 combination that
  onnxruntime's documentation recommends for x86 CPUs).

We use onnxruntime's quantiser and not torch.ao: the model is checked and
timed in onnxruntime anyway, the QDQ file runs in any onnxruntime build (the
runtime that devices ship), and torch.ao's eager mode needs QuantStub/DeQuantStub
edits in every model while its FX/PT2E flows target torch's own runtimes.

The quantiser quantises the operators it knows and leaves the others in float
without saying so; :func:`float_weights` reads the quantised graph for weights
that are still float (an LSTM's, for one), and :func:`quantize_int8` refuses
such a model naming the operators, instead of calling a mostly-float file int8.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QuantizeError", "float_weights", "quantize_int8", "require_onnxruntime", "session"]

INSTALL_HINT = "pip install 'bonsai-fl[export]' (onnx, onnxscript, onnxruntime)"


class QuantizeError(ValueError):
    """onnxruntime is missing, or the model cannot be quantised to int8."""


def require_onnxruntime(flag: str = "--format onnx") -> Any:
    """The ``onnxruntime`` module, or QuantizeError naming the extra that installs it."""
    try:
        import onnx  # noqa: F401 - torch.onnx.export and the checks need it
        import onnxruntime
    except ImportError as e:
        raise QuantizeError(f"{flag} needs the {e.name or 'onnxruntime'} package: "
                            f"{INSTALL_HINT}") from None
    onnxruntime.set_default_logger_severity(3)  # errors only: no optimiser chatter
    return onnxruntime


def session(path: str | Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session of ``path`` on ``threads`` intra-op threads and one
    inter-op thread (``threads=1``: one CPU thread in all)."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _is_weight(init: Any) -> bool:
    """A float initializer with two or more dimensions above 1: a weight matrix or a
    kernel (not a bias, a scale or a shape)."""
    from onnx import TensorProto

    float_types = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                   TensorProto.BFLOAT16)
    return init.data_type in float_types and sum(1 for d in init.dims if d > 1) >= 2


def float_weights(model: Any) -> list[tuple[str, str]]:
    """(op type, node name) of every node of an ONNX model, other than
    DequantizeLinear, that reads a float weight initializer (:func:`_is_weight`):
    in a quantised graph, the operators whose weights stayed float."""
    weights = {i.name for i in model.graph.initializer if _is_weight(i)}
    return [(n.op_type, n.name) for n in model.graph.node
            if n.op_type != "DequantizeLinear" and any(i in weights for i in n.input)]


def _calibration_reader(x: np.ndarray, input_name: str, batch: int = 32) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(
                {input_name: x[i:i + batch]} for i in range(0, len(x), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return Reader()


def quantize_int8(float_path: str | Path, out: str | Path, calibration: np.ndarray,
                  input_name: str = "input") -> dict[str, Any]:
    """Quantise the ONNX model at ``float_path`` to int8 into ``out``; see the module
    docstring. Returns the settings used (for the export report).

    Raises QuantizeError, naming the operators, when weights stay float in the
    quantised graph, and when the quantiser fails; ``out`` is then not written.
    """
    require_onnxruntime("--quantize int8")
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise QuantizeError("--calibration: no examples to calibrate int8 ranges on")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="bonsai-int8-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(float_path), str(pre))
            quantize_static(str(pre), str(q), _calibration_reader(calibration, input_name),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        except Exception as e:  # noqa: BLE001 - the quantiser raises many types; one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise QuantizeError(f"--quantize int8: onnxruntime's quantiser failed on this "
                                f"model: {first}") from None
        model = onnx.load(str(q))
        left = float_weights(model)
        if left:
            ops = sorted({op for op, _ in left})
            nodes = ", ".join(name or op for op, name in left[:4])
            raise QuantizeError(
                f"--quantize int8: operator(s) {', '.join(ops)} cannot be quantised by "
                f"onnxruntime's static int8 quantiser (their weights stay float: {nodes}); "
                "export without --quantize")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(q, out)
    return {"quant_format": "QDQ", "weights": "int8 per output channel",
            "activations": "uint8 per tensor", "calibration": "min-max",
            "calibration_examples": int(len(calibration))}
