#!/usr/bin/env python3
"""Tokens/s of mc.scan on the CPU (numpy, float32) against the float64 reference loops, same run.

    python benchmarks/cpu_scan.py [--B 4 --H 4 --T 256 --d 32 --chunk 64] [--ref-T 256]
                                  [--rules gated_deltanet,moneta,yaad,memora,titans]
                                  [--repeats 7 --ref-repeats 3] [--json PATH]

Per rule (a small LM-training shape: K, V, Q (B, H, T, d), memory params (B, H, ...)), the median
over --repeats timed calls after one warm-up of
  scan fwd       mc.scan(state, K, V, Q, bias=rule.bias, lr=, alpha=[, delta=][, beta=], chunk=C)
  scan fwd+bwd   ad.vjp of the same, then vjp_fn(dY): gradients w.r.t. params, K, V, Q and gates
and the median over --ref-repeats of
  ref fwd        mc.ref.scan (exact rules: the per-token loop) or mc.ref.scan_chunked (anchored
                 rules, same chunk), float64 and one token at a time, on the first --ref-T tokens
                 (its cost per token does not depend on T; a smaller --ref-T keeps the run short)
The table gives tokens/s (B·T / time), the speedup of scan fwd and of scan fwd+bwd over ref fwd,
and the relative RMS error of mc.scan's float32 Y against the reference's float64 Y on the same
--ref-T tokens. Inputs and gates as benchmarks/gpu_anchored.py (K, Q l2-normalised, V ~ N(0, 1),
lr = 0.1·sigmoid(N), alpha = 0.9 + 0.1·sigmoid(N), delta = 1 + softplus(N), beta = 0.9).
The default run takes about 45 s on 2 cores (measured 42–49 s), two thirds of it in the float64
reference loops; `--ref-repeats 1` brings it to about 20 s.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mirascore as mc                                             # noqa: E402
from mirascore.updates import is_exact                             # noqa: E402
from gpu_anchored import (Device, fwd_bwd, make_inputs, make_rule, rel_rms,  # noqa: E402
                          rule_args, scan_fn)
from _machine import cpu_model                                    # noqa: E402

RULES = "gated_deltanet,moneta,yaad,memora,titans"


def timed(fn, repeats):
    """(median, min) seconds per call over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def machine():
    cpu = cpu_model()
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
               if k in os.environ}
    return f"{cpu}, {os.cpu_count()} cores, numpy {np.__version__}, Python {platform.python_version()}" + \
        (f", {threads}" if threads else "")


def bench(name, args, dev, x):
    B, H, T, C, Tr = args.B, args.H, args.T, args.chunk, min(args.ref_T, args.T)
    rule = make_rule(name, args.d, 4)
    f = scan_fn(rule, C)
    *a, dY = rule_args(rule, x, dev, B, H, T, np.float32)
    row = dict(rule=name, shape=f"B{B} H{H} T{T} d{args.d} C{C}", ref_T=Tr,
               ref="scan" if is_exact(rule) else "scan_chunked")
    fwd, fwd_best = timed(lambda: f(*a), args.repeats)
    all_, all_best = timed(lambda: fwd_bwd(f, a, dY), args.repeats)

    # the reference, on the first Tr tokens
    params, K, V, Q, gates = rule_args(rule, x, dev, B, H, Tr, np.float32)[:5]
    state = mc.init(rule.memory, params, retention=rule.retention, algorithm=rule.algorithm)
    if is_exact(rule):
        def ref():
            return mc.ref.scan(state, K, V, Q, bias=rule.bias, **gates)[0]
    else:
        def ref():
            return mc.ref.scan_chunked(state, K, V, Q, bias=rule.bias, chunk=C, **gates)[0]
    ref_s, ref_best = timed(ref, args.ref_repeats)
    err = rel_rms(np, f(params, K, V, Q, gates), ref())
    row.update(scan_fwd_ms=fwd * 1e3, scan_fwd_tok_s=B * T / fwd, scan_fwd_best_ms=fwd_best * 1e3,
               scan_all_ms=all_ * 1e3, scan_all_tok_s=B * T / all_, scan_all_best_ms=all_best * 1e3,
               ref_fwd_ms=ref_s * 1e3, ref_fwd_tok_s=B * Tr / ref_s, ref_fwd_best_ms=ref_best * 1e3,
               err_Y=err)
    row["speedup_fwd"] = row["scan_fwd_tok_s"] / row["ref_fwd_tok_s"]
    row["speedup_fwd_bwd"] = row["scan_all_tok_s"] / row["ref_fwd_tok_s"]
    return row


def print_table(rows):
    print("\n" + "=" * 104)
    print(f"{'rule':<15} {'ref':<13} {'scan fwd':>11} {'scan f+b':>11} {'ref fwd':>11} "
          f"{'fwd ×':>8} {'f+b ×':>8}  {'err Y vs ref':>12}")
    print(f"{'':<15} {'':<13} {'tok/s':>11} {'tok/s':>11} {'tok/s':>11} {'(vs ref)':>8} {'(vs ref)':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['rule']:<15} ERROR {r['error'][:80]}")
            continue
        print(f"{r['rule']:<15} {r['ref']:<13} {r['scan_fwd_tok_s']:>11,.0f} {r['scan_all_tok_s']:>11,.0f} "
              f"{r['ref_fwd_tok_s']:>11,.0f} {r['speedup_fwd']:>8.1f} {r['speedup_fwd_bwd']:>8.1f}  "
              f"{r['err_Y']:>12.1e}")
    print("=" * 104, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--ref-T", dest="ref_T", type=int, default=256,
                    help="tokens for the reference loops (default: 256 = T)")
    ap.add_argument("--rules", default=RULES)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ref-repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    for r in rules:
        if not hasattr(mc.presets, r):
            ap.error(f"unknown rule {r!r}")

    print(machine(), flush=True)
    print(f"shape B={args.B} H={args.H} T={args.T} d={args.d} chunk {args.chunk}, float32; "
          f"ref float64 on T={min(args.ref_T, args.T)}; median of {args.repeats} (ref {args.ref_repeats}) "
          f"after a warm-up", flush=True)
    dev = Device(cpu=True)
    x = make_inputs(args.B, args.H, args.T, args.d)
    rows, t0 = [], time.time()
    for name in rules:
        t1 = time.time()
        try:
            row = bench(name, args, dev, x)
            print(f"  {name:<15} scan fwd {row['scan_fwd_ms']:8.1f} ms, fwd+bwd {row['scan_all_ms']:8.1f} ms; "
                  f"ref fwd {row['ref_fwd_ms']:8.1f} ms (T={row['ref_T']})  [{time.time() - t1:.0f} s]",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            row = dict(rule=name, error=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(machine=machine(), args=vars(args), rows=rows), f, indent=1)
    print_table(rows)
    print(f"total wall time {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
