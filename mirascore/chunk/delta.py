"""Chunked WY/UT form of the gated delta recurrence, forward and hand-derived backward.

The recurrence (every rule of DESIGN §4's exact family reduces to it; see
docs/derivations/chunked-delta.md for the mapping of gates):

    W_t = α_t W_{t−1} (I − b_t k_t k_tᵀ) + c_t v_t k_tᵀ,        y_t = W_t q_t   (read after the update)

W is (..., d_v, d_k) and acts as W k. Shapes: W0 (..., d_v, d_k); K, Q (..., T, d_k); V (..., T, d_v);
α, b, c (..., T); leading dimensions broadcast. Inside a chunk of C tokens the decays live in log
space (g = cumsum log α; only ratios e^{g_t − g_i} with i ≤ t are ever exponentiated), the pseudo-values
U = (I + A)⁻¹ (diag(c) V − diag(b e^g) K Sᵀ) come from one unit-lower-triangular inverse per chunk,
and all chunks are processed at once with batched matmuls; only the chunk-to-chunk state recurrence
is sequential (as FLA's chunk_gated_delta_rule). The backward pass is derived in
docs/derivations/scan-backward-delta.md.

Array-agnostic (numpy or CuPy, chosen by the arguments). On CuPy arrays the sequential state loop and
the triangular inverse run as RawKernels from `mirascore.gpu.delta_kernels` (imported lazily), the
elementwise glue as fused Elementwise/ReductionKernels, and everything else as cuBLAS batched matmuls
through `mirascore.gpu.blas` (transposed views without copies; TF32 after `blas.set_tf32(True)`).
"""
from typing import NamedTuple

import numpy as np

from .._xp import matmul as mm
from .._xp import namespace
from ..autodiff.numpy import unbroadcast
from ..autodiff.tracer import Box, defvjp, defvjp_argnums, primitive

__all__ = ["chunk_delta", "chunk_delta_fwd", "chunk_delta_bwd", "DeltaSaved"]

_LEAF = 16          # blocks of the triangular inverse solved by row substitution


class DeltaSaved(NamedTuple):
    """What the backward pass needs (flattened batch Bn, N chunks of C tokens, padded)."""
    K: object          # (Bn, N, C, d_k)
    V: object          # (Bn, N, C, d_v)
    Q: object          # (Bn, N, C, d_k)
    alpha: object      # (Bn, N, C)   (padding: 1)
    b: object          # (Bn, N, C)   (padding: 0)
    c: object          # (Bn, N, C)   (padding: 0)
    states: object     # (Bn, N, d_v, d_k)  state at the start of each chunk
    Tinv: object       # (Bn, N, C, C)      (I + A)⁻¹ of each chunk
    meta: tuple        # (batch, T, shapes of the seven arguments, use_kernels)


# ---------------------------------------------------------------- shapes in and out

def _swap(x):
    return x.swapaxes(-1, -2)


def _gate_batch(shape):
    return tuple(shape[:-1]) if len(shape) else ()


