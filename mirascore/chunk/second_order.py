"""Hand-derived VJPs of the per-token pieces of the anchored chunked scan (docs/derivations/scan-backward.md).

The anchored forward evaluates a gradient, G_i = J_W(k_i)ᵀ ψ(M(W̄, k_i) − v_i), at the chunk's anchor
W̄, so its backward needs the VJP of that gradient: second-order terms of the inner loss. This module
holds them, batched over a token axis and written with plain array operations (numpy or CuPy):

  bias       psi_vjp(bias, y, v, delta, dpsi)                 -> (dy, dv, ddelta)
  memory     <mem>_forward(params, K, c)                      -> (Y, cache)       M(c_i·W̄, k_i) for all i
             <mem>_factors(cache, psi)                        -> ((E, F) per parameter, gcache)
             <mem>_grad_vjp(cache, gcache, psi, dfactors)     -> (dparams, dK, dpsi, dc, dinter)
             <mem>_apply_vjp(cache, dY, dinter)               -> (dparams, dK, dc)
  exposing   expose_vjp / canonical_vjp / prox_vjp (retention maps), lq_scale / lq_scale_vjp

Shapes: tokens are rows, K (..., b, d_in), Y and psi (..., b, d_out); one anchor per batch element,
params (..., m, n); `c` is a per-token weight scale (..., b) (α_i for grad_at="retained") or None.
A factor pair (E, F) of one parameter holds the rank-1 gradients G_i = e_i f_iᵀ: E (..., b, m),
F (..., b, n). Gradients of `c` come back as (..., b) arrays (None when c is None).
"""
import math
from typing import NamedTuple

import mirascore.autodiff.numpy as anp

from .._xp import is_cupy, namespace
from .._xp import matmul as mm
from ..memory import LN_EPS

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------- small helpers

def _T(x):
    """Swap the last two axes."""
    return x.swapaxes(-1, -2)


def _rowsum(x):
    """Sum over the last axis, kept: (..., n) -> (..., 1)."""
    return x.sum(axis=-1, keepdims=True)


def _scaled(x, c):
    """x (..., b, n) with row i scaled by c_i; c None means 1."""
    return x if c is None else c[..., None] * x


def _add(a, b):
    """a + b where None means zero."""
    return b if a is None else a if b is None else a + b


def _gauss_cdf(z):
    return 0.5 * (1.0 + anp.erf(z / _SQRT2))


def _gauss_pdf(z):
    return namespace(z).exp(-0.5 * z * z) * _INV_SQRT_2PI


def _fused():
    """mirascore.gpu.fused: one-pass CuPy kernels of the formulas below (imported on CuPy input)."""
    from ..gpu import fused
    return fused


def gelu(z):
    """Exact (erf) GELU, z·Φ(z)."""
    if is_cupy(z):
        return _fused().gelu(z)
    return z * _gauss_cdf(z)


def gelu_prime(z):
    """gelu'(z) = Φ(z) + z φ(z)."""
    if is_cupy(z):
        return _fused().gelu_prime(z)
    return _gauss_cdf(z) + z * _gauss_pdf(z)


def gelu_second(z):
    """gelu''(z) = φ(z)(2 − z²)."""
    if is_cupy(z):
        return _fused().gelu_second(z)
    return _gauss_pdf(z) * (2.0 - z * z)


def layer_norm(u):
    """LN without affine parameters over the last axis: (û, s), s = sqrt(var u + 1e-5) (..., 1)."""
    c = u - u.mean(axis=-1, keepdims=True)
    s = (c * c).mean(axis=-1, keepdims=True) + LN_EPS
    s = namespace(s).sqrt(s)
    return c / s, s


def ln_project(g, u_hat, s):
    """(g − mean g − û·mean(g ⊙ û))/s: LN's backward map at (û, s); symmetric in g, so it is also
    the VJP of itself with respect to g."""
    mean_g, mean_gu = g.mean(axis=-1, keepdims=True), (g * u_hat).mean(axis=-1, keepdims=True)
    if is_cupy(g):
        return _fused().ln_project(g, u_hat, s, mean_g, mean_gu)
    return (g - mean_g - u_hat * mean_gu) / s


