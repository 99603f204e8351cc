"""The Transformer++ attention core: causal softmax attention, rotary embeddings, cached decoding.

    out = causal_attention(q, k, v, block=64)        # (..., T, d) -> (..., T, d_v); differentiable
    q   = rope(q, positions, base=10000.0)           # rotary position embedding; differentiable
    o_t = attend_cached(q_t, k_cache, v_cache, n)    # decoding: one query against n cached keys

`causal_attention` is one `mirascore.autodiff` primitive with a hand-derived backward: the forward
runs blockwise with an online softmax (FlashAttention-2) and saves only the output and each row's
logsumexp; the backward recomputes the probabilities block by block. Neither pass holds a T×T
array: memory is O(B·H·T·d + B·H·block²). Every block product is a batched matmul over the leading
axes, so numpy and CuPy arrays run the same code. Derivation: docs/derivations/attention.md.
"""
import math
from typing import NamedTuple

import numpy as np

import mirascore.autodiff as ad
import mirascore.autodiff.numpy as anp

from .._xp import namespace

__all__ = ["causal_attention", "rope", "attend_cached"]


# ---------------------------------------------------------------- input checks

def _check_tokens(name, x):
    """x must be a floating-point array of shape (..., T, d), d ≥ 1."""
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (..., T, d); got shape {tuple(x.shape)}")
    if np.dtype(x.dtype).kind != "f":
        raise ValueError(f"{name} must be a floating-point array; got dtype {x.dtype}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have a head dimension d ≥ 1; got shape {tuple(x.shape)}")


def _check_same_dtype(**arrays):
    dtypes = {name: np.dtype(x.dtype) for name, x in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name}.dtype={dt}" for name, dt in dtypes.items())
        raise ValueError(f"{', '.join(dtypes)} must share one dtype; got {listed}")


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _check_attention_inputs(q, k, v, block):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tokens(name, x)
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have q's shape (..., T, d); got k.shape={tuple(k.shape)}, "
                         f"q.shape={tuple(q.shape)}")
    if tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise ValueError(f"v must have shape (..., T, d_v) with q's leading axes (..., T); got "
                         f"v.shape={tuple(v.shape)}, q.shape={tuple(q.shape)}")
    _check_same_dtype(q=q, k=k, v=v)
    _check_positive_int("block", block)


# ---------------------------------------------------------------- blockwise forward and backward

def _blocks(T, block):
    """(start, stop) of each block of `block` positions; the last one may be shorter."""
    return [(i, min(i + block, T)) for i in range(0, T, block)]


def _causal_bias(xp, n, dtype):
    """(n, n) additive mask of a diagonal block: 0 on and below the diagonal, −inf above."""
    return xp.where(xp.tri(n, dtype=bool), 0.0, -math.inf).astype(dtype)


def _scores(q_scaled, k_block):
    """S = (q/√d) kᵀ for one block pair: a batched matmul over the leading axes."""
    return q_scaled @ k_block.swapaxes(-1, -2)


def attention_forward(q, k, v, block=64):
    """(out, lse): causal softmax attention and each row's logsumexp L of the scaled scores.

    Blockwise with an online softmax; q, k (..., T, d), v (..., T, d_v) of one dtype; out
    (..., T, d_v), lse (..., T). Plain array code (not recorded by autodiff); inputs unchecked.
    """
    xp = namespace(q, k, v)
    T, d = q.shape[-2], q.shape[-1]
    q_scaled = q * (1.0 / math.sqrt(d))
    out = xp.empty(v.shape, dtype=v.dtype)
    lse = xp.empty(q.shape[:-1], dtype=q.dtype)
    bias = _causal_bias(xp, min(block, T), q.dtype) if T else None
    for i0, i1 in _blocks(T, block):
        q_i = q_scaled[..., i0:i1, :]
        m = l = acc = None                  # running row max, row sum of e^(S − m), P̃ V
        for j0, j1 in _blocks(i1, block):   # key blocks up to and including the diagonal
            s = _scores(q_i, k[..., j0:j1, :])
            if j0 == i0:
                s += bias[:i1 - i0, :i1 - i0]
            s_max = s.max(axis=-1)
            m_new = s_max if m is None else xp.maximum(m, s_max)
            s -= m_new[..., None]
            p = xp.exp(s, out=s)
            pv = p @ v[..., j0:j1, :]
            if m is None:
                l, acc = p.sum(axis=-1), pv
            else:
                rescale = xp.exp(m - m_new)
                l = l * rescale + p.sum(axis=-1)
                acc = acc * rescale[..., None] + pv
            m = m_new
        out[..., i0:i1, :] = acc / l[..., None]
        lse[..., i0:i1] = m + xp.log(l)
    return out, lse


