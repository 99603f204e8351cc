"""Data-parallel training: each rank's rows of a batch, one flat gradient buffer, the all-reduce
(docs/training.md, "Data-parallel training").

    rows = rank_rows(cfg.batch, rank, size)         # this rank's contiguous rows of every global batch
    layout = flat_layout(grads)                     # names in sorted order, their offsets, shapes, dtypes
    flat = pack(layout, grads)                      # one contiguous 1-d array
    grads = unpack(layout, comm.all_reduce_mean(flat))
    loss, grads = mean_over_ranks(comm, loss, grads)    # the three lines above, the loss in the buffer too

A communicator has `rank`, `size`, `all_reduce_mean(flat)` (the element-wise mean over the ranks,
the same bits on every rank) and `barrier()`. `Solo` is one process (the identity); `Nccl` one GPU
per process through cupy.cuda.nccl (imported only when built); `thread_ranks(N)` gives N ranks that
are threads of one process, on any array module, so the CPU tests can check that N ranks compute
what one process computes.
"""
import threading
from typing import NamedTuple

import numpy as np

from mirascore._xp import namespace

LOSS = "(loss)"          # the loss's slot in the flat buffer: no parameter has this name
_NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}


def check_world(cfg, size):
    """ValueError unless `size` ranks can share cfg's batches: each gets batch / size rows, which
    its `accumulate` micro-batches must split evenly."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"--gpus must be a positive integer, got {size!r}")
    if cfg.batch % size:
        raise ValueError(f"--gpus {size} must divide the config's batch ({cfg.batch}): each GPU trains on "
                         f"batch / gpus sequences of every step")
    if (cfg.batch // size) % cfg.accumulate:
        raise ValueError(f"config key 'accumulate' ({cfg.accumulate}) must divide the batch of each of the "
                         f"{size} GPUs ({cfg.batch} / {size} = {cfg.batch // size}): lower accumulate")


def rank_rows(batch, rank, size):
    """The rows of a global batch that rank `rank` of `size` trains on: a slice, contiguous and
    disjoint from the other ranks', all of them together covering the batch."""
    if not 0 <= rank < size:
        raise ValueError(f"rank must lie in [0, {size}), got {rank!r}")
    if batch % size:
        raise ValueError(f"{size} ranks cannot share a batch of {batch} rows evenly")
    rows = batch // size
    return slice(rank * rows, (rank + 1) * rows)


def all_rank_rows(batch, size):
    """[[start, stop] of each rank's rows], for checkpoints' state.json."""
    return [[s.start, s.stop] for s in (rank_rows(batch, r, size) for r in range(size))]


class Slot(NamedTuple):
    """Where one named array lives in the flat buffer."""
    name: str
    offset: int
    shape: tuple
    dtype: np.dtype


class FlatLayout(NamedTuple):
    """The flat buffer of a dict of arrays: slots in sorted name order (the same on every rank,
    whatever the dict's order), its length and its dtype (the arrays' common type)."""
    slots: tuple
    size: int
    dtype: np.dtype


def flat_layout(arrays):
    """The FlatLayout of a non-empty dict of arrays (0-d arrays take one element)."""
    if not arrays:
        raise ValueError("flat_layout needs at least one array, got an empty dict")
    slots, offset = [], 0
    for name in sorted(arrays):
        a = arrays[name]
        slots.append(Slot(name, offset, tuple(a.shape), np.dtype(a.dtype)))
        offset += int(np.prod(a.shape, dtype=np.int64))
    return FlatLayout(tuple(slots), offset, np.result_type(*(s.dtype for s in slots)))


def pack(layout, arrays):
    """One contiguous 1-d array of layout.dtype holding every array of the layout, in its order."""
    if set(arrays) != {s.name for s in layout.slots}:
        raise ValueError(f"pack: the arrays' names {sorted(arrays)} are not the layout's "
                         f"{[s.name for s in layout.slots]}")
    xp = namespace(*arrays.values())
    return xp.concatenate([xp.reshape(arrays[s.name], (-1,)).astype(layout.dtype, copy=False)
                           for s in layout.slots])