def _prepare(W0, K, V, Q, alpha, b, c, chunk):
    """Validate, broadcast, flatten the batch, pad T to a multiple of the chunk."""
    xp = namespace(W0, K, V, Q, alpha, b, c)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer; got {chunk!r}")
    arrays = [W0, K, V, Q]
    dtypes = [x.dtype for x in (W0, K, V, Q, alpha, b, c) if hasattr(x, "dtype")]
    dt = np.result_type(*dtypes, np.float32)          # Python-number gates do not promote
    if dt.kind != "f":
        raise ValueError(f"chunk_delta needs real floating arrays; got dtypes {[str(d) for d in dtypes]}")
    W0, K, V, Q = (xp.asarray(x, dtype=dt) for x in arrays)
    alpha, b, c = (xp.asarray(x, dtype=dt) for x in (alpha, b, c))
    shapes = tuple(x.shape for x in (W0, K, V, Q, alpha, b, c))
    for name, x, nd in (("W0", W0, 2), ("K", K, 2), ("V", V, 2), ("Q", Q, 2)):
        if x.ndim < nd:
            raise ValueError(f"{name} needs at least {nd} dimensions; got shape {x.shape}")
    T, d_k = K.shape[-2:]
    d_v = V.shape[-1]
    if T < 1:
        raise ValueError(f"K has no tokens: shape {K.shape}")
    if V.shape[-2] != T or Q.shape[-2:] != (T, d_k):
        raise ValueError(f"K {K.shape}, V {V.shape} and Q {Q.shape} must share T and K, Q the last size")
    if W0.shape[-2:] != (d_v, d_k):
        raise ValueError(f"W0 must end in (d_v, d_k) = ({d_v}, {d_k}); got shape {W0.shape}")
    for name, x in (("alpha", alpha), ("b", b), ("c", c)):
        if x.ndim and x.shape[-1] not in (1, T):
            raise ValueError(f"{name} must broadcast against (..., T) with T = {T}; got shape {x.shape}")
    try:
        batch = np.broadcast_shapes(W0.shape[:-2], K.shape[:-2], V.shape[:-2], Q.shape[:-2],
                                    *(_gate_batch(x.shape) for x in (alpha, b, c)))
    except ValueError:
        raise ValueError("batch dimensions do not broadcast: W0 {}, K {}, V {}, Q {}, alpha {}, b {}, c {}"
                         .format(*shapes)) from None
    Bn = int(np.prod(batch, dtype=np.int64))
    C = int(chunk)
    N = -(-T // C)
    pad = N * C - T

    def flat(x, tail, fill):
        x = xp.broadcast_to(x, batch + tail).reshape((Bn,) + tail)
        if pad:
            widths = [(0, 0), (0, pad)] + [(0, 0)] * (len(tail) - 1)
            x = xp.pad(x, widths, constant_values=fill)
        return x.reshape((Bn, N, C) + tail[1:])

    Kc, Vc, Qc = flat(K, (T, d_k), 0), flat(V, (T, d_v), 0), flat(Q, (T, d_k), 0)
    ac, bc, cc = flat(alpha, (T,), 1), flat(b, (T,), 0), flat(c, (T,), 0)
    W0f = xp.broadcast_to(W0, batch + (d_v, d_k)).reshape(Bn, d_v, d_k)
    return xp, dt, batch, T, shapes, (W0f, Kc, Vc, Qc, ac, bc, cc)


def _unflat(x, batch, T):
    """(Bn, N, C, d) -> batch + (T, d), dropping the padding."""
    Bn, N, C = x.shape[:3]
    return x.reshape((Bn, N * C) + x.shape[3:])[:, :T].reshape(batch + (T,) + x.shape[3:])


# ---------------------------------------------------------------- pieces

def _masks(xp, C):
    incl = xp.tri(C, C, 0, dtype=bool)
    strict = xp.tri(C, C, -1, dtype=bool)
    return incl, strict


def _decays(xp, kern, alpha, incl):
    """g = cumsum log α per chunk; γ = e^g; λ = e^{g_C − g}; D_ti = e^{g_t − g_i} (i ≤ t)."""
    g = xp.cumsum(xp.log(alpha), axis=-1)
    gam = xp.exp(g)
    gC = g[..., -1]
    lam = xp.exp(gC[..., None] - g)
    if kern:
        D = kern.decay_matrix(g)
    else:      # the exponent is masked before exp: never e^{positive}, never inf · 0
        D = xp.exp(xp.where(incl, g[..., :, None] - g[..., None, :], -np.inf))
    return gam, lam, xp.exp(gC), D


# Elementwise glue: one fused pass each on the GPU (mirascore.gpu.delta_kernels), plain
# expressions otherwise. Same results either way.

def _axpby(kern, a, x, b, y):
    return kern.axpby(a, x, b, y) if kern else a * x + b * y


def _rowdot(kern, a, b, axis=-1):
    return kern.rowdot(a, b, axis) if kern else (a * b).sum(axis=axis)


def _strict_A(xp, kern, b, D, KK, strict):
    """A_ti = b_t D_ti k_tᵀk_i for i < t, else 0."""
    return kern.strict_A(b, D, KK) if kern else xp.where(strict, b[..., :, None] * D * KK, 0)


def _bwd_pairs(xp, kern, YU, RU, QK, KK, D, b, strict):
    """From YU = dY Uᵀ and RU = dR Uᵀ: dP ⊙ D, M = diag(b)(dA ⊙ D), E = dD ⊙ D, dA ⊙ D ⊙ KKᵀ."""
    if kern:
        return kern.bwd_pairs(YU, RU, QK, KK, D, b)
    bt = b[..., :, None]
    dA = xp.where(strict, -RU, 0)                 # strictly lower part only
    dAD = dA * D
    return YU * D, bt * dAD, (YU * QK + bt * dA * KK) * D, dAD * KK    # D is 0 above the diagonal


def _exclusive_cumsum(xp, x):
    """Σ_{i<j} x_i along the last axis."""
    return xp.concatenate([xp.zeros_like(x[..., :1]), xp.cumsum(x[..., :-1], axis=-1)], axis=-1)


def unit_lower_inverse(A):
    """(I + A)⁻¹ for strictly lower triangular A (..., n, n): row substitution on blocks of 16,
    merged by the 2×2 block formula [[X, 0], [−Z B X, Z]] (as FLA's solve_tril)."""
    xp = namespace(A)
    n = A.shape[-1]
    if n <= _LEAF:
        Ti = xp.zeros_like(A)
        idx = xp.arange(n)
        Ti[..., idx, idx] = 1
        for i in range(1, n):
            Ti[..., i, :i] = -mm(A[..., i:i + 1, :i], Ti[..., :i, :i])[..., 0, :]
        return Ti
    h = n // 2
    if n == 2 * h:
        both = unit_lower_inverse(xp.stack([A[..., :h, :h], A[..., h:, h:]]))
        X, Z = both[0], both[1]
    else:
        X, Z = unit_lower_inverse(A[..., :h, :h]), unit_lower_inverse(A[..., h:, h:])
    Ti = xp.zeros_like(A)
    Ti[..., :h, :h] = X
    Ti[..., h:, h:] = Z
    Ti[..., h:, :h] = -mm(Z, mm(A[..., h:, :h], X))
    return Ti


def state_scan(A, P, Qm, decay, X0, H=None, sign_a=-1.0, sign_b=1.0, reverse=False):
    """The sequential part, shared by forward and backward. For chunks n in order (or reverse):

        Xs[n] = X;   O_n = A_n + sign_a · P_n Xᵀ;   X ← decay_n X + H_n + sign_b · O_nᵀ Qm_n

    A (Bn, N, C, d_v), P and Qm (Bn, N, C, d_k), decay (Bn, N), X0 (Bn, d_v, d_k), H (Bn, N, d_v, d_k).
    Returns Xs (Bn, N, d_v, d_k), O (Bn, N, C, d_v), X (Bn, d_v, d_k).
    """
    xp = namespace(A, X0)
    N = A.shape[1]
    Xs = xp.empty(A.shape[:2] + X0.shape[1:], dtype=A.dtype)
    O = xp.empty_like(A)
    X = X0
    for n in (range(N - 1, -1, -1) if reverse else range(N)):
        Xs[:, n] = X
        On = A[:, n] + sign_a * mm(P[:, n], _swap(X))
        O[:, n] = On
        X = decay[:, n, None, None] * X + sign_b * mm(_swap(On), Qm[:, n])
        if H is not None:
            X = X + H[:, n]
    return Xs, O, X


def _kernels(xp, use, dt, d_v, d_k, C):
    """The GPU kernel module when it should (and can) be used, else None."""
    if xp is np or use is False:
        return None
    from ..gpu import delta_kernels
    ok = delta_kernels.supports(dt, d_v, d_k, C)
    if use is True and not ok:
        raise ValueError(f"GPU delta kernels do not support dtype {dt}, d_v={d_v}, d_k={d_k}, chunk={C}")
    return delta_kernels if ok else None


# ---------------------------------------------------------------- forward and backward

def chunk_delta_fwd(W0, K, V, Q, alpha, b, c, chunk=64, kernels="auto"):
    """Forward pass: (Y (..., T, d_v), W_T (..., d_v, d_k), saved).

    `kernels`: "auto" (CuPy arrays use mirascore.gpu.delta_kernels where supported), True (must use
    them), False (batched-matmul path only).
    """
    xp, dt, batch, T, shapes, (W0f, Kc, Vc, Qc, ac, bc, cc) = _prepare(W0, K, V, Q, alpha, b, c, chunk)
    Bn, N, C, d_k = Kc.shape
    d_v = Vc.shape[-1]
    kern = _kernels(xp, kernels, dt, d_v, d_k, C)
    incl, strict = _masks(xp, C)
    gam, lam, gamC, D = _decays(xp, kern, ac, incl)
    A = _strict_A(xp, kern, bc, D, mm(Kc, _swap(Kc)), strict)
    Tinv = kern.unit_lower_inverse(A) if kern else unit_lower_inverse(A)
    del A
    Wm = mm(Tinv * (bc * gam)[..., None, :], Kc)     # (I+A)⁻¹ diag(bγ) K
    Um = mm(Tinv * cc[..., None, :], Vc)             # (I+A)⁻¹ diag(c) V
    scan = kern.state_scan if kern else state_scan
    states, U, W_T = scan(Um, Wm, lam[..., None] * Kc, gamC, W0f)     # U = Um − Wm Sᵀ per chunk
    del Wm, Um
    PU = mm(D * mm(Qc, _swap(Kc)), U)
    Y = _axpby(kern, gam[..., None], mm(Qc, _swap(states)), dt.type(1), PU)
    saved = DeltaSaved(Kc, Vc, Qc, ac, bc, cc, states, Tinv, (batch, T, shapes, kernels))
    return _unflat(Y, batch, T), W_T.reshape(batch + (d_v, d_k)), saved


def chunk_delta_bwd(saved, dY, dW_T):
    """Backward pass: (dW0, dK, dV, dQ, dalpha, db, dc), each shaped like its argument.

    dY (..., T, d_v) and dW_T (..., d_v, d_k) may be None (zero cotangent).
    """
    Kc, Vc, Qc, ac, bc, cc, S, Tinv, (batch, T, shapes, kernels) = saved
    xp = namespace(Kc)
    Bn, N, C, d_k = Kc.shape
    d_v = Vc.shape[-1]
    one = Kc.dtype.type(1)
    kern = _kernels(xp, kernels, Kc.dtype, d_v, d_k, C)
    incl, strict = _masks(xp, C)
    gam, lam, gamC, D = _decays(xp, kern, ac, incl)
    KK = mm(Kc, _swap(Kc))
    QK = mm(Qc, _swap(Kc))
    KS = mm(Kc, _swap(S))                              # K Sᵀ      (Bn, N, C, d_v)
    bg = bc * gam
    U = mm(Tinv, _axpby(kern, cc[..., None], Vc, -bg[..., None], KS))   # 𝒯 R

    if dY is None:
        dYc = xp.zeros_like(Vc)
    else:
        dY = xp.asarray(dY, dtype=Kc.dtype)
        dYc = xp.broadcast_to(dY, batch + (T, d_v)).reshape(Bn, T, d_v)
        if N * C > T:
            dYc = xp.pad(dYc, [(0, 0), (0, N * C - T), (0, 0)])
        dYc = dYc.reshape(Bn, N, C, d_v)
    if dW_T is None:
        dWT = xp.zeros((Bn, d_v, d_k), dtype=Kc.dtype)
    else:
        dWT = xp.broadcast_to(xp.asarray(dW_T, dtype=Kc.dtype), batch + (d_v, d_k)).reshape(Bn, d_v, d_k)

    # ---- all chunks at once: the parts of dR and dS that do not depend on the carried dS
    TinvT = _swap(Tinv)
    X1 = mm(TinvT, mm(_swap(D * QK), dYc))     # 𝒯ᵀ Pᵀ dY
    X2 = mm(TinvT * lam[..., None, :], Kc)            # 𝒯ᵀ diag(λ) K
    H = mm(_swap(dYc), gam[..., None] * Qc)           # dYᵀ diag(γ) Q
    G = bg[..., None] * Kc                                    # diag(bγ) K
    # ---- sequential, last chunk first: dSp[n] = gradient at the end of chunk n, dR[n]
    scan = kern.state_scan if kern else state_scan
    dSp, dR, dW0 = scan(X1, X2, G, gamC, dWT, H, 1.0, -1.0, True)
    del X1, X2, H, G

    # ---- all chunks at once again
    dPD, M, E, F = _bwd_pairs(xp, kern, mm(dYc, _swap(U)), mm(dR, _swap(U)), QK, KK, D, bc,
                              strict)
    del KK
    UdS = mm(U, dSp)                                   # row i: (dS'ᵀ u_i)ᵀ
    dQ = _axpby(kern, one, mm(dPD, Kc), gam[..., None], mm(dYc, S))
    dK = mm(_swap(dPD), Qc)
    dK += mm(M + _swap(M), Kc)                         # K Kᵀ enters A twice
    dK += _axpby(kern, lam[..., None], UdS, -bg[..., None], mm(dR, S))
    del dPD, M
    dV = cc[..., None] * dR
    dc = _rowdot(kern, dR, Vc)
    rho = -_rowdot(kern, dR, KS)                              # cotangent of b ⊙ γ
    db = gam * rho + F.sum(axis=-1)
    dgam = _rowdot(kern, dYc, mm(Qc, _swap(S))) + bc * rho
    dlam = _rowdot(kern, UdS, Kc)
    # d log α_j collects only the decays that contain α_j, so nothing large cancels (α_j = 1e-6 in
    # float32 stays accurate): pairs i < j ≤ t of E, γ_t for t ≥ j, λ_i for i < j, and γ_C.
    # (prefix sums are exclusive by construction, never inclusive − self, which would cancel again;
    # Σ_{i<j} E_ti is the matmul E · strict_upper_ones)
    cross = _rowdot(kern, mm(E, _swap(strict).astype(E.dtype)), incl.astype(E.dtype), axis=-2)
    dlog = (cross + xp.flip(xp.cumsum(xp.flip(dgam * gam, axis=-1), axis=-1), axis=-1)
            + _exclusive_cumsum(xp, dlam * lam)
            + (gamC * _rowdot(kern, dSp.reshape(Bn, N, -1), S.reshape(Bn, N, -1)))[..., None])
    dalpha = dlog / ac

    out = (dW0.reshape(batch + (d_v, d_k)), _unflat(dK, batch, T), _unflat(dV, batch, T),
           _unflat(dQ, batch, T), _unflat(dalpha[..., None], batch, T)[..., 0],
           _unflat(db[..., None], batch, T)[..., 0], _unflat(dc[..., None], batch, T)[..., 0])
    return tuple(unbroadcast(g, s) for g, s in zip(out, shapes))


# ---------------------------------------------------------------- the autodiff primitive

class _DeltaOut(NamedTuple):
    Y: object
    W_T: object
    saved: DeltaSaved


class _Cotangent(NamedTuple):
    """Cotangent of _DeltaOut: (dY, dW_T), None meaning zero; adds field by field."""
    dY: object
    dW_T: object

    def __add__(self, other):
        def plus(a, b):
            return b if a is None else a if b is None else a + b
        return _Cotangent(plus(self.dY, other.dY), plus(self.dW_T, other.dW_T))


@primitive
def _chunk_delta_core(W0, K, V, Q, alpha, b, c, chunk=64, kernels="auto"):
    return _DeltaOut(*chunk_delta_fwd(W0, K, V, Q, alpha, b, c, chunk, kernels))


@primitive
def _output_Y(out):
    return out.Y


@primitive
def _output_W_T(out):
    return out.W_T


@primitive
def chunk_delta_bwd_primitive(out, dY, dW_T):
    """The VJP as an operation with no VJP of its own: grad of grad through chunk_delta raises."""
    return chunk_delta_bwd(out.saved, dY, dW_T)


chunk_delta_bwd_primitive.__name__ = "chunk_delta_bwd"

defvjp(_output_Y, lambda ans, out: lambda g: _Cotangent(g, None))
defvjp(_output_W_T, lambda ans, out: lambda g: _Cotangent(None, g))


def _core_vjp(argnums, ans, args, kwargs):
    def vjp(g):
        grads = chunk_delta_bwd_primitive(ans, g.dY, g.dW_T)
        return tuple(grads[i] for i in argnums)
    return vjp


defvjp_argnums(_chunk_delta_core, _core_vjp)


def chunk_delta(W0, K, V, Q, alpha, b, c, chunk=64, kernels="auto"):
    """The gated delta recurrence, chunked and differentiable: returns (Y, W_T).

        W_t = α_t W_{t−1} (I − b_t k_t k_tᵀ) + c_t v_t k_tᵀ,   y_t = W_t q_t

    W0 (..., d_v, d_k); K, Q (..., T, d_k); V (..., T, d_v); alpha, b, c broadcast against (..., T);
    α ∈ (0, 1], b, c ≥ 0 (not checked here: `mc.scan` validates). Any `chunk` ≥ 1 gives the same
    result up to rounding. One primitive of mirascore.autodiff with a hand-derived backward pass for
    all seven array arguments (docs/derivations/scan-backward-delta.md); not differentiable twice.
    """
    out = _chunk_delta_core(W0, K, V, Q, alpha, b, c, chunk=chunk, kernels=kernels)
    if type(out) is not Box:
        return out.Y, out.W_T
    return _output_Y(out), _output_W_T(out)
