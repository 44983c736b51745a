"""Export a run's final global model for on-device inference, physically shrunk.

A results folder (:mod:`fl.results`) holds ``config.json`` and
``final_model.pt`` (the global model in full-model shapes). When AutoFLIP ran,
it also holds ``structure.json``: group name -> kept unit indices
(:func:`fl.pruning.structure_to_json`). :func:`export_run`

1. loads the global model as saved (``weights_only=True``); AutoFLIP serves it
   with its removed units exactly zero;
2. checks ``structure.json`` against two sources it does not come from: the
   weights (every unit it removes must be all zero in ``final_model.pt``, every
   unit it keeps must not be: :func:`fl.pruning.zero_units`) and, when the run
   left one, the strategy state in ``checkpoint.pt`` (the structure the server
   held); a mismatch names the group and units;
3. builds the small model with :func:`fl.pruning.shrink_model` and loads
   :func:`fl.pruning.shrink_state` of the global state: removed filters and
   neurons are gone, not zeros (without ``structure.json`` the model is exported
   as it is);
4. saves it as TorchScript (``torch.jit.trace``) or ONNX (``torch.onnx.export``
   with ``dynamo=False``, opset 17, a dynamic batch dimension);
5. reloads the saved file in the runtime a device runs it in (TorchScript:
   ``torch.jit.load``; ONNX: onnxruntime's CPU provider) and checks that it
   predicts the same classes on the run's test split as the full global model
   as saved (full shapes, zeros at the removed units, not rebuilt from
   ``structure.json``); measures parameters, file size, FLOPs per example
   (:func:`fl.pruning.count_flops`), test accuracy and the latency of one
   example on ``threads`` CPU threads (ONNX: in onnxruntime and, side by side,
   in TorchScript);
6. with ``quantize="int8"`` (ONNX only), quantises the checked file with
   onnxruntime's static quantiser (:mod:`fl.quantize`), calibrated on a slice
   of the test split, and reports its size, latency and accuracy next to the
   float model's.

Why one module of this length: the six steps are one command's pipeline (``bonsai
export``), each checking what the step before produced; its helpers (saving, predicting,
timing, the int8 comparison) serve only it, and the runtimes' sessions and the
quantiser are in fl/quantize.py.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fl.checkpoint import CHECKPOINT, CheckpointError
from fl.checkpoint import load as load_checkpoint
from fl.config import ConfigError, ExperimentConfig, build
from fl.data import load_test
from fl.dotted import flatten
from fl.models import build_model, example_input
from fl.pruning import (
    UnitGroup,
    count_flops,
    groups_for,
    shrink_model,
    shrink_state,
    structure_from_json,
    validate_structure,
    zero_units,
)
from fl.quantize import QuantizeError, quantize_int8, require_onnxruntime, session

__all__ = ["FORMATS", "QUANTIZE", "ExportError", "ExportMismatch", "ExportReport", "Int8Report",
           "export_run", "load_global"]

FORMATS = ("torchscript", "onnx")
STRUCTURE_JSON = "structure.json"
FINAL_MODEL = "final_model.pt"
SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}


class ExportError(ValueError):
    """The results folder cannot be exported (missing or inconsistent files)."""


class ExportMismatch(ExportError):
    """The saved file does not predict what the global model predicts."""


@dataclass(frozen=True)
class GlobalModel:
    """The final global model of a run, in both views."""

    cfg: ExperimentConfig
    full: nn.Module  #: full-model shapes, as saved (removed units are zero: checked)
    small: nn.Module  #: physically shrunk (== full when there is no structure)
    input_shape: tuple[int, ...]
    num_classes: int
    structured: bool


@dataclass(frozen=True)
class Int8Report:
    """The int8 model next to the float one (``--quantize int8``)."""

    path: Path
    file_bytes: int
    latency_ms: float  #: median onnxruntime latency of one example, same threads
    accuracy: float  #: on the whole test split (calibration slice included)
    float_accuracy: float
    accuracy_drop: float  #: float_accuracy - accuracy, in [-1, 1]
    equal_to_float: int  #: test examples where int8 and float predict the same class
    settings: dict[str, Any]  #: format, weights, activations, calibration (fl.quantize)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_run` wrote and measured."""

    path: Path
    format: str
    structured: bool
    params: int
    full_params: int
    file_bytes: int
    flops: int
    full_flops: int
    latency_ms: float  #: median CPU latency of one example (batch 1), in latency_runtime
    latency_runtime: str
    #: runtime -> median latency (ms) of one example: the exported file's runtime and,
    #: for ONNX, TorchScript (the same small model traced) side by side
    latency_by_runtime: dict[str, float]
    threads: int
    test_examples: int
    equal_predictions: int
    max_abs_logit_diff: float
    accuracy: float  #: of the exported model on the test split
    int8: Int8Report | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        if self.int8 is not None:
            d["int8"]["path"] = str(self.int8.path)
        return d


