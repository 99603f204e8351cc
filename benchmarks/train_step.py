#!/usr/bin/env python3
"""Tokens/s of one training step of every language model, with FLOPs per token and MFU, beside
the same step written in PyTorch (Transformer++; Gated DeltaNet with FLA's kernel), in one process.

    python benchmarks/train_step.py --device cpu                      # the tiny models, numpy
    python3 benchmarks/train_step.py --device gpu --tf32 --json train_step.json
    bash benchmarks/run_train_step_gpu.sh                             # the documented GPU run

A step is `mirascore.lm.train.train_step`, what the trainer runs: `ad.value_and_grad(lm.loss)` on
one batch (batch, context + 1) of the embedded corpus handed over from the host, the global-norm
clip and `mirascore.lm.optim.adamw_update`. The PyTorch step (benchmarks/torch_reference.py) does
the same: forward, cross-entropy, backward, clip, `torch.optim.AdamW(fused=True)`, starting from
the same weights (our init copied in), on the same batches. Rows:

  mirascore  fp32 (and tf32 with --tf32: TF32 math mode on mirascore's and CuPy's cuBLAS handles)
  torch      fp32, tf32 (with --tf32), bf16 autocast (GPU); fp32 transformer (CPU, if torch is there)

Per row: the median time of --steps timed steps after --warmup untimed ones (on the GPU CUDA
events around each step, so a step is its span on the device; 2 warm-ups: CUDA graphs are
recorded at the second call), tokens/s (batch × context predicted tokens per step), the model FLOPs
per token (`mirascore.lm.model.flops_per_token`: 6·N over the projection matrices and the output
head, not the embedding lookup, plus the mixer's sequence term — attention 6·depth·context·width,
a Miras memory 6·depth·heads·3·2·|W|), the achieved TFLOP/s, the MFU against
a GEMM ceiling measured in this process (fp32/TF32: an 8192³ product through mirascore's cuBLAS
path; bf16: torch; CPU: a 2048³ numpy product) and, on an H100/H200, against the datasheet
(dense fp32 67, TF32 495, bf16 989 TFLOP/s), peak memory (GPU: the high-water mark each
allocator holds — CuPy's pool plus the recorded graphs' pools, torch's max_memory_reserved) and
the first step's loss (same weights, same batch: ours and torch's should agree). Torch rows add
ratio = torch tokens/s ÷ ours, per precision of ours. --json is rewritten after every row.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model, enable_tf32  # noqa: E402

import mirascore.lm as lm  # noqa: E402
from mirascore.lm import data, model as lm_model  # noqa: E402
from mirascore.lm.optim import adamw_init  # noqa: E402
from mirascore.lm.train import train_step  # noqa: E402

MODELS = ("transformer", "gated_deltanet", "moneta", "yaad", "memora", "titans")
TORCH_MODELS = ("transformer", "gated_deltanet")
DATASHEET = {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12}     # H100/H200 SXM, dense
FLOPS_FORMULA = ("mirascore.lm.model.flops_per_token: 6·N (projection matrices and the output head, "
                 "not the embedding lookup) + attention 6·depth·context·width | Miras 6·depth·heads·3·2·|W|")
OUT = {"path": None, "info": {}, "ceilings": {}, "rows": []}
HOST_PARAMS = {}


def save():
    if OUT["path"]:
        with open(OUT["path"], "w") as f:
            json.dump({k: v for k, v in OUT.items() if k != "path"}, f, indent=1)


def per_size(text, name):
    """'16' (every size) or '20m=16,120m=8' -> {size or None: int}."""
    if text is None:
        return {}
    try:
        if "=" not in text:
            return {None: int(text)}
        return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise SystemExit(f"--{name}: expected N or SIZE=N,SIZE=N, got {text!r}") from None


def time_calls(fn, inputs, clock):
    """fn(x) for each x: (per-call ms, wall ms per call). clock "cpu" (perf_counter; fn returns
    when done), "cupy" or "torch" (CUDA events around each call, one synchronisation at the end)."""
    if clock == "cpu":
        ms, start = [], time.perf_counter()
        for x in inputs:
            t = time.perf_counter()
            fn(x)
            ms.append((time.perf_counter() - t) * 1e3)
        return ms, (time.perf_counter() - start) * 1e3 / len(inputs)
    if clock == "cupy":
        import cupy
        event, sync, elapsed = cupy.cuda.Event, cupy.cuda.Device().synchronize, cupy.cuda.get_elapsed_time
    else:
        import torch
        event, sync = (lambda: torch.cuda.Event(enable_timing=True)), torch.cuda.synchronize
        elapsed = lambda s, e: s.elapsed_time(e)  # noqa: E731
    sync()
    pairs, start = [], time.perf_counter()
    for x in inputs:
        s, e = event(), event()
        s.record()
        fn(x)
        e.record()
        pairs.append((s, e))
    sync()
    wall = (time.perf_counter() - start) * 1e3 / len(inputs)
    return [elapsed(s, e) for s, e in pairs], wall


# ---------------------------------------------------------------- ceilings

def measure_ceilings(gpu, torch_rows, tf32):
    """Matmul FLOP/s measured here: {"fp32", "tf32"?, "bf16"?}."""
    n = 8192 if gpu else 2048
    out = {}
    if not gpu:
        a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in (0, 1))
        ms, _ = time_calls(lambda _: a @ b, range(7), "cpu")
        return {"fp32": 2 * n ** 3 / (statistics.median(ms[2:]) * 1e-3)}
    import cupy
    from mirascore.gpu import blas, settings
    a, b = (cupy.random.default_rng(i).standard_normal((n, n), dtype=cupy.float32) for i in (0, 1))
    for name in ("fp32", "tf32") if tf32 else ("fp32",):
        with settings.using(tf32=name == "tf32"):
            ms, _ = time_calls(lambda _: blas.matmul(a, b), range(13), "cupy")
        out[name] = 2 * n ** 3 / (statistics.median(ms[3:]) * 1e-3)
    del a, b
    cupy.get_default_memory_pool().free_all_blocks()
    if torch_rows:
        import torch
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms, _ = time_calls(lambda _: a @ b, range(13), "torch")
        out["bf16"] = 2 * n ** 3 / (statistics.median(ms[3:]) * 1e-3)
        del a, b
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- rows

def config(name, size, args):
    overrides = {}
    for key in ("batch", "context"):
        value = getattr(args, key).get(size, getattr(args, key).get(None))
        if value is not None:
            overrides[key] = value
    cfg = lm.config.with_overrides(lm.load_config(os.path.join(ROOT, "models", f"{name}-{size}.toml")), args.set)
    return lm.config.replace(cfg, **overrides)


def initial_params(cfg, size):
    """lm.init's params on the host, drawn once per model and size (the rows of a model
    share them: the same weights for ours, in every precision, and for torch's)."""
    key = (cfg.model, size)
    if key not in HOST_PARAMS:
        HOST_PARAMS[key] = lm_model.init(cfg, seed=cfg.seed)
    return HOST_PARAMS[key]