# ---------------------------------------------------------------- biases: ψ-VJPs

def psi_vjp(bias, y, v, delta, dpsi):
    """VJP of ψ = bias.psi(y, v, delta): dpsi (..., d_out) -> (dy, dv, ddelta).

    ddelta (...,) only for the per-token δ gate (huber(delta=None)); None otherwise (static δ and
    radius are constants). Away from the kinks (|r_j| = δ, ‖r‖ = δ, r = 0 for p < 2) these are the
    exact derivatives; at a kink the inside branch is taken, as the forward's `≤` does.
    """
    if bias.name == "dot":                       # ψ = −v: no dependence on y
        return 0.0 * dpsi, -dpsi, None
    r = y - v
    dr, ddelta = _PSI_VJPS[bias.name](bias, r, delta, dpsi)
    return dr, -dr, ddelta


def _l2_vjp(bias, r, delta, dpsi):
    return dpsi, None


def _lp_vjp(bias, r, delta, dpsi):
    xp, p = namespace(r), bias.p
    if bias.slope is not None:                   # ψ = tanh(s r)(r² + ε)^((p−1)/2)
        tau, base = xp.tanh(bias.slope * r), r * r + bias.eps
        d = (bias.slope * (1.0 - tau * tau) * base ** (0.5 * (p - 1.0))
             + tau * (p - 1.0) * r * base ** (0.5 * (p - 3.0)))
        return dpsi * d, None
    if p == 1.0:                                 # ψ = sign(r): zero derivative a.e.
        return 0.0 * dpsi, None
    if is_cupy(r):
        return _fused().lp_psi_grad(r, dpsi, p), None
    return dpsi * ((p - 1.0) * xp.abs(r) ** (p - 2.0)), None


def _huber_delta(bias, delta):
    """δ as a number or as (..., 1) against r; whether it is a gate."""
    if bias.delta is not None:
        return bias.delta, False
    return delta[..., None], True


def _huber_vjp(bias, r, delta, dpsi):
    xp = namespace(r, dpsi)
    d, gate = _huber_delta(bias, delta)
    if bias.kind == "coord":                     # ψ = clip(r, −δ, δ)
        inside = xp.abs(r) <= d
        dr = xp.where(inside, dpsi, 0.0)
        ddelta = (xp.where(inside, 0.0, dpsi * xp.sign(r))).sum(axis=-1)
        return dr, ddelta if gate else None
    n = xp.sqrt(_rowsum(r * r))
    inside = n <= d
    if bias.kind == "norm":                      # ψ = r·min(1, δ/‖r‖)
        r_hat = r / xp.where(inside, 1.0, n)     # outside, ‖r‖ > δ > 0
        proj = _rowsum(r_hat * dpsi)
        dr = xp.where(inside, dpsi, (d / xp.where(inside, 1.0, n)) * (dpsi - r_hat * proj))
        ddelta = xp.where(inside, 0.0, proj)[..., 0]
    else:                                        # mixture: ψ = r or δ·sign(r)
        dr = xp.where(inside, dpsi, 0.0)
        ddelta = xp.where(inside, 0.0, _rowsum(dpsi * xp.sign(r)))[..., 0]
    return dr, ddelta if gate else None


def _robust_vjp(bias, r, delta, dpsi):
    # ψ = r + Δ r/n, n = sqrt(‖r‖² + ε): ∂ψ/∂r = I + Δ(I/n − r rᵀ/n³), symmetric
    n = namespace(r).sqrt(_rowsum(r * r) + bias.eps)
    return dpsi + bias.radius * (dpsi / n - r * _rowsum(r * dpsi) / (n * n * n)), None


_PSI_VJPS = {"l2": _l2_vjp, "lp": _lp_vjp, "huber": _huber_vjp, "robust": _robust_vjp}


# ---------------------------------------------------------------- linear memory

class LinearCache(NamedTuple):
    """Forward of Y = c ⊙ (K W̄ᵀ): W (..., d_out, d_in), K (..., b, d_in), c (..., b) | None,
    Y0 = K W̄ᵀ (..., b, d_out) before the row scale."""
    W: object
    K: object
    c: object
    Y0: object


