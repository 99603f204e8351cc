"""The anchored chunked scan (DESIGN §4) for every rule outside the exact family, with its backward.

Inside a chunk every token's gradient is taken at the chunk's starting exposed weights W̄ (at α_i·W̄
for grad_at="retained"), so all b gradients of a chunk are rank-1 factor pairs computed at once with
batched matmuls (linear: G_i = ψ_i k_iᵀ; mlp: G1_i = g_u,i a_iᵀ, G2_i = g_z,i k_iᵀ, paper §5.1). The
stored quantity s ← α·s + U and the momentum S ← β·S − lr·G are then linear recurrences whose closed
forms use decay matrices built in log space (a masked segment sum, as Mamba2: β = 0 gives exact
zeros, never −inf − (−inf)):

    s_t = A_t s̄ + m_t S̄ − Σ_{i≤t} C_ti e_i f_iᵀ          (chunk end: one matmul of the factors)

Elastic net's threshold is applied once at the chunk end; in-chunk reads follow docs/internals.md
(dual form for none / l2 / elastic net / lq's frozen normaliser; W̄ for kl and sigmoid), the chunk's
last token reads the returned state. Derivations: docs/derivations/chunked.md (forward) and
docs/derivations/scan-backward.md (backward).

    Y, final_state, saved = anchored_scan_fwd(state, K, V, Q, bias=..., lr=..., alpha=..., chunk=64)
    grads = anchored_scan_bwd(saved, dY, (dparams, dmomentum))
    Y, *params, *momentum = anchored_scan(*params, *momentum, K, V, Q, lr, alpha, delta, beta,
                                          memory=..., bias=..., retention=..., algorithm=..., chunk=64)

The last one is a single `mirascore.autodiff` primitive whose VJP is `anchored_scan_bwd`. Arrays are
numpy or CuPy; the compute dtype is the inputs' floating dtype. On CuPy the products go through
`mirascore.gpu.blas`, the chunk loops are replayed as CUDA graphs (`mirascore.gpu.graph`) and the
elementwise chains of second_order.py run as `mirascore.gpu.fused` kernels (docs/internals.md).
"""
from typing import NamedTuple

import numpy as np

import mirascore.autodiff as ad

from .._xp import matmul as mm
from .._xp import namespace
from ..autodiff.core import tree_leaves
from ..autodiff.numpy import unbroadcast
from . import second_order as so

# ---------------------------------------------------------------- static description of a run


class _Rule(NamedTuple):
    memory: object
    bias: object
    retention: object
    algorithm: object
    chunk: int

    @property
    def momentum(self):
        return self.algorithm.name == "momentum"

    @property
    def retained(self):
        return getattr(self.retention, "grad_at", "state") == "retained"

    @property
    def anchor_reads(self):
        """kl and sigmoid read W̄ inside a chunk (docs/internals.md); the others use the dual form."""
        return self.retention.name in ("kl", "sigmoid")


class _Tokens(NamedTuple):
    """Per-token inputs, broadcast to the batch: K, Q (..., T, d_in), V (..., T, d_out); gates
    lr, alpha (..., T); delta (..., T) or None; beta (..., T) or None."""
    K: object
    V: object
    Q: object
    lr: object
    alpha: object
    delta: object
    beta: object

    def window(self, start, stop):
        """Tokens start..stop−1."""
        def cut(x, n):
            return None if x is None else x[(Ellipsis, slice(start, stop)) + (slice(None),) * n]
        return _Tokens(cut(self.K, 1), cut(self.V, 1), cut(self.Q, 1), cut(self.lr, 0),
                       cut(self.alpha, 0), cut(self.delta, 0), cut(self.beta, 0))


class Saved(NamedTuple):
    """What the backward needs: the rule, the broadcast inputs, each chunk's starting stored
    quantity and momentum, per parameter stacked over chunks (everything inside a chunk is
    recomputed), and the inputs' shapes."""
    rule: object
    tokens: object
    s_in: tuple
    S_in: tuple | None
    shapes: dict


class Grads(NamedTuple):
    """Gradients of the anchored scan, each in its input's shape (None where the input was None)."""
    params: tuple
    momentum: tuple | None
    K: object
    V: object
    Q: object
    lr: object
    alpha: object
    delta: object
    beta: object


# ---------------------------------------------------------------- forward


