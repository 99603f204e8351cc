"""Array-namespace helpers: numpy or CuPy, chosen by the arrays themselves.

CuPy is never imported here: an array is recognised as CuPy's by its type's module,
so `import mirascore` stays free of cupy (and of numba).
"""
import numpy as np

_numpy_types = (np.ndarray, np.generic, float, int, bool)


def is_cupy(x):
    """True for a CuPy array (without importing CuPy)."""
    return type(x).__module__.startswith("cupy")


def namespace(*arrays):
    """The array module (numpy or cupy) that the given arrays live in.

    Python scalars and None count for nothing; mixing numpy and CuPy arrays is a
    ValueError, because moving data between host and device silently is never wanted.
    """
    xp = None
    for a in arrays:
        if a is None or isinstance(a, _numpy_types):
            if isinstance(a, np.ndarray) and xp is not None and xp is not np:
                raise ValueError("numpy and CuPy arrays mixed in one call; move them to one device first")
            if isinstance(a, np.ndarray):
                xp = np
            continue
        if is_cupy(a):
            import cupy
            if xp is np:
                raise ValueError("numpy and CuPy arrays mixed in one call; move them to one device first")
            xp = cupy
    return np if xp is None else xp


def matmul(a, b):
    """a @ b; CuPy arrays go through `mirascore.gpu.blas` (cuBLAS that a CUDA graph can capture)."""
    if is_cupy(a):
        from .gpu.blas import matmul as gpu_matmul
        return gpu_matmul(a, b)
    return a @ b


def to_numpy(x):
    """A host (numpy) copy of x, whether x lives on the host or a GPU."""
    return x.get() if is_cupy(x) else np.asarray(x)