def load_global(results_dir: str | Path) -> GlobalModel:
    """Read ``config.json``, ``final_model.pt`` and (if present) ``structure.json``."""
    d = Path(results_dir).expanduser()
    if not d.is_dir():
        raise ExportError(f"RESULTS_DIR: {str(d)!r} is not a folder")
    for f in ("config.json", FINAL_MODEL):
        if not (d / f).is_file():
            raise ExportError(f"RESULTS_DIR: {str(d)!r} has no {f} (did the run finish?)")
    try:
        cfg = build(flatten(json.loads((d / "config.json").read_text())))
    except (ConfigError, json.JSONDecodeError) as e:
        raise ExportError(f"{d / 'config.json'}: not a valid experiment config ({e})") from None
    try:
        test = load_test(cfg)
    except Exception as e:  # noqa: BLE001 - any loader failure is one line for the user
        raise ExportError(f"cannot load the run's test data ({cfg.dataset.name}): {e}") from None
    shape, classes = test.input_shape, test.num_classes
    try:
        state = torch.load(d / FINAL_MODEL, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - torch raises many types on a damaged or unsafe file
        raise ExportError(f"{d / FINAL_MODEL} is not a valid, safe PyTorch state dict (damaged, "
                          "or it holds objects other than tensors); refused without running "
                          "anything in it") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise ExportError(f"{d / FINAL_MODEL} is not a state dict of tensors")
    full = build_model(cfg.model, shape, classes)
    try:
        full.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(f"{d / FINAL_MODEL} does not fit model {cfg.model!r} with input "
                          f"{shape} and {classes} classes: {str(e).splitlines()[0]}") from None
    small: nn.Module = full
    structured = (d / STRUCTURE_JSON).is_file()
    if structured:
        try:
            groups = groups_for(cfg.model, shape, classes)
            structure = validate_structure(
                structure_from_json((d / STRUCTURE_JSON).read_text()), groups)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ExportError(f"{d / STRUCTURE_JSON} does not fit the model: {e}") from None
        check_structure(d, structure, groups, state)
        small = shrink_model(cfg.model, shape, classes, structure)
        small.load_state_dict(shrink_state(state, groups, structure))
    full.eval()
    small.eval()
    return GlobalModel(cfg, full, small, tuple(shape), classes, structured)


def _units(idx: torch.Tensor | list[int], limit: int = 8) -> str:
    """Unit indices for one line: the first ``limit`` and how many there are."""
    units = [int(i) for i in idx]
    shown = ", ".join(map(str, units[:limit]))
    return f"[{shown}{', ...' if len(units) > limit else ''}] ({len(units)} units)"


def check_structure(d: Path, structure: Mapping[str, torch.Tensor], groups: Sequence[UnitGroup],
                    state: Mapping[str, torch.Tensor]) -> None:
    """Check ``structure.json`` (validated, every group present) against the run's
    checkpoint (the server's own structure, when ``checkpoint.pt`` is there) and
    against the weights of ``final_model.pt`` (AutoFLIP zeroes exactly the removed
    units); ExportError naming the group and units on the first mismatch."""
    where = d / STRUCTURE_JSON
    if (d / CHECKPOINT).is_file():
        try:
            ckpt = load_checkpoint(d, flag="RESULTS_DIR")
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        held = ckpt.strategy.get("structure")
        if held is not None:
            try:
                held = validate_structure(held, groups)
            except (ValueError, TypeError) as e:
                raise ExportError(f"{d / CHECKPOINT}: its structure does not fit the model: "
                                  f"{e}") from None
            for g in groups:
                want, got = set(held[g.name].tolist()), set(structure[g.name].tolist())
                if want != got:
                    raise ExportError(
                        f"{where}: group {g.name!r} keeps {len(got)} units, the run's "
                        f"{CHECKPOINT} {len(want)}; units kept only in {STRUCTURE_JSON}: "
                        f"{_units(sorted(got - want))}, only in the checkpoint: "
                        f"{_units(sorted(want - got))}; not exported")
    try:
        zero = zero_units(groups, state)
    except ValueError as e:
        raise ExportError(f"{d / FINAL_MODEL}: {e}") from None
    for g in groups:
        kept = torch.zeros(g.n_units, dtype=torch.bool)
        kept[structure[g.name]] = True
        removed_live = torch.nonzero(~kept & ~zero[g.name]).reshape(-1)
        if removed_live.numel():
            raise ExportError(
                f"{where}: group {g.name!r}: it removes units {_units(removed_live)} whose "
                f"weights are not zero in {FINAL_MODEL} (the run removed only all-zero units); "
                "the structure does not belong to this model; not exported")
        kept_dead = torch.nonzero(kept & zero[g.name]).reshape(-1)
        if kept_dead.numel():
            raise ExportError(
                f"{where}: group {g.name!r}: it keeps units {_units(kept_dead)} whose weights "
                f"are all zero in {FINAL_MODEL} (units the run removed); the structure does "
                "not belong to this model; not exported")


def _save(model: nn.Module, example: torch.Tensor, fmt: str, path: Path) -> None:
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        traced.save(str(path))
        return
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _ts_predict(module: Any) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def _ort_predict(sess: Any) -> Callable[[np.ndarray], np.ndarray]:
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(None, {name: x})[0])

    return run