def anchored_scan_fwd(state, K, V, Q, *, bias, lr, alpha=1.0, delta=None, beta=None, chunk=64):
    """The anchored chunked scan of DESIGN §4.

    state: MemoryState (params = the stored quantity, momentum for momentum()); K, Q (..., T, d_in),
    V (..., T, d_out); gates broadcast against (..., T). Returns (Y (..., T, d_out), final
    MemoryState, saved), Y read after each token's update.
    """
    rule = _Rule(state.memory, bias, state.retention, state.algorithm, int(chunk))
    _check_rule(rule, delta, beta)
    params, momentum, tokens, shapes = _broadcast(rule, state.params, state.momentum, K, V, Q,
                                                  lr, alpha, delta, beta)
    Y, s, S, s_in, S_in = _device_call(_forward, rule, params, momentum, tokens)
    final = state._replace(params=s, momentum=S)
    return Y, final, Saved(rule, tokens, s_in, S_in, shapes)


def _forward(rule, params, momentum, tokens):
    """The chunk loop: (Y, final params, final momentum, each chunk's starting params and
    momentum stacked along a new leading axis). Results are written into preallocated arrays:
    CuPy's concatenate of many pieces copies pointers from the host, which a CUDA graph cannot
    capture."""
    xp, T = namespace(*params, tokens.K), tokens.K.shape[-2]
    bounds = _bounds(T, rule.chunk)
    Y = xp.empty(tokens.K.shape[:-2] + (T, rule.memory.d_out), dtype=tokens.K.dtype)

    def stack(states):
        return None if states is None or not bounds else \
            tuple(xp.empty((len(bounds),) + x.shape, dtype=x.dtype) for x in states)
    s, S = params, momentum
    s_in, S_in = stack(s), stack(S)
    for c, (start, stop) in enumerate(bounds):
        for into, state in ((s_in, s), (S_in, S)):
            for buffer, x in zip(into or (), state or ()):
                buffer[c] = x
        Yc, s, S, _ = _chunk_forward(rule, s, S, tokens.window(start, stop))
        Y[..., start:stop, :] = Yc
    return Y, tuple(s), None if S is None else tuple(S), s_in, S_in


def _bounds(T, chunk):
    return [(start, min(start + chunk, T)) for start in range(0, T, chunk)]


def _device_call(fn, rule, *args):
    """fn(rule, *args); on CuPy replayed as a CUDA graph once the shapes repeat
    (mirascore.gpu.graph), which removes the Python cost of each chunk's hundred small kernels."""
    if namespace(*tree_leaves(args)) is np:
        return fn(rule, *args)
    from ..gpu import graph
    return graph.call(lambda *a: fn(rule, *a), args, key=(fn.__name__, rule))


def _check_rule(rule, delta, beta):
    if rule.algorithm.name not in ("gd", "momentum"):
        raise ValueError(f"the anchored scan runs gd and momentum; got algorithm "
                         f"{rule.algorithm.name!r} (implicit() belongs to the exact family)")
    if rule.momentum and beta is None:
        raise ValueError("momentum() needs the beta= gate")
    if getattr(rule.bias, "needs_delta", False) and delta is None:
        raise ValueError("huber(delta=None) needs the delta= gate")


def _broadcast(rule, params, momentum, K, V, Q, lr, alpha, delta, beta):
    """Everything broadcast to one batch shape and the compute dtype; the original shapes kept
    for summing gradients back (`unbroadcast`)."""
    xp = namespace(*params, K, V, Q)
    dtype = np.result_type(*(x.dtype for x in (*params, K, V, Q)))
    gates = {"lr": lr, "alpha": 1.0 if alpha is None else alpha, "delta": delta,
             "beta": beta if rule.momentum else None}
    gates = {n: None if g is None else xp.asarray(g, dtype=dtype) for n, g in gates.items()}
    T = K.shape[-2]
    batch = np.broadcast_shapes(*(p.shape[:-2] for p in params),
                                *(m.shape[:-2] for m in momentum or ()),
                                K.shape[:-2], V.shape[:-2], Q.shape[:-2],
                                *(g.shape[:-1] for g in gates.values() if g is not None and g.ndim))
    shapes = {"params": [p.shape for p in params],
              "momentum": None if momentum is None else [m.shape for m in momentum],
              "K": K.shape, "V": V.shape, "Q": Q.shape,
              **{n: None if g is None else g.shape for n, g in gates.items()}}

    def to(x, tail):
        return xp.broadcast_to(xp.asarray(x, dtype=dtype), batch + tail)
    params = tuple(to(p, p.shape[-2:]) for p in params)
    if rule.momentum:
        momentum = tuple(to(m, m.shape[-2:]) for m in momentum) if momentum is not None else \
            tuple(xp.zeros(p.shape, dtype=dtype) for p in params)
    else:
        momentum = None
    tokens = _Tokens(to(K, (T, K.shape[-1])), to(V, (T, V.shape[-1])), to(Q, (T, Q.shape[-1])),
                     *(None if gates[n] is None else to(gates[n], (T,))
                       for n in ("lr", "alpha", "delta", "beta")))
    return params, momentum, tokens, shapes


