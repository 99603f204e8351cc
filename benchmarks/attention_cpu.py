#!/usr/bin/env python3
"""Forward+backward time of causal attention on the CPU: the blockwise primitive against naive autodiff.

    python benchmarks/attention_cpu.py [--shapes 12x4x64x32,4x4x1024x32] [--blocks 64]
                                       [--dtype float32] [--repeats 7]

Per shape B×H×T×d and block size, the median (and best) over --repeats timed calls, after one
warm-up, of ad.vjp followed by the VJP with a random cotangent (gradients for q, k and v):
  blockwise   mirascore.lm.attention.causal_attention(q, k, v, block)  (one primitive, no T×T array)
  naive       softmax(q kᵀ/√d + causal mask) v written with autodiff ops (tests/test_lm_attention.py)
The ratio is naive / blockwise: above 1, the blockwise primitive is faster. Calls alternate
between the two so that a busy machine slows both alike.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                                      # run from a checkout, uninstalled
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mirascore.autodiff as ad                                    # noqa: E402
from mirascore.lm.attention import causal_attention               # noqa: E402
from test_lm_attention import naive_attention                     # noqa: E402
from _machine import cpu_model                                    # noqa: E402


def fwd_bwd(f, args, d_out):
    out, pull = ad.vjp(f, *args)
    return pull(d_out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="12x4x64x32,4x4x1024x32", help="B x H x T x d, comma-separated")
    parser.add_argument("--blocks", default="64", help="block sizes of the primitive, comma-separated")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"Python {platform.python_version()}; {args.dtype}; fwd+bwd, median (best) of {args.repeats}")
    print("| B×H×T×d | block | blockwise ms | naive ms | naive / blockwise |")
    print("|---|--:|--:|--:|--:|")
    for shape in args.shapes.split(","):
        B, H, T, d = (int(n) for n in shape.split("x"))
        rng = np.random.default_rng(0)
        qkv = [rng.standard_normal((B, H, T, d)).astype(dtype) for _ in range(3)]
        d_out = rng.standard_normal((B, H, T, d)).astype(dtype)
        for block in (int(b) for b in args.blocks.split(",")):
            runs = {"blockwise": lambda: fwd_bwd(lambda *a: causal_attention(*a, block=block), qkv, d_out),
                    "naive": lambda: fwd_bwd(naive_attention, qkv, d_out)}
            times = {name: [] for name in runs}
            for fn in runs.values():
                fn()
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            best = {name: min(t) * 1e3 for name, t in times.items()}
            print(f"| {shape} | {block} | {med['blockwise']:.2f} ({best['blockwise']:.2f}) | "
                  f"{med['naive']:.2f} ({best['naive']:.2f}) | {med['naive'] / med['blockwise']:.2f} |")


if __name__ == "__main__":
    main()
