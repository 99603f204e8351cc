"""Replay a pure CuPy function as a CUDA graph, so a loop of hundreds of small kernels costs one
launch instead of hundreds of Python calls.

    outputs = call(fn, args, key=("forward", rule))

`fn(*args)` must be a pure function of the arrays in `args` (nested tuples / NamedTuples of CuPy
arrays and None), launching work only on the current stream, never synchronising with the host,
and doing matrix products with `mirascore.gpu.blas.matmul` (CuPy's own cuBLAS calls cannot be
captured). Per signature — `key`, the GEMM precision setting (a graph records the GEMM kernels of
the precision it was captured at), the structure, and every array's shape and dtype:

- the first call runs `fn` eagerly (compiling its kernels); one-off shapes never pay for a capture;
- the second call captures `fn` on a private stream into a graph whose intermediates live in a
  private memory pool, then replays it;
- every later call copies the inputs into the graph's input buffers, launches the graph on the
  current stream and returns copies of its outputs (the next replay overwrites the buffers);
- inside a capture of the caller's own, `fn` simply runs (and is recorded into that capture).

At most `settings.current().max_graphs` graphs are kept (least recently used first out);
`clear()` frees them, and `settings.configure(cuda_graphs=False)` (or MIRASCORE_CUDA_GRAPHS=0 in
the environment) turns replay off. A key that cannot be hashed (a spec holding arrays) runs eagerly.
"""
import traceback
import warnings
from typing import NamedTuple

from ..autodiff.core import tree_leaves, tree_map
from . import blas, settings

_SEEN, _EAGER = "seen once", "capture failed"
_graphs = settings.RESOURCES.graphs


class _Graph(NamedTuple):
    graph: object
    inputs: list          # the graph's input buffers, one per leaf of args (None where None)
    outputs: object       # the graph's output buffers, in fn's output structure
    pool: object          # the private memory pool holding every intermediate
    workspace: object     # the cuBLAS workspace its GEMMs use


def call(fn, args, key):
    """fn(*args), replayed from a CUDA graph once this signature has been seen before."""
    import cupy
    if not settings.current().cuda_graphs or cupy.cuda.get_current_stream().is_capturing():
        return fn(*args)                   # inside the caller's own capture: just record the work
    leaves = tree_leaves(args)
    sig = (key, settings.current().precision, cupy.cuda.Device().id, _structure(args)) + \
        tuple(None if x is None else (x.shape, x.dtype.str) for x in leaves)
    try:
        entry = _graphs.get(sig)
    except TypeError:                      # an unhashable key: nothing to remember it by
        return fn(*args)
    if entry is None:
        _remember(sig, _SEEN)
        return fn(*args)
    if entry is _EAGER:
        return fn(*args)
    if entry is _SEEN:
        entry = _capture(fn, args, leaves)
        _remember(sig, entry)
        if entry is _EAGER:
            return fn(*args)
    _graphs.move_to_end(sig)
    for buffer, x in zip(entry.inputs, leaves):
        if buffer is not None:
            buffer[...] = x
    entry.graph.launch()
    return tree_map(lambda o: None if o is None else o.copy(), entry.outputs)


def _structure(tree):
    """The nesting of args without the arrays (types and lengths), part of the signature."""
    if isinstance(tree, (tuple, list)):
        return (type(tree).__name__,) + tuple(_structure(t) for t in tree)
    return None if tree is None else "array"


def _remember(sig, entry):
    _graphs[sig] = entry
    _graphs.move_to_end(sig)
    trim()


def trim():
    """Forget the least recently used graphs beyond the `max_graphs` setting."""
    while len(_graphs) > settings.current().max_graphs:
        _graphs.popitem(last=False)


def _capture(fn, args, leaves):
    """A _Graph of fn at these inputs' shapes, or _EAGER if the capture fails."""
    import cupy
    from cupy.cuda import runtime
    pool = cupy.cuda.MemoryPool()
    stream = _capture_stream()
    stream.wait_event(cupy.cuda.get_current_stream().record())
    with cupy.cuda.using_allocator(pool.malloc), stream:
        workspace = cupy.empty(settings.current().blas_workspace_bytes, dtype=cupy.uint8)
        blas.prepare(workspace)
        inputs = [None if x is None else x.copy() for x in leaves]
        it = iter(inputs)
        static_args = tree_map(lambda _: next(it), args)
        stream.synchronize()
        stream.begin_capture(runtime.streamCaptureModeRelaxed)
        try:
            outputs = fn(*static_args)
            graph = stream.end_capture()
        except Exception as exc:  # noqa: BLE001  (fn ran eagerly at these shapes: a capture problem)
            if stream.is_capturing():
                try:
                    stream.end_capture()
                except Exception:  # noqa: BLE001
                    pass
            where = traceback.extract_tb(exc.__traceback__)[-3:]
            warnings.warn(f"CUDA graph capture failed, running eagerly: {type(exc).__name__}: {exc} "
                          f"(at {'; '.join(f'{f.filename}:{f.lineno}' for f in where)})",
                          RuntimeWarning, stacklevel=3)
            return _EAGER
    graph.upload(stream)
    stream.synchronize()
    return _Graph(graph, inputs, outputs, pool, workspace)


def _capture_stream():
    """The one stream per device that every capture records on (one cuBLAS handle for all of
    them; each graph brings its own workspace)."""
    import cupy
    device = cupy.cuda.Device().id
    streams = settings.RESOURCES.capture_streams
    if device not in streams:
        streams[device] = cupy.cuda.Stream(non_blocking=True)
    return streams[device]


def clear():
    """Forget every graph and free their memory."""
    _graphs.clear()


def memory_bytes():
    """Device memory held by the kept graphs' pools."""
    return sum(e.pool.total_bytes() for e in _graphs.values() if isinstance(e, _Graph))
