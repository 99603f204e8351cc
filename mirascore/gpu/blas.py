"""Batched matrix products on CuPy arrays through cuBLAS, callable inside a CUDA graph capture.

`cupy.matmul` refuses to run while a stream is being captured (CuPy raises NotImplementedError
for every cuBLAS call then), and its batched path costs tens of microseconds of Python per call.
`matmul` here calls cuBLAS's strided-batched GEMMs through ctypes on a handle of our own, one per
stream, with a fixed workspace, so a capture allocates nothing inside cuBLAS:

    C = matmul(A, B)                     # A (..., m, k), B (..., k, n), batch dims broadcast -> (..., m, n)
    C = matmul(A, B, precision="fp32")   # this product at full float32 whatever the setting

The precision of float32 products (settings.current().precision, docs/contract.md §5) is chosen per
call, never through the handle's math mode: "fp32" `cublasSgemmStridedBatched`; "tf32"
`cublasGemmStridedBatchedEx` with compute type CUBLAS_COMPUTE_32F_FAST_TF32; "bf16" and "fp16"
the operands cast to 16 bits first (one elementwise kernel each, into a buffer in the operand's
memory order, allocated from CuPy's pool like any kernel's output, which a capture by
mirascore.gpu.graph makes private; bfloat16 is stored as uint16 bits, rounded to nearest even here,
since CuPy's own bfloat16 needs ml_dtypes), then `cublasGemmStridedBatchedEx` with 16-bit inputs,
CUBLAS_COMPUTE_32F (fp32 accumulation on tensor cores) and a float32 result. float64 products
always run in float64 (`cublasDgemmStridedBatched`). Workspace size and handles live in
mirascore.gpu.settings.

Operands are passed without copies when their matrices are row-major or transposed views
(`x.swapaxes(-1, -2)`) and their batch dims collapse to one stride (or are broadcast, stride 0);
anything else is made contiguous first. Linux only (the library is found among those mapped).
"""
import ctypes
import math

import numpy as np

from . import settings

_OP_N, _OP_T = 0, 1
_DEFAULT_MATH = 0                           # no TF32: precision is chosen per call
_R_32F, _R_16F, _R_16BF = 0, 2, 14          # cudaDataType_t (library_types.h)
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32 = 68, 77   # cublasComputeType_t (cublas_api.h)
_GEMM_DEFAULT = -1                          # cublasGemmAlgo_t: cuBLAS's heuristics
_lib = None
_to_bf16 = None


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
    # handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB,
    # beta, C, Ctype, ldc, strideC, batchCount, computeType, algo
    lib.cublasGemmStridedBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll,
                                               p, p, i, i, ll, i, i, i]
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
        _check(lib.cublasSetMathMode(handle, _DEFAULT_MATH), "cublasSetMathMode")
        entry = handles[key] = (handle, workspace)
    return entry[0]


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
    the previous setting. The same as `settings.configure(tf32=enabled)`: True is precision
    "tf32", False is "fp32"."""
    return settings.configure(tf32=bool(enabled)).tf32


def _empty(shape, dtype):
    """Allocation of the products (tests monkeypatch this to fill with NaN)."""
    import cupy
    return cupy.empty(shape, dtype=dtype)


def _empty_like(x, dtype):
    """Allocation of a cast operand in x's memory order (tests monkeypatch this to poison it)."""
    import cupy
    return cupy.empty_like(x, dtype=dtype)


def _cast16(x, precision):
    """float32 x as a 16-bit cuBLAS operand: (array, cudaDataType). float16 by CuPy's conversion,
    bfloat16 as uint16 bits rounded to nearest even (a NaN stays a NaN). The buffer keeps x's
    memory order, so a transposed view stays a transposed view (a cuBLAS op, no copy), and an
    axis of stride 0 (a broadcast) is cast once, then broadcast again."""
    import cupy
    global _to_bf16
    core = x[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                   for n, st in zip(x.shape, x.strides))]
    if precision == "fp16":
        y, kind = _empty_like(core, cupy.float16), _R_16F
        cupy.copyto(y, core, casting="same_kind")
    else:
        if _to_bf16 is None:
            _to_bf16 = cupy.ElementwiseKernel(
                "float32 x", "uint16 y",
                """unsigned int u = __float_as_uint(x);
                   y = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40u)
                       : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);""",
                "mirascore_float_to_bf16")
        y, kind = _empty_like(core, cupy.uint16), _R_16BF
        _to_bf16(core, y)
    return (y if y.shape == x.shape else cupy.broadcast_to(y, x.shape)), kind


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


def matmul(a, b, precision=None):
    """a @ b for CuPy arrays a (..., m, k), b (..., k, n) of one floating dtype (float32 or
    float64), batch dims broadcast: one strided-batched GEMM (after a cast of each operand for
    bf16 and fp16), capture-safe. `precision`: one of settings.PRECISIONS for this product, or
    None for `settings.current().precision`; float64 products ignore it. The result has the
    operands' dtype."""
    if precision is None:
        precision = settings.current().precision
    else:
        settings.precision(precision)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul takes matrices (ndim ≥ 2); got shapes {a.shape} and {b.shape}")
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
        raise ValueError(f"matmul takes two float32 or two float64 arrays; got {a.dtype} and {b.dtype}")
    (m, k), (k2, n) = a.shape[-2:], b.shape[-2:]
    if k != k2:
        raise ValueError(f"matmul: inner sizes differ, a {a.shape} and b {b.shape}")
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = _empty(batch + (m, n), a.dtype)
    count = math.prod(batch)
    if out.size == 0:
        return out
    if k == 0:
        out.fill(0)
        return out
    single = a.dtype == np.float32
    kind_a = kind_b = _R_32F
    if single and precision in ("bf16", "fp16"):
        (a, kind_a), (b, kind_b) = _cast16(a, precision), _cast16(b, precision)
    A, op_a, lda, sa = _operand(a, batch)
    B, op_b, ldb, sb = _operand(b, batch)
    lib, handle = _library(), _handle()
    one, zero = (ctypes.c_float(1), ctypes.c_float(0)) if single else (ctypes.c_double(1), ctypes.c_double(0))
    # row-major C = A B is column-major Cᵀ = Bᵀ Aᵀ
    if not single or precision == "fp32":
        gemm = lib.cublasSgemmStridedBatched if single else lib.cublasDgemmStridedBatched
        _check(gemm(handle, op_b, op_a, n, m, k, ctypes.addressof(one), B.data.ptr, ldb, sb,
                    A.data.ptr, lda, sa, ctypes.addressof(zero), out.data.ptr, n, m * n, count),
               "gemmStridedBatched")
        return out
    compute = _COMPUTE_32F_FAST_TF32 if precision == "tf32" else _COMPUTE_32F
    _check(lib.cublasGemmStridedBatchedEx(
        handle, op_b, op_a, n, m, k, ctypes.addressof(one), B.data.ptr, kind_b, ldb, sb,
        A.data.ptr, kind_a, lda, sa, ctypes.addressof(zero), out.data.ptr, _R_32F, n, m * n, count,
        compute, _GEMM_DEFAULT), f"gemmStridedBatchedEx ({precision})")
    return out