def batches(cfg, corpus, n):
    return [data.train_batch(corpus.train, s, cfg.seed, cfg.batch, cfg.context) for s in range(n)]


def bench_ours(cfg, params, inputs, args, gpu):
    """(per-step ms, wall ms, first loss, peak bytes or None) of mirascore's step."""
    if gpu:
        import cupy
        from mirascore.gpu import graph
    xp = cupy if gpu else np
    state = {"params": {name: xp.array(p) for name, p in params.items()}}
    state["opt"] = adamw_init(state["params"])

    def step(tokens):
        state["params"], state["opt"], loss, _ = train_step(state["params"], state["opt"], tokens, cfg.lr, cfg)
        return loss
    loss0 = float(step(inputs[0]))
    for tokens in inputs[1:args.warmup]:
        step(tokens)
    ms, wall = time_calls(step, inputs[args.warmup:], "cupy" if gpu else "cpu")
    peak = cupy.get_default_memory_pool().total_bytes() + graph.memory_bytes() if gpu else None
    return ms, wall, loss0, peak


def bench_torch(cfg, params, inputs, args, gpu, precision, row):
    import torch
    import torch_reference as ref
    device = "cuda" if gpu else "cpu"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    model = ref.LM(cfg)
    ref.load_params(model, params, cfg)
    model.to(device)
    row["params_torch"] = ref.param_count(model)
    row["note"] = model.note
    step = ref.make_step(model, cfg, precision)
    row["fused_adamw"] = bool(step.fused)

    def run(tokens):
        return step(torch.from_numpy(tokens).to(device).long())
    loss0 = float(run(inputs[0]))
    for tokens in inputs[1:args.warmup]:
        run(tokens)
    ms, wall = time_calls(run, inputs[args.warmup:], "torch" if gpu else "cpu")
    return ms, wall, loss0, torch.cuda.max_memory_reserved() if gpu else None


def release():
    """Give back what a GPU row held (also after a failure such as running out of memory), so
    the next row, ours or torch's, starts from an empty pool."""
    import cupy
    from mirascore.gpu import graph
    gc.collect()
    graph.clear()
    cupy.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