def linear_forward(params, K, c=None):
    """y_i = c_i W̄ k_i for all rows: (Y (..., b, d_out), cache)."""
    (W,) = params
    Y0 = mm(K, _T(W))
    return _scaled(Y0, c), LinearCache(W, K, c, Y0)


def linear_factors(cache, psi):
    """G_i = ψ_i k_iᵀ: one factor pair (E, F) = (ψ, K)."""
    return ((psi, cache.K),), None


def linear_grad_vjp(cache, gcache, psi, dfactors):
    """VJP of (W̄, K, ψ) ↦ (E, F) = (ψ, K): the pair's cotangents pass straight through."""
    ((dE, dF),) = dfactors
    return (None,), dF, dE, None, None


def linear_apply_vjp(cache, dY, dinter=None):
    """VJP of Y = c ⊙ (K W̄ᵀ): dY (..., b, d_out) -> ((dW̄,), dK, dc)."""
    dY0 = _scaled(dY, cache.c)
    dW = mm(_T(dY0), cache.K)
    dK = mm(dY0, cache.W)
    dc = None if cache.c is None else (dY * cache.Y0).sum(axis=-1)
    return (dW,), dK, dc


# ---------------------------------------------------------------- mlp memory

class MLPCache(NamedTuple):
    """Forward of y = k + LN(c W̄1 gelu(c W̄2 k)) for all rows (paper §5.1, no LN affine).
    W1 (..., d, h), W2 (..., h, d), K (..., b, d); z0, z, a (..., b, h); u0, u_hat (..., b, d);
    s (..., b, 1)."""
    W1: object
    W2: object
    K: object
    c: object
    z0: object
    z: object
    a: object
    u0: object
    u_hat: object
    s: object


class MLPGradCache(NamedTuple):
    """The gradient path: g_u (..., b, d), h = W̄1ᵀ g_u and gelu'(z) (..., b, h)."""
    g_u: object
    h: object
    gp: object


def mlp_forward(params, K, c=None):
    """y_i = k_i + LN(c_i W̄1 gelu(c_i W̄2 k_i)) for all rows: (Y (..., b, d), cache)."""
    W1, W2 = params
    z0 = mm(K, _T(W2))
    z = _scaled(z0, c)
    a = gelu(z)
    u0 = mm(a, _T(W1))
    u_hat, s = layer_norm(_scaled(u0, c))
    return K + u_hat, MLPCache(W1, W2, K, c, z0, z, a, u0, u_hat, s)


def mlp_factors(cache, psi):
    """Paper §5.1 at Wg = c·W̄: ∇W1 = g_u aᵀ, ∇W2 = g_z kᵀ; g_u = LN-backward(ψ),
    g_z = c (W̄1ᵀ g_u) ⊙ gelu'(z). Returns (((g_u, a), (g_z, K)), gcache)."""
    g_u = ln_project(psi, cache.u_hat, cache.s)
    h = mm(g_u, cache.W1)
    gp = gelu_prime(cache.z)
    g_z = _scaled(h * gp, cache.c)
    return ((g_u, cache.a), (g_z, cache.K)), MLPGradCache(g_u, h, gp)


def mlp_grad_vjp(cache, gcache, psi, dfactors):
    """VJP of the gradient path (û, s, z, a, W̄1, K, ψ) ↦ ((g_u, a), (g_z, K)).

    Returns ((dW̄1, None), dK, dψ, dc, dinter) with dinter = (dû, ds, dz, da), the cotangents of the
    forward intermediates, which `mlp_apply_vjp` carries down to W̄, K and c.
    """
    (dE1, dF1), (dE2, dF2) = dfactors
    g_u, h, gp = gcache
    c, u_hat, s = cache.c, cache.u_hat, cache.s
    dEc = _scaled(dE2, c)                                     # g_z = c·h⊙gelu'(z)
    dh = dEc * gp
    dz = dEc * h * gelu_second(cache.z)
    dc = None if c is None else (dE2 * h * gp).sum(axis=-1)
    dW1 = mm(_T(g_u), dh)                                      # h = W̄1ᵀ g_u
    dg_u = dE1 + mm(dh, _T(cache.W1))
    dpsi = ln_project(dg_u, u_hat, s)                         # g_u = LN-backward(ψ; û, s)
    du_hat = -(dg_u * (psi * u_hat).mean(axis=-1, keepdims=True)
               + psi * (dg_u * u_hat).mean(axis=-1, keepdims=True)) / s
    ds = -_rowsum(dg_u * g_u) / s
    return (dW1, None), dF2, dpsi, dc, (du_hat, ds, dz, dF1)


