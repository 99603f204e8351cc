"""Array namespaces: numpy, or CuPy with capture-safe matrix products, chosen by the arrays.

    xp = namespace(*arrays)        # numpy itself, or the CuPy namespace below
    xp.matmul(a, b)                # on CuPy: cuBLAS through mirascore.gpu.blas (a CUDA graph can
                                   # record it; CuPy's own cuBLAS calls cannot be captured), at the
                                   # GEMM precision setting (mirascore.gpu.settings)
    full_matmul(xp, a, b)          # xp.matmul at the operands' own precision, whatever the setting
    with gemm_precision(p, x): ... # on CuPy, the setting is p inside the block (None: unchanged)

Code that takes `xp` once per call and uses only `xp.<numpy name>` runs unchanged on both
devices: no `is_cupy` branches downstream. CuPy is never imported here unless a CuPy array
arrives (an array is recognised as CuPy's by its type's module), so `import mirascore` stays free
of cupy (and of numba).
"""
import contextlib
import types

import numpy as np

_numpy_types = (np.ndarray, np.generic, float, int, bool)
_cupy_namespace = None


def on_device(x):
    """True for a CuPy array (without importing CuPy)."""
    return type(x).__module__.startswith("cupy")


def cupy_namespace():
    """cupy's namespace with `matmul` replaced by mirascore.gpu.blas.matmul (built once)."""
    global _cupy_namespace
    if _cupy_namespace is None:
        import cupy

        from .gpu import blas
        ns = types.ModuleType("mirascore.cupy", "cupy's functions; matmul through mirascore.gpu.blas")
        ns.__dict__.update({k: v for k, v in vars(cupy).items() if not k.startswith("__")})
        ns.__getattr__ = lambda name: getattr(cupy, name)        # submodules CuPy loads lazily

        def matmul(a, b):
            if _blas_operands(a, b):
                return blas.matmul(a, b)
            return cupy.matmul(a, b)             # vectors, integers, mixed dtypes: not captured
        ns.matmul = matmul
        _cupy_namespace = ns
    return _cupy_namespace


def _blas_operands(a, b):
    """Whether mirascore.gpu.blas multiplies these (matrices of one float dtype)."""
    return a.ndim >= 2 and b.ndim >= 2 and a.dtype == b.dtype and a.dtype.char in "fd"


def full_matmul(xp, a, b):
    """xp.matmul(a, b) at the operands' own precision (float32 SIMT on the GPU), whatever the GEMM
    precision setting: for the decay algebra, whose products feed the gates' gradients as sums
    that a 16-bit operand would spoil (docs/contract.md §5; FLA keeps its decays in fp32 too)."""
    if on_device(a) and _blas_operands(a, b):
        from .gpu import blas
        return blas.matmul(a, b, precision="fp32")
    return xp.matmul(a, b)


def gemm_precision(precision, like):
    """A context in which the matrix products of the CuPy namespace run at `precision` (one of
    mirascore.gpu.settings.PRECISIONS), when `like` is a CuPy array; nothing for numpy arrays or
    precision None (numpy multiplies at the operands' dtype)."""
    if precision is None or not on_device(like):
        return contextlib.nullcontext()
    from .gpu import settings
    return settings.using(precision=precision)


def namespace(*arrays):
    """The array namespace (numpy, or CuPy with capture-safe matmul) the given arrays live in.

    Python scalars and None count for nothing; mixing numpy and CuPy arrays is a ValueError,
    because moving data between host and device silently is never wanted.
    """
    xp = None
    for a in arrays:
        if a is None or isinstance(a, _numpy_types):
            if isinstance(a, np.ndarray) and xp is not None and xp is not np:
                raise ValueError("numpy and CuPy arrays mixed in one call; move them to one device first")
            if isinstance(a, np.ndarray):
                xp = np
            continue
        if on_device(a):
            if xp is np:
                raise ValueError("numpy and CuPy arrays mixed in one call; move them to one device first")
            xp = cupy_namespace()
    return np if xp is None else xp


def to_numpy(x):
    """A host (numpy) copy of x, whether x lives on the host or a GPU."""
    return x.get() if on_device(x) else np.asarray(x)