class _ChunkCache(NamedTuple):
    """One chunk's forward intermediates, recomputed in the backward."""
    s_in: tuple           # stored quantity handed in by the previous chunk, per param
    s_bar: tuple          # canonical stored quantity at the chunk start (the anchor), per param
    W_bar: tuple          # exposed anchor weights
    S_bar: tuple | None   # momentum at the chunk start
    mcache: object        # memory forward at the anchor over the chunk's keys
    Yk: object            # M(c·W̄, k_i): (..., b, d_out)
    psi: object           # ψ_i: (..., b, d_out)
    factors: tuple        # (E, F) per parameter
    gcache: object
    co: object            # _Coef
    s_lin: tuple          # chunk-end stored quantity before prox
    s_out: tuple
    W_out: tuple
    lcache: object        # memory forward of the last token's read
    rcache: object        # in-chunk reads' intermediates (or None when b = 1)


def _chunk_forward(rule, s_in, S_in, tok):
    """One chunk: (Y (..., b, d_out), s_out, S_out, cache)."""
    mem, ret = rule.memory, rule.retention
    s_bar = tuple(so.canonical(ret, x) for x in s_in)
    W_bar = tuple(so.expose(ret, x) for x in s_bar)
    c = tok.alpha if rule.retained else None
    Yk, mcache = so.memory_forward(mem, W_bar, tok.K, c)
    psi = rule.bias.psi(Yk, tok.V, tok.delta)
    factors, gcache = so.memory_factors(mem, mcache, psi)
    co = _coefficients(tok.lr, tok.alpha, tok.beta)
    s_lin, S_out = _chunk_end(co, s_bar, S_in, factors)
    s_out = tuple(so.prox(ret, x) for x in s_lin)
    W_out = tuple(so.expose(ret, x) for x in s_out)
    y_last, lcache = so.memory_forward(mem, W_out, tok.Q[..., -1:, :])
    Y, rcache = y_last, None
    if tok.Q.shape[-2] > 1:
        Y_in, rcache = _reads(rule, co, s_bar, W_bar, S_in, factors, tok.Q[..., :-1, :])
        Y = namespace(Y_in).concatenate([Y_in, y_last], axis=-2)
    cache = _ChunkCache(s_in, s_bar, W_bar, S_in, mcache, Yk, psi, factors, gcache, co, s_lin, s_out,
                        W_out, lcache, rcache)
    return Y, s_out, S_out, cache


# ---------------------------------------------------------------- decay coefficients


class _Coef(NamedTuple):
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


def _decay(gate):
    """D (..., b+1, b+1), D_ti = Π_{i<j≤t} gate_j for i ≤ t (indices 0..b; 0 = chunk start), else 0.

    Built as exp of a masked segment sum of log gates (Mamba2's segsum): the strictly lower part of
    log gate_t is cumulated down each column, so a zero gate gives −inf → exactly 0, with no
    −inf − (−inf); the products never over/underflow their way to NaN for any T.
    """
    xp = namespace(gate)
    b = gate.shape[-1]
    pos = gate > 0
    lg = xp.where(pos, xp.log(xp.where(pos, gate, 1.0)), -xp.inf)
    lg = xp.concatenate([xp.zeros(gate.shape[:-1] + (1,), dtype=gate.dtype), lg], axis=-1)
    t = xp.arange(b + 1)
    strict = t[:, None] > t[None, :]
    seg = xp.cumsum(xp.where(strict, lg[..., :, None], 0.0), axis=-2)
    return xp.where(t[:, None] >= t[None, :], xp.exp(seg), 0.0)


def _decay_vjp(D, dD):
    """d gate (..., b) from dD (..., b+1, b+1): for i < j ≤ t, D_ti = D_tj·gate_j·D_{j−1,i}, so
    d gate_j = Σ_t D_tj (dD Dᵀ)_{t,j−1}. No division by the gate (exact at β = 0); D's structural
    zeros keep entries of dD on or above the diagonal out of the sum."""
    M = mm(dD, D.swapaxes(-1, -2))
    return (D[..., :, 1:] * M[..., :, :-1]).sum(axis=-2)


def _coefficients(lr, alpha, beta):
    """_Coef for one chunk's gates lr, alpha, beta (..., b); beta None for gd."""
    Xa = _decay(alpha)
    A, Da = Xa[..., 1:, 0], Xa[..., 1:, 1:]
    m = P_end = w = Xb = None
    R = Da
    if beta is not None:
        Xb = _decay(beta)
        P, Db = Xb[..., 1:, 0], Xb[..., 1:, 1:]
        R = mm(Da, Db)
        m = mm(Da, P[..., None])[..., 0]
        P_end, w = P[..., -1], Db[..., -1, :] * lr
    return _Coef(A, R * lr[..., None, :], m, P_end, w, Xa, Xb, R, lr)


