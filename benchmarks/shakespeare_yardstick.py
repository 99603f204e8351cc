#!/usr/bin/env python3
"""nanoGPT's shakespeare_char as a yardstick of the trainer's recipe (docs/results.md).

    python3 benchmarks/shakespeare_yardstick.py --device gpu --steps 5000 [--models transformer,moneta]
                                                [--torch] [--tf32] [--out runs/yardstick] [--json PATH]
                                                [--dropout P] [--plot PNG]
    python3 benchmarks/shakespeare_yardstick.py --from-json PATH --plot PNG     # the figure again

Trains models/yardstick/<model>-shakespeare.toml (nanoGPT's size and recipe: 6 layers × 384,
context 256, batches of 64 × 256 bytes, lr 1e-3 → 1e-4, dropout 0.2) on the embedded Tiny Shakespeare with
`mirascore.lm.train.run`, `--steps` optimizer steps (the schedule spans them; nanoGPT's budget is
5,000; warm-up min(100, steps/10)). With --torch (GPU or CPU, needs torch), the same Transformer++
written in PyTorch (benchmarks/torch_reference.py) trains from the same initial parameters on the
same batches with the same schedule, AdamW, clipping, dropout (nn.Dropout at the same places, with
torch's own masks) and precision: if the two curves agree, the recipe is the model's, not a defect
of the trainer. Prints val bits per byte, wall time and
tokens/s beside nanoGPT's published 2.12 bits (1.4697 nats/char after 82M characters); --plot
draws every row's training loss against tokens (matplotlib).
"""
import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mirascore.lm import data, load_config, model, train  # noqa: E402
from mirascore.lm.evaluate import bits_per_byte  # noqa: E402
from mirascore.lm.optim import learning_rate  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "models" / "yardstick"
NANOGPT = dict(val_bpb=1.4697 / math.log(2.0), tokens=5000 * 64 * 256, wall_s=180.0, device="one A100")


def config(name, args):
    """The yardstick config of `name`, its schedule spanning args.steps; args.dropout, when given,
    replaces the config's rate."""
    path = CONFIGS / f"{name}-shakespeare.toml"
    cfg = load_config(path)
    dropout = cfg.dropout if args.dropout is None else args.dropout
    return load_config(path, steps=args.steps, tf32=args.tf32, dropout=dropout,
                       warmup=min(cfg.warmup, args.steps // 10), eval_every=0, checkpoint_every=0,
                       log_every=max(1, args.steps // 20))


def run_ours(name, args):
    cfg = config(name, args)
    result = train.run(cfg, Path(args.out) / name, device_name=args.device, output="log")
    return dict(model=f"mirascore {name}", params=model.param_count(cfg), steps=result.step,
                tokens=result.tokens, wall_s=result.elapsed_s, val_bpb=result.val_bpb,
                losses=[r["loss"] for r in result.metrics])


def run_torch(args):
    """The PyTorch Transformer++ on the same batches, schedule and initial parameters."""
    import torch
    import torch_reference as ref
    cfg = config("transformer", args)
    dev = "cuda" if args.device == "gpu" else "cpu"
    torch.manual_seed(cfg.seed)                # its dropout masks
    net = ref.LM(cfg).to(dev)
    ref.load_params(net, model.init(cfg, seed=cfg.seed), cfg)
    step = ref.make_step(net, cfg, "tf32" if args.tf32 else "fp32")
    corpus = data.load_corpus(None)
    validation = data.validation_batches(corpus.validation, cfg.seed, cfg.eval_batches, cfg.batch, cfg.context)
    losses, window = [], []
    start = time.perf_counter()
    for s in range(cfg.steps):
        for group in step.optimizer.param_groups:
            group["lr"] = learning_rate(s, cfg)
        tokens = torch.as_tensor(data.train_batch(corpus.train, s, cfg.seed, cfg.batch, cfg.context), device=dev)
        window.append(step(tokens.long()))
        if (s + 1) % cfg.log_every == 0 or s + 1 == cfg.steps:
            losses.append(float(torch.stack(window).mean()))
            window = []
            print(f"torch step {s + 1}/{cfg.steps} | loss {losses[-1]:.4f}", flush=True)
    wall = time.perf_counter() - start
    net.eval()                                 # validation without dropout, as ours
    with torch.no_grad():
        val = sum(float(net.loss(torch.as_tensor(b, device=dev).long())) for b in validation) / len(validation)
    return dict(model="PyTorch transformer", params=ref.param_count(net), steps=cfg.steps,
                tokens=cfg.steps * cfg.batch * cfg.context, wall_s=wall, val_bpb=bits_per_byte(val),
                losses=losses)


def plot(rows, steps, path):
    """Training loss (nats per byte, the mean of each logging window) of every row against tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    every = max(1, steps // 20)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in rows:
        tokens = [min((i + 1) * every, r["steps"]) * r["tokens"] / r["steps"] for i in range(len(r["losses"]))]
        ax.plot(tokens, r["losses"], label=f"{r['model']} (val {r['val_bpb']:.3f} bits)")
    ax.set(xlabel="tokens (bytes)", ylabel="training loss (nats per byte)",
           title=f"shakespeare_char size and recipe, {steps} steps of 64 × 256")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="transformer,moneta")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls (ours and torch's)")
    ap.add_argument("--dropout", type=float, help="dropout rate of every row (default: the configs' 0.2)")
    ap.add_argument("--torch", action="store_true", help="also the PyTorch Transformer++ (needs torch)")
    ap.add_argument("--out", default="runs/yardstick")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--plot", metavar="PNG", help="training-loss curves of the rows")
    ap.add_argument("--from-json", metavar="PATH", help="train nothing: the rows of an earlier --json")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        if args.plot:
            plot(saved["rows"], saved["args"]["steps"], args.plot)
        return
    rows = []
    jobs = ([run_torch] if args.torch else []) + [
        lambda args, name=name.strip(): run_ours(name, args) for name in args.models.split(",")]
    for job in jobs:
        try:
            rows.append(job(args))
        except Exception:                      # a failed row is reported; the others still run
            traceback.print_exc()
        if args.json:
            Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows, nanogpt=NANOGPT), indent=1))
    print("\n| model | params | steps | tokens | wall s | tokens/s | val bpb |\n|---|---|---|---|---|---|---|")
    print(f"| nanoGPT shakespeare_char ({NANOGPT['device']}, published) | 10.7M | 5,000 | {NANOGPT['tokens']:,} | "
          f"{NANOGPT['wall_s']:.0f} | {NANOGPT['tokens'] / NANOGPT['wall_s']:,.0f} | {NANOGPT['val_bpb']:.4f} |")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['steps']:,} | {r['tokens']:,} | {r['wall_s']:.0f} | "
              f"{r['tokens'] / r['wall_s']:,.0f} | {r['val_bpb']:.4f} |")
    if args.plot and rows:
        plot(rows, args.steps, args.plot)


if __name__ == "__main__":
    main()
