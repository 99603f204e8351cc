"""The training loop (docs/training.md, "Training recipe", "Resume", "Metrics").

    result = run(cfg, "runs/moneta-tiny")                  # trains cfg.steps steps, checkpoints, evaluates
    result = run(cfg, "runs/moneta-tiny", resume=True)     # continues from the last checkpoint
    [row["loss"] for row in result.metrics]                # what this session logged

A step: `accumulate` micro-batches through `ad.value_and_grad(lm.loss)`, their gradients averaged,
clipped to a global norm of cfg.clip, then one AdamW step at learning_rate(step). Every array stays
on the device; the host waits for it only at log, eval and checkpoint steps. The data order, the
initialisation and the optimizer are pure functions of (cfg, step), and the checkpoint holds all
the rest (params, moments, the running loss sum of the current log window), so a resumed run
computes bit for bit what an uninterrupted one computes. Dropout masks (cfg.dropout > 0) are seeded
by (cfg.seed, step, micro-batch, rank), so they too are redrawn identically on resume.

Data-parallel (distributed.py): with a communicator `comm` of N ranks, each rank trains on its
rows of every global batch, the gradients and the loss are averaged over the ranks before
clipping, and rank 0 alone writes the run directory. With dropout the rank is part of the masks' seed
(ranks must not share masks), so N ranks match one process in distribution, not bit for bit.
"""
import dataclasses
import functools
import hashlib
import importlib.metadata
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import mirascore.autodiff as ad
from mirascore._xp import namespace

from . import checkpoint, data, device, distributed, rundir, tasks
from . import model as lm_model
from .config import replace
from .optim import adamw_init, adamw_update, clip_by_global_norm, learning_rate

TIMING_FIELDS = ("tokens_per_s", "elapsed_s")     # the metrics that differ between identical runs
DROPOUT_STREAM = 3       # dropout seeds (seed, 3, step, micro, rank); data and MQAR use streams 0-2
OUTPUTS = ("bar", "log", "silent")


class Window(NamedTuple):
    """The steps since the last metrics line: their loss sum (a 0-d device array) and count."""
    loss_sum: object
    steps: int


class TrainResult(NamedTuple):
    params: dict
    opt: object          # AdamState
    step: int            # optimizer steps done
    metrics: list        # the metrics rows this session wrote
    val_bpb: float       # the last validation bits per byte of the run (None before the first eval)
    tokens: int          # predicted tokens trained on, over the whole run
    elapsed_s: float     # wall time over the whole run
    run_dir: Path


def version():
    try:
        return importlib.metadata.version("mirascore")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def config_hash(cfg):
    return hashlib.sha256(cfg.to_toml().encode()).hexdigest()


def dropout_seed(cfg, step, micro, rank=0):
    """The seed of the dropout masks of micro-batch `micro` of optimizer step `step` on data-parallel
    rank `rank` (None without dropout): a pure function of them and cfg.seed, so a resumed run draws
    the masks the uninterrupted one draws. DROPOUT_STREAM keeps it apart from the data's seeds."""
    return (cfg.seed, DROPOUT_STREAM, step, micro, rank) if cfg.dropout else None


def train_step(params, opt, tokens, lr, cfg, reduce=None, step=0, rank=0):
    """One optimizer step on a host int batch of cfg.task (tasks.py; lm: (batch, context + 1) bytes):
    (params, opt, loss, grad_norm), loss = the batch's mean loss and grad_norm = the norm before
    clipping, both 0-d device arrays. reduce(loss, grads) -> (loss, grads), when given, averages
    them over the data-parallel ranks. step (the optimizer step) and rank seed the dropout masks."""
    xp = namespace(*params.values())
    loss_and_grad = ad.value_and_grad(tasks.loss_fn(cfg))
    loss, grads = None, None
    for i, micro in enumerate(data.micro_batches(tokens, cfg.accumulate)):
        micro_loss, micro_grads = loss_and_grad(params, xp.asarray(micro), cfg,
                                                dropout_seed=dropout_seed(cfg, step, i, rank))
        if grads is None:
            loss, grads = micro_loss, micro_grads
        else:
            loss = loss + micro_loss
            grads = {name: grads[name] + g for name, g in micro_grads.items()}
    if cfg.accumulate > 1:
        loss = loss / cfg.accumulate
        grads = {name: g / cfg.accumulate for name, g in grads.items()}
    if reduce is not None:            # before clipping: every rank clips the same global gradient
        loss, grads = reduce(loss, grads)
    grads, norm = clip_by_global_norm(grads, cfg.clip)
    params, opt = adamw_update(params, grads, opt, lr, cfg, lm_model.decays)
    return params, opt, loss, norm


