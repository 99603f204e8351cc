#!/usr/bin/env python3
"""Time mirascore's anchored chunked scan (Moneta, Yaad, Memora, Titans; MLP memory) on one GPU,
optionally beside titans-pytorch NeuralMemory in the same process.

    python3 benchmarks/gpu_anchored.py [--with-titans] [--json PATH] [--rules moneta,yaad,memora,titans]
                                       [--precision fp32,tf32,bf16]
                                       [--B 8 --T 4096 --H 8 --d 128 --expansion 4 --chunk 64]
    python3 benchmarks/gpu_anchored.py --quick                   # small shapes, smoke run (GPU)
    python benchmarks/gpu_anchored.py --cpu --quick              # the same code on numpy (xp = numpy)

What is timed (median of --iters ≥ 10 runs after --warmup; CUDA events on the GPU, perf_counter
with --cpu), for each rule of --rules at K, V, Q (B, H, T, d), memory params (B, H, ...):
  fwd       mc.scan(state, K, V, Q, bias=rule.bias, lr=, alpha=[, delta=][, beta=], chunk=C)
  fwd+bwd   ad.vjp of the same, then vjp_fn(dY) with a random dY: gradients w.r.t. the initial
            params, K, V, Q and every gate
Rows: ours P for each GEMM precision P of --precision (default fp32,tf32,bf16; --no-tf32 drops
tf32): mc.scan(..., precision=P), CUDA graph replay from the third call on, so the warm-up covers
the eager call and the capture (--eager turns replay off). mc.scan runs these rules' products in
fp32 at every precision (mirascore.chunk.anchored.anchored_precision: their errors in TF32, fp16
and bf16 exceed the contract's 1e-2), so the rows of other precisions, marked "tf32*", "bf16*" and
"fp16*", replace that mapping by the identity for the row: what reduced-precision products (TF32;
or cast operands, fp32 accumulation, the decay algebra in fp32) would give, in time and error;
with --with-titans,
titans-pytorch NeuralMemory fp32 and bf16 (fwd+bwd exactly as ../shared/anchors/anchors_gpu.py
times it, plus a forward under torch.no_grad()), dim = H·d as H heads of d, chunk C, depth 2,
expansion 4, same B and T; its time includes its own q/k/v/gate projections.

Per row: ms, tokens/s, peak memory (GiB: ours, the CuPy pool's peak beyond what was allocated
before the call plus our own inputs, or tracemalloc's with --cpu; titans, torch.cuda.max_memory_allocated),
relative RMS error of Y (fwd) and of Y and every gradient (fwd+bwd) against a float64 run of ours at
the same B, H, d but T = --err-T (default 256, to keep float64 cheap), GFLOP of the anchored chunk
algebra (matmuls only, 2 per multiply-add, as executed: the backward recomputes each chunk's
forward; see `flops`) and the fraction of the fp32 cuBLAS ceiling, 51 TFLOP/s (../shared/anchors/README.md).
The final table ends with the speed ratios titans / ours (per token); the target is ≥ 10× against
titans fp32 forward+backward.

Inputs (seeded): K, Q l2-normalised per token, V ~ N(0, 1); gates lr = 0.1·sigmoid(N(0,1)),
alpha = 0.9 + 0.1·sigmoid(N(0,1)), delta = 1 + softplus(N(0,1)) (Yaad), beta = 0.9 (Titans);
memory params from rule.memory.init(seed, batch_shape=(B, H)).
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import CEIL  # noqa: E402
import mirascore as mc  # noqa: E402
import mirascore.autodiff as ad  # noqa: E402
import mirascore.chunk.anchored as anchored  # noqa: E402

ROWS = []
JSON = {"path": None, "extra": {}}
RULES = "moneta,yaad,memora,titans"

# shape profiles; explicit flags win
FULL = dict(B=8, T=4096, H=8, d=128, expansion=4, chunk=64, err_T=256, warmup=3, iters=10)
QUICK = dict(B=2, T=512, H=4, d=64, expansion=4, chunk=64, err_T=128, warmup=2, iters=10)
QUICK_CPU = dict(B=1, T=128, H=2, d=16, expansion=4, chunk=32, err_T=64, warmup=1, iters=10)
CPU = dict(B=1, T=512, H=2, d=32, expansion=4, chunk=64, err_T=128, warmup=1, iters=10)


def save_json():
    """Rewrite --json after every row, so a run cut short still leaves its results."""
    if JSON["path"]:
        with open(JSON["path"], "w") as f:
            json.dump(dict(ceilings=CEIL, rows=ROWS, **JSON["extra"]), f, indent=1, default=str)



# ---------------------------------------------------------------- FLOPs


def flops(rule, B, H, T, C):
    """Matmul FLOPs (2 per multiply-add) of mirascore.chunk.anchored for an mlp memory, per call:
    (fwd, fwd+bwd, {piece: FLOPs of one fwd+bwd}), or None for other memories.

    Per chunk of b tokens (t = b − 1 in-chunk reads), W1 (d, h), W2 (h, d):
      anchor      memory forward of the chunk's keys at W̄: K W2ᵀ, gelu(z) W1ᵀ          4bdh
      factors     g_u W1 (the gradient factors (g_u, a), (g_z, k))                    2bdh
      end         chunk-end update Eᵀ diag(C_b) F per parameter                       4bdh  (+4bdh momentum)
      last read   the chunk's last token at the returned state                        4dh
      reads       dual form per parameter: X s̄ᵀ, X Fᵀ, (C∘·) E                        4tdh + 4tb(d+h) (+4tdh momentum: X S̄ᵀ)
                  (kl/sigmoid read the anchor W̄ instead: memory forward of t rows     4tdh)
      decay       momentum: R = Dα Dβ, m = Dα P                                       2b³ + 2b²
    Backward, beyond recomputing the chunk's forward (anchored_scan_bwd does):
      last read   memory VJP of one row                                               8dh
      end         F gᵀ and E g per parameter                                          8bdh  (+8bdh momentum)
      reads       _dual_vjp per parameter (8 matmuls, 11 with momentum)               12tdh + 10tb(d+h) (+12tdh)
                  (anchor reads: memory VJP of t rows                                  8tdh)
      anchor      VJP of the memory forward at the anchor (4 matmuls)                  8bdh
      factors     VJP of the gradient path (2 matmuls)                                 4bdh
      decay       dD Dᵀ per decay matrix, Dαᵀ dR, dR Dβᵀ, Dαᵀ dm                       2(b+1)³ (+4b³ + 2b² + 2(b+1)³)
    """
    if not isinstance(rule.memory, mc.memory.MLP):
        return None
    d, h = rule.memory.d_in, rule.memory.hidden
    mom = rule.algorithm.uses_momentum
    anchor_reads = rule.retention.read_scale(np.ones((1, 1))) is None   # kl, sigmoid read W̄
    fwd = {k: 0.0 for k in ("anchor", "factors", "end", "last read", "reads", "decay")}
    bwd = dict(fwd)
    for start in range(0, T, C):
        b = min(C, T - start)
        t = b - 1
        fwd["anchor"] += 4 * b * d * h
        fwd["factors"] += 2 * b * d * h
        fwd["end"] += 4 * b * d * h * (2 if mom else 1)
        fwd["last read"] += 4 * d * h
        if anchor_reads:
            fwd["reads"] += 4 * t * d * h
            bwd["reads"] += 8 * t * d * h
        else:
            fwd["reads"] += 4 * t * d * h * (2 if mom else 1) + 4 * t * b * (d + h)
            bwd["reads"] += 12 * t * d * h * (2 if mom else 1) + 10 * t * b * (d + h)
        bwd["last read"] += 8 * d * h
        bwd["end"] += 8 * b * d * h * (2 if mom else 1)
        bwd["anchor"] += 8 * b * d * h               # VJP of the memory forward at the anchor
        bwd["factors"] += 4 * b * d * h              # VJP of the gradient path
        bwd["decay"] += 2 * (b + 1) ** 3
        if mom:
            fwd["decay"] += 2 * b ** 3 + 2 * b * b
            bwd["decay"] += 4 * b ** 3 + 2 * b * b + 2 * (b + 1) ** 3
    n = B * H
    f_fwd = n * sum(fwd.values())
    pieces = {k: n * (2 * fwd[k] + bwd[k]) for k in fwd}        # the backward recomputes the forward
    return f_fwd, sum(pieces.values()), pieces


# ---------------------------------------------------------------- the device (CuPy or numpy)


class Device:
    """xp, transfers, a timer and a peak-memory probe for CuPy (CUDA events, the memory pool) or
    numpy (perf_counter, tracemalloc)."""

    def __init__(self, cpu):
        self.cpu = cpu
        if cpu:
            self.xp = np
            return
        import cupy
        self.xp = cupy
        self.pool = cupy.get_default_memory_pool()
        self.peak = self.base = 0
        cupy.cuda.set_allocator(self._malloc)

    def _malloc(self, size):
        mem = self.pool.malloc(size)
        used = self.pool.used_bytes()
        if used > self.peak:
            self.peak = used
        return mem

    def name(self):
        if self.cpu:
            return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}"
        import cupy
        return (f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, CuPy {cupy.__version__}, "
                f"numpy {np.__version__}")

    def put(self, x):
        return x if self.cpu else self.xp.asarray(x)

    def sync(self):
        if not self.cpu:
            self.xp.cuda.Device().synchronize()

    def free(self):
        if not self.cpu:
            self.sync()
            self.pool.free_all_blocks()

    def peak_bytes(self, fn):
        """Run fn once; (its result, bytes allocated at the peak beyond those held before)."""
        if self.cpu:
            import tracemalloc
            tracemalloc.start()
            try:
                out = fn()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            return out, peak
        self.free()
        self.base = self.peak = self.pool.used_bytes()
        out = fn()
        self.sync()
        return out, self.peak - self.base

    def time_ms(self, fn, warmup, iters):
        """(median, p20, p80) ms over `iters` calls after `warmup` calls."""
        for _ in range(warmup):
            fn()
        if self.cpu:
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        else:
            cupy = self.xp
            self.sync()
            ev = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(iters)]
            for s, e in ev:
                s.record()
                fn()
                e.record()
            self.sync()
            times = [cupy.cuda.get_elapsed_time(s, e) for s, e in ev]
        return float(np.median(times)), float(np.percentile(times, 20)), float(np.percentile(times, 80))


# ---------------------------------------------------------------- inputs and the functions timed


def make_inputs(B, H, T, d, seed=0):
    """Host float32 inputs (see the module docstring); slices along T give the --err-T inputs."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def sigmoid(x):
        return 1 / (1 + np.exp(-x))
    K, V, Q = normal(B, H, T, d), normal(B, H, T, d), normal(B, H, T, d)
    K /= np.linalg.norm(K, axis=-1, keepdims=True)
    Q /= np.linalg.norm(Q, axis=-1, keepdims=True)
    gates = dict(lr=0.1 * sigmoid(normal(B, H, T)),
                 alpha=0.9 + 0.1 * sigmoid(normal(B, H, T)),
                 delta=1 + np.logaddexp(0, normal(B, H, T)),
                 beta=np.full((B, H, T), 0.9, np.float32))
    dY = normal(B, H, T, d)
    return dict(K=K, V=V, Q=Q, dY=dY, gates={k: v.astype(np.float32) for k, v in gates.items()})


