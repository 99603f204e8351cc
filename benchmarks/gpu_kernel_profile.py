#!/usr/bin/env python3
"""Where the GPU time of one anchored scan goes: every CUDA kernel of a forward+backward, grouped
by name, through torch.profiler (CUPTI sees CuPy's kernels and those replayed from CUDA graphs).

    python3 benchmarks/gpu_kernel_profile.py [--rule moneta] [--B 8 --T 4096 --H 8 --d 128 --chunk 64]
                                              [--mode fwd+bwd] [--top 25] [--eager]

Prints the total kernel time, the kernel count and the `--top` kernels by total time (ms, calls,
µs per call, share). Needs torch with CUDA (for its profiler only).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_anchored as bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rule", default="moneta")
    for k, v in dict(B=8, T=4096, H=8, d=128, chunk=64, expansion=4, top=25).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    ap.add_argument("--eager", action="store_true", help="no CUDA graph replay")
    args = ap.parse_args()

    import cupy
    from torch.profiler import ProfilerActivity, profile

    from mirascore.gpu import settings
    settings.configure(cuda_graphs=not args.eager)
    rule = bench.make_rule(args.rule, args.d, args.expansion)
    x = bench.make_inputs(args.B, args.H, args.T, args.d)

    class Dev:
        put = staticmethod(cupy.asarray)
    *a, dY = bench.rule_args(rule, x, Dev, args.B, args.H, args.T, np.float32)
    f = bench.scan_fn(rule, args.chunk)
    run = (lambda: f(*a)) if args.mode == "fwd" else (lambda: bench.fwd_bwd(f, a, dY))
    for _ in range(3):                      # eager, capture, replay
        run()
    cupy.cuda.Device().synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        cupy.cuda.Device().synchronize()
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in rows)
    calls = sum(e.count for e in rows)
    print(f"{args.rule} {args.mode} B{args.B} T{args.T} H{args.H} d{args.d} chunk {args.chunk}"
          f"{' eager' if args.eager else ''}: {total / 1e3:.1f} ms of kernels, {calls} kernels "
          f"({total / max(calls, 1):.1f} µs each on average)")
    print(f"{'ms':>8} {'calls':>6} {'µs/call':>8} {'share':>6}  kernel")
    for e in sorted(rows, key=lambda e: -e.device_time_total)[:args.top]:
        print(f"{e.device_time_total / 1e3:8.2f} {e.count:6d} {e.device_time_total / e.count:8.1f} "
              f"{e.device_time_total / total:6.1%}  {e.key[:90]}")


if __name__ == "__main__":
    main()
