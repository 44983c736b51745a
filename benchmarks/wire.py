"""Bytes and time of fl.wire encodings for a model-sized set of float32 tensors.

    python benchmarks/wire.py [--numel 11_000_000] [--repeats 3]

Prints one row per (density, encoding): payload bytes, bytes per entry, and
encode / decode wall time (best of ``--repeats``), tagged with the host and
versions. The byte column follows the formula in fl/wire.py's docstring.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from fl.wire import decode, encode

VARIANTS = {
    "dense": {},
    "bitmap": {"send_mask": True},
    "against-mask": {"send_mask": False},
    "bitmap+int8": {"send_mask": True, "quantize": True},
    "against+int8": {"send_mask": False, "quantize": True},
}


def _model(numel: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [numel // 2, numel // 4, numel // 8, numel - numel // 2 - numel // 4 - numel // 8]
    return {f"layer{i}.weight": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=11_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tensors = _model(args.numel, 0)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {args.numel} float32 entries"
    )
    head = ("density", "encoding", "bytes", "B/entry", "enc ms", "dec ms")
    print("{:>7} {:>13} {:>11} {:>8} {:>8} {:>8}".format(*head))
    for density in (1.0, 0.5, 0.1):
        gen = torch.Generator().manual_seed(1)
        masks = {k: torch.rand(t.shape, generator=gen) < density for k, t in tensors.items()}
        for label, kw in VARIANTS.items():
            if label == "dense" and density < 1.0:
                continue
            extra = {} if label == "dense" else {"masks": masks, "mask_version": 1}
            data = encode(tensors, **extra, **kw)
            known = {"known_masks": masks, "known_mask_version": 1}
            dkw = known if kw.get("send_mask") is False else {}
            t_enc = _best(lambda: encode(tensors, **extra, **kw), args.repeats)  # noqa: B023
            t_dec = _best(lambda: decode(data, **dkw), args.repeats)  # noqa: B023
            print(
                f"{density:>7.2f} {label:>13} {len(data):>11} {len(data) / args.numel:>8.3f} "
                f"{t_enc * 1e3:>8.1f} {t_dec * 1e3:>8.1f}"
            )


if __name__ == "__main__":
    main()
