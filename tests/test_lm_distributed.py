"""Data-parallel training (mirascore.lm.distributed, mirascore.lm.launch): rank slicing, the flat
gradient buffer, N ranks against one process, checkpoints and resume across N, the launcher's
checks and supervision. On the CPU, ranks are threads (distributed.thread_ranks); the NCCL path
runs under `pytest -m gpu`."""
import json
import signal
import sys
import threading
import time

import numpy as np
import pytest

from mirascore.lm import cli, config, distributed, launch, rundir, train
from test_lm_cli import write_config


def tiny(model="moneta", **train_keys):
    """A tiny real model in float64 (so N ranks and one process agree to ~1e-12)."""
    table = {"steps": 20, "batch": 8, "context": 16, "warmup": 2, "log_every": 1, "eval_every": 0,
             "eval_batches": 1, "checkpoint_every": 0, "lr": 3e-3, "dtype": "float64"}
    table.update(train_keys)
    return config.from_dict({"model": {"model": model, "width": 16, "depth": 1, "heads": 2, "chunk": 8},
                             "train": table})


def run_ranks(cfg, out_dir, size, **kwargs):
    """train.run on `size` thread ranks sharing out_dir: their TrainResults, by rank."""
    results, errors = [None] * size, []

    def rank_main(comm):
        try:
            results[comm.rank] = train.run(cfg, out_dir, comm=comm, **kwargs)
        except BaseException as e:
            errors.append(e)
            comm.abort()              # the other ranks' all-reduce raises instead of waiting

    threads = [threading.Thread(target=rank_main, args=(c,)) for c in distributed.thread_ranks(size, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def losses(result):
    return [row["loss"] for row in result.metrics]


def assert_params_close(a, b, rtol=1e-6):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=1e-7, err_msg=name)


# ------------------------------------------------------------------ rank slicing

@pytest.mark.parametrize("batch, size", [(8, 1), (8, 2), (8, 4), (12, 3), (8, 8)])
def test_rank_rows_are_contiguous_disjoint_and_cover_the_batch(batch, size):
    rows = [distributed.rank_rows(batch, r, size) for r in range(size)]
    assert rows[0].start == 0 and rows[-1].stop == batch
    for before, after in zip(rows, rows[1:]):
        assert before.stop == after.start
    assert all(r.stop - r.start == batch // size for r in rows)
    assert distributed.all_rank_rows(batch, size) == [[r.start, r.stop] for r in rows]
    tokens = np.arange(batch * 3).reshape(batch, 3)
    assert np.array_equal(np.concatenate([tokens[r] for r in rows]), tokens)


def test_rank_rows_refuses_a_bad_rank_or_an_uneven_split():
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 2\), got 2"):
        distributed.rank_rows(8, 2, 2)
    with pytest.raises(ValueError, match="3 ranks cannot share a batch of 8"):
        distributed.rank_rows(8, 0, 3)


@pytest.mark.parametrize("size, keys, message", [
    (0, {}, "--gpus must be a positive integer, got 0"),
    (3, {}, r"--gpus 3 must divide the config's batch \(8\)"),
    (4, {"accumulate": 4}, r"'accumulate' \(4\) must divide the batch of each of the 4 GPUs \(8 / 4 = 2\)"),
])
def test_check_world_names_what_does_not_divide(size, keys, message):
    with pytest.raises(ValueError, match=message):
        distributed.check_world(tiny(**keys), size)


def test_check_world_accepts_accumulation_within_each_rank():
    distributed.check_world(tiny(accumulate=2), 2)      # 8 rows: 4 per rank, 2 micro-batches of 2


# ------------------------------------------------------------------ the flat buffer

def test_flat_buffer_round_trip_keeps_names_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    arrays = {"b.weight": rng.standard_normal((3, 4)).astype(np.float32), "a.gain": rng.standard_normal(5),
              "c": np.float64(2.5) * np.ones(()), "d.kernel": rng.standard_normal((2, 1, 3)).astype(np.float32)}
    layout = distributed.flat_layout(arrays)
    assert [s.name for s in layout.slots] == ["a.gain", "b.weight", "c", "d.kernel"]     # sorted
    assert layout.size == 5 + 12 + 1 + 6 and layout.dtype == np.float64
    flat = distributed.pack(layout, arrays)
    assert flat.shape == (layout.size,) and flat.dtype == np.float64 and flat.flags.c_contiguous
    assert np.array_equal(flat[5:17], arrays["b.weight"].ravel())
    back = distributed.unpack(layout, flat)
    for name, a in arrays.items():
        assert back[name].shape == a.shape and back[name].dtype == a.dtype, name
        assert np.array_equal(back[name], a), name                # float32 → float64 → float32 is exact
    shuffled = dict(reversed(list(arrays.items())))
    assert distributed.flat_layout(shuffled) == layout                        # the dict's order is irrelevant
    assert np.array_equal(distributed.pack(layout, shuffled), flat)


def test_flat_buffer_of_one_dtype_unpacks_to_views():
    arrays = {"x": np.arange(6.0).reshape(2, 3), "y": np.arange(4.0)}
    layout = distributed.flat_layout(arrays)
    flat = distributed.pack(layout, arrays)
    back = distributed.unpack(layout, flat)
    assert np.shares_memory(back["x"], flat) and np.shares_memory(back["y"], flat)


def test_flat_buffer_refuses_other_arrays():
    layout = distributed.flat_layout({"x": np.zeros(3)})
    with pytest.raises(ValueError, match=r"pack: the arrays' names \['y'\] are not the layout's \['x'\]"):
        distributed.pack(layout, {"y": np.zeros(3)})
    with pytest.raises(ValueError, match=r"unpack: expected a flat buffer of shape \(3,\), got \(4,\)"):
        distributed.unpack(layout, np.zeros(4))
    with pytest.raises(ValueError, match="at least one array"):
        distributed.flat_layout({})


def test_mean_over_thread_ranks_is_the_same_mean_on_every_rank():
    size = 3
    rng = np.random.default_rng(1)
    grads = [{"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(4)} for _ in range(size)]
    loss = [np.asarray(float(r)) for r in range(size)]
    out = [None] * size

    def rank_main(comm):
        out[comm.rank] = distributed.mean_over_ranks(comm, loss[comm.rank], grads[comm.rank])

    threads = [threading.Thread(target=rank_main, args=(c,)) for c in distributed.thread_ranks(size, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for mean_loss, mean_grads in out:
        assert float(mean_loss) == 1.0 and mean_loss.shape == ()
        for name in ("w", "b"):
            np.testing.assert_allclose(mean_grads[name], sum(g[name] for g in grads) / size, rtol=1e-15)
            assert np.array_equal(mean_grads[name], out[0][1][name])


def test_a_dead_thread_rank_breaks_the_others_wait_instead_of_hanging():
    comms = distributed.thread_ranks(2, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError):
        comms[0].all_reduce_mean(np.zeros(2))            # rank 1 never comes
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------ N ranks against one process

def test_solo_communicator_computes_what_training_alone_computes_bit_for_bit(tmp_path):
    cfg = tiny(steps=4, accumulate=2)
    alone = train.run(cfg, tmp_path / "alone")
    solo = train.run(cfg, tmp_path / "solo", comm=distributed.Solo())
    assert losses(solo) == losses(alone)
    for name in alone.params:
        assert np.array_equal(solo.params[name], alone.params[name]), name


@pytest.mark.parametrize("size, accumulate", [(2, 1), (4, 1), (2, 2)])
def test_n_ranks_give_one_process_training_curve_and_final_params(tmp_path, size, accumulate):
    cfg = tiny(accumulate=accumulate, checkpoint_every=10)
    alone = train.run(cfg, tmp_path / "alone")
    ranks = run_ranks(cfg, tmp_path / "ranks", size)
    np.testing.assert_allclose(losses(ranks[0]), losses(alone), rtol=1e-8)
    assert len(losses(alone)) == 20
    for result in ranks:                       # every replica holds the same parameters
        assert_params_close(result.params, alone.params)
        for name in result.params:
            assert np.array_equal(result.params[name], ranks[0].params[name]), name
    assert all(r.metrics == [] and r.val_bpb is None for r in ranks[1:])
    # rank 0 alone wrote: one metrics line per step, one checkpoint with every rank's data position
    rows = rundir.read_metrics(tmp_path / "ranks")
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in rundir.read_metrics(tmp_path / "alone")]
    state = json.loads((tmp_path / "ranks" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 20 and state["data"]["next_step"] == 20 and state["data"]["batch"] == 8
    assert state["data"]["ranks"] == size
    assert state["data"]["rank_rows"] == [[r * 8 // size, (r + 1) * 8 // size] for r in range(size)]
    single = json.loads((tmp_path / "alone" / "checkpoint" / "state.json").read_text())
    assert single["data"]["ranks"] == 1 and single["data"]["rank_rows"] == [[0, 8]]


def test_ranks_clip_the_reduced_gradient(tmp_path):
    # a clip far below the gradient norm: each rank's own norm differs from the global one, so
    # clipping before the reduction would change the update
    cfg = tiny(steps=3, clip=1e-3)
    alone = train.run(cfg, tmp_path / "alone")
    ranks = run_ranks(cfg, tmp_path / "ranks", 4)
    np.testing.assert_allclose([r["grad_norm"] for r in ranks[0].metrics],
                               [r["grad_norm"] for r in alone.metrics], rtol=1e-8)
    assert_params_close(ranks[0].params, alone.params)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 4), (4, 2)])
def test_resume_across_a_change_of_ranks(tmp_path, before, after):
    cfg = tiny(checkpoint_every=5)
    whole = train.run(cfg, tmp_path / "whole")

    def train_on(size, **kwargs):
        if size == 1:
            return [train.run(cfg, tmp_path / "parts", **kwargs)]
        return run_ranks(cfg, tmp_path / "parts", size, **kwargs)

    first = train_on(before, stop_at=10)[0]
    state = json.loads((tmp_path / "parts" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10 and state["data"]["ranks"] == before
    rest = train_on(after, resume=True)[0]
    assert rest.step == 20
    np.testing.assert_allclose(losses(first) + losses(rest), losses(whole), rtol=1e-8)
    assert_params_close(rest.params, whole.params)
    assert [r["step"] for r in rundir.read_metrics(tmp_path / "parts")] == list(range(1, 21))


def test_ranks_refuse_a_batch_they_cannot_share(tmp_path):
    with pytest.raises(ValueError, match=r"--gpus 3 must divide the config's batch \(8\)"):
        run_ranks(tiny(), tmp_path, 3)


# ------------------------------------------------------------------ the launcher

@pytest.mark.parametrize("gpus, nccl, count, message", [
    (0, True, 2, "--gpus must be a positive integer, got 0"),
    (3, True, 2, "--gpus 3: only 2 GPUs present"),
    (2, True, 1, "--gpus 2: only 1 GPU present"),
    (2, False, 8, r"--gpus 2 needs NCCL, which CuPy cannot load here \(cupy.cuda.nccl.available is false\)"),
])
def test_check_gpus_refuses_what_cannot_run(gpus, nccl, count, message):
    with pytest.raises(ValueError, match=message):
        launch.check_gpus(gpus, nccl, count)


def test_check_gpus_accepts_one_gpu_without_nccl():
    launch.check_gpus(1, False, 1)
    launch.check_gpus(8, True, 8)


def scripted_rank(rank, size, scripts, pipe):
    """A stand-in rank process for the supervision tests: does what scripts[rank] says."""
    what = scripts[rank]
    if what == "done":
        pipe.send(("done", rank * 10))
    elif what == "error":
        pipe.send(("error", "--resume: no checkpoint here"))
        sys.exit(launch.EXIT_ERROR)
    elif what == "crash":
        sys.exit(1)
    elif what == "signal":
        signal.raise_signal(signal.SIGKILL)
    else:
        time.sleep(60)                    # a rank blocked in an all-reduce whose peer is gone


def test_supervision_returns_every_ranks_report():
    assert launch.spawn(scripted_rank, 2, (("done", "done"),)) == {0: 0, 1: 10}


@pytest.mark.parametrize("scripts, message", [
    (("hang", "error"), r"^rank 1 of 2: --resume: no checkpoint here \(the other ranks were stopped\)$"),
    (("signal", "hang"), r"^rank 0 of 2 was killed by signal SIGKILL; the other ranks were stopped$"),
    (("hang", "crash"), r"^rank 1 of 2 exited with status 1 \(its error is above\); the other ranks were stopped$"),
])
def test_a_failed_rank_stops_the_others_with_one_line(scripts, message, monkeypatch):
    stopped = []
    monkeypatch.setattr(launch, "stop", lambda processes, grace: stopped.extend(processes) or
                        launch_stop(processes, grace))
    start = time.monotonic()
    with pytest.raises(launch.RankFailed, match=message):
        launch.spawn(scripted_rank, 2, (scripts,), grace=2.0)
    assert time.monotonic() - start < 20                  # the hanging rank did not hold us for its 60 s
    assert stopped and not any(p.is_alive() for p in stopped)


launch_stop = launch.stop


def stubborn(ready):
    """A process that ignores SIGTERM."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(60)


def test_stop_kills_what_ignores_sigterm():
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=stubborn, args=(ready,), daemon=True)
    process.start()
    assert ready.wait(30)
    start = time.monotonic()
    launch.stop([process], grace=0.5)
    assert not process.is_alive() and process.exitcode == -signal.SIGKILL
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------ the command line

def cli_error(capsys, tmp_path, *flags):
    path = write_config(tmp_path)                    # test_lm_cli's tiny Moneta, batch 4
    status = cli.main(["train", str(path), "--out", str(tmp_path / "run"), *flags])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    return err


def test_cli_gpus_refuses_a_batch_it_cannot_share(capsys, tmp_path):
    err = cli_error(capsys, tmp_path, "--gpus", "3")
    assert "mirascore: error: --gpus 3 must divide the config's batch (4)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (("--gpus", "0"), "argument --gpus: expected a positive integer, got '0'"),
    (("--gpus", "2", "--device", "cpu"), "--gpus 2 trains on GPUs: drop --device cpu"),
])
def test_cli_gpus_refuses_bad_flags(capsys, tmp_path, flags, message):
    assert message in cli_error(capsys, tmp_path, *flags)


def test_cli_gpus_without_cupy_is_one_line(capsys, tmp_path):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    assert "--device gpu needs CuPy" in cli_error(capsys, tmp_path, "--gpus", "2")


# ------------------------------------------------------------------ on GPUs (pytest -m gpu)

def _gpu_count():
    import cupy
    return cupy.cuda.runtime.getDeviceCount()


@pytest.mark.gpu
def test_gpu_nccl_of_one_rank_computes_what_training_alone_computes(tmp_path):
    from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("NCCL is not available to CuPy")
    cfg = tiny(steps=4, accumulate=2)
    alone = train.run(cfg, tmp_path / "alone", device_name="gpu")
    comm = distributed.Nccl(0, 1, nccl.get_unique_id())
    one = train.run(cfg, tmp_path / "nccl", device_name="gpu", comm=comm)
    comm.barrier()
    assert losses(one) == losses(alone)
    for name in alone.params:
        assert bool((one.params[name] == alone.params[name]).all()), name


@pytest.mark.gpu
def test_gpu_launch_of_one_rank_matches_the_in_process_run(tmp_path):
    from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("NCCL is not available to CuPy")
    cfg = tiny(steps=4)
    alone = train.run(cfg, tmp_path / "alone", device_name="gpu")
    launched = launch.run(cfg, tmp_path / "launched", gpus=1)
    assert losses(launched) == losses(alone)
    for name in alone.params:
        assert bool((launched.params[name] == alone.params[name]).all()), name


@pytest.mark.gpu
def test_gpu_two_ranks_give_one_gpus_curve_and_resume_on_one(tmp_path):
    if _gpu_count() < 2:
        pytest.skip("needs two GPUs")
    cfg = tiny(checkpoint_every=10)
    alone = train.run(cfg, tmp_path / "alone", device_name="gpu")
    two = launch.run(cfg, tmp_path / "two", gpus=2)
    np.testing.assert_allclose(losses(two), losses(alone), rtol=1e-10)
    for name in alone.params:
        np.testing.assert_allclose(two.params[name].get(), alone.params[name].get(), rtol=1e-8, atol=1e-12)
    launch.run(cfg, tmp_path / "parts", gpus=2, stop_at=10)
    rest = train.run(cfg, tmp_path / "parts", device_name="gpu", resume=True)
    np.testing.assert_allclose(losses(rest), losses(alone)[10:], rtol=1e-10)