def unpack(layout, flat):
    """The dict of arrays that `pack(layout, ...)` flattened into `flat`, each in its own shape and
    dtype (views of `flat` where the dtype is the buffer's)."""
    if flat.shape != (layout.size,):
        raise ValueError(f"unpack: expected a flat buffer of shape ({layout.size},), got {flat.shape}")
    out = {}
    for s in layout.slots:
        n = int(np.prod(s.shape, dtype=np.int64))
        out[s.name] = flat[s.offset:s.offset + n].reshape(s.shape).astype(s.dtype, copy=False)
    return out


def mean_over_ranks(comm, loss, grads):
    """(loss, grads), each averaged over the ranks by one all-reduce of one flat buffer."""
    layout = flat_layout({**grads, LOSS: loss})
    reduced = unpack(layout, comm.all_reduce_mean(pack(layout, {**grads, LOSS: loss})))
    return reduced.pop(LOSS), reduced


class Solo(NamedTuple):
    """One process alone: the mean over one rank is the buffer itself."""
    rank: int = 0
    size: int = 1

    def all_reduce_mean(self, flat):
        return flat

    def barrier(self):
        pass


class Nccl:
    """Rank `rank` of `size` processes, each on its own GPU (the current CuPy device), joined by
    NCCL through the unique id that one of them drew (cupy.cuda.nccl.get_unique_id())."""

    def __init__(self, rank, size, unique_id):
        from cupy.cuda import nccl
        if not nccl.available:
            raise ValueError("NCCL is not available to CuPy here (cupy.cuda.nccl.available is false)")
        self.rank, self.size = rank, size
        self._nccl = nccl
        self._comm = nccl.NcclCommunicator(size, unique_id, rank)

    def all_reduce_mean(self, flat):
        """In place on a contiguous CuPy buffer, on the current stream: the host does not wait."""
        import cupy
        if flat.dtype.name not in _NCCL_TYPES:
            raise ValueError(f"all_reduce_mean: NCCL reduces {sorted(_NCCL_TYPES)}, not {flat.dtype.name}")
        flat = cupy.ascontiguousarray(flat)
        self._comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size,
                             getattr(self._nccl, _NCCL_TYPES[flat.dtype.name]), self._nccl.NCCL_SUM,
                             cupy.cuda.get_current_stream().ptr)
        return flat / self.size if self.size > 1 else flat

    def barrier(self):
        """Return once every rank has called barrier (a 1-element all-reduce, then a wait for it)."""
        import cupy
        self.all_reduce_mean(cupy.zeros(1, dtype=cupy.float32))
        cupy.cuda.get_current_stream().synchronize()


class _Shared(NamedTuple):
    slots: list
    barrier: threading.Barrier


class ThreadRank:
    """Rank `rank` of ranks that are threads of one process (made by thread_ranks)."""

    def __init__(self, rank, size, shared):
        self.rank, self.size, self._shared = rank, size, shared

    def all_reduce_mean(self, flat):
        slots, barrier = self._shared
        slots[self.rank] = flat
        barrier.wait()
        total = slots[0]
        for other in slots[1:]:           # every rank adds in rank order: the same bits everywhere
            total = total + other
        barrier.wait()                    # nobody refills a slot before every rank has read them all
        return total / self.size

    def barrier(self):
        self._shared.barrier.wait()

    def abort(self):
        """Break the barrier: the other ranks' waits raise threading.BrokenBarrierError at once."""
        self._shared.barrier.abort()


def thread_ranks(size, timeout=60.0):
    """`size` ThreadRanks sharing one barrier; a wait longer than `timeout` seconds (a rank that
    died) raises threading.BrokenBarrierError instead of hanging."""
    shared = _Shared([None] * size, threading.Barrier(size, timeout=timeout))
    return [ThreadRank(rank, size, shared) for rank in range(size)]