def attention_backward(q, k, v, out, lse, d_out, block=64):
    """(dq, dk, dv) of causal attention for the cotangent d_out, recomputing P blockwise from lse.

    Plain array code, not differentiable a second time. Shapes as `attention_forward`.
    """
    xp = namespace(q, k, v, out, lse, d_out)
    T, d = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    q_scaled = q * scale
    d_out = xp.asarray(d_out, dtype=out.dtype)
    delta = (d_out * out).sum(axis=-1)      # D = rowsum(dO ⊙ O) = rowsum(P ⊙ dP)
    dq = xp.zeros(q.shape, dtype=q.dtype)
    dk = xp.empty(k.shape, dtype=k.dtype)
    dv = xp.empty(v.shape, dtype=v.dtype)
    bias = _causal_bias(xp, min(block, T), q.dtype) if T else None
    for j0, j1 in _blocks(T, block):        # key blocks outside, the query blocks that see them inside
        k_j, v_j = k[..., j0:j1, :], v[..., j0:j1, :]
        dk_j = dv_j = None
        for i0, i1 in _blocks(T, block)[j0 // block:]:
            q_i, d_out_i = q_scaled[..., i0:i1, :], d_out[..., i0:i1, :]
            s = _scores(q_i, k_j)
            if i0 == j0:
                s += bias[:i1 - i0, :j1 - j0]
            s -= lse[..., i0:i1, None]
            p = xp.exp(s, out=s)                                   # P
            dv_ij = p.swapaxes(-1, -2) @ d_out_i                   # Pᵀ dO
            dp = d_out_i @ v_j.swapaxes(-1, -2)                    # dO Vᵀ
            dp -= delta[..., i0:i1, None]
            ds = xp.multiply(p, dp, out=dp)                        # dS = P ⊙ (dP − D)
            dq[..., i0:i1, :] += ds @ k_j                          # times 1/√d below
            dk_ij = ds.swapaxes(-1, -2) @ q_i                      # dSᵀ Q/√d
            dv_j = dv_ij if dv_j is None else dv_j + dv_ij
            dk_j = dk_ij if dk_j is None else dk_j + dk_ij
        dk[..., j0:j1, :] = dk_j
        dv[..., j0:j1, :] = dv_j
    dq *= scale
    return dq, dk, dv


# ---------------------------------------------------------------- the autodiff primitive

class _Saved(NamedTuple):
    """What the forward keeps for the backward besides q, k, v: the output and the logsumexp."""
    out: object
    lse: object


@ad.primitive
def _attention(q, k, v, block=64):
    return _Saved(*attention_forward(q, k, v, block))


@ad.primitive
def _output(saved):
    """The attention output of a saved record; its cotangent is the record's (lse gets none)."""
    return saved.out


@ad.primitive
def _attention_vjp(q, k, v, saved, d_out, block):
    """The hand-derived backward as an operation with no VJP: grad of grad through it raises."""
    return attention_backward(q, k, v, saved.out, saved.lse, d_out, block)


_attention_vjp.__name__ = "causal_attention_bwd"


def _attention_vjp_maker(argnums, ans, args, kwargs):
    q, k, v = args
    block = kwargs.get("block", 64)

    def vjp(d_out):
        grads = _attention_vjp(q, k, v, ans, d_out, block)
        return tuple(grads[i] for i in argnums)
    return vjp


ad.defvjp_argnums(_attention, _attention_vjp_maker)
ad.defvjp(_output, lambda ans, saved: lambda g: g)


def causal_attention(q, k, v, block=64):
    """softmax(q kᵀ/√d + causal mask) v, blockwise with an online softmax, differentiable.

    q, k (..., T, d) and v (..., T, d_v): numpy or CuPy arrays of one floating dtype; any leading
    axes (batch, heads); T = 0 gives an empty output. `block` (≥ 1) is the tile size of both the
    query and the key loops; every block gives the same result up to rounding. One primitive of
    `mirascore.autodiff` with a hand-derived VJP for q, k and v (plain array code: first-order
    gradients only; grad of grad raises NotImplementedError). Memory O(B·H·T·d + B·H·block²).
    Mismatched shapes or dtypes, or a non-positive block, raise ValueError.
    """
    _check_attention_inputs(q, k, v, block)
    return _output(_attention(q, k, v, block=int(block)))


# ---------------------------------------------------------------- rotary position embedding

def rope_tables(positions, d, base, dtype, xp):
    """(cos, sin) of the angles positions[t]·base^(−2i/d), i < d/2: (T, d/2) arrays in `dtype`.

    Computed in float64, then cast, so one position gives the same values in every call.
    """
    exponents = xp.arange(0, d, 2, dtype=xp.float64) / d
    inv_freq = 1.0 / (float(base) ** exponents)
    angles = positions.astype(xp.float64)[:, None] * inv_freq[None, :]
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


@ad.primitive
def _rotate(x, cos, sin):
    """[x1 cos − x2 sin, x2 cos + x1 sin] with x1, x2 the two halves of x's last axis."""
    xp = namespace(x, cos, sin)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = xp.empty(x.shape, dtype=x.dtype)
    out1, out2 = out[..., :h], out[..., h:]
    xp.multiply(x1, cos, out=out1)
    out1 -= x2 * sin
    xp.multiply(x2, cos, out=out2)
    out2 += x1 * sin
    return out


# The rotation by θ is orthogonal; its transpose is the rotation by −θ. The VJP calls _rotate
# itself, so rope is differentiable to any order. The tables are constants.
ad.defvjp(_rotate, lambda ans, x, cos, sin: lambda g: _rotate(g, cos, -sin), None, None)


def rope(x, positions, base=10000.0):
    """Rotary position embedding (half-split) of x (..., T, d) at integer positions (T,).

    With x1 = x[..., :d/2], x2 = x[..., d/2:] and θ_ti = positions[t]·base^(−2i/d):
    out = [x1 cos θ − x2 sin θ, x2 cos θ + x1 sin θ]. The tables are computed in float64 and cast
    to x's dtype; one position gives the same rotation whatever else `positions` holds (decoding
    with positions = [t] matches the full sequence exactly). Differentiable in x (any order).
    Bad shapes, non-integer positions or base ≤ 0 raise ValueError.
    """
    if x.ndim < 2 or np.dtype(x.dtype).kind != "f":
        raise ValueError(f"x must be a floating-point array of shape (..., T, d); got shape "
                         f"{tuple(x.shape)}, dtype {x.dtype}")
    T, d = x.shape[-2], x.shape[-1]
    if d < 2 or d % 2:
        raise ValueError(f"x's last axis d must be even and ≥ 2; got d={d} (x.shape={tuple(x.shape)})")
    xp = namespace(anp.stop_gradient(x))
    positions = xp.asarray(positions)
    if positions.ndim != 1 or positions.shape[0] != T or np.dtype(positions.dtype).kind not in "iu":
        raise ValueError(f"positions must be integers of shape (T,) = ({T},); got shape "
                         f"{tuple(positions.shape)}, dtype {positions.dtype}")
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a finite number > 0; got {base!r}")
    cos, sin = rope_tables(positions, d, base, x.dtype, xp)
    return _rotate(x, cos, sin)


# ---------------------------------------------------------------- decoding

def attend_cached(q, k_cache, v_cache, length):
    """One query per sequence against the first `length` cached keys and values.

    q (..., d); k_cache (..., T_max, d), v_cache (..., T_max, d_v), 1 ≤ length ≤ T_max →
    (..., d_v): softmax(q k[:length]ᵀ/√d) v[:length], the row `length − 1` of `causal_attention`
    over the cached sequence. Plain array code (no gradient). Bad shapes, dtypes or length raise
    ValueError.
    """
    if q.ndim < 1 or np.dtype(q.dtype).kind != "f":
        raise ValueError(f"q must be a floating-point array of shape (..., d); got shape "
                         f"{tuple(q.shape)}, dtype {q.dtype}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tokens(name, x)
    if tuple(k_cache.shape[:-2]) != tuple(q.shape[:-1]) or k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"k_cache must have shape (..., T_max, d) with q's (..., d); got "
                         f"k_cache.shape={tuple(k_cache.shape)}, q.shape={tuple(q.shape)}")
    if tuple(v_cache.shape[:-1]) != tuple(k_cache.shape[:-1]):
        raise ValueError(f"v_cache must have shape (..., T_max, d_v) with k_cache's (..., T_max); "
                         f"got v_cache.shape={tuple(v_cache.shape)}, "
                         f"k_cache.shape={tuple(k_cache.shape)}")
    _check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    T_max = k_cache.shape[-2]
    if (isinstance(length, bool) or not isinstance(length, (int, np.integer))
            or not 1 <= length <= T_max):
        raise ValueError(f"length must be an integer in [1, T_max] = [1, {T_max}]; got {length!r}")
    xp = namespace(q, k_cache, v_cache)
    q_scaled = q[..., None, :] * (1.0 / math.sqrt(q.shape[-1]))
    s = _scores(q_scaled, k_cache[..., :length, :])          # (..., 1, length)
    s -= s.max(axis=-1, keepdims=True)
    p = xp.exp(s, out=s)
    return (p @ v_cache[..., :length, :])[..., 0, :] / p.sum(axis=-1)