def _assemble(col0, D):
    """The (..., b+1, b+1) cotangent of a decay matrix from those of its column 0 (rows 1..b) and
    of its block 1..b."""
    xp = namespace(D)
    out = xp.zeros(D.shape[:-2] + (D.shape[-2] + 1, D.shape[-1] + 1), dtype=D.dtype)
    out[..., 1:, 0] = col0
    out[..., 1:, 1:] = D
    return out


def _coefficients_vjp(co, dA, dC, dm, dP_end, dw):
    """(dlr, dalpha, dbeta) (..., b) from the coefficients' cotangents (dm, dP_end, dw None for gd)."""
    lr = co.lr
    dlr = (dC * co.R).sum(axis=-2)
    dR = dC * lr[..., None, :]
    dbeta = None
    if co.Xb is None:
        dDa = dR
    else:
        Da, Db, P = co.Xa[..., 1:, 1:], co.Xb[..., 1:, 1:], co.Xb[..., 1:, 0]
        dlr = dlr + dw * Db[..., -1, :]
        dDb = mm(Da.swapaxes(-1, -2), dR)
        dDb[..., -1, :] += dw * lr
        dDa = mm(dR, Db.swapaxes(-1, -2)) + dm[..., :, None] * P[..., None, :]
        dP = mm(Da.swapaxes(-1, -2), dm[..., None])[..., 0]
        dP[..., -1] += dP_end
        dbeta = _decay_vjp(co.Xb, _assemble(dP, dDb))
    return dlr, _decay_vjp(co.Xa, _assemble(dA, dDa)), dbeta


# ---------------------------------------------------------------- chunk end


def _mat(x):
    """A per-batch scalar (...,) against matrices (..., m, n)."""
    return x[..., None, None]


def _chunk_end(co, s_bar, S_bar, factors):
    """s_b = A_b s̄ + m_b S̄ − Eᵀ diag(C_b·) F and S_b = P_b S̄ − Eᵀ diag(w) F, per parameter."""
    Cb, Ab = co.C[..., -1, :, None], _mat(co.A[..., -1])
    s_lin, S_out = [], []
    for p, (E, F) in enumerate(factors):
        x = Ab * s_bar[p] - mm(E.swapaxes(-1, -2), Cb * F)
        if co.m is not None:
            x = x + _mat(co.m[..., -1]) * S_bar[p]
            S_out.append(_mat(co.P_end) * S_bar[p] - mm(E.swapaxes(-1, -2), co.w[..., :, None] * F))
        s_lin.append(x)
    return tuple(s_lin), (tuple(S_out) if co.m is not None else None)


# ---------------------------------------------------------------- in-chunk reads


class _Rows(NamedTuple):
    """The coefficients' rows of the in-chunk reads (t = b − 1 rows)."""
    A: object
    m: object
    C: object


def _rows(co, t):
    return _Rows(co.A[..., :t], None if co.m is None else co.m[..., :t], co.C[..., :t, :])


def _dual(X, base, S_bar, rows, E, F):
    """One parameter's dual-form read, o_t = A_t s̄ x_t + m_t S̄ x_t − Σ_i C_ti e_i (f_i·x_t):
    X (..., t, n), base s̄ and S̄ (..., m, n), E (..., b, m), F (..., b, n) -> (..., t, m)."""
    O = rows.A[..., None] * mm(X, base.swapaxes(-1, -2)) - mm(rows.C * mm(X, F.swapaxes(-1, -2)), E)
    if rows.m is not None:
        O = O + rows.m[..., None] * mm(X, S_bar.swapaxes(-1, -2))
    return O


def _dual_vjp(X, base, S_bar, rows, E, F, G):
    """VJP of `_dual` for cotangent G (..., t, m): (dX, dbase, dS_bar, dA, dm, dC, dE, dF)."""
    AG = rows.A[..., None] * G
    dA = (G * mm(X, base.swapaxes(-1, -2))).sum(axis=-1)
    dbase = mm(AG.swapaxes(-1, -2), X)
    H = mm(G, E.swapaxes(-1, -2))               # (t, b): ⟨G_t, e_i⟩
    Rx = mm(X, F.swapaxes(-1, -2))              # (t, b): ⟨f_i, x_t⟩
    CH = rows.C * H
    dX = mm(AG, base) - mm(CH, F)
    dF = -mm(CH.swapaxes(-1, -2), X)
    dE = -mm((rows.C * Rx).swapaxes(-1, -2), G)
    dS = dm = None
    if rows.m is not None:
        mG = rows.m[..., None] * G
        dm = (G * mm(X, S_bar.swapaxes(-1, -2))).sum(axis=-1)
        dS = mm(mG.swapaxes(-1, -2), X)
        dX = dX + mm(mG, S_bar)
    return dX, dbase, dS, dA, dm, -H * Rx, dE, dF


