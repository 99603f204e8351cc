"""Atomic safetensors checkpoints (mirascore.lm.checkpoint), including a writer killed by SIGKILL."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mirascore.lm import checkpoint
from mirascore.lm.optim import AdamState


def _written(step, n=16):
    """The checkpoint a writer saves at `step`: every array filled with the step number."""
    params = {"embed.weight": np.full((n, 4), step, np.float32), "norm.gain": np.full(n, step, np.float32)}
    moments = {k: np.full_like(a, step) for k, a in params.items()}
    return params, AdamState(step, moments, {k: a + 0.5 for k, a in moments.items()}), {"step": step}


def _check_whole(run_dir):
    """Load the checkpoint and check it is one that was written whole; returns its step."""
    params, opt, state = checkpoint.load(run_dir)
    step = state["step"]
    assert opt.step == step
    for name, a in params.items():
        assert np.all(a == step), name
        assert np.all(opt.m[name] == step) and np.all(opt.v[name] == step + 0.5), name
    return step


def test_round_trip(tmp_path):
    params, opt, state = _written(3)
    checkpoint.save(tmp_path, params, opt, dict(state, note="x"))
    got_params, got_opt, got_state = checkpoint.load(tmp_path)
    assert got_state["note"] == "x" and got_state["step"] == 3 and got_opt.step == 3
    assert set(got_params) == set(params)
    for name in params:
        np.testing.assert_array_equal(got_params[name], params[name])
        assert got_params[name].dtype == np.float32
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["model.safetensors", "optimizer.safetensors", "state.json"]


def test_the_optimizer_file_keys_are_m_and_v_of_each_param(tmp_path):
    from safetensors.numpy import load_file
    checkpoint.save(tmp_path, *_written(1))
    keys = set(load_file(tmp_path / "checkpoint" / "optimizer.safetensors"))
    assert keys == {"m.embed.weight", "m.norm.gain", "v.embed.weight", "v.norm.gain"}


def test_no_checkpoint_is_a_file_not_found_error(tmp_path):
    assert not checkpoint.exists(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path)


def test_every_crash_state_of_save_leaves_a_loadable_checkpoint(tmp_path):
    checkpoint.save(tmp_path, *_written(1))
    current, old, tmp = (tmp_path / n for n in (checkpoint.NAME, checkpoint.OLD, checkpoint.TMP))
    # killed while writing the next one: a partial checkpoint.tmp beside the whole checkpoint
    tmp.mkdir()
    (tmp / checkpoint.MODEL).write_bytes(b"partial")
    assert _check_whole(tmp_path) == 1
    # killed between the two renames: only checkpoint.old (and a whole .tmp) exist
    os.rename(current, old)
    assert _check_whole(tmp_path) == 1
    checkpoint.recover(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"] and _check_whole(tmp_path) == 1
    # killed while removing checkpoint.old: the new checkpoint is in place
    checkpoint.save(tmp_path, *_written(2))
    old.mkdir()
    assert _check_whole(tmp_path) == 2
    checkpoint.save(tmp_path, *_written(3))       # the next save cleans up first
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"] and _check_whole(tmp_path) == 3


WRITER = """
import sys
import numpy as np
from mirascore.lm import checkpoint
from mirascore.lm.optim import AdamState
run_dir = sys.argv[1]
step = checkpoint.load(run_dir)[2]["step"] if checkpoint.exists(run_dir) else 0
print("ready", flush=True)
while True:
    step += 1
    params = {f"p{i}": np.full(1 << 19, step, np.float32) for i in range(4)}    # 8 MiB of params
    m = {k: np.full_like(a, step) for k, a in params.items()}
    checkpoint.save(run_dir, params, AdamState(step, m, {k: a + 0.5 for k, a in m.items()}), {"step": step})
"""


def test_a_writer_killed_at_random_moments_always_leaves_a_whole_checkpoint(tmp_path):
    rng = random.Random(0)
    steps = [0]
    for _ in range(6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "ready\n"
        while not checkpoint.exists(tmp_path) and writer.poll() is None:   # the first writer's first save
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))        # a save of 24 MiB with fsyncs takes tens of ms
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        step = _check_whole(tmp_path)
        assert step >= steps[-1]                  # never older than what was already found
        steps.append(step)
    assert steps[-1] >= 6, steps                  # the writers got through several checkpoints
