"""Checkpoints of a run directory, written atomically (docs/training.md, "Checkpoints").

    RUN_DIR/checkpoint/model.safetensors       params, keyed by their dotted names
    RUN_DIR/checkpoint/optimizer.safetensors   Adam's moments, keyed m.<name> and v.<name>
    RUN_DIR/checkpoint/state.json              step, tokens, seed, data position, config hash, ...

`save` writes the new checkpoint into `checkpoint.tmp/`, fsyncs every file and the folder, then
swaps it in with two renames: `checkpoint/` → `checkpoint.old/`, `checkpoint.tmp/` → `checkpoint/`,
and removes `checkpoint.old/`. A process killed at any moment therefore leaves a whole checkpoint
under one of two names:

    killed while writing checkpoint.tmp/      checkpoint/ is the previous one; the .tmp is rubbish
    killed between the two renames            only checkpoint.old/ (the previous one) is whole
    killed while removing checkpoint.old/     checkpoint/ is the new one

`load` reads `checkpoint/`, else `checkpoint.old/`, and never changes the folder (a sampler may
read while a trainer writes); `recover`, called by the writer, puts the names back in order.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np

from mirascore._xp import to_numpy

from .optim import AdamState

NAME, TMP, OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "state.json"
FORMAT = "mirascore-checkpoint-1"


def require_safetensors():
    """safetensors.numpy (a ModuleNotFoundError naming safetensors when the train extra is missing)."""
    import safetensors.numpy
    return safetensors.numpy


def _write_durably(path, data):
    """Write bytes to path and fsync them before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(run_dir):
    """Bring the checkpoint names back to one whole `checkpoint/` after a crash inside `save`."""
    run_dir = Path(run_dir)
    current, old, tmp = run_dir / NAME, run_dir / OLD, run_dir / TMP
    if not current.exists() and old.exists():
        os.rename(old, current)          # killed between the two renames: the previous one is whole
        _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def save(run_dir, params, opt_state, state):
    """Write params (dict of arrays), opt_state (AdamState) and state (a JSON-able dict, to which
    the optimizer step and the format are added) as RUN_DIR/checkpoint/, atomically."""
    st = require_safetensors()
    run_dir = Path(run_dir)
    recover(run_dir)
    tmp = run_dir / TMP
    tmp.mkdir()
    moments = {f"m.{n}": a for n, a in opt_state.m.items()} | {f"v.{n}": a for n, a in opt_state.v.items()}
    meta = {"format": FORMAT}
    _write_durably(tmp / MODEL, st.save(_host(params), metadata=meta))
    _write_durably(tmp / OPTIMIZER, st.save(_host(moments), metadata=meta))
    state = dict(state, optimizer_step=opt_state.step, format=FORMAT)
    _write_durably(tmp / STATE, (json.dumps(state, indent=1) + "\n").encode())
    _fsync_dir(tmp)
    current, old = run_dir / NAME, run_dir / OLD
    if current.exists():
        os.rename(current, old)
    os.rename(tmp, current)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def exists(run_dir):
    """Whether RUN_DIR holds a checkpoint that `load` can read."""
    return any((Path(run_dir) / name / STATE).is_file() for name in (NAME, OLD))


def load(run_dir, xp=np):
    """(params, AdamState, state dict) of RUN_DIR's checkpoint, arrays on xp's device.
    A FileNotFoundError when there is none."""
    run_dir = Path(run_dir)
    for _ in range(3):                  # a concurrent save may rename the folder while we read
        for name in (NAME, OLD):
            try:
                return _read(run_dir / name, xp)
            except FileNotFoundError:
                continue
    raise FileNotFoundError(f"no checkpoint in {str(run_dir)!r} (expected {NAME}/{STATE})")


def _read(folder, xp):
    st = require_safetensors()
    state = json.loads((folder / STATE).read_text())
    params = st.load((folder / MODEL).read_bytes())
    moments = st.load((folder / OPTIMIZER).read_bytes())
    if state.get("format") != FORMAT:
        raise ValueError(f"{str(folder)!r} is not a {FORMAT} checkpoint (format {state.get('format')!r})")
    m = {n[2:]: xp.asarray(a) for n, a in moments.items() if n.startswith("m.")}
    v = {n[2:]: xp.asarray(a) for n, a in moments.items() if n.startswith("v.")}
    if set(m) != set(params) or set(v) != set(params):
        raise ValueError(f"{str(folder)!r}: the optimizer moments do not match the parameters")
    params = {n: xp.asarray(a) for n, a in params.items()}
    return params, AdamState(state["optimizer_step"], m, v), state


def _host(arrays):
    """Host copies for safetensors (CuPy arrays come back with .get())."""
    return {n: np.ascontiguousarray(to_numpy(a)) for n, a in arrays.items()}