class _DualCache(NamedTuple):
    """Intermediates of the dual-form reads: per parameter its input X, raw output O_raw and
    read normaliser ν (lq's frozen anchor normaliser; 1 otherwise); mlp adds Z (pre-gelu) and
    the LN of U."""
    rows: object
    X: tuple
    O_raw: tuple
    nu: tuple
    n: tuple
    Z: object
    u_hat: object
    s: object


def _reads(rule, co, s_bar, W_bar, S_bar, factors, Qin):
    """In-chunk reads for the rows of Qin (..., t, d_in) -> (Y (..., t, d_out), cache)."""
    mem, ret = rule.memory, rule.retention
    if rule.anchor_reads:
        return so.memory_forward(mem, W_bar, Qin)
    rows = _rows(co, Qin.shape[-2])
    if ret.name == "lq":
        nus, ns = zip(*(so.lq_scale(x, ret.q, ret.eps) for x in s_bar))
    else:
        nus, ns = (1.0,) * len(s_bar), (None,) * len(s_bar)
    S = S_bar if S_bar is not None else (None,) * len(s_bar)

    def read(p, X):
        O = _dual(X, s_bar[p], S[p], rows, *factors[p])
        return O, nus[p] * O
    if mem.name == "linear":
        O, Y = read(0, Qin)
        return Y, _DualCache(rows, (Qin,), (O,), nus, ns, None, None, None)
    O2, Z = read(1, Qin)                         # W2 (h, d) reads q
    Aq = so.gelu(Z)
    O1, U = read(0, Aq)                          # W1 (d, h) reads gelu(z)
    u_hat, s = so.layer_norm(U)
    return Qin + u_hat, _DualCache(rows, (Aq, Qin), (O1, O2), nus, ns, Z, u_hat, s)


def _reads_vjp(rule, cache, rc, dYin, acc):
    """Backward of the in-chunk reads: returns dQin and accumulates into `acc` (the chunk's
    cotangent accumulator: ds_bar, dS_bar, dW_bar, dnu, dE, dF, dA, dm, dC)."""
    mem = rule.memory
    if rule.anchor_reads:
        dP, dQ, _ = so.memory_apply_vjp(mem, rc, dYin)
        for p, d in enumerate(dP):
            acc.dW_bar[p] = acc.dW_bar[p] + d
        return dQ

    def read_vjp(p, dO):
        acc.dnu[p] = acc.dnu[p] + (dO * rc.O_raw[p]).sum(axis=(-2, -1), keepdims=True)
        S = None if cache.S_bar is None else cache.S_bar[p]
        dX, dbase, dS, dA, dm, dC, dE, dF = _dual_vjp(rc.X[p], cache.s_bar[p], S, rc.rows,
                                                      *cache.factors[p], rc.nu[p] * dO)
        acc.ds_bar[p] = acc.ds_bar[p] + dbase
        if dS is not None:
            acc.dS_bar[p] = acc.dS_bar[p] + dS
            acc.dm_rows = acc.dm_rows + dm
        acc.dA_rows = acc.dA_rows + dA
        acc.dC_rows = acc.dC_rows + dC
        acc.dE[p] = acc.dE[p] + dE
        acc.dF[p] = acc.dF[p] + dF
        return dX
    if mem.name == "linear":
        return read_vjp(0, dYin)
    dU = so.ln_project(dYin, rc.u_hat, rc.s)     # y = q + LN(U)
    dAq = read_vjp(0, dU)
    dZ = dAq * so.gelu_prime(rc.Z)
    return dYin + read_vjp(1, dZ)


# ---------------------------------------------------------------- backward


class _Acc:
    """Cotangent accumulator of one chunk's anchor-side quantities (mutable, chunk-local)."""

    def __init__(self, cache, t, xp):
        zeros = xp.zeros_like
        n = len(cache.s_bar)
        self.ds_bar = [zeros(x) for x in cache.s_bar]
        self.dS_bar = None if cache.S_bar is None else [zeros(x) for x in cache.S_bar]
        self.dW_bar = [zeros(x) for x in cache.W_bar]
        self.dnu = [0.0] * n
        self.dE = [zeros(E) for E, _ in cache.factors]
        self.dF = [zeros(F) for _, F in cache.factors]
        co = cache.co
        self.dA_rows = zeros(co.A[..., :t])
        self.dm_rows = None if co.m is None else zeros(co.m[..., :t])
        self.dC_rows = zeros(co.C[..., :t, :])


