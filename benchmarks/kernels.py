"""Step time of the masked optimizers and the compression kernels against plain torch.

    python benchmarks/kernels.py [--sizes 1e6 10e6 50e6] [--repeats 15] [--device auto]
                                 [--sweep-launch]

For each model size (parameters spread over the tensor shapes of a ResNet-18
scaled in width: convolutions, normalisation vectors, a classifier), measures
side by side, interleaved, over ``--repeats`` runs:

- MaskedSGD (momentum 0.9, weight decay 5e-4) and MaskedAdamW (weight decay
  1e-2), both with a 50%-dense mask, against torch.optim.SGD / AdamW with
  ``foreach=True`` unmasked, and the same followed by ``torch._foreach_mul_``
  of the masks (the obvious way to keep pruned weights at zero);
- each compression kernel against the obvious torch code (imported from
  tests/test_kernels_compress.py, as Liger-Kernel's benchmarks do);
- agreement: how far MaskedSGD / MaskedAdamW end from torch.optim after 20
  steps on the same gradients (all-ones mask, no options);
- with ``--sweep-launch`` (GPU), the fused optimizer kernels at each BLOCK and
  num_warps, and at a length that is not a multiple of 16.

Ratios use the minimum over the repeats (medians are recorded too). On a GPU
each sample times a batch of back-to-back calls (about 2 ms) and divides.
Targets (issue 3): on CPU the masked step within 1.10x of torch's unmasked
foreach step; on a GPU >= 1.5x faster than foreach + mask multiply and
>= 70% of memory bandwidth (bytes the fused kernel must move / time / peak;
peak is a device-to-device copy measured in the same run). Prints a table
and appends a JSON record tagged with the host, device and versions to
benchmarks/results/kernels-<device>.json.

Why one module of this length: one script over one set of shapes and one timing
method (benchmarks/common.py); its sections (optimizer steps, agreement with
torch.optim, the launch sweep, the compression kernels) make one record per run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' obvious torch code is the baseline

import fl.kernels as K  # noqa: E402
from benchmarks.common import append_record, interleaved, machine  # noqa: E402
from fl.kernels.adamw import masked_adamw_step_triton  # noqa: E402
from fl.kernels.sgd import masked_sgd_step_triton  # noqa: E402
from fl.optim import MaskedAdamW, MaskedSGD  # noqa: E402
from tests.test_kernels_compress import (  # noqa: E402
    obvious_gather,
    obvious_kth,
    obvious_pack_bits,
    obvious_quantize,
    obvious_scatter,
    obvious_segment_minmax,
    obvious_unpack_bits,
)

# --- model shapes ---------------------------------------------------------------


def resnet18_shapes(width: int, num_classes: int = 1000) -> list[tuple[int, ...]]:
    """Parameter shapes of a ResNet-18 whose first stage has ``width`` channels."""
    shapes: list[tuple[int, ...]] = [(width, 3, 7, 7), (width,), (width,)]
    c_in = width
    for stage in range(4):
        c = width * 2**stage
        for block in range(2):
            first_in = c_in if block == 0 else c
            shapes += [(c, first_in, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
            if block == 0 and first_in != c:
                shapes += [(c, first_in, 1, 1), (c,), (c,)]
        c_in = c
    shapes += [(num_classes, c_in), (num_classes,)]
    return shapes


def shapes_for(numel: int) -> list[tuple[int, ...]]:
    """ResNet-18 shapes whose width makes the total closest to ``numel``."""

    def total(w: int) -> int:
        return sum(torch.Size(s).numel() for s in resnet18_shapes(w))

    best = min(range(4, 512), key=lambda w: abs(total(w) - numel))
    return resnet18_shapes(best)


# --- timing ------------------------------------------------------------------------


def peak_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a large device-to-device copy (read + write), the attainable peak."""
    if device.type != "cuda":
        return None
    x = torch.empty(256 * 2**20, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = interleaved({"copy": lambda: y.copy_(x)}, 10, device)["copy"]["min"]
    return 2 * 256 * 2**20 * 4 / t


# --- optimizer benchmark -----------------------------------------------------------


def _tensors(shapes, device, seed):  # noqa: ANN001, ANN202
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device) * 1e-3 for s in shapes]
    masks = [(torch.rand(s, generator=g) < 0.5).to(device) for s in shapes]
    return params, grads, masks