def make_rule(name, d, expansion):
    rule = getattr(mc.presets, name)(d)
    if isinstance(rule.memory, mc.memory.MLP) and expansion != rule.memory.expansion:
        rule = rule._replace(memory=mc.memory.mlp(d, expansion=expansion))
    return rule


def gate_names(rule):
    """The gates a rule's scan takes: lr, alpha, plus delta (huber(delta=None)), beta (momentum)."""
    names = ["lr", "alpha"]
    if getattr(rule.bias, "needs_delta", False):
        names.append("delta")
    if rule.algorithm.uses_momentum:
        names.append("beta")
    return names


def rule_args(rule, x, dev, B, H, T, dtype, seed=0):
    """(params, K, V, Q, gates, dY) on the device in `dtype`, the first T tokens of x."""
    params = rule.memory.init(seed, batch_shape=(B, H), dtype=np.float32)

    def put(a):
        return dev.put(np.ascontiguousarray(a.astype(dtype)))
    cut = (Ellipsis, slice(0, T), slice(None))
    gates = {n: put(x["gates"][n][..., :T]) for n in gate_names(rule)}
    return (tuple(put(p) for p in params), put(x["K"][cut]), put(x["V"][cut]), put(x["Q"][cut]),
            gates, put(x["dY"][cut]))