def _chunk_backward(rule, cache, tok, dY, ds_out, dS_out):
    """Reverse one chunk. dY (..., b, d_out); ds_out, dS_out: cotangents of the chunk's returned
    stored quantity and momentum (per param). Returns (ds_in, dS_in, token grads as a _Tokens)."""
    mem, co = rule.memory, cache.co
    xp = namespace(dY)
    b = tok.K.shape[-2]
    acc = _Acc(cache, b - 1, xp)
    ds_lin, dq_last = _last_read_vjp(rule, cache, dY[..., -1:, :], ds_out)
    dA_b, dm_b, dP_end, dC_b, dw = _chunk_end_vjp(cache, ds_lin, dS_out, acc)
    dQ = dq_last
    if b > 1:
        dQin = _reads_vjp(rule, cache, cache.rcache, dY[..., :-1, :], acc)
        dQ = xp.concatenate([dQin, dq_last], axis=-2)

    # coefficients -> gates
    dA = xp.concatenate([acc.dA_rows, dA_b[..., None]], axis=-1)
    dC = xp.concatenate([acc.dC_rows, dC_b[..., None, :]], axis=-2)
    dm = None if co.m is None else xp.concatenate([acc.dm_rows, dm_b[..., None]], axis=-1)
    dlr, dalpha, dbeta = _coefficients_vjp(co, dA, dC, dm, dP_end, dw)

    # factors -> anchor, keys, values, δ, and c = α for grad_at="retained" (second-order terms)
    dWg, dK, dV, ddelta, dc = so.factors_vjp(mem, rule.bias, cache.mcache, cache.gcache,
                                             cache.factors, cache.Yk, cache.psi, tok.V, tok.delta,
                                             tuple(zip(acc.dE, acc.dF)))
    if dc is not None:
        dalpha = dalpha + dc
    ds_in = _anchor_vjp(rule, cache, acc, dWg)
    return ds_in, acc.dS_bar, _Tokens(dK, dV, dQ, dlr, dalpha, ddelta, dbeta)


def _last_read_vjp(rule, cache, dy_last, ds_out):
    """The chunk's last token reads M(expose(s_out), q_b); s_out = prox(s_lin).
    Returns (ds_lin per param, dq_b (..., 1, d_in))."""
    ret = rule.retention
    dW_out, dq_last, _ = so.memory_apply_vjp(rule.memory, cache.lcache, dy_last)
    ds_lin = [so.prox_vjp(ret, s_lin, ds + so.expose_vjp(ret, s_out, W_out, dW))
              for s_lin, ds, s_out, W_out, dW in zip(cache.s_lin, ds_out, cache.s_out,
                                                       cache.W_out, dW_out)]
    return ds_lin, dq_last


def _chunk_end_vjp(cache, ds_lin, dS_out, acc):
    """Transpose of s_lin = A_b s̄ + m_b S̄ − Eᵀ diag(C_b·) F and S_out = P_b S̄ − Eᵀ diag(w) F.
    Accumulates ds̄, dS̄, dE, dF into acc; returns (dA_b, dm_b, dP_end, dC_b·, dw), where
    e_iᵀ X f_i is the row sum of E ⊙ (F Xᵀ): matmuls, never a per-token matrix."""
    co = cache.co
    xp = namespace(co.C)
    Cb = co.C[..., -1, :]
    dA_b = dm_b = dP_end = 0.0
    dC_b, dw = xp.zeros_like(Cb), None if co.w is None else xp.zeros_like(co.w)
    for p, (E, F) in enumerate(cache.factors):
        g = ds_lin[p]
        acc.ds_bar[p] = acc.ds_bar[p] + _mat(co.A[..., -1]) * g
        dA_b = dA_b + (g * cache.s_bar[p]).sum(axis=(-2, -1))
        FgT = mm(F, g.swapaxes(-1, -2))
        dC_b = dC_b - (E * FgT).sum(axis=-1)
        acc.dE[p] = acc.dE[p] - Cb[..., None] * FgT
        acc.dF[p] = acc.dF[p] - Cb[..., None] * mm(E, g)
        if co.m is None:
            continue
        G, S_bar = dS_out[p], cache.S_bar[p]
        acc.dS_bar[p] = acc.dS_bar[p] + _mat(co.m[..., -1]) * g + _mat(co.P_end) * G
        dm_b = dm_b + (g * S_bar).sum(axis=(-2, -1))
        dP_end = dP_end + (G * S_bar).sum(axis=(-2, -1))
        FGT = mm(F, G.swapaxes(-1, -2))
        dw = dw - (E * FGT).sum(axis=-1)
        acc.dE[p] = acc.dE[p] - co.w[..., :, None] * FGT
        acc.dF[p] = acc.dF[p] - co.w[..., :, None] * mm(E, G)
    return dA_b, dm_b, dP_end, dC_b, dw


