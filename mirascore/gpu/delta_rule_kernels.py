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
Everything else is cuBLAS batched matmuls (mirascore.gpu.blas), except at the TF32 GEMM precision
in float32, where the forward's per-chunk work runs as two fused kernels with tensor-core products
(source: delta_chunk_kernels.cu): `chunk_prepare_tf32` (K Kᵀ, the triangular inverse and the
products Wm, Um of one chunk) and `chunk_output_tf32` (the chunk's outputs Y).

`KernelPieces` is what the chunk code uses on CuPy: `mirascore.chunk.delta_rule.ArrayPieces` (the
formulas, which run instead on numpy or for sizes `supports` rejects) with these kernels in place
of its glue, its loop and, at TF32, its per-chunk forward.

Outputs of the RawKernels are allocated with `_empty`, which tests replace with a NaN-filled
allocator (poison) to catch entries a kernel forgets to write. This module imports CuPy; nothing
imports it unless CuPy arrays arrive.
"""
import os

import cupy
import numpy as np

from ..chunk.delta_rule import ArrayPieces
from . import settings

_SOURCE_PATH = os.path.join(os.path.dirname(__file__), "delta_rule_kernels.cu")
_CHUNK_SOURCE_PATH = os.path.join(os.path.dirname(__file__), "delta_chunk_kernels.cu")
_MAX_C, _MAX_K, _NT = 64, 128, 256
_BV = {np.dtype(np.float32): 32, np.dtype(np.float64): 16}
# state_scan is latency-bound: two resident blocks per SM (registers capped at 128 per thread)
# run it in 2.5 ms instead of 3.9 at B·H = 128, 64 chunks of 64, d = 128 (H200, float32)
_MIN_BLOCKS = {np.dtype(np.float32): 2, np.dtype(np.float64): 1}
_REAL = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_KT = 32            # columns of P per slice (KT in the .cu)
_STAGES = 3         # state_scan's ring of slice buffers (STAGES in the .cu)
_modules = {}           # per dtype: delta_rule_kernels.cu
_chunk_module = None    # delta_chunk_kernels.cu (float32 only)
_smem_allowed = set()   # (kernel name, dtype, device) allowed over 48 KB of dynamic shared memory


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


def _chunk_function(name):
    """A kernel of delta_chunk_kernels.cu (float32 only)."""
    global _chunk_module
    if _chunk_module is None:
        with open(_CHUNK_SOURCE_PATH) as f:
            _chunk_module = cupy.RawModule(code=f.read())
    return _chunk_module.get_function(name)


def _launch(kernel, key, grid, args, smem):
    """kernel<<<grid, _NT, smem>>>(args), first allowing it `smem` bytes of dynamic shared memory
    on this device (a function attribute, needed above 48 KB)."""
    key = key + (cupy.cuda.Device().id,)
    if key not in _smem_allowed:
        kernel.max_dynamic_shared_size_bytes = smem
        _smem_allowed.add(key)
    kernel(grid, (_NT,), args, shared_mem=smem)


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
    _launch(_function("state_scan", dt), ("state_scan", dt), grid,     # float32: 52 KB, two blocks per SM
            (A, P, Qm, decay, X0, Hc, Xs, O, Xout, np.int32(N), np.int32(C), np.int32(dv), np.int32(dk),
             real(sign_a), real(sign_b), np.int32(H is not None), np.int32(bool(reverse))),
            _state_scan_smem(dt))
    return Xs, O, Xout


# ---------------------------------------------------------------- fused per-chunk forward (TF32)

_VT = 64            # columns of d_v per chunk_output block (VT in delta_chunk_kernels.cu)
# dynamic shared memory of the two kernels, in bytes (the buffers listed at their starts in the .cu,
# of row strides MAXK + 4, MAXC + 4 and VT + 4)
_KST, _CST, _VST = _MAX_K + 4, _MAX_C + 4, _VT + 4
_PREPARE_SMEM = 4 * (_MAX_C * (_KST + 2 * _CST + _VST) + 3 * _MAX_C)
_OUTPUT_SMEM = 4 * (_MAX_C * (2 * _KST + _CST + _VST) + _MAX_C)


# the largest d_k the fused forward is used at (H200, TF32 forward, docs/benchmarks.md: d = 128,
# B·H = 128, T = 4096: 4.62 -> 6.22 ms, slower; d = 64, B·H = 64, T = 2048: 1.34 -> 0.86 ms, a gain
# still to be confirmed with the order of the rows alternated)
_FUSED_MAX_K = 64


def fused_forward(dtype, d_k):
    """Whether the forward's per-chunk work runs as the fused TF32 kernels: float32 arrays at the
    TF32 GEMM precision with d_k ≤ _FUSED_MAX_K (sizes as `supports`)."""
    return np.dtype(dtype) == np.float32 and settings.current().precision == "tf32" and d_k <= _FUSED_MAX_K


def chunk_prepare_tf32(K, V, g, b, c):
    """Per chunk, in one kernel: Tinv = (I + A)⁻¹ with A_ti = b_t e^{g_t − g_i} k_tᵀk_i (i < t),
    Wm = Tinv diag(b e^g) K, Um = Tinv diag(c) V; float32, products in TF32.
    K (..., C, d_k), V (..., C, d_v), g, b, c (..., C). Returns (Tinv, Wm, Um)."""
    C, dk, dv = K.shape[-2], K.shape[-1], V.shape[-1]
    K, V, g, b, c = (cupy.ascontiguousarray(x, dtype=np.float32) for x in (K, V, g, b, c))
    Tinv = _empty(K.shape[:-1] + (C,), np.float32)
    Wm, Um = _empty(K.shape, np.float32), _empty(V.shape, np.float32)
    chunks = K.size // (C * dk) if K.size else 0
    if chunks:
        _launch(_chunk_function("chunk_prepare"), ("chunk_prepare",), (chunks,),
                (K, V, g, b, c, Tinv, Wm, Um, np.int32(C), np.int32(dk), np.int32(dv)), _PREPARE_SMEM)
    return Tinv, Wm, Um


def chunk_output_tf32(Q, K, S, U, g):
    """Per chunk, in one kernel: Y = diag(e^g) Q Sᵀ + (D ⊙ Q Kᵀ) U with D_ti = e^{g_t − g_i}
    (i ≤ t); float32, products in TF32. Q, K (..., C, d_k), S (..., d_v, d_k), U (..., C, d_v),
    g (..., C). Returns Y (..., C, d_v)."""
    C, dk, dv = Q.shape[-2], Q.shape[-1], U.shape[-1]
    Q, K, S, U, g = (cupy.ascontiguousarray(x, dtype=np.float32) for x in (Q, K, S, U, g))
    Y = _empty(U.shape, np.float32)
    chunks = Q.size // (C * dk) if Q.size else 0
    if chunks and dv:
        _launch(_chunk_function("chunk_output"), ("chunk_output",), (chunks, -(-dv // _VT)),
                (Q, K, S, U, g, Y, np.int32(C), np.int32(dk), np.int32(dv)), _OUTPUT_SMEM)
    return Y


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


# ---------------------------------------------------------------- the pieces the chunk code uses


class KernelPieces(ArrayPieces):
    """ArrayPieces on CuPy with this module's kernels: the glue, the inverse and the state loop
    always; the forward's per-chunk work fused (`chunk_prepare_tf32`, `chunk_output_tf32`) where
    `fused_forward` says so, else ArrayPieces's formulas with the kernel glue."""

    decay_matrix = staticmethod(decay_matrix)
    strict_A = staticmethod(strict_A)
    bwd_pairs = staticmethod(bwd_pairs)
    axpby = staticmethod(axpby)
    rowdot = staticmethod(rowdot)
    unit_lower_inverse = staticmethod(unit_lower_inverse)
    state_scan = staticmethod(state_scan)

    def chunk_prepare(self, K, V, g, gam, b, c):
        if fused_forward(K.dtype, K.shape[-1]):
            return (*chunk_prepare_tf32(K, V, g, b, c), None)
        return super().chunk_prepare(K, V, g, gam, b, c)

    def chunk_output(self, Q, K, S, U, g, gam, D=None):
        if fused_forward(Q.dtype, Q.shape[-1]):
            return chunk_output_tf32(Q, K, S, U, g)
        return super().chunk_output(Q, K, S, U, g, gam, D)
