"""``bonsai export RESULTS_DIR --format torchscript|onnx [--quantize int8]``: the final
global model, physically shrunk by AutoFLIP's structure, saved for on-device
inference, checked in the runtime that runs it (ONNX: onnxruntime)."""

from __future__ import annotations

import argparse

from fl.cli.common import fail
from fl.export import FORMATS, QUANTIZE, ExportError, ExportMismatch, export_run
from fl.progress import human_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="save a run's final model (shrunk) as TorchScript or ONNX")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="a run's results folder")
    p.add_argument("--format", choices=FORMATS, default="torchscript")
    p.add_argument("--out", help="output file (default RESULTS_DIR/model.torchscript.pt or "
                   "RESULTS_DIR/model.onnx)")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="also write a post-training int8 model (ONNX: onnxruntime's static "
                   "quantiser, next to the float file as *.int8.onnx)")
    p.add_argument("--calibration", type=int, default=128, metavar="N",
                   help="test examples that calibrate the int8 ranges (default 128)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads while measuring latency (default 1, like a small device)")
    p.add_argument("--runs", type=int, default=50, help="timed runs for the latency median")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        r = export_run(args.results_dir, args.format, args.out, args.threads, args.runs,
                       quantize=args.quantize, calibration=args.calibration)
    except ExportMismatch as e:
        return fail(str(e), code=1)
    except ExportError as e:
        return fail(str(e))
    shrink = "shrunk by structure.json" if r.structured else "no structure.json: not shrunk"
    print(f"wrote {r.path} ({r.format}, {shrink})")
    print(f"  parameters     {r.params:,} (global model {r.full_params:,}, "
          f"{100 * r.params / max(1, r.full_params):.1f}%)")
    print(f"  file size      {human_bytes(r.file_bytes)}")
    print(f"  FLOPs/example  {r.flops:,} (global model {r.full_flops:,}, "
          f"{100 * r.flops / max(1, r.full_flops):.1f}%)")
    side = ", ".join(f"{name} {ms:.4f} ms" for name, ms in r.latency_by_runtime.items())
    print(f"  CPU latency    {side} per example (batch 1, {r.threads} thread(s), median of "
          f"{args.runs})")
    print(f"  predictions    {r.equal_predictions}/{r.test_examples} test examples equal to the "
          f"global model in {r.latency_runtime} (max logit difference "
          f"{r.max_abs_logit_diff:.2e}); accuracy {100 * r.accuracy:.2f}%")
    if r.int8 is not None:
        q = r.int8
        print(f"wrote {q.path} ({q.settings['quant_format']}: weights "
              f"{q.settings['weights']}, activations {q.settings['activations']}; "
              f"{q.settings['calibration']} calibration on "
              f"{q.settings['calibration_examples']} test examples)")
        print(f"  file size      {human_bytes(q.file_bytes)} (float {human_bytes(r.file_bytes)}, "
              f"{100 * q.file_bytes / max(1, r.file_bytes):.1f}%)")
        print(f"  CPU latency    onnxruntime {q.latency_ms:.4f} ms per example (float "
              f"{r.latency_by_runtime.get('onnxruntime', r.latency_ms):.4f} ms)")
        print(f"  accuracy       {100 * q.accuracy:.2f}% (float {100 * q.float_accuracy:.2f}%, "
              f"drop {100 * q.accuracy_drop:+.2f} points; {q.equal_to_float}/{r.test_examples} "
              "predictions equal to the float model's)")
    return 0