def bench_row(impl, name, size, precision, args, gpu, corpus, deadline):
    cfg = config(name, size, args)
    tokens = cfg.batch * cfg.context
    row = dict(impl=impl, model=name, size=size, precision=precision, batch=cfg.batch,
               context=cfg.context, tokens_per_step=tokens, params=lm_model.param_count(cfg),
               flops_per_token=lm_model.flops_per_token(cfg))
    print(f"-- {impl} {name}-{size} {precision} B={cfg.batch} T={cfg.context}", flush=True)
    if time.perf_counter() > deadline:
        row["skipped"] = "skipped: --time-limit reached"
        print("   " + row["skipped"], flush=True)
    else:
        try:
            inputs = batches(cfg, corpus, args.warmup + args.steps)
            params = initial_params(cfg, size)
            if impl == "mirascore":
                ms, wall, loss0, peak = bench_ours(cfg, params, inputs, args, gpu)
            else:
                ms, wall, loss0, peak = bench_torch(cfg, params, inputs, args, gpu, precision, row)
            median = statistics.median(ms)
            achieved = tokens / (median * 1e-3) * row["flops_per_token"]
            ceiling = OUT["ceilings"].get(precision)
            sheet = DATASHEET.get(precision) if OUT["info"].get("datasheet") else None
            row.update(ms=median, ms_min=min(ms), ms_max=max(ms), wall_ms=wall, steps=len(ms),
                       tok_s=tokens / (median * 1e-3), tflop_s=achieved / 1e12, loss0=loss0,
                       mfu=achieved / ceiling if ceiling else None,
                       mfu_datasheet=achieved / sheet if sheet else None,
                       peak_gib=peak / 2 ** 30 if peak is not None else None)
            print("   " + line(row), flush=True)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
            print(f"   ERROR {row['error']}", flush=True)
        finally:
            if gpu:
                release()
    OUT["rows"].append(row)
    save()
    return row


# ---------------------------------------------------------------- output

def pct(x):
    return f"{100 * x:.1f}%" if x is not None else "—"


def line(r):
    if "ms" not in r:
        return r.get("error") or r.get("skipped", "")
    gib = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "—"
    return (f"{r['ms']:9.1f} ms {r['tok_s']:>10,.0f} tok/s {r['flops_per_token'] / 1e9:7.4g} GFLOP/tok "
            f"{r['tflop_s']:7.4g} TFLOP/s  MFU {pct(r['mfu']):>6} (datasheet {pct(r['mfu_datasheet'])})  "
            f"{gib} GiB  loss0 {r['loss0']:.4f}")


def ratios():
    ours = {(r["model"], r["size"], r["precision"]): r for r in OUT["rows"]
            if r["impl"] == "mirascore" and "tok_s" in r}
    lines = []
    for r in OUT["rows"]:
        if r["impl"] != "torch" or "tok_s" not in r:
            continue
        parts = []
        for precision in ("fp32", "tf32"):
            mine = ours.get((r["model"], r["size"], precision))
            if mine:
                ratio = r["tok_s"] / mine["tok_s"]
                r[f"ratio_vs_ours_{precision}"] = ratio
                parts.append(f"{ratio:6.2f}× ours {precision}")
        if parts:
            lines.append(f"  torch {r['model']}-{r['size']} {r['precision']:<5} ÷ " + ", ".join(parts))
    return lines


def print_table():
    head = (f"{'impl':<10} {'model':<15} {'size':<5} {'prec':<5} {'B×T':>9} {'ms/step':>9} {'tok/s':>10} "
            f"{'GFLOP/tok':>9} {'TFLOP/s':>8} {'MFU':>6} {'sheet':>6} {'GiB':>6} {'loss0':>7}")
    print("\n" + "=" * len(head) + "\n" + head)
    for r in OUT["rows"]:
        lead = (f"{r['impl']:<10} {r['model']:<15} {r['size']:<5} {r['precision']:<5} "
                f"{str(r['batch']) + '×' + str(r['context']):>9}")
        if "ms" not in r:
            print(f"{lead} {r.get('error') or r.get('skipped')}")
            continue
        gib = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "—"
        print(f"{lead} {r['ms']:>9.1f} {r['tok_s']:>10,.0f} {r['flops_per_token'] / 1e9:>9.4g} "
              f"{r['tflop_s']:>8.4g} {pct(r['mfu']):>6} {pct(r['mfu_datasheet']):>6} {gib:>6} {r['loss0']:>7.4f}")
    print("=" * len(head))
    params = {(r["model"], r["size"]): (r["params"], r["params_torch"]) for r in OUT["rows"] if "params_torch" in r}
    for (name, size), (mine, theirs) in params.items():
        print(f"parameters {name}-{size}: mirascore {mine:,}, torch {theirs:,}")
    for note in sorted({r["note"] for r in OUT["rows"] if r.get("note")}):
        print(f"note: {note}")
    ratio_lines = ratios()
    if ratio_lines:
        print("ratio = torch tokens/s ÷ mirascore tokens/s (same process, same batch):")
        print("\n".join(ratio_lines))
    ceil = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in OUT["ceilings"].items())
    print(f"MFU = achieved ÷ measured matmul ceiling ({ceil} TFLOP/s); sheet = ÷ datasheet "
          f"({'H100/H200 dense fp32 67, TF32 495, bf16 989' if OUT['info'].get('datasheet') else 'n/a on this device'})")
    print(f"FLOPs/token: {FLOPS_FORMULA}")
    save()


