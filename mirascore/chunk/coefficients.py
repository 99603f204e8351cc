"""The anchored chunk's linear recurrences in closed form, and their VJPs (docs/derivations/chunked.md
§1–2, scan-backward.md §2.1).

Inside a chunk of b tokens the stored quantity and the momentum follow
    gd:        s_t = α_t s_{t−1} − lr_t G_t
    momentum:  S_t = β_t S_{t−1} − lr_t G_t,     s_t = α_t s_{t−1} + S_t
and with decay matrices built in log space (a masked segment sum, as Mamba2: β = 0 gives exact
zeros, never −inf − (−inf)) every s_t is A_t s̄ + m_t S̄ − Σ_{i≤t} C_ti G_i; the gradients are
rank-1 factor pairs G_i = e_i f_iᵀ, so the chunk's end is one matmul of the factors:
    s_b = A_b s̄ + m_b S̄ − Eᵀ diag(C_b·) F,     S_b = P_b S̄ − Eᵀ diag(w) F.
Every function takes the array namespace `xp` of the call (numpy, or CuPy with capture-safe matmul).
Products of decay matrices and their VJPs run at the operands' own precision whatever the GEMM
precision setting (`full_matmul`): the gates' gradients are sums over them.
"""
from typing import NamedTuple

from .._xp import full_matmul


class Coefficients(NamedTuple):
    """Closed-form coefficients of one chunk (b tokens, index 0 = chunk start):
    A (..., b) = Π_{j≤t} α_j;  C (..., b, b) = R diag(lr);  m (..., b) = Σ_{u≤t} (A_t/A_u) P_u;
    P_end (...,) = Π_j β_j;  w (..., b) = lr_i Π_{i<j≤b} β_j (momentum only; else None);
    Xa, Xb (..., b+1, b+1): the decay matrices; R = D^α D^β (momentum) or D^α (gd)."""
    A: object
    C: object
    m: object
    P_end: object
    w: object
    Xa: object
    Xb: object
    R: object
    lr: object


def decay_matrix(xp, gate):
    """D (..., b+1, b+1), D_ti = Π_{i<j≤t} gate_j for i ≤ t (indices 0..b; 0 = chunk start), else 0.

    Built as exp of a masked segment sum of log gates (Mamba2's segsum): the strictly lower part of
    log gate_t is cumulated down each column, so a zero gate gives −inf → exactly 0, with no
    −inf − (−inf); the products never over/underflow their way to NaN for any T.
    """
    b = gate.shape[-1]
    pos = gate > 0
    lg = xp.where(pos, xp.log(xp.where(pos, gate, 1.0)), -xp.inf)
    lg = xp.concatenate([xp.zeros(gate.shape[:-1] + (1,), dtype=gate.dtype), lg], axis=-1)
    t = xp.arange(b + 1)
    strict = t[:, None] > t[None, :]
    seg = xp.cumsum(xp.where(strict, lg[..., :, None], 0.0), axis=-2)
    return xp.where(t[:, None] >= t[None, :], xp.exp(seg), 0.0)


def decay_matrix_vjp(xp, D, dD):
    """d gate (..., b) from dD (..., b+1, b+1): for i < j ≤ t, D_ti = D_tj·gate_j·D_{j−1,i}, so
    d gate_j = Σ_t D_tj (dD Dᵀ)_{t,j−1}. No division by the gate (exact at β = 0); D's structural
    zeros keep entries of dD on or above the diagonal out of the sum."""
    M = full_matmul(xp, dD, D.swapaxes(-1, -2))
    return (D[..., :, 1:] * M[..., :, :-1]).sum(axis=-2)


def coefficients(xp, lr, alpha, beta):
    """Coefficients for one chunk's gates lr, alpha, beta (..., b); beta None for gd."""
    Xa = decay_matrix(xp, alpha)
    A, Da = Xa[..., 1:, 0], Xa[..., 1:, 1:]
    m = P_end = w = Xb = None
    R = Da
    if beta is not None:
        Xb = decay_matrix(xp, beta)
        P, Db = Xb[..., 1:, 0], Xb[..., 1:, 1:]
        R = full_matmul(xp, Da, Db)
        m = full_matmul(xp, Da, P[..., None])[..., 0]
        P_end, w = P[..., -1], Db[..., -1, :] * lr
    return Coefficients(A, R * lr[..., None, :], m, P_end, w, Xa, Xb, R, lr)