def _anchor_vjp(rule, cache, acc, dWg):
    """W̄ = expose(s̄) (gradient point and kl/sigmoid reads), lq's frozen read normaliser ν̄(s̄),
    and s̄ = canonical(s_in): the cotangent of the stored quantity handed in, per param."""
    ret = rule.retention
    ds_in = []
    for p, s_bar in enumerate(cache.s_bar):
        ds = acc.ds_bar[p] + so.expose_vjp(ret, s_bar, cache.W_bar[p], acc.dW_bar[p] + dWg[p])
        if ret.name == "lq" and cache.rcache is not None:
            ds = ds + so.lq_scale_vjp(s_bar, ret.q, ret.eps, cache.rcache.n[p], acc.dnu[p])
        ds_in.append(so.canonical_vjp(ret, cache.s_in[p], ds))
    return ds_in


def anchored_scan_bwd(saved, dY, dfinal=None):
    """Gradients of `anchored_scan_fwd`'s outputs' cotangents w.r.t. its inputs.

    dY (..., T, d_out) or None; dfinal = (dparams, dmomentum) for the final state, each a tuple
    (entries may be None) or None. Returns Grads, every entry summed back to its input's shape.
    """
    rule, tok = saved.rule, saved.tokens
    xp = namespace(tok.K)
    dparams, dmom = (None, None) if dfinal is None else dfinal
    if saved.s_in is None:                       # T = 0
        return _grads(saved, xp, None, None, None, dparams, dmom)
    # the final state's cotangents, full (broadcast) shape; the stored quantity keeps its shape
    like = [x[0] for x in saved.s_in]
    ds = tuple(_zeros_or(xp, d, x) for d, x in zip(dparams or (None,) * len(like), like))
    dS = tuple(_zeros_or(xp, d, x) for d, x in zip(dmom or (None,) * len(like), like)) \
        if rule.momentum else None
    dY = None if dY is None else xp.broadcast_to(dY, tok.Q.shape[:-1] + (rule.memory.d_out,))
    ds, dS, dtok = _device_call(_backward, rule, tok, saved.s_in, saved.S_in, dY, ds, dS)
    return _grads(saved, xp, dtok, ds, dS, dparams, dmom)


def _backward(rule, tok, s_in, S_in, dY, ds, dS):
    """The chunk loop in reverse: (ds, dS at the scan's start, token gradients as a _Tokens of
    full-length arrays, None where the input was None)."""
    xp = namespace(tok.K)
    grads = dict.fromkeys(_Tokens._fields)          # full-length arrays, filled chunk by chunk
    for c, (start, stop) in reversed(list(enumerate(_bounds(tok.K.shape[-2], rule.chunk)))):
        window = tok.window(start, stop)
        _, _, _, cache = _chunk_forward(rule, tuple(x[c] for x in s_in),
                                        None if S_in is None else tuple(x[c] for x in S_in), window)
        dYc = xp.zeros(window.Q.shape[:-1] + (rule.memory.d_out,), dtype=tok.K.dtype) \
            if dY is None else dY[..., start:stop, :]
        ds, dS, dtok = _chunk_backward(rule, cache, window, dYc, ds, dS)
        for name, g in zip(_Tokens._fields, dtok):
            if g is None:
                continue
            if grads[name] is None:
                grads[name] = xp.empty(getattr(tok, name).shape, dtype=g.dtype)
            cut = (Ellipsis, slice(start, stop)) + ((slice(None),) if name in ("K", "V", "Q") else ())
            grads[name][cut] = g
    dtok = _Tokens(**grads)
    return tuple(ds), None if dS is None else tuple(dS), dtok


def _zeros_or(xp, d, like):
    """A full-shape cotangent: d broadcast to like's shape, or zeros."""
    if d is None:
        return xp.zeros(like.shape, dtype=like.dtype)
    return xp.broadcast_to(xp.asarray(d, dtype=like.dtype), like.shape)


