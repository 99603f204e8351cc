#!/usr/bin/env python3
"""Time mirascore's chunked delta rule (delta_rule_scan) on one GPU, optionally beside FLA.

    python3 benchmarks/gpu_delta.py [--with-fla] [--json PATH] [--precision fp32,tf32,bf16]
                                    [--B 8 --T 4096 --H 16 --d 128 --chunk 64]

Rows (median of --iters runs after --warmup, CUDA events):
  ours P      forward, forward+backward      for each GEMM precision P of --precision (default
                                             fp32,tf32,bf16; fp16 too if listed; --no-tf32 drops
                                             tf32): mirascore.gpu.settings precision=P around the
                                             call, so every cuBLAS product of the scan runs at P
                                             (bf16, fp16: operands cast to 16 bits, fp32
                                             accumulation); the RawKernels, decays and gates stay
                                             float32
  fla bf16    forward, forward+backward      fla.ops.gated_delta_rule.chunk_gated_delta_rule (with
                                             --with-fla; same inputs, same process)
Per row: ms, Mtok/s, peak memory (GiB: ours, the pool's peak beyond what was allocated before the
call plus our fp32 inputs; FLA, torch.cuda.max_memory_allocated with its bf16 inputs), relative RMS error of Y and
of every gradient against a float64 run of ours (FLA: Y and gradients against the same float64 run,
with dα mapped to FLA's dg = α·dα), GFLOP (matmul FLOPs of our algorithm, the same count for FLA)
and the fraction of the ceilings in ../shared/anchors/README.md (fp32 cuBLAS 51 TFLOP/s,
batched fp32 64×128×64 25 TFLOP/s, bf16 745 TFLOP/s).

Inputs as anchors_gpu.py: q, k l2-normalised, v ~ N(0, 1), log α = logsigmoid(U(0, 1)),
β = sigmoid(U(0, 1)); the Gated DeltaNet gates (b = c = β). Q is pre-scaled by d^-1/2 for ours.
"""
import argparse
import json
import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import CEIL  # noqa: E402

ROWS = []
JSON = {"path": None, "extra": {}}


def save_json():
    """Rewrite --json after every row, so a run cut short still leaves its results."""
    if JSON["path"]:
        with open(JSON["path"], "w") as f:
            json.dump(dict(ceilings=CEIL, rows=ROWS, **JSON["extra"]), f, indent=1)


def flops(B, H, T, dk, dv, C):
    """Matmul FLOPs of the delta rule's forward and backward (2 per multiply-add)."""
    N = -(-T // C)
    fwd = (2 * C * C * dk            # K Kᵀ
           + C ** 3 / 3              # (I + A)⁻¹ by substitution
           + 2 * C * C * (dk + dv)   # W^m, U^m
           + 4 * C * dk * dv         # state loop
           + 2 * C * dk * dv         # Q Sᵀ
           + 2 * C * C * (dk + dv))  # Q Kᵀ, P U
    bwd = (4 * C * C * dk + 2 * C * dk * dv + 2 * C * C * dv       # K Kᵀ, Q Kᵀ, K Sᵀ, U = 𝒯R
           + 4 * C * C * dv + 2 * C * C * dk + 2 * C * dk * dv     # Pᵀ dY, X1, X2, H
           + 4 * C * dk * dv                                       # dS loop
           + 2 * C * dk * dv + 4 * C * C * dv + 2 * C * dk * dv   # dU, dP, dA, U dS'
           + 2 * C * C * dk + 4 * C * dk * dv                      # dQ
           + 6 * C * C * dk + 2 * C * dk * dv)                     # dK
    return B * H * N * fwd, B * H * N * (fwd + bwd)


def rel_rms(got, want):
    import cupy
    g = cupy.asarray(got, dtype=cupy.float64)
    w = cupy.asarray(want, dtype=cupy.float64)
    return float(cupy.sqrt(cupy.mean((g - w) ** 2)) / cupy.maximum(cupy.sqrt(cupy.mean(w ** 2)), 1e-300))


class PeakPool:
    """CuPy's default pool behind an allocator that records the peak of used bytes."""

    def __init__(self):
        import cupy
        self.pool = cupy.get_default_memory_pool()
        self.peak = 0
        cupy.cuda.set_allocator(self.malloc)

    def malloc(self, size):
        mem = self.pool.malloc(size)
        used = self.pool.used_bytes()
        if used > self.peak:
            self.peak = used
        return mem

    def reset(self):
        self.base = self.peak = self.pool.used_bytes()

    def extra(self):
        """Bytes allocated at the peak beyond what was allocated before (inputs, references)."""
        return self.peak - self.base


def time_ms(fn, warmup, iters):
    import cupy
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    ev = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(iters)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    cupy.cuda.Device().synchronize()
    return float(np.median([cupy.cuda.get_elapsed_time(s, e) for s, e in ev]))


def make_inputs(args):
    import cupy
    B, T, H, d = args.B, args.T, args.H, args.d
    rng = cupy.random.default_rng(0)
    q = rng.standard_normal((B, H, T, d), dtype=cupy.float32)
    k = rng.standard_normal((B, H, T, d), dtype=cupy.float32)
    q /= cupy.linalg.norm(q, axis=-1, keepdims=True)
    k /= cupy.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, H, T, d), dtype=cupy.float32)
    u = rng.random((B, H, T), dtype=cupy.float32)
    logalpha = -cupy.log1p(cupy.exp(-u))                         # logsigmoid(u)
    beta = 1 / (1 + cupy.exp(-rng.random((B, H, T), dtype=cupy.float32)))
    dY = rng.standard_normal((B, H, T, d), dtype=cupy.float32)
    return dict(q=q, k=k, v=v, logalpha=logalpha, beta=beta, dY=dY, scale=d ** -0.5)