def bench_optimizers(shapes, device, repeats) -> list[dict]:  # noqa: ANN001
    rows = []
    n = sum(torch.Size(s).numel() for s in shapes)
    configs = [
        ("SGD", "momentum=0.9 wd=5e-4", dict(lr=1e-3, momentum=0.9, weight_decay=5e-4)),
        ("SGD", "momentum=0.9 wd=0", dict(lr=1e-3, momentum=0.9, weight_decay=0.0)),
        ("AdamW", "wd=1e-2", dict(lr=1e-3, weight_decay=1e-2)),
    ]
    for kind, label, hyper in configs:
        params, grads, masks = _tensors(shapes, device, seed=0)
        fmasks = [m.float() for m in masks]
        ref_params = [torch.nn.Parameter(p.clone()) for p in params]
        our_params = [torch.nn.Parameter(p * m) for p, m in zip(params, masks, strict=True)]
        for rp, op, g in zip(ref_params, our_params, grads, strict=True):
            rp.grad = g.clone()
            op.grad = g.clone()
        del params, grads
        if kind == "SGD":
            ref = torch.optim.SGD(ref_params, foreach=True, **hyper)
            ours = MaskedSGD(our_params, masks=masks, **hyper)
            # fused kernel traffic per entry: w, g, buf read; w, buf written; 1-byte mask
            bytes_per_entry = 4 * 5 + 1
        else:
            ref = torch.optim.AdamW(ref_params, foreach=True, **hyper)
            ours = MaskedAdamW(our_params, masks=masks, **hyper)
            bytes_per_entry = 4 * 7 + 1  # w, g, m, v read; w, m, v written; mask

        def ref_step(ref=ref) -> None:  # noqa: ANN001
            ref.step()

        def ref_mask_step(ref=ref, ref_params=ref_params, fmasks=fmasks) -> None:  # noqa: ANN001
            ref.step()
            with torch.no_grad():
                torch._foreach_mul_(ref_params, fmasks)

        fns = {"torch": ref_step, "torch+mask": ref_mask_step, "masked": ours.step}
        if kind == "AdamW":
            fused_params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
            for fp, rp in zip(fused_params, ref_params, strict=True):
                fp.grad = rp.grad.clone()
            fused = torch.optim.AdamW(fused_params, fused=True, **hyper)
            fns["torch fused (info)"] = fused.step
        stats = interleaved(fns, repeats, device)
        t = {k: v["min"] for k, v in stats.items()}
        med = {k: v["median"] for k, v in stats.items()}
        row = {
            "op": f"Masked{kind}.step",
            "config": label,
            "numel": n,
            "tensors": len(shapes),
            "seconds_min": t,
            "seconds_median": med,
            "ratio_vs_torch_foreach": t["masked"] / t["torch"],
            "ratio_vs_torch_foreach_median": med["masked"] / med["torch"],
            "ratio_vs_torch_foreach_plus_mask": t["masked"] / t["torch+mask"],
            "speedup_vs_torch_foreach_plus_mask": t["torch+mask"] / t["masked"],
            "masked_gb_per_s": bytes_per_entry * n / t["masked"] / 1e9,
            "backend": "triton" if ours.backends[0] == "triton" else "torch reference",
        }
        rows.append(row)
        del ref, ours, ref_params, our_params, fmasks, masks, fns
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in fp32 units in the last place between same-signed entries
    (their bit patterns as integers differ by that many representable values)."""
    ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)  # sign-magnitude to a monotone line
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def agreement(shapes, device, steps: int = 20) -> list[dict]:  # noqa: ANN001
    """How far MaskedSGD / MaskedAdamW (all-ones mask, options off, default backend)
    end from torch.optim after ``steps`` steps on the same gradients, per torch variant:
    entries that differ, the largest difference in ulps and in absolute value."""
    g = torch.Generator(device="cpu").manual_seed(3)
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * 1e-2 for s in shapes] for _ in range(steps)]
    cases = [
        ("SGD", dict(lr=1e-2, momentum=0.9, weight_decay=5e-4), MaskedSGD, torch.optim.SGD,
         ["foreach", "single-tensor"]),
        ("AdamW", dict(lr=1e-3, weight_decay=1e-2), MaskedAdamW, torch.optim.AdamW,
         ["foreach", "single-tensor", "fused"]),
    ]  # fmt: skip
    rows = []
    for name, hyper, ours_cls, torch_cls, variants in cases:
        models = {v: [torch.nn.Parameter(p.clone().to(device)) for p in start] for v in variants}
        mine = [torch.nn.Parameter(p.clone().to(device)) for p in start]
        opts = {
            v: torch_cls(ps, foreach=v == "foreach", **({"fused": True} if v == "fused" else {}),
                         **hyper)
            for v, ps in models.items()
        }  # fmt: skip
        ours = ours_cls(mine, masks=[torch.ones(s, dtype=torch.bool, device=device)
                                     for s in shapes], **hyper)  # fmt: skip
        for step_grads in grads:
            for ps in [*models.values(), mine]:
                for p, gr in zip(ps, step_grads, strict=True):
                    if p.grad is None:
                        p.grad = gr.to(device)
                    else:
                        p.grad.copy_(gr)
            for opt in [*opts.values(), ours]:
                opt.step()
        flat_mine = torch.cat([p.detach().reshape(-1) for p in mine])
        for v, ps in models.items():
            flat_ref = torch.cat([p.detach().reshape(-1) for p in ps])
            rows.append({
                "op": f"agreement Masked{name}", "vs": f"torch.optim.{name} {v}",
                "steps": steps, "numel": flat_ref.numel(),
                "backend": "triton" if ours.backends[0] == "triton" else "torch reference",
                "entries_differing": int((flat_mine != flat_ref).sum()),
                "max_ulps": _ulps(flat_mine, flat_ref),
                "max_abs": float((flat_mine - flat_ref).abs().max()),
            })  # fmt: skip
    return rows


def sweep_launch(n: int, device: torch.device, repeats: int, peak: float | None) -> list[dict]:
    """The fused optimizer kernels at each (BLOCK, num_warps): what the GPU default
    (``K.OPTIM_GPU_BLOCK``) should be. One flat buffer of ``n`` entries,
    50%-dense uint8 mask, SGD with momentum and decay, AdamW with decay."""
    g = torch.Generator(device="cpu").manual_seed(2)
    param = torch.randn(n, generator=g).to(device)
    grad = (torch.randn(n, generator=g) * 1e-3).to(device)
    mask = (torch.rand(n, generator=g) < 0.5).to(device).view(torch.uint8)
    s1, s2 = torch.zeros_like(param), torch.zeros_like(param)
    kernels = {
        "sgd": (4 * 5 + 1, lambda **k: masked_sgd_step_triton(
            param, grad, s1, mask, lr=1e-3, momentum=0.9, weight_decay=5e-4, **k)),
        "adamw": (4 * 7 + 1, lambda **k: masked_adamw_step_triton(
            param, grad, s1, s2, mask, step=1, lr=1e-3, weight_decay=1e-2, **k)),
    }  # fmt: skip

    def row(op: str, numel: int, block: int, warps: int, seconds: float, bpe: int) -> dict:
        gbps = bpe * numel / seconds / 1e9
        return {
            "op": op, "numel": numel, "block": block, "num_warps": warps,
            "seconds_min": seconds, "gb_per_s": gbps,
            "bandwidth_fraction": gbps * 1e9 / peak if peak else None,
        }  # fmt: skip

    rows = []
    for name, (bytes_per_entry, step) in kernels.items():
        fns = {
            (block, warps): (lambda b=block, w=warps, step=step: step(block=b, num_warps=w))
            for block in (512, 1024, 2048, 4096)
            for warps in (2, 4, 8)
        }
        stats = interleaved(fns, repeats, device)
        for (block, warps), st in stats.items():
            rows.append(row(f"sweep {name}", n, block, warps, st["min"], bytes_per_entry))
    # the same SGD step over n - 2 entries (n % 16 = 14): what fl.optim's padding of its
    # flat buffers to a multiple of 16 avoids (Triton cannot vectorise the bounds mask)
    odd = n - 2
    st = interleaved(
        {"odd": lambda: masked_sgd_step_triton(
            param[:odd], grad[:odd], s1[:odd], mask[:odd], lr=1e-3, momentum=0.9,
            weight_decay=5e-4)},
        repeats, device,
    )["odd"]  # fmt: skip
    rows.append(row("sweep sgd n%16=14", odd, K.OPTIM_GPU_BLOCK, 4, st["min"], 4 * 5 + 1))
    return rows


# --- compression benchmark ---------------------------------------------------------


def bench_compression(shapes, device, repeats) -> list[dict]:  # noqa: ANN001
    sizes = [torch.Size(s).numel() for s in shapes]
    n = sum(sizes)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.rand(n, generator=g).to(device)
    a = torch.randn(n, generator=g).to(device)
    mask = x < 0.5
    kept = obvious_gather(a, mask)
    packed = obvious_pack_bits(mask)
    q, scales = obvious_quantize(a, 256)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=device)
    acc = torch.zeros(n, device=device)
    k = n // 2

    def obvious_sq_dev() -> None:
        acc.add_(0.3 * (a - x) ** 2)

    def obvious_dequant() -> torch.Tensor:
        return q.float() * scales.repeat_interleave(256)[:n]

    def obvious_quantile() -> torch.Tensor:
        if n <= 2**24:
            return torch.quantile(x, 0.7)
        srt = torch.sort(x).values  # what one writes once torch.quantile refuses
        r = 0.7 * (n - 1)
        return torch.lerp(srt[int(r)], srt[int(r) + 1], r - int(r))

    cases = {
        "pack_bits": (lambda: K.pack_bits(mask), lambda: obvious_pack_bits(mask)),
        "unpack_bits": (lambda: K.unpack_bits(packed, n), lambda: obvious_unpack_bits(packed, n)),
        "gather_kept": (lambda: K.gather_kept(a, mask), lambda: obvious_gather(a, mask)),
        "scatter_kept": (lambda: K.scatter_kept(kept, mask), lambda: obvious_scatter(kept, mask)),
        "quantize_int8_blocks": (
            lambda: K.quantize_int8_blocks(a),
            lambda: obvious_quantize(a, 256),
        ),
        "dequantize_int8_blocks": (lambda: K.dequantize_int8_blocks(q, scales), obvious_dequant),
        "sq_dev_accumulate": (lambda: K.sq_dev_accumulate(acc, a, x, 0.3), obvious_sq_dev),
        "segment_minmax_normalize": (
            lambda: K.segment_minmax_normalize(a, offsets),
            lambda: obvious_segment_minmax(a, offsets.cpu()),
        ),
        "threshold_mask": (lambda: K.threshold_mask(x, 0.5), lambda: x > 0.5),
        "kth_value": (lambda: K.kth_value(x, k), lambda: obvious_kth(x, k)),
        "quantile": (lambda: K.quantile(x, 0.7), obvious_quantile),
    }
    rows = []
    for name, (ours, obvious) in cases.items():
        slow = name in ("kth_value", "quantile") or (n > 20e6 and "kept" in name)
        reps = max(3, repeats // 4) if slow else repeats
        stats = interleaved({"ours": ours, "obvious": obvious}, reps, device, warmup=1)
        t = {k: v["min"] for k, v in stats.items()}
        rows.append(
            {
                "op": name,
                "numel": n,
                "seconds_min": t,
                "seconds_median": {k: v["median"] for k, v in stats.items()},
                "speedup_vs_obvious": t["obvious"] / t["ours"],
            }
        )
    return rows


# --- report ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 10e6, 50e6])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--skip-compression", action="store_true")
    parser.add_argument(
        "--sweep-launch",
        action="store_true",
        help="GPU: also time the optimizer kernels at each BLOCK/num_warps",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file to append to")
    args = parser.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the benchmark times real kernels")

    info = machine(device)
    peak = peak_bandwidth(device)
    print(f"# {info['device']} | {info['cpu']} x{info['cpu_count']} | torch {info['torch']}"
          f" | triton {info['triton']} | load {info['load_average']}"
          f" | times: min of {args.repeats} interleaved runs")  # fmt: skip
    if peak:
        print(f"# measured copy bandwidth: {peak / 1e9:.0f} GB/s")
    rows: list[dict] = []
    for size in args.sizes:
        shapes = shapes_for(int(size))
        opt_rows = bench_optimizers(shapes, device, args.repeats)
        for r in opt_rows:
            t = r["seconds_min"]
            line = (
                f"{r['op']:<17} {r['config']:<20} n={r['numel'] / 1e6:5.1f}M"
                f"  torch {t['torch'] * 1e3:8.2f} ms"
                f"  torch+mask {t['torch+mask'] * 1e3:8.2f} ms  masked {t['masked'] * 1e3:8.2f} ms"
                f"  masked/torch {r['ratio_vs_torch_foreach']:.3f}x"
                f"  masked/(torch+mask) {r['ratio_vs_torch_foreach_plus_mask']:.3f}x"
                f"  (medians: masked/torch {r['ratio_vs_torch_foreach_median']:.3f}x)"
            )
            if "torch fused (info)" in t:
                line += f"  [torch fused AdamW {t['torch fused (info)'] * 1e3:.2f} ms]"
            if peak:
                r["bandwidth_fraction"] = r["masked_gb_per_s"] * 1e9 / peak
                line += f"  {r['masked_gb_per_s']:.0f} GB/s = {r['bandwidth_fraction']:.0%} peak"
            print(line, flush=True)
        rows += opt_rows
        if not args.skip_compression:
            comp_rows = bench_compression(shapes, device, args.repeats)
            for r in comp_rows:
                t = r["seconds_min"]
                print(
                    f"{r['op']:<26} n={r['numel'] / 1e6:6.1f}M  ours {t['ours'] * 1e3:9.2f} ms"
                    f"  obvious {t['obvious'] * 1e3:9.2f} ms"
                    f"  speedup {r['speedup_vs_obvious']:.2f}x",
                    flush=True,
                )
            rows += comp_rows
        gc.collect()

    for r in agreement(shapes_for(int(min(args.sizes))), device):
        print(f"{r['op']:<24} vs {r['vs']:<32} {r['steps']} steps, {r['backend']}:"
              f" {r['entries_differing']} of {r['numel']} entries differ,"
              f" max {r['max_ulps']} ulp, max abs {r['max_abs']:.3g}")  # fmt: skip
        rows.append(r)
    if args.sweep_launch:
        if device.type != "cuda":
            parser.error("--sweep-launch needs a GPU (Triton kernels are timed compiled)")
        sweep = sweep_launch(int(max(args.sizes)), device, args.repeats, peak)
        for r in sweep:
            frac = f" = {r['bandwidth_fraction']:.0%} peak" if r["bandwidth_fraction"] else ""
            print(
                f"{r['op']:<22} n={r['numel']} BLOCK {r['block']:>5} warps {r['num_warps']:>2}"
                f"  {r['seconds_min'] * 1e3:8.3f} ms  {r['gb_per_s']:6.0f} GB/s{frac}"
            )
        rows += sweep

    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "peak_copy_bandwidth_bytes_per_s": peak,
        "repeats": args.repeats,
        "rows": rows,
    }
    append_record(record, "kernels", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
