"""Gated DeltaNet at the shapes the trainer uses, beside FLA: a table of ms and ratios.

    python3 benchmarks/gpu_delta_shapes.py --out DIR [--time-limit 300] [--precision tf32]
    python3 benchmarks/gpu_delta_shapes.py --out DIR --table-only      # reprint from DIR's JSON

Runs benchmarks/gpu_delta.py --with-fla once per shape (a fresh process each: no memory pool or
compiled-kernel state carried from one shape to the next), its JSON into DIR/B{B}_T{T}_H{H}_d{d}.json,
then prints one markdown row per shape: our forward and forward+backward ms at --precision, FLA's
(bf16), and the ratios. Shapes not started within --time-limit seconds are listed as skipped.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# (B, T, H, d): head dims 48, 64, 128; T 256 to 8192; batch × heads 8 to 256. The 20m models are
# width 512 in 8 heads of 64 at context 2048 (batch 8 and 16).
SHAPES = [(8, 2048, 8, 64), (4, 1024, 4, 48), (32, 256, 8, 64), (1, 8192, 8, 128), (16, 2048, 8, 64),
          (8, 4096, 16, 128)]


def name(shape):
    return "B{}_T{}_H{}_d{}".format(*shape)


def table(out, precision):
    print(f"| B | T | H | d | B·H | ours {precision} fwd ms | FLA bf16 fwd ms | ratio | "
          f"ours {precision} fwd+bwd ms | FLA bf16 fwd+bwd ms | ratio | max rel. err ours / FLA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        path = os.path.join(out, name(shape) + ".json")
        B, T, H, d = shape
        if not os.path.exists(path):
            print(f"| {B} | {T} | {H} | {d} | {B * H} | skipped | | | | | | |")
            continue
        with open(path) as f:
            rows = json.load(f)["rows"]
        timed = {(r["impl"], r["mode"]): r for r in rows if "ms" in r}     # impl "ours" / "fla"
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            ours, fla = timed.get(("ours", mode)), timed.get(("fla", mode))
            cells += [f"{ours['ms']:.3f}" if ours else "—", f"{fla['ms']:.3f}" if fla else "—",
                      f"{ours['ms'] / fla['ms']:.2f}×" if ours and fla else "—"]
        errs = [f"{max(timed[impl, 'fwd+bwd']['err'].values()):.1e}" if (impl, "fwd+bwd") in timed else "—"
                for impl in ("ours", "fla")]
        print(f"| {B} | {T} | {H} | {d} | {B * H} | " + " | ".join(cells) + f" | {' / '.join(errs)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the per-shape JSON files")
    ap.add_argument("--precision", default="tf32", help="our GEMM precision (one of gpu_delta.py's)")
    ap.add_argument("--time-limit", type=float, default=float("inf"))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + args.time_limit
    for shape in ([] if args.table_only else SHAPES):
        if time.monotonic() > deadline:
            break
        B, T, H, d = shape
        cmd = [sys.executable, os.path.join(HERE, "gpu_delta.py"), "--with-fla", "--precision", args.precision,
               "--B", str(B), "--T", str(T), "--H", str(H), "--d", str(d),
               "--json", os.path.join(args.out, name(shape) + ".json")]
        print("$ " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=False)
    table(args.out, args.precision)


if __name__ == "__main__":
    main()