def _predict_all(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.concatenate([predict(x[i:i + 256]) for i in range(0, len(x), 256)])


def _latency_ms(call: Callable[[np.ndarray], Any], x: np.ndarray, runs: int) -> float:
    """Median seconds of ``call(x)`` over ``runs`` timed calls (after a warm-up), in ms."""
    for _ in range(min(10, runs)):
        call(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _calibration_slice(n_test: int, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` test examples (a seeded permutation: every class is likely in)."""
    return np.random.default_rng(seed).permutation(n_test)[:min(n, n_test)]


QUANTIZE = ("int8",)


def export_run(results_dir: str | Path, fmt: str = "torchscript", out: str | Path | None = None,
               threads: int = 1, runs: int = 50, quantize: str | None = None,
               calibration: int = 128) -> ExportReport:
    """Export the final global model of ``results_dir``; see the module docstring.

    Raises
    ------
    ExportError
        Bad format, missing files or packages, a structure that does not fit the
        model, a model that cannot be quantised, or (:class:`ExportMismatch`) an
        exported file whose predictions differ from the global model's.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    if threads < 1 or runs < 1:
        raise ExportError("--threads and --runs must be >= 1")
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise ExportError(f"--quantize: got {quantize!r}; allowed: {', '.join(QUANTIZE)}")
        if fmt != "onnx":
            raise ExportError(f"--quantize {quantize}: needs --format onnx (onnxruntime's "
                              f"quantiser); got --format {fmt}")
        if calibration < 1:
            raise ExportError(f"--calibration: got {calibration}; allowed: >= 1")
    if fmt == "onnx":
        try:
            require_onnxruntime()
        except QuantizeError as e:
            raise ExportError(str(e)) from None
    g = load_global(results_dir)
    path = Path(out) if out else Path(results_dir) / f"model{SUFFIX[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example_input(g.small, g.input_shape)
    test = load_test(g.cfg).test  # as the model takes it (uint8 images scaled, normalised)
    x_test = test.transform(test.x, None, train=False).numpy()
    if x_test.dtype.kind == "f":  # token ids stay integers
        x_test = x_test.astype(np.float32)
    y_test = test.y.numpy()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            # torch 2.13 marks TorchScript and the TorchScript-based ONNX exporter deprecated;
            # both still work and are what small runtimes load today (DESIGN.md, checked)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            _save(g.small, example, fmt, path)
            if fmt == "onnx":
                import onnx

                try:
                    onnx.checker.check_model(onnx.load(str(path)))
                    sess = session(path, threads)
                except Exception as e:  # noqa: BLE001 - onnx/onnxruntime raise many types
                    raise ExportMismatch(f"{path}: onnxruntime cannot load the exported file: "
                                         f"{str(e).strip().splitlines()[0]}") from None
                predict, runtime = _ort_predict(sess), "onnxruntime (CPU)"
                with torch.no_grad():
                    ts = torch.jit.trace(g.small, example)
            else:
                ts = torch.jit.load(str(path), map_location="cpu")
                ts.eval()
                predict, runtime = _ts_predict(ts), "TorchScript (torch.jit.load)"
        with torch.no_grad():
            want = g.full(torch.from_numpy(x_test)).numpy()
        got = _predict_all(predict, x_test)
        latency = {("onnxruntime" if fmt == "onnx" else "torchscript"):
                   _latency_ms(predict, x_test[:1], runs)}
        if fmt == "onnx":
            latency["torchscript"] = _latency_ms(_ts_predict(ts), x_test[:1], runs)
    finally:
        torch.set_num_threads(prev_threads)
    equal = int((got.argmax(1) == want.argmax(1)).sum())
    accuracy = float((got.argmax(1) == y_test).mean()) if len(y_test) else 0.0
    first = next(iter(latency.values()))
    report = ExportReport(
        path=path, format=fmt, structured=g.structured,
        params=sum(p.numel() for p in g.small.parameters()),
        full_params=sum(p.numel() for p in g.full.parameters()),
        file_bytes=path.stat().st_size,
        flops=count_flops(g.small, g.input_shape), full_flops=count_flops(g.full, g.input_shape),
        latency_ms=round(first, 4), latency_runtime=runtime,
        latency_by_runtime={k: round(v, 4) for k, v in latency.items()}, threads=threads,
        test_examples=len(x_test), equal_predictions=equal,
        max_abs_logit_diff=float(np.abs(got - want).max()) if len(got) else 0.0,
        accuracy=round(accuracy, 6),
    )
    report_path = path.parent / (path.name + ".json")
    report_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if equal != len(x_test):
        raise ExportMismatch(f"the exported model predicts {len(x_test) - equal} of {len(x_test)} "
                             f"test examples differently from the global model (max logit "
                             f"difference {report.max_abs_logit_diff:.3g}); {path} is not usable")
    if quantize == "int8":
        report = replace(report, int8=_int8(path, x_test, y_test, got, accuracy, threads, runs,
                                            _calibration_slice(len(x_test), calibration,
                                                               g.cfg.seed)))
        report_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report


def _int8(path: Path, x_test: np.ndarray, y_test: np.ndarray, float_logits: np.ndarray,
          float_accuracy: float, threads: int, runs: int, calib: np.ndarray) -> Int8Report:
    """Quantise the checked float file, then measure the int8 one as the float one was."""
    q_path = path.with_name(path.name.removesuffix(".onnx") + ".int8.onnx")
    try:
        settings = quantize_int8(path, q_path, x_test[calib])
    except QuantizeError as e:
        raise ExportError(str(e)) from None
    predict = _ort_predict(session(q_path, threads))
    got = _predict_all(predict, x_test)
    acc = float((got.argmax(1) == y_test).mean()) if len(y_test) else 0.0
    return Int8Report(
        path=q_path, file_bytes=q_path.stat().st_size,
        latency_ms=round(_latency_ms(predict, x_test[:1], runs), 4),
        accuracy=round(acc, 6), float_accuracy=round(float_accuracy, 6),
        accuracy_drop=round(float_accuracy - acc, 6),
        equal_to_float=int((got.argmax(1) == float_logits.argmax(1)).sum()),
        settings=settings,
    )
