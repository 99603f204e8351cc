"""The files of a run directory (docs/training.md, "Checkpoints") and how they are read and written.

    RUN_DIR/config.toml     the resolved config (Config.to_toml)
    RUN_DIR/run.json        what ran: config, parameter count, FLOPs/token, device, data, version
    RUN_DIR/metrics.jsonl   one JSON object per logged step, append-only
    RUN_DIR/checkpoint/     see checkpoint.py
"""
import json
import os
from pathlib import Path

from . import checkpoint
from .config import load_config

CONFIG, RUN_INFO, METRICS = "config.toml", "run.json", "metrics.jsonl"


def is_empty(run_dir):
    """True when run_dir does not exist or holds nothing."""
    run_dir = Path(run_dir)
    return not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir()))


def create(run_dir, cfg, info):
    """Start a fresh run directory: config.toml, run.json, an empty metrics.jsonl."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {str(run_dir)!r} is a file, not a directory")
    if not is_empty(run_dir):
        raise ValueError(f"run directory {str(run_dir)!r} is not empty: pass --resume to continue "
                         f"its run, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG).write_text(cfg.to_toml())
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=1) + "\n")
    (run_dir / METRICS).write_text("")


def read_config(run_dir):
    """The run's resolved config (a FileNotFoundError when run_dir is not a run directory)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no {CONFIG})")
    return load_config(path)


def read_info(run_dir):
    """run.json as a dict ({} when absent)."""
    path = Path(run_dir) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def load(run_dir, xp):
    """(cfg, params, state dict) of a run's last checkpoint, params on xp's device."""
    cfg = read_config(run_dir)
    params, _, state = checkpoint.load(run_dir, xp)
    return cfg, params, state


def read_metrics(run_dir):
    """The metrics lines as dicts; a line cut short by a crash (the last one) is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no {METRICS}")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(run_dir, step):
    """Drop the metrics lines after `step` (resuming from a checkpoint at `step`), atomically."""
    path = Path(run_dir) / METRICS
    kept = [row for row in read_metrics(run_dir) if row["step"] <= step]
    tmp = path.with_name(METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)


def append_metrics(run_dir, row):
    """Append one metrics line (flushed, so a reader sees whole lines)."""
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