def scan_fn(rule, chunk):
    """f(params, K, V, Q, gates) -> Y: the public API, one mc.scan from a fresh state."""
    def f(params, K, V, Q, gates):
        state = mc.init(rule.memory, params, retention=rule.retention, algorithm=rule.algorithm)
        Y, _ = mc.scan(state, K, V, Q, bias=rule.bias, chunk=chunk, **gates)
        return Y
    return f


def fwd_bwd(f, args, dY):
    """Y and the gradients w.r.t. every argument of f (params, K, V, Q, gates)."""
    Y, pull = ad.vjp(f, *args)
    return Y, pull(dY)


def named_grads(rule, grads):
    """{name: gradient} from fwd_bwd's (params, K, V, Q, gates) tuple."""
    params, dK, dV, dQ, dgates = grads
    pnames = ("W1", "W2") if isinstance(rule.memory, mc.memory.MLP) else tuple(f"P{i}" for i in range(len(params)))
    out = {f"d{n}": g for n, g in zip(pnames, params)}
    out.update(dK=dK, dV=dV, dQ=dQ)
    out.update({f"d{n}": g for n, g in dgates.items()})
    return out


def rel_rms(xp, got, want):
    g = xp.asarray(got, dtype=xp.float64)
    w = xp.asarray(want, dtype=xp.float64)
    return float(xp.sqrt(xp.mean((g - w) ** 2)) / max(float(xp.sqrt(xp.mean(w ** 2))), 1e-300))


