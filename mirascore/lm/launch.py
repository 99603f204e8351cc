"""`mirascore train --gpus N`: one training process per GPU, started and watched from here.

    result = launch.run(cfg, "runs/moneta", gpus=4, output="bar")     # a TrainResult, as train.run's

The parent checks what it can before starting anything (check_gpus, distributed.check_world),
draws the NCCL unique id and spawns N children (multiprocessing "spawn": a CUDA context does not
survive a fork). Child r makes GPU r its device, joins the NCCL communicator and runs
train.run(..., comm=...); rank 0 alone writes the run directory. The parent waits for them all;
when one fails, it stops the others (SIGTERM, then SIGKILL after GRACE_S seconds: a rank blocked
in an all-reduce with a dead peer never returns by itself) and raises one ValueError naming it.
"""
import multiprocessing
import signal
import sys
import time
from multiprocessing import connection
from typing import NamedTuple

from . import checkpoint, device, distributed, train
from .config import replace

GRACE_S = 10.0          # how long a stopped rank may take to exit before it is killed
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


class RankFailed(ValueError):
    """A rank of a data-parallel run failed; the others were stopped."""


class Job(NamedTuple):
    """What every rank runs: train.run's arguments."""
    cfg: object
    out_dir: str
    data_path: object
    resume: bool
    stop_at: object
    output: str


def gpu_facts():
    """(NCCL usable by CuPy, number of GPUs): a ValueError when CuPy or CUDA is missing."""
    cupy = device.array_module("gpu")
    from cupy.cuda import nccl
    return bool(nccl.available), cupy.cuda.runtime.getDeviceCount()


def check_gpus(gpus, nccl_available, device_count):
    """ValueError unless `gpus` ranks can run here, given the facts gpu_facts() reports."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus must be a positive integer, got {gpus!r}")
    if gpus > device_count:
        raise ValueError(f"--gpus {gpus}: only {device_count} GPU{'s' if device_count != 1 else ''} present")
    if gpus > 1 and not nccl_available:
        raise ValueError(f"--gpus {gpus} needs NCCL, which CuPy cannot load here (cupy.cuda.nccl.available "
                         f"is false): install the NCCL library of CuPy's CUDA version")


def run(cfg, out_dir, *, gpus, data_path=None, steps=None, resume=False, stop_at=None, output="silent",
        grace=GRACE_S):
    """train.run on `gpus` GPUs, one process each; returns rank 0's TrainResult, with the final
    parameters and moments read back from the run's checkpoint onto this process's GPU."""
    if output not in train.OUTPUTS:
        raise ValueError(f"output must be one of {train.OUTPUTS}, got {output!r}")
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    distributed.check_world(cfg, gpus)
    check_gpus(gpus, *gpu_facts())
    checkpoint.require_safetensors()
    from cupy.cuda import nccl
    job = Job(cfg, str(out_dir), data_path, resume, stop_at, output)
    results = spawn(_rank_main, gpus, (nccl.get_unique_id(), job), grace)
    if results.get(0) is None:
        raise RankFailed("rank 0 ended without reporting its result")
    params, opt, _ = checkpoint.load(out_dir, device.array_module("gpu"))
    return results[0]._replace(params=params, opt=opt)


def spawn(target, size, args, grace=GRACE_S):
    """Start target(rank, size, *args, pipe) in `size` spawned processes and supervise them."""
    context = multiprocessing.get_context("spawn")
    processes, pipes = [], []
    try:
        for rank in range(size):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=target, args=(rank, size, *args, send),
                                      name=f"mirascore-rank-{rank}", daemon=True)
            process.start()
            send.close()              # the child holds the only writing end: its death reads as EOF
            processes.append(process)
            pipes.append(receive)
    except BaseException:
        stop(processes, grace)
        raise
    return supervise(processes, pipes, grace)


def _rank_main(rank, size, unique_id, job, pipe):
    """One rank's process: bind GPU `rank`, join NCCL, train; report to the parent through `pipe`."""
    try:
        import cupy
        cupy.cuda.Device(rank).use()      # first, before anything makes a CUDA context on GPU 0
        comm = distributed.Nccl(rank, size, unique_id)
        result = train.run(job.cfg, job.out_dir, data_path=job.data_path, device_name="gpu",
                           resume=job.resume, stop_at=job.stop_at,
                           output=job.output if rank == 0 else "silent", comm=comm)
        pipe.send(("done", result._replace(params=None, opt=None)))    # the parent reads the checkpoint
    except (ValueError, OSError) as e:
        pipe.send(("error", " ".join(str(e).split()) or type(e).__name__))
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def supervise(processes, pipes=None, grace=GRACE_S):
    """Wait for every process; returns {rank: what it sent as ("done", x)}: x, or None. When one
    exits non-zero, stop the others and raise RankFailed naming it (with the message it sent as
    ("error", text)). On any way out, Ctrl-C included, no process is left running."""
    pipes = pipes or [None] * len(processes)
    pending, messages = dict(enumerate(processes)), {}
    try:
        while pending:
            waiting = {p.sentinel: r for r, p in pending.items()}
            waiting |= {pipes[r]: r for r in pending if pipes[r] is not None and r not in messages}
            for ready in connection.wait(list(waiting)):
                rank = waiting[ready]
                if ready is pipes[rank]:          # read as it comes: a full pipe would block the rank
                    if rank not in messages:
                        messages[rank] = _receive(ready)
                    continue
                process = pending.pop(rank)
                process.join()
                if rank not in messages and pipes[rank] is not None and pipes[rank].poll():
                    messages[rank] = _receive(pipes[rank])
                if process.exitcode != 0:
                    raise RankFailed(_failure(rank, len(processes), process.exitcode, messages.get(rank)))
    finally:
        stop(list(pending.values()), grace)
    return {rank: m[1] if m and m[0] == "done" else None for rank, m in
            ((r, messages.get(r)) for r in range(len(processes)))}


def _receive(pipe):
    try:
        return pipe.recv()
    except EOFError:                  # the rank closed its end without a word (it died)
        return None


def _failure(rank, size, exitcode, message):
    """The one-line message of a failed rank."""
    who = f"rank {rank} of {size}"
    if message and message[0] == "error":
        return f"{who}: {message[1]} (the other ranks were stopped)"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        return f"{who} was killed by signal {name}; the other ranks were stopped"
    return f"{who} exited with status {exitcode} (its error is above); the other ranks were stopped"


def stop(processes, grace=GRACE_S):
    """Terminate the processes still running; kill those still alive `grace` seconds later."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