def _assemble(xp, col0, D):
    """The (..., b+1, b+1) cotangent of a decay matrix from those of its column 0 (rows 1..b) and
    of its block 1..b."""
    out = xp.zeros(D.shape[:-2] + (D.shape[-2] + 1, D.shape[-1] + 1), dtype=D.dtype)
    out[..., 1:, 0] = col0
    out[..., 1:, 1:] = D
    return out


def coefficients_vjp(xp, coef, dA, dC, dm, dP_end, dw):
    """(dlr, dalpha, dbeta) (..., b) from the coefficients' cotangents (dm, dP_end, dw None for gd)."""
    lr = coef.lr
    dlr = (dC * coef.R).sum(axis=-2)
    dR = dC * lr[..., None, :]
    dbeta = None
    if coef.Xb is None:
        dDa = dR
    else:
        Da, Db, P = coef.Xa[..., 1:, 1:], coef.Xb[..., 1:, 1:], coef.Xb[..., 1:, 0]
        dlr = dlr + dw * Db[..., -1, :]
        dDb = full_matmul(xp, Da.swapaxes(-1, -2), dR)
        dDb[..., -1, :] += dw * lr
        dDa = full_matmul(xp, dR, Db.swapaxes(-1, -2)) + dm[..., :, None] * P[..., None, :]
        dP = full_matmul(xp, Da.swapaxes(-1, -2), dm[..., None])[..., 0]
        dP[..., -1] += dP_end
        dbeta = decay_matrix_vjp(xp, coef.Xb, _assemble(xp, dP, dDb))
    return dlr, decay_matrix_vjp(xp, coef.Xa, _assemble(xp, dA, dDa)), dbeta


# ---------------------------------------------------------------- chunk end

def per_matrix(x):
    """A per-batch scalar (...,) against matrices (..., m, n)."""
    return x[..., None, None]


def chunk_end(xp, coef, s_bar, S_bar, factors):
    """s_b = A_b s̄ + m_b S̄ − Eᵀ diag(C_b·) F and S_b = P_b S̄ − Eᵀ diag(w) F, per parameter."""
    Cb, Ab = coef.C[..., -1, :, None], per_matrix(coef.A[..., -1])
    s_lin, S_out = [], []
    for p, (E, F) in enumerate(factors):
        x = Ab * s_bar[p] - xp.matmul(E.swapaxes(-1, -2), Cb * F)
        if coef.m is not None:
            x = x + per_matrix(coef.m[..., -1]) * S_bar[p]
            S_out.append(per_matrix(coef.P_end) * S_bar[p]
                         - xp.matmul(E.swapaxes(-1, -2), coef.w[..., :, None] * F))
        s_lin.append(x)
    return tuple(s_lin), (tuple(S_out) if coef.m is not None else None)


def chunk_end_vjp(xp, coef, s_bar, S_bar, factors, ds_lin, dS_out, acc):
    """Transpose of `chunk_end`. Accumulates ds̄, dS̄, dE, dF into acc; returns (dA_b, dm_b,
    dP_end, dC_b·, dw), where e_iᵀ X f_i is the row sum of E ⊙ (F Xᵀ): matmuls, never a
    per-token matrix."""
    Cb = coef.C[..., -1, :]
    dA_b = dm_b = dP_end = 0.0
    dC_b, dw = xp.zeros_like(Cb), None if coef.w is None else xp.zeros_like(coef.w)
    for p, (E, F) in enumerate(factors):
        g = ds_lin[p]
        acc.ds_bar[p] = acc.ds_bar[p] + per_matrix(coef.A[..., -1]) * g
        dA_b = dA_b + (g * s_bar[p]).sum(axis=(-2, -1))
        FgT = xp.matmul(F, g.swapaxes(-1, -2))
        dC_b = dC_b - (E * FgT).sum(axis=-1)
        acc.dE[p] = acc.dE[p] - Cb[..., None] * FgT
        acc.dF[p] = acc.dF[p] - Cb[..., None] * xp.matmul(E, g)
        if coef.m is None:
            continue
        G = dS_out[p]
        acc.dS_bar[p] = acc.dS_bar[p] + per_matrix(coef.m[..., -1]) * g + per_matrix(coef.P_end) * G
        dm_b = dm_b + (g * S_bar[p]).sum(axis=(-2, -1))
        dP_end = dP_end + (G * S_bar[p]).sum(axis=(-2, -1))
        FGT = xp.matmul(F, G.swapaxes(-1, -2))
        dw = dw - (E * FGT).sum(axis=-1)
        acc.dE[p] = acc.dE[p] - coef.w[..., :, None] * FGT
        acc.dF[p] = acc.dF[p] - coef.w[..., :, None] * xp.matmul(E, G)
    return dA_b, dm_b, dP_end, dC_b, dw