def accuracy(rule, x, dev, args):
    """Relative RMS errors of Y and every gradient, float32 (at the row's GEMM precision) vs
    float64, at T = err_T."""
    B, H, T, C = args.B, args.H, min(args.err_T, args.T), args.chunk
    f = scan_fn(rule, C)
    out = {}
    for dtype in (np.float32, np.float64):
        *a, dY = rule_args(rule, x, dev, B, H, T, dtype)
        Y, grads = fwd_bwd(f, a, dY)
        out[dtype] = (Y, named_grads(rule, grads))
        del a, dY
    (Y32, g32), (Y64, g64) = out[np.float32], out[np.float64]
    err = {"Y": rel_rms(dev.xp, Y32, Y64)}
    err.update({n: rel_rms(dev.xp, g32[n], g64[n]) for n in g64})
    finite = bool(dev.xp.isfinite(Y32).all()) and all(bool(dev.xp.isfinite(g).all()) for g in g32.values())
    return err, finite


def bench_rule(name, args, dev, x, mode):
    """The fwd and fwd+bwd rows of one rule."""
    B, H, T, C = args.B, args.H, args.T, args.chunk
    shape = f"B{B} T{T} H{H} D{args.d} C{C}"
    base = dict(impl="ours", rule=name, dtype=mode, shape=shape, tokens=B * T)
    try:
        rule = make_rule(name, args.d, args.expansion)
        err, finite = accuracy(rule, x, dev, args)
        dev.free()
        *a, dY = rule_args(rule, x, dev, B, H, T, np.float32)
        f = scan_fn(rule, C)
        fl = flops(rule, B, H, T, C)
        inputs = sum(p.nbytes for p in a[0]) + sum(y.nbytes for y in a[1:4]) + sum(g.nbytes for g in a[4].values())
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        for m in args.modes:
            row = dict(base, mode=m, error=f"{type(e).__name__}: {e}"[:300])
            ROWS.append(row)
            print_row(row)
        save_json()
        return
    if fl is not None:
        JSON["extra"].setdefault("flops", {})[name] = dict(fwd=fl[0], fwd_bwd=fl[1], pieces_fwd_bwd=fl[2])
    fns = {"fwd": (lambda: f(*a), 0 if fl is None else fl[0], {"Y": err["Y"]}, inputs),
           "fwd+bwd": (lambda: fwd_bwd(f, a, dY), 0 if fl is None else fl[1], err, inputs + dY.nbytes)}
    for m in args.modes:
        fn, fl_m, err_m, in_bytes = fns[m]
        row = dict(base, mode=m, err=err_m, err_T=min(args.err_T, T), finite_err_run=finite)
        try:
            out, extra = dev.peak_bytes(fn)
            ok = bool(dev.xp.isfinite(out[0] if isinstance(out, tuple) else out).all())
            del out
            row.update(peak_gib=(extra + in_bytes) / 2**30, finite=ok)
            ms, p20, p80 = dev.time_ms(fn, args.warmup, args.iters)
            row.update(ms=ms, p20=p20, p80=p80, tok_s=B * T / ms * 1e3)
            if not dev.cpu:
                from mirascore.gpu import graph
                row.update(graph_gib=graph.memory_bytes() / 2**30)
                graph.clear()
            if fl_m:
                row.update(gflop=fl_m / 1e9, tflop_s=fl_m / ms / 1e9,
                           frac={k: fl_m / (ms * 1e-3) / v for k, v in CEIL.items()})
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
        dev.free()
        ROWS.append(row)
        print_row(row)
        save_json()
    del fns
    dev.free()


