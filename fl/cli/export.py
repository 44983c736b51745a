"""``bonsai export RESULTS_DIR --format torchscript|onnx``: the final global model,
physically shrunk by AutoFLIP's structure, saved for on-device inference."""

from __future__ import annotations

import argparse

from fl.cli.common import fail
from fl.export import FORMATS, ExportError, ExportMismatch, export_run
from fl.progress import human_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="save a run's final model (shrunk) as TorchScript or ONNX")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="a run's results folder")
    p.add_argument("--format", choices=FORMATS, default="torchscript")
    p.add_argument("--out", help="output file (default RESULTS_DIR/model.torchscript.pt or "
                   "RESULTS_DIR/model.onnx)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads while measuring latency (default 1, like a small device)")
    p.add_argument("--runs", type=int, default=50, help="timed runs for the latency median")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        r = export_run(args.results_dir, args.format, args.out, args.threads, args.runs)
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
    print(f"  CPU latency    {r.latency_ms:.3f} ms per example (batch 1, {r.threads} thread(s), "
          f"median of {args.runs}; {r.latency_runtime})")
    print(f"  predictions    {r.equal_predictions}/{r.test_examples} test examples equal to the "
          f"global model (max logit difference {r.max_abs_logit_diff:.2e})")
    return 0
