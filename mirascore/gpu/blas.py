"""Batched matrix products on CuPy arrays through cuBLAS, callable inside a CUDA graph capture.

`cupy.matmul` refuses to run while a stream is being captured (CuPy raises NotImplementedError
for every cuBLAS call then), and its batched path costs tens of microseconds of Python per call.
`matmul` here calls `cublas{S,D}gemmStridedBatched` through ctypes on a handle of our own, one
per stream, with a fixed workspace, so a capture allocates nothing inside cuBLAS:

    C = matmul(A, B)        # A (..., m, k), B (..., k, n), batch dims broadcast -> (..., m, n)

Its settings (TF32 math, workspace size) and its handles live in mirascore.gpu.settings.

Operands are passed without copies when their matrices are row-major or transposed views
(`x.swapaxes(-1, -2)`) and their batch dims collapse to one stride (or are broadcast, stride 0);
anything else is made contiguous first. Linux only (the library is found among those mapped).
"""
import ctypes
import math

import numpy as np

from . import settings

_OP_N, _OP_T = 0, 1
_DEFAULT_MATH, _TF32_MATH = 0, 3
_lib = None


def _library():
    """The libcublas that CuPy itself loaded (found in /proc/self/maps), with its prototypes."""
    global _lib
    if _lib is not None:
        return _lib
    from cupy_backends.cuda.libs import cublas  # noqa: F401  (maps the library into the process)
    path = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            name = line.split()[-1]
            if "/libcublas.so" in name:
                path = name
                break
    lib = ctypes.CDLL(path or "libcublas.so")
    p, i, ll, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_size_t
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
    lib.cublasSetStream_v2.argtypes = [p, p]
    lib.cublasSetWorkspace_v2.argtypes = [p, p, sz]
    lib.cublasSetMathMode.argtypes = [p, i]
    for name in ("cublasSgemmStridedBatched", "cublasDgemmStridedBatched"):
        getattr(lib, name).argtypes = [p, i, i, i, i, i, p, p, i, ll, p, i, ll, p, p, i, ll, i]
    _lib = lib
    return lib


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def _handle():
    """The handle bound to the current device and stream (created on first use, outside any
    capture: `prepare` does it before one begins)."""
    import cupy
    stream = cupy.cuda.get_current_stream()
    key = (cupy.cuda.Device().id, stream.ptr)
    handles = settings.RESOURCES.blas_handles
    entry = handles.get(key)
    if entry is None:
        lib = _library()
        handle = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        _check(lib.cublasSetStream_v2(handle, stream.ptr), "cublasSetStream")
        size = settings.current().blas_workspace_bytes
        workspace = cupy.empty(size, dtype=cupy.uint8)
        _check(lib.cublasSetWorkspace_v2(handle, workspace.data.ptr, size), "cublasSetWorkspace")
        _check(lib.cublasSetMathMode(handle, _math_mode()), "cublasSetMathMode")
        entry = handles[key] = (handle, workspace)
    return entry[0]


def _math_mode():
    return _TF32_MATH if settings.current().tf32 else _DEFAULT_MATH


def apply_math_mode():
    """Give every existing handle the math mode of the current settings (settings.configure
    calls this when tf32 changes)."""
    lib = _library()
    for handle, _ in settings.RESOURCES.blas_handles.values():
        _check(lib.cublasSetMathMode(handle, _math_mode()), "cublasSetMathMode")


def prepare(workspace=None):
    """Create the current stream's handle now (a capture must not create one); with `workspace`
    (a CuPy uint8 buffer the caller keeps alive), make it the handle's workspace, so that each
    recorded graph owns the workspace its GEMMs use."""
    handle = _handle()
    if workspace is not None:
        _check(_library().cublasSetWorkspace_v2(handle, workspace.data.ptr, workspace.nbytes),
               "cublasSetWorkspace")


def set_tf32(enabled):
    """Let float32 GEMMs use TF32 tensor cores (about 1e-3 relative error per product); returns
    the previous setting. The same as `settings.configure(tf32=enabled)`."""
    return settings.configure(tf32=bool(enabled)).tf32


def _operand(x, batch):
    """(x as passed, cuBLAS op, leading dimension, batch stride) in elements, for x viewed as a
    column-major matrix: a row-major (r, c) matrix is a column-major (c, r) one (op N), a
    transposed view is already column-major (op T)."""
    import cupy
    x = cupy.broadcast_to(x, batch + x.shape[-2:])
    for attempt in range(2):
        size = x.itemsize
        r, c = x.shape[-2:]
        sr, sc = x.strides[-2:]
        if (c == 1 or sc == size) and (r == 1 or (sr % size == 0 and sr >= c * size)):
            op, ld = _OP_N, max(c, sr // size if r > 1 else c, 1)
        elif (r == 1 or sr == size) and (c == 1 or (sc % size == 0 and sc >= r * size)):
            op, ld = _OP_T, max(r, sc // size if c > 1 else r, 1)
        else:
            op = None
        stride = _batch_stride(x.shape[:-2], x.strides[:-2], size)
        if op is not None and stride is not None:
            return x, op, ld, stride
        x = cupy.ascontiguousarray(x)
    raise AssertionError("a contiguous array always has a cuBLAS layout")


def _batch_stride(shape, strides, size):
    """One element stride s with offset(i) = i·s over the flattened batch, or None."""
    stride, inner = None, 1
    for n, st in zip(reversed(shape), reversed(strides)):
        if n > 1:
            if st % size:
                return None
            st //= size
            if stride is None:
                stride = st              # the innermost batch dim of size > 1 sets it
            elif st != stride * inner:
                return None
        inner *= n
    return 0 if stride is None else stride


def matmul(a, b):
    """a @ b for CuPy arrays a (..., m, k), b (..., k, n) of one floating dtype (float32 or
    float64), batch dims broadcast: one strided-batched GEMM, capture-safe."""
    import cupy
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul takes matrices (ndim ≥ 2); got shapes {a.shape} and {b.shape}")
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
        raise ValueError(f"matmul takes two float32 or two float64 arrays; got {a.dtype} and {b.dtype}")
    (m, k), (k2, n) = a.shape[-2:], b.shape[-2:]
    if k != k2:
        raise ValueError(f"matmul: inner sizes differ, a {a.shape} and b {b.shape}")
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = cupy.empty(batch + (m, n), dtype=a.dtype)
    count = math.prod(batch)
    if out.size == 0:
        return out
    if k == 0:
        out.fill(0)
        return out
    A, op_a, lda, sa = _operand(a, batch)
    B, op_b, ldb, sb = _operand(b, batch)
    lib, handle = _library(), _handle()
    single = a.dtype == np.float32
    one, zero = (ctypes.c_float(1), ctypes.c_float(0)) if single else (ctypes.c_double(1), ctypes.c_double(0))
    gemm = lib.cublasSgemmStridedBatched if single else lib.cublasDgemmStridedBatched
    # row-major C = A B is column-major Cᵀ = Bᵀ Aᵀ
    _check(gemm(handle, op_b, op_a, n, m, k, ctypes.addressof(one), B.data.ptr, ldb, sb,
                A.data.ptr, lda, sa, ctypes.addressof(zero), out.data.ptr, n, m * n, count),
           "gemmStridedBatched")
    return out