# ---------------------------------------------------------------- titans-pytorch


def import_neural_memory():
    """As anchors_gpu.py: `from titans_pytorch import NeuralMemory`, or, if the package __init__
    fails on its other dependencies, titans_pytorch.neural_memory alone through a stub package."""
    import importlib.util
    import types
    site = os.environ.get("ANCHORS_SITE", "/tmp/site")
    if os.path.isdir(site) and site not in sys.path:
        sys.path.insert(0, site)
    try:
        from titans_pytorch import NeuralMemory
        return NeuralMemory, "package import"
    except Exception as e:  # noqa: BLE001
        print(f"titans_pytorch package import failed ({type(e).__name__}: {e}); "
              f"falling back to titans_pytorch.neural_memory only", flush=True)
        for mod in [m for m in sys.modules if m == "titans_pytorch" or m.startswith("titans_pytorch.")]:
            del sys.modules[mod]
        spec = importlib.util.find_spec("titans_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise
        pkg = types.ModuleType("titans_pytorch")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["titans_pytorch"] = pkg
        from titans_pytorch.neural_memory import NeuralMemory
        return NeuralMemory, "neural_memory only (stub package)"


def bench_titans(args, dev):
    """titans-pytorch NeuralMemory, dim = H·d as H heads of d, chunk C, depth 2, expansion
    --expansion, (B, T, dim) input, fp32 and bf16; fwd+bwd exactly as anchors_gpu.py (grad of the
    output w.r.t. x and every parameter), and fwd under torch.no_grad(). Halves B on CUDA OOM."""
    try:
        import torch
        NeuralMemory, how = import_neural_memory()
        import importlib.metadata as md
        print(f"\ntitans-pytorch {md.version('titans-pytorch')} ({how}), torch {torch.__version__}", flush=True)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row = dict(impl="titans", rule="titans-pytorch", dtype="-", mode="-", shape="-",
                   error=f"import: {type(e).__name__}: {e}"[:300])
        ROWS.append(row)
        print_row(row)
        save_json()
        return
    tdev = torch.device("cpu" if dev.cpu or not torch.cuda.is_available() else "cuda")
    cuda = tdev.type == "cuda"
    dim, heads, dh, C = args.H * args.d, args.H, args.d, args.chunk
    dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    if args.titans_tf32:
        dtypes.insert(1, ("tf32", torch.float32))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def make(dtype, mode, B):
        torch.manual_seed(0)
        mem = NeuralMemory(dim=dim, heads=heads, dim_head=dh, chunk_size=C, batch_size=None,
                           use_accelerated_scan=False,
                           default_model_kwargs=dict(depth=2, expansion_factor=float(args.expansion)),
                           ).to(tdev, dtype)
        x = torch.randn(B, args.T, dim, device=tdev, dtype=dtype, requires_grad=(mode == "fwd+bwd"))
        do = torch.randn(B, args.T, dim, device=tdev, dtype=dtype)
        params = [x] + [p for p in mem.parameters() if p.requires_grad]

        def fn_all():
            y, _state = mem(x)
            torch.autograd.grad(y, params, do, allow_unused=True)

        def fn_fwd():
            with torch.no_grad():
                mem(x)
        return fn_all if mode == "fwd+bwd" else fn_fwd

    def time_ms(fn):
        for _ in range(args.warmup):
            fn()
        sync()
        if not cuda:
            times = []
            for _ in range(args.titans_iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        else:
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(args.titans_iters)]
            for s, e in ev:
                s.record()
                fn()
                e.record()
            sync()
            times = [s.elapsed_time(e) for s, e in ev]
        return float(np.median(times)), float(np.percentile(times, 20)), float(np.percentile(times, 80))

    dev.free()
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    for label, dtype in dtypes:
        torch.backends.cuda.matmul.allow_tf32 = label == "tf32"
        for mode in args.modes:
            B = args.B
            while B >= 1:
                row = dict(impl="titans", rule="titans-pytorch", dtype=label, mode=mode, tokens=B * args.T,
                           shape=f"B{B} T{args.T} dim{dim} H{heads}x{dh} c{C} depth2")
                fn = None
                try:
                    if cuda:
                        sync()
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    fn = make(dtype, mode, B)
                    ms, p20, p80 = time_ms(fn)
                    row.update(ms=ms, p20=p20, p80=p80, tok_s=B * args.T / ms * 1e3,
                               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    traceback.print_exc()
                del fn
                if cuda:
                    sync()
                    torch.cuda.empty_cache()
                ROWS.append(row)
                print_row(row)
                save_json()
                if "error" not in row or "OutOfMemory" not in row["error"]:
                    break
                B //= 2
    torch.backends.cuda.matmul.allow_tf32 = tf32_before


# ---------------------------------------------------------------- output


def print_row(r):
    head = f"{r['impl']:<6} {r['rule']:<14} {r['dtype']:<5} {r.get('mode', '-'):<8}"
    if "error" in r:
        print(f"{head} ERROR {r['error']}", flush=True)
        return
    err = " ".join(f"{k}={v:.1e}" for k, v in r.get("err", {}).items())
    fl = f" {r['tflop_s']:7.3f} TFLOP/s ({100 * r['frac']['fp32']:.1f}% fp32)" if "tflop_s" in r else ""
    print(f"{head} {r['ms']:10.3f} ms {r['tok_s'] / 1e6:9.4f} Mtok/s {r['peak_gib']:7.3f} GiB{fl}"
          f"{'  err: ' + err if err else ''}{'' if r.get('finite', True) else '  NON-FINITE'}", flush=True)


def print_table():
    print("\n" + "=" * 112)
    print(f"{'impl':<6} {'rule':<14} {'dtype':<5} {'mode':<8} {'ms':>10} {'Mtok/s':>9} {'GiB':>7} "
          f"{'GFLOP':>9} {'TFLOP/s':>8} {'%fp32':>6}  {'err Y':>8} {'max err grad':>12}")
    for r in ROWS:
        head = f"{r['impl']:<6} {r['rule']:<14} {r['dtype']:<5} {r.get('mode', '-'):<8}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][:70]}")
            continue
        grads = [v for k, v in r.get("err", {}).items() if k != "Y"]
        fl = (f"{r['gflop']:>9.4g} {r['tflop_s']:>8.3f} {100 * r['frac']['fp32']:>6.1f}" if "gflop" in r
              else f"{'-':>9} {'-':>8} {'-':>6}")
        ey = f"{r['err']['Y']:>8.1e}" if "err" in r else f"{'-':>8}"
        eg = f"{max(grads):>12.1e}" if grads else f"{'-':>12}"
        print(f"{head} {r['ms']:>10.3f} {r['tok_s'] / 1e6:>9.4f} {r['peak_gib']:>7.3f} {fl}  {ey} {eg}")
    titans = {(r["dtype"], r["mode"]): r for r in ROWS if r["impl"] == "titans" and "ms" in r}
    if titans:
        print("-" * 112)
        print("speed ratio titans / ours (per token; > 1: ours faster; target ≥ 10× vs titans fp32 fwd+bwd)")
        for r in ROWS:
            if r["impl"] != "ours" or "ms" not in r:
                continue
            parts = []
            for label in ("fp32", "tf32", "bf16"):
                t = titans.get((label, r["mode"]))
                if t:
                    ratio = (t["ms"] / t["tokens"]) / (r["ms"] / r["tokens"])
                    mark = (" ok" if ratio >= 10 else " <10") if label == "fp32" and r["mode"] == "fwd+bwd" else ""
                    parts.append(f"vs titans {label} {ratio:7.2f}x{mark}")
                    r.setdefault("ratio_titans_over_ours", {})[label] = ratio
            print(f"  ours {r['rule']:<10} {r['dtype']:<5} {r['mode']:<8} " + "   ".join(parts))
    print("=" * 112, flush=True)


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k in ("B", "T", "H", "d", "expansion", "chunk", "warmup", "iters"):
        ap.add_argument(f"--{k}", type=int, default=None)
    ap.add_argument("--err-T", dest="err_T", type=int, default=None,
                    help="T of the fp32-vs-float64 accuracy run (default 256; --quick 128)")
    ap.add_argument("--rules", default=RULES, help=f"comma-separated presets (default {RULES})")
    ap.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--cpu", action="store_true", help="run on numpy instead of CuPy (no TF32, no CUDA)")
    ap.add_argument("--with-titans", action="store_true", help="also time titans-pytorch NeuralMemory")
    ap.add_argument("--titans-iters", type=int, default=10)
    ap.add_argument("--titans-tf32", action="store_true", help="also a titans row with torch TF32 matmuls")
    ap.add_argument("--precision", default="fp32,tf32,bf16",
                    help="comma-separated GEMM precisions of our rows (fp32, tf32, bf16, fp16)")
    ap.add_argument("--no-tf32", action="store_true", help="leave tf32 out of --precision")
    ap.add_argument("--eager", action="store_true",
                    help="no CUDA graph replay (mirascore.gpu.settings cuda_graphs=False)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    profile = (QUICK_CPU if args.quick else CPU) if args.cpu else (QUICK if args.quick else FULL)
    for k, v in profile.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for r in args.rules:
        if not hasattr(mc.presets, r):
            ap.error(f"unknown rule {r!r}; presets: moneta, yaad, memora, titans, ttt_mlp, ...")
    if any(m not in ("fwd", "fwd+bwd") for m in args.modes):
        ap.error(f"--modes takes fwd and fwd+bwd, got {args.modes}")
    if args.iters < 10 or args.titans_iters < 10:
        ap.error("--iters and --titans-iters must be at least 10")

    from mirascore.gpu import settings
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()
                  and not (args.no_tf32 and p.strip() == "tf32")]
    for p in precisions:
        if p not in settings.PRECISIONS:
            ap.error(f"--precision takes {', '.join(settings.PRECISIONS)}; got {p!r}")
    if args.cpu:
        precisions = ["fp32"]                     # numpy multiplies at the arrays' dtype

    JSON["path"] = args.json
    JSON["extra"]["args"] = vars(args)
    dev = Device(args.cpu)
    JSON["extra"]["device"] = dev.name()
    print(dev.name(), flush=True)
    print(f"shape B={args.B} T={args.T} H={args.H} d={args.d} (mlp expansion {args.expansion}), chunk "
          f"{args.chunk}; median of {args.iters} after {args.warmup} warm-up; errors at T={min(args.err_T, args.T)}",
          flush=True)
    t0 = time.time()
    x = make_inputs(args.B, args.H, args.T, args.d)
    if args.eager and not args.cpu:
        settings.configure(cuda_graphs=False)
    for name in args.rules:
        for p in precisions:
            forced = p != "fp32"
            label = p + ("*" if forced else "") + (" eager" if args.eager and not args.cpu else "")
            with at_precision(p, forced):
                bench_rule(name, args, dev, x, label)
    if args.with_titans:
        bench_titans(args, dev)
    print_table()
    if any(p != "fp32" for p in precisions):
        print("* mc.scan runs these rules' products in fp32 at every precision (anchored_precision);\n"
              "  the starred rows bypass that mapping to show what reduced-precision products would give",
              flush=True)
    print(f"total wall time {time.time() - t0:.1f} s", flush=True)
    save_json()


@contextlib.contextmanager
def at_precision(precision, forced):
    """mc.scan calls inside run at GEMM precision `precision` (the setting, which mc.scan's
    precision=None takes); forced: anchored_precision is the identity meanwhile, so that the reduced
    precision reaches the anchored products (mc.scan imports it at each call)."""
    from mirascore.gpu import settings
    mapping = anchored.anchored_precision
    if forced:
        anchored.anchored_precision = lambda p: p
    try:
        with settings.using(precision=precision):
            yield
    finally:
        anchored.anchored_precision = mapping


if __name__ == "__main__":
    main()
