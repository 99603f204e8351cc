#!/usr/bin/env python3
"""Multi-query associative recall (MQAR, Zoology): a 2-layer model of every mixer trained on generated
MQAR sequences at four sizes of key-value sets; a markdown table of held-out accuracy and wall time.

    python3 benchmarks/mqar.py --device gpu --json mqar.json       # the table (~4 min per column on an H200)
    python benchmarks/mqar.py --quick                               # tiny settings: a CPU smoke run, ~1 min

Each row is `mirascore.lm.train.run` (the trainer, task = "mqar") on a config built from
models/<model>-tiny.toml with depth 2, the pair count and context of its column and the training
settings below (the tiny configs' width 128, heads 4, chunk 16 and per-model ffn_hidden, so the
models have equal parameter counts), then `mirascore.lm.mqar.evaluate` on --samples held-out
sequences: what `mirascore eval RUN_DIR --task mqar` prints. Settings for every row:

  alpha_floor   1 − 1/context where the tiny config has a floor (the mlp memories; docs/training.md)
  attention_block  min(context, 256) (transformer; not semantic, fewer Python-level block pairs)
  batch         --tokens // context sequences per step (equal tokens per step in every column)
  eval          only at the end (the run's val_acc), 1 validation batch; then the held-out test

--set KEY=VALUE applies to every row after these (e.g. chunk=64, lr=0.001, tf32=true). Rows run
column by column (all models at the smallest pair count first), so a run cut short by --time-limit
still has whole columns; --json is rewritten after every row. Accuracy is per query (Zoology's);
chance is 1 / (vocab / 2) = 1/128 for a model that has learnt only which tokens are values.

Measured on an H200 (docs/results.md): a row of 500 steps takes 11–57 s at 8 or 32 pairs; at 150
steps every mixer but Titans (0.41) stayed near chance, at 500 Titans solved 8 pairs (1.000) and the
others had barely begun, so 500 is the default and more steps separate the rest.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirascore.lm import config, model, mqar, train  # noqa: E402

MODELS = ("transformer", "gated_deltanet", "moneta", "yaad", "memora", "titans")
FULL = {"pairs": (8, 32, 64, 128), "contexts": (256, 256, 512, 1024), "tokens": 32768, "steps": 500,
        "lr": 3e-3, "warmup": 15, "samples": 256}
QUICK = {"pairs": (2, 4, 8, 16), "contexts": (16, 16, 32, 64), "tokens": 256, "steps": 10,
         "lr": 1e-2, "warmup": 2, "samples": 16,
         "model": {"width": 32, "heads": 2, "ffn_hidden": 0, "gate_rank": 8, "chunk": 8}}


def row_config(name, pairs, context, settings, overrides=()):
    """The config of one table cell: models/<name>-tiny.toml, made a 2-layer MQAR model (module doc)."""
    base = config.load_config(ROOT / "models" / f"{name}-tiny.toml")
    changes = dict(settings.get("model", {}), depth=2, task="mqar", mqar_pairs=pairs, context=context,
                   batch=max(1, settings["tokens"] // context), steps=settings["steps"], lr=settings["lr"],
                   warmup=settings["warmup"], eval_every=0, eval_batches=1, log_every=settings["steps"],
                   checkpoint_every=0)
    if base.alpha_floor:
        changes["alpha_floor"] = 1.0 - 1.0 / context
    if base.is_transformer:
        changes["attention_block"] = min(context, 256)
    return config.with_overrides(config.replace(base, **changes), list(overrides))


def run_row(cfg, run_dir, device, samples):
    """{"acc", "loss", "queries", "val_acc", "train_s", "eval_s", "params"} of one trained cell."""
    start = time.perf_counter()
    result = train.run(cfg, run_dir, device_name=device)
    trained = time.perf_counter()
    scores = mqar.evaluate(result.params, cfg, mqar.held_out(cfg, samples))
    return scores | {"val_acc": result.metrics[-1].get("val_acc"), "train_s": trained - start,
                     "eval_s": time.perf_counter() - trained, "params": model.param_count(cfg)}


def markdown(rows, models, columns):
    """Rows: models; columns: (pairs, context); cells: accuracy and training seconds."""
    cells = {(r["model"], r["pairs"]): r for r in rows}
    head = "| model | params | " + " | ".join(f"{p} pairs, T={c}" for p, c in columns) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(columns)]
    for name in models:
        params = next((r["params"] for r in rows if r["model"] == name and "params" in r), None)
        row = [name, f"{params:,}" if params else "—"]
        for pairs, _ in columns:
            r = cells.get((name, pairs))
            row.append("skipped" if r is None or "acc" not in r else f"{r['acc']:.3f} ({r['train_s']:.0f} s)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _ints(text):
    return tuple(int(t) for t in text.split(","))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny models and sequences: a smoke run (~1 min on a CPU)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--pairs", type=_ints, help="key-value pairs per column (default 8,32,64,128; quick 2,4,8,16)")
    ap.add_argument("--contexts", type=_ints, help="sequence length per column (default 256,256,512,1024)")
    ap.add_argument("--tokens", type=int, help="tokens per optimizer step (default 32768; quick 256)")
    ap.add_argument("--steps", type=int, help="optimizer steps per row (default 500; quick 10)")
    ap.add_argument("--samples", type=int, help="held-out test sequences per row (default 256; quick 16)")
    ap.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config override for every row (TOML value syntax)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; rows not started by then are skipped")
    ap.add_argument("--out", help="keep the run directories here (default: a temporary folder)")
    ap.add_argument("--json", help="write the rows here (rewritten after every row)")
    args = ap.parse_args(argv)

    settings = dict(QUICK if args.quick else FULL)
    for key in ("pairs", "contexts", "tokens", "steps", "samples"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if len(settings["pairs"]) != len(settings["contexts"]):
        ap.error(f"--pairs {settings['pairs']} and --contexts {settings['contexts']} differ in length")
    models = tuple(args.models.split(","))
    columns = list(zip(settings["pairs"], settings["contexts"]))
    try:        # every config first: a bad --set or size fails before any training
        configs = {(n, p): row_config(n, p, c, settings, args.set) for n in models for p, c in columns}
    except ValueError as e:
        ap.error(str(e))

    out = {"settings": {k: v for k, v in settings.items()}, "device": args.device, "set": args.set, "rows": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        for pairs, context in columns:
            for name in models:
                row = {"model": name, "pairs": pairs, "context": context}
                cfg = configs[(name, pairs)]
                if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
                    row["skipped"] = f"time limit {args.time_limit:g} s"
                else:
                    row |= {"batch": cfg.batch, "steps": cfg.steps}
                    row |= run_row(cfg, root / f"{name}-{pairs}", args.device, settings["samples"])
                    print(f"{name:15s} pairs {pairs:4d}  T {context:5d}  acc {row['acc']:.3f}  "
                          f"loss {row['loss']:.3f}  train {row['train_s']:.1f} s", flush=True)
                out["rows"].append(row)
                if args.json:
                    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    out["elapsed_s"] = time.perf_counter() - started
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print()
    print(markdown(out["rows"], models, columns))
    print(f"\n{out['elapsed_s']:.0f} s in all; accuracy per query on held-out sequences (chance for a "
          f"model that knows only the value tokens: 2/vocab)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
