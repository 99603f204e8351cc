#!/usr/bin/env python3
"""The GEMM precisions emulated on the CPU: relative errors of `mc.scan` (forward and backward)
against float64, per rule and precision, and with --sites the product sites they come from.

    python benchmarks/cpu_precision.py [--rules gated_deltanet,moneta,yaad,memora,titans]
                                       [--precision fp32,tf32,bf16,fp16] [--shape B,H,T,d,chunk ...]
    python benchmarks/cpu_precision.py --rules titans --precision bf16 --shape 1,1,96,64,32 --sites

How: numpy's matmul of two float32 matrices is replaced by one that rounds both operands as
mirascore.gpu.blas does on the GPU — bf16 and fp16 to nearest even, tf32 to nearest with 10 mantissa
bits (what the H200's TF32 errors match) — and multiplies them in float64 (fp32 accumulation errs
far less than the operands' rounding). As on the GPU, the delta rule's state loop and triangular
inverse (float32 RawKernels there, for chunk ≤ 64 and d_k ≤ 128) and the decay algebra
(`mirascore._xp.full_matmul`) keep unrounded products. Every product runs at the precision asked
for, the anchored rules' included: what `mc.scan` would give without `anchored_precision`.

Inputs as the GPU benchmarks: K, Q unit rows, V ~ N(0, 1); lr = sigmoid(N(0, 1)) for the exact
family (its β), 0.1·sigmoid(N(0, 1)) otherwise; α = 0.9 + 0.1·sigmoid(N(0, 1)); δ = 1 + softplus;
β = 0.9; dY ~ N(0, 1). Per row: the relative RMS error ‖x − x₆₄‖/‖x₆₄‖ of Y and of every gradient
(initial params, K, V, Q, gates), the worst of them first. --sites: the worst error with only one
product site (file:line of the matmul call) rounded, for every site, largest first.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mirascore as mc  # noqa: E402
import mirascore.autodiff as ad  # noqa: E402
import mirascore.chunk.coefficients as coefficients  # noqa: E402
import mirascore.chunk.delta_rule as delta_rule  # noqa: E402
import mirascore.testing as mt  # noqa: E402

_matmul = np.matmul
EMULATE = {"precision": None, "only": None, "sites": None}
_KEEP = {"bf16": 16, "fp16": None, "tf32": 13}          # float32 mantissa bits dropped


def round_to(x, precision):
    """float32 x as its operand rounding for `precision` leaves it (float32 values)."""
    if precision == "fp16":
        return x.astype(np.float16).astype(np.float32)
    drop = _KEEP[precision]
    u = np.ascontiguousarray(x).view(np.uint32).astype(np.uint64)
    u = (u + ((1 << (drop - 1)) - 1) + ((u >> drop) & 1)) & ~np.uint64((1 << drop) - 1)
    return u.astype(np.uint32).view(np.float32)


def emulated_matmul(a, b, *args, **kwargs):
    p = EMULATE["precision"]
    if (p is None or args or kwargs or not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray)
            or a.ndim < 2 or b.ndim < 2 or a.dtype != np.float32 or b.dtype != np.float32):
        return _matmul(a, b, *args, **kwargs)
    caller = sys._getframe(1)
    site = f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno}"
    if EMULATE["sites"] is not None:
        EMULATE["sites"][site] = EMULATE["sites"].get(site, 0) + 1
    if EMULATE["only"] is not None and site != EMULATE["only"]:
        return _matmul(a, b)
    return _matmul(round_to(a, p).astype(np.float64), round_to(b, p).astype(np.float64)).astype(np.float32)


def unrounded(fn):
    def run(*args, **kwargs):
        saved, EMULATE["precision"] = EMULATE["precision"], None
        try:
            return fn(*args, **kwargs)
        finally:
            EMULATE["precision"] = saved
    return run


def gpu_like_pieces(xp, use, dt, d_v, d_k, C, _pieces=delta_rule._pieces):
    """The delta rule's pieces as the GPU runs them: float32 RawKernels for the state loop and the
    inverse where mirascore.gpu.delta_rule_kernels.supports the sizes (chunk ≤ 64, d_k ≤ 128)."""
    pieces = _pieces(xp, use, dt, d_v, d_k, C)
    if C <= 64 and d_k <= 128:
        pieces.state_scan = unrounded(delta_rule.state_scan)
        pieces.unit_lower_inverse = unrounded(delta_rule.unit_lower_inverse)
    return pieces


def install():
    np.matmul = emulated_matmul
    delta_rule._pieces = gpu_like_pieces
    full = unrounded(lambda xp, a, b: xp.matmul(a, b))
    delta_rule.full_matmul = coefficients.full_matmul = full


def problem(rule, B, H, T, d, seed=0):
    """(params, K, V, Q, gates, dY): mirascore.testing.scan_inputs, then a cotangent dY ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = mt.scan_inputs(rule, (B, H), T, seed, rng=rng)
    return x["params"], x["K"], x["V"], x["Q"], x["gates"], rng.standard_normal((B, H, T, d))