def _run_info(cfg, corpus, xp):
    return {"config": dataclasses.asdict(cfg), "parameters": lm_model.param_count(cfg),
            "parameters_without_embedding": lm_model.param_count(cfg, embeddings=False),
            "flops_per_token": lm_model.flops_per_token(cfg), "device": device.describe(xp),
            "data": corpus.source, "split": corpus.split, "train_bytes": len(corpus.train),
            "validation_bytes": len(corpus.validation), "version": version(),
            "python": sys.version.split()[0], "numpy": np.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _check_resumable(run_dir, cfg, corpus):
    """ValueError unless run_dir holds a checkpoint of this very config and data."""
    if not Path(run_dir).is_dir():
        raise ValueError(f"--resume: run directory {str(run_dir)!r} does not exist")
    saved = rundir.read_config(run_dir)
    changed = [f"{f.name} ({getattr(saved, f.name)!r} in the run, {getattr(cfg, f.name)!r} now)"
               for f in dataclasses.fields(cfg) if getattr(saved, f.name) != getattr(cfg, f.name)]
    if changed:
        raise ValueError(f"--resume: the config differs from the run's in {'; '.join(changed)}; "
                         f"resume with the run's arguments or start a new --out")
    saved_data = rundir.read_info(run_dir).get("data")
    if saved_data != corpus.source:
        raise ValueError(f"--resume: the run trained on {saved_data!r}, not {corpus.source!r}")
    if not checkpoint.exists(run_dir):
        raise ValueError(f"--resume: no checkpoint in {str(run_dir)!r} to resume from (the run stopped "
                         f"before its first one: remove the directory to start afresh)")


def _checkpoint_state(cfg, step, window, elapsed, ranks=1):
    return {"step": step, "tokens": step * cfg.batch * cfg.context, "seed": cfg.seed,
            "data": {"seed": cfg.seed, "next_step": step,
                     "order": "window starts of step s from numpy default_rng([seed, 0, s])",
                     "batch": cfg.batch, "ranks": ranks,     # rank r trained on rows rank_rows[r]
                     "rank_rows": distributed.all_rank_rows(cfg.batch, ranks)},
            "rng": "none carried: initialisation and data order are seeded by (seed, step), dropout "
                   "masks by (seed, step, micro-batch, rank)",
            "window": {"loss_sum": float(window.loss_sum), "steps": window.steps},
            "elapsed_s": elapsed, "config_hash": config_hash(cfg), "version": version()}


def _progress(output, cfg, start):
    if output == "bar":
        from tqdm.auto import tqdm
        return tqdm(total=cfg.steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True)
    return None


def _log_line(row, cfg):
    text = (f"step {row['step']}/{cfg.steps} | loss {row['loss']:.4f} | lr {row['lr']:.3g} | "
            f"grad norm {row['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tokens/s")
    text += f" | val bpb {row['val_bpb']:.4f}" if "val_bpb" in row else ""
    return text + (f" | val acc {row['val_acc']:.4f}" if "val_acc" in row else "")


def run(cfg, out_dir, *, data_path=None, steps=None, device_name="cpu", resume=False, stop_at=None,
        output="silent", comm=None):
    """Train cfg (with steps=N: cfg.steps = N) into run directory out_dir; see the module docstring.

    data_path: None (the embedded corpus), a text file or a folder (data.load_corpus).
    stop_at: end this session after that step, with a checkpoint, as if killed right after it
    (a later run(..., resume=True) finishes the run). output: "bar" (tqdm on stderr), "log" (a
    line per metrics row on stdout) or "silent". comm: this process's rank of a data-parallel
    group (distributed.py; None: training alone). Returns a TrainResult (on ranks other than 0,
    its metrics are empty and its val_bpb None)."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    comm = distributed.Solo() if comm is None else comm
    distributed.check_world(cfg, comm.size)
    checkpoint.require_safetensors()          # missing extras fail before the run directory exists
    if output == "bar":
        import tqdm.auto  # noqa: F401
    xp = device.array_module(device_name)
    with device.tf32(cfg.tf32 and xp is not np):
        return _run(cfg, Path(out_dir), tasks.corpus(cfg, data_path), xp, resume, stop_at, output, comm)


def _start(cfg, run_dir, corpus, xp, resume, comm):
    """(params, opt, step, elapsed_s, window): a fresh run's, or those of its last checkpoint.
    Every rank draws the same initialisation or reads the same checkpoint; rank 0 alone writes."""
    writer = comm.rank == 0
    if not resume:
        if writer:
            rundir.create(run_dir, cfg, _run_info(cfg, corpus, xp))
        params = lm_model.init(cfg, seed=cfg.seed, xp=xp)
        return params, adamw_init(params), 0, 0.0, Window(xp.zeros((), dtype=cfg.dtype), 0)
    if writer:
        _check_resumable(run_dir, cfg, corpus)
        checkpoint.recover(run_dir)
    comm.barrier()                    # the others read the checkpoint once rank 0 has recovered it
    params, opt, state = checkpoint.load(run_dir, xp)
    if state["config_hash"] != config_hash(cfg):
        raise ValueError(f"--resume: the checkpoint in {str(run_dir)!r} belongs to another config")
    if writer:
        rundir.truncate_metrics(run_dir, state["step"])
    window = Window(xp.asarray(state["window"]["loss_sum"], dtype=cfg.dtype), state["window"]["steps"])
    return params, opt, state["step"], state["elapsed_s"], window


def _run(cfg, run_dir, corpus, xp, resume, stop_at, output, comm):
    params, opt, step, elapsed_before, window = _start(cfg, run_dir, corpus, xp, resume, comm)
    writer = comm.rank == 0                            # rank 0 alone writes metrics and checkpoints
    rows_of_rank = distributed.rank_rows(cfg.batch, comm.rank, comm.size)
    reduce = functools.partial(distributed.mean_over_ranks, comm) if comm.size > 1 else None
    validation = tasks.validation_batches(cfg, corpus)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    session_start = window_start = time.perf_counter()
    timed_steps, rows = 0, []           # steps of this window run in this session (for tokens/s)
    bar = _progress(output, cfg, step)
    try:
        for s in range(step, end):
            tokens = tasks.train_batch(cfg, corpus, s)[rows_of_rank]
            params, opt, loss, norm = train_step(params, opt, tokens, learning_rate(s, cfg), cfg, reduce,
                                                 step=s, rank=comm.rank)
            window = Window(window.loss_sum + loss, window.steps + 1)
            timed_steps += 1
            done = s + 1
            evaluating = done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)
            if writer and (done % cfg.log_every == 0 or evaluating):
                row = {"step": done, "tokens": done * cfg.batch * cfg.context,
                       "loss": float(window.loss_sum) / window.steps, "lr": learning_rate(s, cfg),
                       "grad_norm": float(norm)}
                seconds = time.perf_counter() - window_start     # after float(): the device is done
                row["tokens_per_s"] = timed_steps * cfg.batch * cfg.context / max(seconds, 1e-9)
                if evaluating:
                    row |= tasks.validation_metrics(params, cfg, validation)
                row["elapsed_s"] = elapsed_before + time.perf_counter() - session_start
                rundir.append_metrics(run_dir, row)
                rows.append(row)
                _report(bar, output, row, cfg)
                window, timed_steps = Window(xp.zeros((), dtype=cfg.dtype), 0), 0
                window_start = time.perf_counter()              # the eval is not training time
            if writer and (done == end or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
                saving = time.perf_counter()
                checkpoint.save(run_dir, params, opt, _checkpoint_state(
                    cfg, done, window, elapsed_before + saving - session_start, comm.size))
                window_start += time.perf_counter() - saving     # nor is saving
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    step = max(step, end)
    val = [row["val_bpb"] for row in rundir.read_metrics(run_dir) if "val_bpb" in row] if writer else []
    return TrainResult(params, opt, step, rows, val[-1] if val else None, step * cfg.batch * cfg.context,
                       elapsed_before + time.perf_counter() - session_start, run_dir)


def _report(bar, output, row, cfg):
    if output == "log":
        print(_log_line(row, cfg), flush=True)
    elif bar is not None:
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
        if "val_bpb" in row:
            bar.write(f"step {row['step']}: val bpb {row['val_bpb']:.4f}", file=sys.stderr)