# ---------------------------------------------------------------- main

def torch_available(gpu):
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if gpu and not torch.cuda.is_available():
        return False, "torch has no CUDA here"
    return True, torch.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sizes", default=None, help="default: tiny on cpu, 20m,120m on gpu")
    ap.add_argument("--batch", default=None, help="N or SIZE=N,...: override the configs' batch")
    ap.add_argument("--context", default=None, help="N or SIZE=N,...: override the configs' context")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5 cpu, 10 gpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 cpu, 2 gpu)")
    ap.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override a config key of every row, as `mirascore train --set` does")
    ap.add_argument("--tf32", action="store_true", help="GPU: also TF32 rows (ours and torch)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: rows not started by then are skipped (listed in the table)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gpu = args.device == "gpu"
    args.steps = args.steps or (10 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    if args.steps < (10 if gpu else 5) or args.warmup < 1:
        ap.error("--steps must be ≥ 10 on the GPU and ≥ 5 on the CPU; --warmup ≥ 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sizes = [s.strip() for s in (args.sizes or ("20m,120m" if gpu else "tiny")).split(",")]
    args.batch, args.context = per_size(args.batch, "batch"), per_size(args.context, "context")
    deadline = time.perf_counter() + (float("inf") if args.time_limit is None else args.time_limit)
    OUT["path"] = args.json

    info = dict(device=args.device, python=platform.python_version(), numpy=np.__version__,
                cpu=cpu_model(), cores=os.cpu_count(), args=vars(args), flops_formula=FLOPS_FORMULA,
                **{k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                   if k in os.environ})
    if gpu:
        from mirascore.lm import device
        cupy = device.array_module("gpu")
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        info.update(gpu=name.decode() if isinstance(name, bytes) else name, cupy=cupy.__version__)
        info["datasheet"] = any(s in info["gpu"] for s in ("H100", "H200"))
    with_torch, why = (False, "--no-torch") if args.no_torch else torch_available(gpu)
    torch_models = [m for m in TORCH_MODELS if m in models and (gpu or m == "transformer")]
    torch_precisions = (["fp32"] + (["tf32"] if args.tf32 else []) + ["bf16"]) if gpu else ["fp32"]
    if with_torch:
        import torch
        info["torch"] = torch.__version__
        try:
            import fla
            info["fla"] = getattr(fla, "__version__", "?")
        except ImportError as e:
            info["fla"] = f"not importable ({e})"
            if gpu and "gated_deltanet" in torch_models:
                print("FLA is not importable: the torch Gated DeltaNet rows are skipped "
                      "(install ../shared/anchors/wheels, see benchmarks/run_train_step_gpu.sh)", flush=True)
                torch_models.remove("gated_deltanet")
        if not gpu and os.environ.get("OPENBLAS_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OPENBLAS_NUM_THREADS"]))   # the same cores as numpy
        info["torch_threads"] = torch.get_num_threads()
    else:
        print(f"PyTorch rows skipped: {why}", flush=True)
        torch_models = []
    OUT["info"] = info
    print(json.dumps({k: v for k, v in info.items() if k != "args"}), flush=True)

    OUT["ceilings"] = measure_ceilings(gpu, bool(torch_models), args.tf32 and gpu)
    print("matmul ceilings measured here: " +
          ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in OUT["ceilings"].items()), flush=True)
    save()
    corpus = data.load_corpus(None)

    for size in sizes:                                   # fp32, then the torch rows, size by size
        for name in models:
            bench_row("mirascore", name, size, "fp32", args, gpu, corpus, deadline)
        for name in torch_models:
            for precision in torch_precisions:
                bench_row("torch", name, size, precision, args, gpu, corpus, deadline)
    if gpu and args.tf32:                                # then TF32 (the switch stays on)
        print(f"TF32: cuBLAS math mode {enable_tf32()}", flush=True)
        for size in sizes:
            for name in models:
                bench_row("mirascore", name, size, "tf32", args, gpu, corpus, deadline)
    print_table()


if __name__ == "__main__":
    main()