def _grads(saved, xp, dtok, ds, dS, dparams, dmom):
    """Everything summed back to the inputs' shapes; dtok None for T = 0."""
    sh = saved.shapes
    if dtok is None:                              # T = 0: the scan is the identity on the state
        zeros = [xp.zeros(s) for s in sh["params"]]
        params = tuple(z if d is None else unbroadcast(xp.asarray(d), s)
                       for z, d, s in zip(zeros, dparams or (None,) * len(zeros), sh["params"]))
        mom = None
        if sh["momentum"] is not None:
            mom = tuple(xp.zeros(s) if d is None else unbroadcast(xp.asarray(d), s)
                        for d, s in zip(dmom or (None,) * len(sh["momentum"]), sh["momentum"]))
        empty = {n: None if sh[n] is None else xp.zeros(sh[n]) for n in _Tokens._fields}
        return Grads(params, mom, **empty)

    def back(name):
        g = getattr(dtok, name)
        return None if g is None or sh[name] is None else unbroadcast(g, sh[name])
    params = tuple(unbroadcast(d, s) for d, s in zip(ds, sh["params"]))
    mom = None if sh["momentum"] is None or dS is None else \
        tuple(unbroadcast(d, s) for d, s in zip(dS, sh["momentum"]))
    return Grads(params, mom, *(back(n) for n in _Tokens._fields))


# ---------------------------------------------------------------- one autodiff primitive


class _Cotangents(tuple):
    """The cotangent of a tuple-valued primitive, one entry per output (None = zero); the tape
    adds these when several outputs of one call are used."""

    def __add__(self, other):
        return _Cotangents(a if b is None else b if a is None else a + b for a, b in zip(self, other))

    __radd__ = __add__


@ad.primitive
def _pick(outputs, i):
    """Output i of a tuple-valued primitive, as its own differentiable value."""
    return outputs[i]


ad.defvjp(_pick, lambda ans, outputs, i: lambda g: _Cotangents(
    g if j == i else None for j in range(len(outputs))), None)


def _split(rule, arrays):
    """The primitive's positional arrays -> (params, momentum, K, V, Q, lr, alpha, delta, beta)."""
    n = len(rule.memory.param_shapes())
    n_mom = n if rule.momentum else 0
    if len(arrays) != n + n_mom + 7:
        raise ValueError(f"anchored_scan takes {n} params, {n_mom} momentum arrays and K, V, Q, lr, "
                         f"alpha, delta, beta positionally ({n + n_mom + 7}); got {len(arrays)}")
    params, mom, rest = arrays[:n], arrays[n:n + n_mom], arrays[n + n_mom:]
    return tuple(params), (tuple(mom) if n_mom else None), rest


@ad.primitive
def _anchored_raw(*arrays, memory, bias, retention, algorithm, chunk):
    from ..rules import MemoryState
    rule = _Rule(memory, bias, retention, algorithm, int(chunk))
    params, mom, (K, V, Q, lr, alpha, delta, beta) = _split(rule, arrays)
    state = MemoryState(memory, retention, algorithm, params, mom)
    Y, final, saved = anchored_scan_fwd(state, K, V, Q, bias=bias, lr=lr, alpha=alpha,
                                        delta=delta, beta=beta, chunk=chunk)
    return (Y,) + final.params + (final.momentum or ()) + (saved,)


def _anchored_vjp(argnums, ans, args, kwargs):
    saved = ans[-1]
    n = len(saved.rule.memory.param_shapes())
    n_mom = n if saved.rule.momentum else 0

    def vjp(g):
        g = tuple(g) + (None,) * (len(ans) - len(g))
        dparams = g[1:1 + n]
        dmom = g[1 + n:1 + n + n_mom] if n_mom else None
        gr = anchored_scan_bwd(saved, g[0], (dparams, dmom))
        flat = gr.params + (gr.momentum or ()) + (gr.K, gr.V, gr.Q, gr.lr, gr.alpha, gr.delta, gr.beta)
        return tuple(_like(flat[i], args[i]) for i in argnums)
    return vjp


def _like(g, x):
    """A gradient in the form of its input: a Python float for a float input."""
    if g is None or not isinstance(x, float):
        return g
    return float(g.sum())


ad.defvjp_argnums(_anchored_raw, _anchored_vjp)


def anchored_scan(*arrays, memory, bias, retention, algorithm, chunk=64):
    """The anchored chunked scan as one differentiable operation of `mirascore.autodiff`.

    Positional: params... (the stored quantity, one array per memory parameter), momentum...
    (one per parameter, only for momentum()), K, V, Q, lr, alpha, delta, beta (delta / beta may
    be None). Keywords are the static specs and the chunk size. Returns
    (Y, params'..., momentum'...). Its VJP is the hand-derived `anchored_scan_bwd`.
    """
    out = _anchored_raw(*arrays, memory=memory, bias=bias, retention=retention,
                        algorithm=algorithm, chunk=chunk)
    n = len(memory.param_shapes()) * (2 if algorithm.name == "momentum" else 1)
    return tuple(_pick(out, i) for i in range(1 + n))