def results(rule, prob, dtype, chunk):
    params, K, V, Q, gates, dY = (tuple(x.astype(dtype) for x in p) if isinstance(p, tuple) else
                                  {k: v.astype(dtype) for k, v in p.items()} if isinstance(p, dict) else
                                  p.astype(dtype) for p in prob)

    def f(P, K, V, Q, gates):
        state = mc.init(rule.memory, P, retention=rule.retention, algorithm=rule.algorithm)
        return mc.scan(state, K, V, Q, bias=rule.bias, chunk=chunk, **gates)[0]
    Y, pull = ad.vjp(f, params, K, V, Q, gates)
    dP, dK, dV, dQ, dg = pull(dY)
    out = {"Y": Y, **{f"dP{i}": g for i, g in enumerate(dP)}, "dK": dK, "dV": dV, "dQ": dQ,
           **{f"d{n}": g for n, g in dg.items()}}
    return {n: np.asarray(x, dtype=np.float64) for n, x in out.items()}


def errors(got, want):
    def rel(g, w):
        return float(np.sqrt(np.mean((g - w) ** 2)) / max(np.sqrt(np.mean(w ** 2)), 1e-300))
    err = {n: rel(got[n], want[n]) for n in want}
    return dict(sorted(err.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", default="gated_deltanet,moneta,yaad,memora,titans")
    ap.add_argument("--precision", default="fp32,tf32,bf16,fp16")
    ap.add_argument("--shape", nargs="+", default=["2,1,37,8,8", "1,2,128,64,32", "1,2,128,128,64"],
                    help="B,H,T,d,chunk (d: the memory's d_in = d_out)")
    ap.add_argument("--sites", action="store_true", help="also the error of each product site alone")
    args = ap.parse_args()
    precisions = [p for p in args.precision.split(",") if p]
    for p in precisions:
        if p not in ("fp32", "tf32", "bf16", "fp16"):
            ap.error(f"--precision takes fp32, tf32, bf16, fp16; got {p!r}")
    install()
    print("rule            prec  shape                       worst          Y        all (largest first)")
    for shape in args.shape:
        B, H, T, d, chunk = map(int, shape.split(","))
        for name in args.rules.split(","):
            rule = getattr(mc.presets, name)(d)
            prob = problem(rule, B, H, T, d)
            want = results(rule, prob, np.float64, chunk)
            for p in precisions:
                EMULATE.update(precision=None if p == "fp32" else p, sites={})
                err = errors(results(rule, prob, np.float32, chunk), want)
                sites, EMULATE["sites"] = EMULATE["sites"], None
                worst = next(iter(err))
                print(f"{name:<15} {p:<5} B{B} H{H} T{T} d{d} C{chunk:<10} {worst}={err[worst]:.1e}  "
                      f"Y={err['Y']:.1e}  " + " ".join(f"{k}={v:.1e}" for k, v in err.items()), flush=True)
                if args.sites and p != "fp32":
                    alone = []
                    for site in sites:
                        EMULATE["only"] = site
                        e = errors(results(rule, prob, np.float32, chunk), want)
                        EMULATE["only"] = None
                        alone.append((next(iter(e.values())), site, next(iter(e))))
                    for value, site, which in sorted(alone, reverse=True):
                        print(f"    {site:<24} x{sites[site]:<4} alone: {which}={value:.1e}", flush=True)
                EMULATE["precision"] = None


if __name__ == "__main__":
    main()