def ours_args(x, dtype):
    import cupy
    B, H, T, d = x["k"].shape
    W0 = cupy.zeros((B, H, d, d), dtype=dtype)
    alpha = cupy.exp(x["logalpha"].astype(dtype))
    beta = x["beta"].astype(dtype)
    return (W0, x["k"].astype(dtype), x["v"].astype(dtype), (x["q"] * x["scale"]).astype(dtype),
            alpha, beta, beta)


def reference(x, chunk):
    """float64 run of ours: Y and the seven gradients (with dY, no cotangent on W_T)."""
    from mirascore.chunk import delta_rule_bwd, delta_rule_fwd
    a = ours_args(x, np.float64)
    Y, _, saved = delta_rule_fwd(*a, chunk=chunk)
    grads = delta_rule_bwd(saved, x["dY"].astype(np.float64), None)
    del saved
    return a, Y, grads


def bench_ours(args, mode, pool, x, ref):
    """The fwd and fwd+bwd rows at GEMM precision `mode` (mirascore.gpu.settings); "tf32-unfused"
    is TF32 without the fused per-chunk forward kernels (the path before them, for the
    before/after in one process)."""
    from mirascore.gpu import delta_rule_kernels, settings
    fused = delta_rule_kernels.fused_forward
    if mode == "tf32-unfused":
        delta_rule_kernels.fused_forward = lambda dtype, d_k: False
    try:
        with settings.using(precision=mode.split("-")[0]):
            _bench_ours(args, mode, pool, x, ref)
    finally:
        delta_rule_kernels.fused_forward = fused


def _bench_ours(args, mode, pool, x, ref):
    import cupy
    from mirascore.chunk import delta_rule_bwd, delta_rule_fwd
    B, T, H, d, C = args.B, args.T, args.H, args.d, args.chunk
    a = ours_args(x, np.float32)
    dY = x["dY"]
    f_fwd, f_all = flops(B, H, T, d, d, C)

    def fwd():
        return delta_rule_fwd(*a, chunk=C)

    def fwd_bwd():
        Y, W_T, saved = delta_rule_fwd(*a, chunk=C)
        return Y, delta_rule_bwd(saved, dY, None)

    for name, fn, fl in (("fwd", fwd, f_fwd), ("fwd+bwd", fwd_bwd, f_all)):
        row = dict(impl="ours", dtype=mode, mode=name,
                   shape=f"B{B} T{T} H{H} D{d} C{C}")
        try:
            cupy.get_default_memory_pool().free_all_blocks()
            pool.reset()
            out = fn()
            cupy.cuda.Device().synchronize()
            inputs = sum(x.nbytes for x in a) + (dY.nbytes if name != "fwd" else 0)
            row["peak_gib"] = (pool.extra() + inputs) / 2**30           # working set + own inputs
            if name == "fwd":
                row["err"] = {"Y": rel_rms(out[0], ref[1])}
            else:
                row["err"] = {"Y": rel_rms(out[0], ref[1])}
                for nm, g, w in zip(("dW0", "dK", "dV", "dQ", "dalpha", "db", "dc"), out[1], ref[2]):
                    row["err"][nm] = rel_rms(g, w)
            del out
            ms = time_ms(fn, args.warmup, args.iters)
            add_speed(row, ms, fl, B * T)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:200]
            traceback.print_exc()
        ROWS.append(row)
        print_row(row)
        save_json()


def add_speed(row, ms, fl, tokens):
    """Time, throughput, FLOP rate and the fraction of each ceiling, into row."""
    row.update(ms=ms, mtok_s=tokens / ms / 1e3, gflop=fl / 1e9, tflop_s=fl / ms / 1e9)
    row["frac"] = {k: fl / (ms * 1e-3) / v for k, v in CEIL.items()}