def mlp_apply_vjp(cache, dY, dinter=None):
    """VJP of y = k + LN(u), u = c W̄1 a, a = gelu(z), z = c W̄2 k, given dY (..., b, d) and the
    intermediates' cotangents dinter = (dû, ds, dz, da) from the gradient path (or None).
    Returns ((dW̄1, dW̄2), dK, dc)."""
    c, u_hat, s = cache.c, cache.u_hat, cache.s
    du_hat, ds, dz, da = (None,) * 4 if dinter is None else dinter
    du_hat = _add(du_hat, dY)
    du = ln_project(du_hat, u_hat, s)
    if ds is not None:                                        # s = sqrt(var u + ε): ∂s/∂u = û/d
        du = du + ds * u_hat / u_hat.shape[-1]
    du0 = _scaled(du, c)                                      # u = c·(W̄1 a)
    dW1 = mm(_T(du0), cache.a)
    da = _add(da, mm(du0, cache.W1))
    dz = _add(dz, da * gelu_prime(cache.z))                   # a = gelu(z)
    dz0 = _scaled(dz, c)                                      # z = c·(W̄2 k)
    dW2 = mm(_T(dz0), cache.K)
    dK = dY + mm(dz0, cache.W2)                                # residual + MLP path
    dc = None
    if c is not None:
        dc = (du * cache.u0).sum(axis=-1) + (dz * cache.z0).sum(axis=-1)
    return (dW1, dW2), dK, dc


# ---------------------------------------------------------------- dispatch over memories

_MEMORIES = {
    "linear": (linear_forward, linear_factors, linear_grad_vjp, linear_apply_vjp),
    "mlp": (mlp_forward, mlp_factors, mlp_grad_vjp, mlp_apply_vjp),
}


def memory_forward(memory, params, K, c=None):
    """(Y, cache): M(c_i·W̄, k_i) for every row of K."""
    return _MEMORIES[memory.name][0](params, K, c)


def memory_factors(memory, cache, psi):
    """(factor pairs (E, F) per parameter, gcache) of G_i = J_W(k_i)ᵀ ψ_i."""
    return _MEMORIES[memory.name][1](cache, psi)


def memory_apply_vjp(memory, cache, dY, dinter=None):
    """((dparams), dK, dc) of Y = M(c·W̄, K)."""
    return _MEMORIES[memory.name][3](cache, dY, dinter)


def factors_vjp(memory, bias, cache, gcache, factors, Y, psi, V, delta, dfactors):
    """VJP of (W̄, K, V, δ, c) ↦ factor pairs, through ψ's Jacobian and the memory's backward.

    factors: the forward's pairs (for shapes); dfactors: one (dE, dF) per parameter, None entries
    meaning zero. Returns (dparams, dK, dV, ddelta, dc).
    """
    dfactors = tuple(_zero_pair(pair, d) for pair, d in zip(factors, dfactors))
    grad_vjp, apply_vjp = _MEMORIES[memory.name][2], _MEMORIES[memory.name][3]
    dP1, dK1, dpsi, dc1, dinter = grad_vjp(cache, gcache, psi, dfactors)
    dY, dV, ddelta = psi_vjp(bias, Y, V, delta, dpsi)
    dP2, dK2, dc2 = apply_vjp(cache, dY, dinter)
    dparams = tuple(_add(a, b) for a, b in zip(dP1, dP2))
    return dparams, dK1 + dK2, dV, ddelta, _add(dc1, dc2)


def _zero_pair(pair, dpair):
    """A cotangent pair with None entries replaced by zeros shaped like the factors."""
    xp = namespace(pair[0])
    if dpair is None:
        return xp.zeros_like(pair[0]), xp.zeros_like(pair[1])
    return tuple(xp.zeros_like(x) if d is None else d for x, d in zip(pair, dpair))


