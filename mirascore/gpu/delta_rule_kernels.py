"""CuPy kernels for the chunked delta rule (mirascore.chunk.delta_rule): its `pieces` on the GPU.

Two kernels (source: delta_rule_kernels.cu beside this file), compiled lazily on first use and cached
per dtype (float32: fp32 arithmetic and accumulation; float64 for tests):

- `unit_lower_inverse(A)`: (I + A)⁻¹ of each strictly lower C × C block (C ≤ 64), by forward
  substitution, one thread block per matrix.
- `state_scan(A, P, Qm, decay, X0, H, sign_a, sign_b, reverse)`: the sequential
  chunk-to-chunk loop of the forward (states, pseudo-values U) and backward (dS, dR) passes, fused
  into one launch; each thread block keeps a BV × d_k tile of the state in shared memory for the whole
  sequence (register-tiled, P and Qm streamed through a ring of shared buffers by cp.async; dynamic
  shared memory, `_state_scan_smem` bytes). Same contract as
  `mirascore.chunk.delta_rule.state_scan` (the batched-matmul version).

Elementwise glue, fused so that each runs as one pass over memory (CuPy ElementwiseKernel /
ReductionKernel, compiled on first call): `decay_matrix`, `strict_A`, `bwd_pairs`, `axpby`, `rowdot`.
The same names as `mirascore.chunk.delta_rule.ArrayPieces` (the formulas), which the chunk code
uses instead on numpy or for sizes `supports` rejects. Everything else is cuBLAS batched matmuls
(mirascore.gpu.blas).

Outputs of the RawKernels are allocated with `_empty`, which tests replace with a NaN-filled
allocator (poison) to catch entries a kernel forgets to write. This module imports CuPy; nothing
imports it unless CuPy arrays arrive.
"""
import os

import cupy
import numpy as np

_SOURCE_PATH = os.path.join(os.path.dirname(__file__), "delta_rule_kernels.cu")
_MAX_C, _MAX_K, _NT = 64, 128, 256
_BV = {np.dtype(np.float32): 32, np.dtype(np.float64): 16}
# state_scan is latency-bound: two resident blocks per SM (registers capped at 128 per thread)
# run it in 2.5 ms instead of 3.9 at B·H = 128, 64 chunks of 64, d = 128 (H200, float32)
_MIN_BLOCKS = {np.dtype(np.float32): 2, np.dtype(np.float64): 1}
_REAL = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_KT = 32            # columns of P per slice (KT in the .cu)
_STAGES = 3         # state_scan's ring of slice buffers (STAGES in the .cu)
_modules = {}
_smem_allowed = set()   # (dtype, device) where state_scan may take over 48 KB of shared memory


def _state_scan_smem(dtype):
    """state_scan's dynamic shared memory, SMEM_BYTES in the .cu: the X tile, O, STAGES slices."""
    size = np.dtype(dtype).itemsize
    vw = 16 // size                                   # REALs per 16 bytes: the rows' padding
    bv = _BV[np.dtype(dtype)]
    return size * (bv * (_MAX_K + vw) + _MAX_C * bv + _STAGES * _MAX_C * (_KT + vw))


def _empty(shape, dtype):
    """Allocation of kernel outputs (tests monkeypatch this to fill with NaN)."""
    return cupy.empty(shape, dtype=dtype)


def supports(dtype, d_v, d_k, chunk):
    """Whether the kernels handle this problem (otherwise the batched-matmul path runs)."""
    return np.dtype(dtype) in _REAL and chunk <= _MAX_C and d_k <= _MAX_K and d_v >= 1


def _function(name, dtype):
    dtype = np.dtype(dtype)
    mod = _modules.get(dtype)
    if mod is None:
        with open(_SOURCE_PATH) as f:
            code = f.read()
        mod = cupy.RawModule(code=code, options=(f"-DREAL={_REAL[dtype]}", f"-DBV={_BV[dtype]}",
                                                 f"-DMIN_BLOCKS={_MIN_BLOCKS[dtype]}", f"-DSTAGES={_STAGES}"))
        _modules[dtype] = mod
    return mod.get_function(name)


def unit_lower_inverse(A):
    """(I + A)⁻¹ for strictly lower triangular A (..., C, C), C ≤ 64."""
    C = A.shape[-1]
    A = cupy.ascontiguousarray(A)
    out = _empty(A.shape, A.dtype)
    M = A.size // (C * C) if C else 0
    if M:
        _function("unit_lower_inverse", A.dtype)((M,), (C,), (A, out, np.int32(C)))
    return out