def bench_fla(args, x, ref):
    import cupy
    import torch
    import importlib
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    chunk_o = importlib.import_module("fla.ops.common.chunk_o")
    # fla-org/flash-linear-attention#640: the Hopper + Triton < 3.7.1 guard; bypassed as in
    # ../shared/anchors/anchors_gpu.py (its naive check shows the gradients are right at D=128)
    if getattr(chunk_o, "IS_NVIDIA_HOPPER", False) and not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True):
        chunk_o.TRITON_ABOVE_3_7_1 = True
    B, T, H, d, C = args.B, args.T, args.H, args.d, args.chunk

    def to_torch(a, dtype):        # (B, H, T, ...) CuPy -> (B, T, H, ...) torch
        t = torch.from_dlpack(cupy.ascontiguousarray(a))
        return t.transpose(1, 2).contiguous().to(dtype)
    q, k, v = (to_torch(x[n], torch.bfloat16) for n in ("q", "k", "v"))
    g, beta = to_torch(x["logalpha"], torch.float32), to_torch(x["beta"], torch.float32)
    do = to_torch(x["dY"], torch.bfloat16)
    ins = [t.requires_grad_(True) for t in (q, k, v, g, beta)]
    f_fwd, f_all = flops(B, H, T, d, d, C)

    def fwd():
        with torch.no_grad():
            return chunk_gated_delta_rule(q, k, v, g, beta, scale=x["scale"])

    def fwd_bwd():
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=x["scale"])
        return o, torch.autograd.grad(o, ins, do)

    def back(t):                   # torch (B, T, H, ...) -> CuPy (B, H, T, ...)
        return cupy.from_dlpack(t.detach().float().transpose(1, 2).contiguous())

    for name, fn, fl in (("fwd", fwd, f_fwd), ("fwd+bwd", fwd_bwd, f_all)):
        row = dict(impl="fla", dtype="bf16", mode=name, shape=f"B{B} T{T} H{H} D{d} C64")
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["err"] = {"Y": rel_rms(back(out[0]), ref[1])}
            if name == "fwd+bwd":
                dq, dk, dv, dg, db = (back(t) for t in out[1])
                alpha = ref[0][4]
                row["err"].update(dK=rel_rms(dk, ref[2][1]), dV=rel_rms(dv, ref[2][2]),
                                  dQ=rel_rms(dq, ref[2][3] * x["scale"]),          # FLA's q is unscaled
                                  dalpha=rel_rms(dg, ref[2][4] * alpha),
                                  db=rel_rms(db, ref[2][5] + ref[2][6]))
            del out
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(args.iters)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(args.iters)]
            for _ in range(args.warmup):
                fn()
            torch.cuda.synchronize()
            for s, e in zip(starts, ends):
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            ms = float(np.median([s.elapsed_time(e) for s, e in zip(starts, ends)]))
            add_speed(row, ms, fl, B * T)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:200]
            traceback.print_exc()
        ROWS.append(row)
        print_row(row)
        save_json()