# ---------------------------------------------------------------- exposing maps (one matrix)

_MATRIX = (-2, -1)


def lq_scale(A, q, eps):
    """(ν, n): ν = max(n, eps)^(2−q), n = ‖A‖_q over each matrix; both (..., 1, 1)."""
    xp = namespace(A)
    power_sum = _fused().lq_power_sum(A, q) if is_cupy(A) else \
        (xp.abs(A) ** q).sum(axis=_MATRIX, keepdims=True)
    n = power_sum ** (1.0 / q)
    return xp.maximum(n, eps) ** (2.0 - q), n


def lq_scale_vjp(A, q, eps, n, dnu, nu=None, dW=None):
    """VJP of ν(A) = max(‖A‖_q, eps)^(2−q): dν (..., 1, 1) -> dA. Zero on the eps branch (ν
    constant there): dA = dν (2−q) n^(2−2q) sign(A)|A|^(q−1) for n > eps. With nu and dW, returns
    ν·dW + dA (expose_vjp's sum, one pass on the GPU)."""
    xp = namespace(A)
    big = n > eps
    n_safe = xp.where(big, n, 1.0)
    coef = xp.where(big, dnu * (2.0 - q) * n_safe ** (2.0 - 2.0 * q), 0.0)
    if is_cupy(A):
        zero = A.dtype.type(0)
        return _fused().lq_grad(A, zero if nu is None else nu, zero if dW is None else dW, coef, q)
    dA = coef * xp.sign(A) * xp.abs(A) ** (q - 1.0)
    return dA if nu is None else nu * dW + dA


def expose(retention, s):
    """W = expose(s) for one stored matrix s (..., m, n)."""
    xp, name = namespace(s), retention.name
    if name == "lq":
        return lq_scale(s, retention.q, retention.eps)[0] * s
    if name == "kl":
        e = xp.exp(s - s.max(axis=-1, keepdims=True))
        return retention.scale * e / e.sum(axis=-1, keepdims=True)
    if name == "sigmoid":
        e = xp.exp(-xp.abs(s))
        return xp.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return s


def expose_vjp(retention, s, W, dW):
    """VJP of W = expose(s): dW -> ds (W is expose(s), passed to avoid recomputing it)."""
    name = retention.name
    if name == "lq":
        nu, n = lq_scale(s, retention.q, retention.eps)
        dnu = (dW * s).sum(axis=_MATRIX, keepdims=True)
        return lq_scale_vjp(s, retention.q, retention.eps, n, dnu, nu, dW)
    if name == "kl":                                  # row softmax scaled by `scale`
        return W * (dW - _rowsum(dW * W) / retention.scale)
    if name == "sigmoid":
        return dW * W * (1.0 - W)
    return dW


def canonical(retention, s):
    """The chunk-start coordinates of the linear recurrence: kl's log(W/scale) = log_softmax(L)."""
    if retention.name != "kl":
        return s
    m = s.max(axis=-1, keepdims=True)
    return s - m - namespace(s).log(namespace(s).exp(s - m).sum(axis=-1, keepdims=True))


def canonical_vjp(retention, s, ds_bar):
    """VJP of canonical: kl's log_softmax gives ds = ds̄ − softmax(s)·rowsum(ds̄)."""
    if retention.name != "kl":
        return ds_bar
    return ds_bar - expose(retention, s) / retention.scale * _rowsum(ds_bar)


def prox(retention, s):
    """The once-per-chunk map: elastic net's soft threshold S_γ, identity otherwise."""
    if retention.name != "elastic_net":
        return s
    xp = namespace(s)
    return xp.sign(s) * xp.maximum(xp.abs(s) - retention.gamma, 0.0)


def prox_vjp(retention, s_lin, ds):
    """VJP of prox at its input s_lin: ds ⊙ I(|s_lin| > γ) for elastic net."""
    if retention.name != "elastic_net":
        return ds
    return namespace(ds).where(namespace(s_lin).abs(s_lin) > retention.gamma, ds, 0.0)