def state_scan(A, P, Qm, decay, X0, H=None, sign_a=-1.0, sign_b=1.0, reverse=False):
    """Fused sequential loop; see mirascore.chunk.delta_rule.state_scan for the contract."""
    dt = A.dtype
    Bn, N, C, dv = A.shape
    dk = P.shape[-1]
    real = dt.type
    A, P, Qm, decay, X0 = (cupy.ascontiguousarray(x, dtype=dt) for x in (A, P, Qm, decay, X0))
    Hc = X0 if H is None else cupy.ascontiguousarray(H, dtype=dt)
    Xs = _empty((Bn, N, dv, dk), dt)
    O = _empty((Bn, N, C, dv), dt)
    Xout = _empty((Bn, dv, dk), dt)
    bv = _BV[np.dtype(dt)]
    grid = (Bn, -(-dv // bv))
    kernel, smem = _function("state_scan", dt), _state_scan_smem(dt)
    if (dt, cupy.cuda.Device().id) not in _smem_allowed:   # a function attribute, per device
        kernel.max_dynamic_shared_size_bytes = smem           # (float32: 52 KB, two blocks per SM)
        _smem_allowed.add((dt, cupy.cuda.Device().id))
    kernel(
        grid, (_NT,),
        (A, P, Qm, decay, X0, Hc, Xs, O, Xout, np.int32(N), np.int32(C), np.int32(dv), np.int32(dk),
         real(sign_a), real(sign_b), np.int32(H is not None), np.int32(bool(reverse))),
        shared_mem=smem)
    return Xs, O, Xout


# ---------------------------------------------------------------- fused elementwise glue

# D_ti = e^{g_t − g_i} for i ≤ t, else 0 (gt: g[..., :, None], gi: g[..., None, :]); i is the
# flat output index, so (t, j) = ((i / C) % C, i % C).
_decay_matrix = cupy.ElementwiseKernel(
    "T gt, T gi, int32 C", "T D",
    "const int t = (i / C) % C, j = i % C; D = (j <= t) ? exp(gt - gi) : (T)0;",
    "mirascore_delta_decay_matrix")

# A_ti = b_t D_ti (K Kᵀ)_ti for i < t, else 0
_strict_A = cupy.ElementwiseKernel(
    "T bt, T D, T KK, int32 C", "T A",
    "const int t = (i / C) % C, j = i % C; A = (j < t) ? bt * D * KK : (T)0;",
    "mirascore_delta_strict_A")

# backward pair terms from YU = dY Uᵀ and RU = dR Uᵀ (see mirascore.chunk.delta_rule.delta_rule_bwd):
#   dPD = YU ⊙ D (incl. diagonal; D is 0 above it), dA = −RU strictly below the diagonal,
#   M = b_t dA ⊙ D, E = (YU ⊙ QK + b_t dA ⊙ KK) ⊙ D, F = dA ⊙ D ⊙ KK
_bwd_pairs = cupy.ElementwiseKernel(
    "T YU, T RU, T QK, T KK, T D, T bt, int32 C", "T dPD, T M, T E, T F",
    """const int t = (i / C) % C, j = i % C;
    const T dA = (j < t) ? -RU : (T)0;
    const T dAD = dA * D;
    dPD = YU * D;
    M = bt * dAD;
    E = (YU * QK + bt * dA * KK) * D;
    F = dAD * KK;""",
    "mirascore_delta_bwd_pairs")

_axpby = cupy.ElementwiseKernel(
    "T a, T x, T b, T y", "T z", "z = a * x + b * y", "mirascore_delta_axpby")

_rowdot = cupy.ReductionKernel(
    "T a, T b", "T y", "a * b", "a + b", "y = a", "0", "mirascore_delta_rowdot")


def decay_matrix(g):
    C = g.shape[-1]
    return _decay_matrix(g[..., :, None], g[..., None, :], np.int32(C))


def strict_A(b, D, KK):
    return _strict_A(b[..., :, None], D, KK, np.int32(D.shape[-1]))


def bwd_pairs(YU, RU, QK, KK, D, b):
    return _bwd_pairs(YU, RU, QK, KK, D, b[..., :, None], np.int32(D.shape[-1]))


def axpby(a, x, b, y):
    """a x + b y with broadcasting, one pass."""
    return _axpby(a, x, b, y)


def rowdot(a, b, axis=-1):
    """(a ⊙ b) summed over `axis`, without the product in memory."""
    return _rowdot(a, b, axis=axis)