def breakdown(args, x):
    """Where the time goes: the pieces of the chunked delta rule at the benchmark size (fp32)."""
    import cupy
    from mirascore.chunk import delta_rule as delta
    from mirascore.gpu import delta_rule_kernels as delta_kernels
    B, T, H, d, C = args.B, args.T, args.H, args.d, args.chunk
    Bn, N = B * H, -(-T // C)
    rng = cupy.random.default_rng(1)
    f32 = cupy.float32
    K = rng.standard_normal((Bn, N, C, d), dtype=f32) / d ** 0.5
    A = cupy.tril(rng.standard_normal((Bn, N, C, C), dtype=f32) / C, -1)
    CC = rng.standard_normal((Bn, N, C, C), dtype=f32)
    dec = rng.random((Bn, N), dtype=f32)
    X0 = cupy.zeros((Bn, d, d), f32)
    a = ours_args(x, np.float32)
    _, _, saved = delta.delta_rule_fwd(*a, chunk=C)
    pieces = {
        "state_scan kernel (one pass)": lambda: delta_kernels.state_scan(K, K, K, dec, X0),
        "decay_matrix (fused)": lambda: delta_kernels.decay_matrix(dec[..., None] * K[..., 0]),
        "bwd_pairs (fused, 6 in, 4 out)": lambda: delta_kernels.bwd_pairs(CC, CC, CC, CC, CC, K[..., 0]),
        "unit_lower_inverse kernel": lambda: delta_kernels.unit_lower_inverse(A),
        "unit_lower_inverse (batched path)": lambda: delta.unit_lower_inverse(A),
        "matmul C x d x C (K Kt)": lambda: cupy.matmul(K, K.swapaxes(-1, -2)),
        "matmul C x C x d (Tinv K)": lambda: cupy.matmul(CC, K),
        "elementwise C x C multiply": lambda: CC * CC,
        "elementwise C x d multiply": lambda: K * K,
        "forward total": lambda: delta.delta_rule_fwd(*a, chunk=C),
        "backward total": lambda: delta.delta_rule_bwd(saved, x["dY"], None),
    }
    print("\nbreakdown (fp32, median ms):", flush=True)
    out = {}
    for name, fn in pieces.items():
        try:
            out[name] = time_ms(fn, 2, 10)
            print(f"  {name:<40} {out[name]:8.3f}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  {name:<40} ERROR {type(e).__name__}: {e}", flush=True)
    return out


def print_row(r):
    if "error" in r:
        print(f"{r['impl']:<5} {r['dtype']:<5} {r['mode']:<8} ERROR {r['error']}", flush=True)
        return
    err = " ".join(f"{k}={v:.1e}" for k, v in r.get("err", {}).items())
    print(f"{r['impl']:<5} {r['dtype']:<5} {r['mode']:<8} {r['ms']:>9.3f} ms {r['mtok_s']:>8.2f} Mtok/s "
          f"{r['peak_gib']:>6.2f} GiB {r['tflop_s']:>7.2f} TFLOP/s "
          f"({100 * r['frac']['fp32']:.0f}% fp32, {100 * r['frac']['bf16']:.1f}% bf16)  err: {err}", flush=True)


def print_table():
    print("\n" + "=" * 100)
    print(f"{'impl':<5} {'dtype':<5} {'mode':<8} {'ms':>9} {'Mtok/s':>8} {'GiB':>6} {'TFLOP/s':>8} "
          f"{'%fp32':>6} {'%bf16':>6}  {'err Y':>8} {'err max grad':>12}")
    for r in ROWS:
        if "error" in r:
            print(f"{r['impl']:<5} {r['dtype']:<5} {r['mode']:<8} ERROR {r['error'][:60]}")
            continue
        grads = [v for k, v in r["err"].items() if k != "Y"]
        print(f"{r['impl']:<5} {r['dtype']:<5} {r['mode']:<8} {r['ms']:>9.3f} {r['mtok_s']:>8.2f} "
              f"{r['peak_gib']:>6.2f} {r['tflop_s']:>8.2f} {100 * r['frac']['fp32']:>6.1f} "
              f"{100 * r['frac']['bf16']:>6.2f}  {r['err']['Y']:>8.1e} "
              f"{max(grads) if grads else float('nan'):>12.1e}")
    fla = {r["mode"]: r for r in ROWS if r["impl"] == "fla" and "ms" in r}
    for r in ROWS:
        if r["impl"].startswith("ours") and "ms" in r and r["mode"] in fla:
            print(f"ratio {r['impl']}/FLA  {r['dtype']:<5} {r['mode']:<8} {r['ms'] / fla[r['mode']]['ms']:6.2f}x")
    print("=" * 100, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--with-fla", action="store_true")
    ap.add_argument("--precision", default="fp32,tf32,bf16",
                    help="comma-separated GEMM precisions of our rows (fp32, tf32, bf16, fp16; "
                         "tf32-unfused: TF32 without the fused per-chunk forward kernels)")
    ap.add_argument("--no-tf32", action="store_true", help="leave tf32 out of --precision")
    ap.add_argument("--breakdown", action="store_true", help="also time the pieces (fp32)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.iters < 10:
        ap.error("--iters must be at least 10")

    from mirascore.gpu import settings
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()
                  and not (args.no_tf32 and p.strip() == "tf32")]
    for p in precisions:
        if p not in settings.PRECISIONS + ("tf32-unfused",):
            ap.error(f"--precision takes {', '.join(settings.PRECISIONS)} or tf32-unfused; got {p!r}")

    JSON["path"] = args.json
    JSON["extra"]["args"] = vars(args)
    import cupy
    pool = PeakPool()
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, CuPy {cupy.__version__}",
          flush=True)
    x = make_inputs(args)
    ref = reference(x, args.chunk)
    cupy.get_default_memory_pool().free_all_blocks()
    for p in precisions:
        bench_ours(args, p, pool, x, ref)
    if args.breakdown:
        JSON["extra"]["breakdown"] = breakdown(args, x)
        save_json()
    if args.with_fla:
        try:
            bench_fla(args, x, ref)
        except Exception as e:  # noqa: BLE001
            print(f"FLA unavailable: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    print_table()
    save_json()


if __name__ == "__main__":
    main()
