"""Memory architectures: the small model M(W, k) that is trained at test time (docs/contract.md §3).

A memory is a NamedTuple of its sizes (`name`, `d_in`, `d_out`, ...) whose architecture is written
once, over rows of inputs, with every product by a parameter left to the caller (docs/internals.md):

  forward(read, X)                       -> (Y, cache)       Y = M(W, x) for each row x of X
  backward(cache, dY, read_vjp, with_dX=True, dcache=None) -> (dO, dX, bcache)
  backward_vjp(cache, bcache, dY, ddO, read_vjp_vjp)       -> (ddY, dcache)

`read(p, Z)` returns Z W_pᵀ for parameter p (the caller decides what W_p is: the weights, the
chunk's anchor c·W̄, or the dual form of the in-chunk states), `read_vjp(p, dO)` the cotangent of
Z. `backward` is the VJP of `forward`; its `dO` are the cotangents of each product's output, so at
dY = ψ the gradient of parameter p for row i is the rank-1 matrix dO_p,i Z_p,iᵀ. `backward_vjp` is
the VJP of `backward` w.r.t. dY and the forward's intermediates, given cotangents ddO of its dO
(second-order terms of the anchored scan's backward).

From these, per token (numpy or CuPy arrays, or autodiff boxes; leading dims are batch dims):
  param_shapes()              shapes of the parameter arrays, without batch dims
  apply(params, k)            M(W, k)
  grad(params, k, psi)        ∇_W ℓ = J_W(k)ᵀ ψ, one array per parameter
  grad_input(params, k, psi)  J_k(k)ᵀ ψ
  init(rng, batch_shape, dtype)  a random start (numpy arrays; move them to the GPU yourself)
"""
import math
from typing import NamedTuple

import numpy as np

import mirascore.autodiff.numpy as anp

from .fusable import fusable
from .validation import size

LN_EPS = 1e-5  # layer norm inside the mlp memory (TTT / paper §5.1)


# ---------------------------------------------------------------- the elementwise formulas

def gauss_cdf(z):
    """Φ(z) = ½(1 + erf(z/√2))."""
    return 0.5 * (1.0 + anp.erf(z * (1.0 / math.sqrt(2.0))))


def gauss_pdf(z):
    """φ(z) = exp(−z²/2)/√(2π)."""
    return anp.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))


@fusable
def gelu(z):
    """Exact (erf) GELU, z·Φ(z)."""
    return z * gauss_cdf(z)


@fusable
def gelu_prime(z):
    """gelu'(z) = Φ(z) + z φ(z)."""
    return gauss_cdf(z) + z * gauss_pdf(z)


@fusable
def gelu_second(z):
    """gelu''(z) = φ(z)(2 − z²)."""
    return gauss_pdf(z) * (2.0 - z * z)


def layer_norm(u):
    """LN without affine parameters over the last axis: (û, s), s = sqrt(var u + 1e-5) (..., 1)."""
    c = u - anp.mean(u, axis=-1, keepdims=True)
    s = anp.sqrt(anp.mean(c * c, axis=-1, keepdims=True) + LN_EPS)
    return c / s, s


@fusable
def layer_norm_vjp(g, u_hat, s):
    """(g − mean g − û·mean(g ⊙ û))/s: LN's VJP at (û, s); symmetric in g, so also its own VJP
    with respect to g."""
    return (g - anp.mean(g, axis=-1, keepdims=True)
            - u_hat * anp.mean(g * u_hat, axis=-1, keepdims=True)) / s


# ---------------------------------------------------------------- per token, from the rows form

class _Weights:
    """Plain reads Z W_pᵀ of given parameter arrays (batch dims broadcast), remembering each
    product's input. einsum, not matmul: a per-token product is a dot product, summed in order
    without fused multiply-adds, so an exact cancellation stays an exact zero (sign(r) at r = 0)."""

    def __init__(self, params):
        self.params, self.inputs = params, [None] * len(params)

    def read(self, p, Z):
        self.inputs[p] = Z
        return anp.einsum("...mn,...bn->...bm", self.params[p], Z)

    def vjp(self, p, dO):
        return anp.einsum("...bm,...mn->...bn", dO, self.params[p])


def _row(x):
    return anp.expand_dims(x, -2)


def apply_by_forward(memory, params, k):
    """M(W, k) for k (..., d_in) from `memory.forward` with the weights' own reads."""
    Y, _ = memory.forward(_Weights(params).read, _row(k))
    return Y[..., 0, :]


def grad_by_backward(memory, params, k, psi):
    """∇_W ℓ = J_W(k)ᵀ ψ from `memory.backward` at dY = ψ: dO_pᵀ Z_p per parameter."""
    w = _Weights(params)
    _, cache = memory.forward(w.read, _row(k))
    dO, _, _ = memory.backward(cache, _row(psi), w.vjp, with_dX=False)
    return tuple(anp.einsum("...bm,...bn->...mn", d, z) for d, z in zip(dO, w.inputs))


def grad_input_by_backward(memory, params, k, psi):
    """J_kᵀ ψ from `memory.backward` at dY = ψ."""
    w = _Weights(params)
    _, cache = memory.forward(w.read, _row(k))
    _, dX, _ = memory.backward(cache, _row(psi), w.vjp)
    return dX[..., 0, :]


# ---------------------------------------------------------------- memories

class Linear(NamedTuple):
    """Matrix memory M(W, k) = W k;  W: (..., d_out, d_in), k: (..., d_in) -> (..., d_out)."""
    name: str
    d_in: int
    d_out: int
    matrix_memory = True          # M(W, k) = W k: the exact (delta-rule) chunked form applies
    apply = apply_by_forward
    grad = grad_by_backward
    grad_input = grad_input_by_backward

    def param_shapes(self):
        return ((self.d_out, self.d_in),)

    def forward(self, read, X):
        return read(0, X), None

    def backward(self, cache, dY, read_vjp, with_dX=True, dcache=None):
        return (dY,), (read_vjp(0, dY) if with_dX else None), None

    def backward_vjp(self, cache, bcache, dY, ddO, read_vjp_vjp):
        return ddO[0], None                         # dO = dY

    def init(self, rng, batch_shape=(), dtype=np.float32):
        """W ~ N(0, 1/d_in), so that W k keeps the scale of k."""
        rng = np.random.default_rng(rng)
        W = rng.standard_normal(tuple(batch_shape) + (self.d_out, self.d_in)) / math.sqrt(self.d_in)
        return (W.astype(dtype),)


class MLPCache(NamedTuple):
    """The mlp forward's intermediates (rows: (..., b, ·)); also the form of their cotangents."""
    z: object         # W2 k, pre-activation (..., b, h)
    u_hat: object     # LN(W1 gelu(z)) (..., b, d)
    s: object         # LN's sqrt(var + eps) (..., b, 1)


class MLPBackwardCache(NamedTuple):
    """What backward computed at dY, for backward_vjp: dU (= g_u), dA = read_vjp(0, dU), gelu'(z)."""
    dU: object
    dA: object
    gp: object


class MLP(NamedTuple):
    """Two-layer residual memory (paper §5.1, TTT-MLP): M(k) = k + LN(W1 gelu(W2 k)).

    W1: (..., d, h), W2: (..., h, d), h = expansion·d, k: (..., d) -> (..., d). gelu is the exact
    (erf) form; LN(u) = (u − mean u)/sqrt(var u + 1e-5) with the biased variance and no affine
    parameters. Parameter 0 is W1, parameter 1 is W2.
    """
    name: str
    d_in: int
    d_out: int
    expansion: int
    apply = apply_by_forward
    grad = grad_by_backward
    grad_input = grad_input_by_backward

    @property
    def hidden(self):
        return self.expansion * self.d_in

    def param_shapes(self):
        d, h = self.d_in, self.hidden
        return ((d, h), (h, d))

    def forward(self, read, X):
        z = read(1, X)                                # W2 reads the key
        u_hat, s = layer_norm(read(0, gelu(z)))       # W1 reads gelu(z)
        return X + u_hat, MLPCache(z, u_hat, s)

    def backward(self, cache, dY, read_vjp, with_dX=True, dcache=None):
        """dU = LN-VJP(dY), dZ = read_vjp(0, dU) ⊙ gelu'(z), dX = dY + read_vjp(1, dZ); dcache adds
        the cotangents of û, s (∂s/∂u = û/d) and z where they enter."""
        z, u_hat, s = cache
        dU = layer_norm_vjp(dY if dcache is None else dY + dcache.u_hat, u_hat, s)
        if dcache is not None:
            dU = dU + dcache.s * u_hat * (1.0 / u_hat.shape[-1])
        dA = read_vjp(0, dU)
        gp = gelu_prime(z)
        dZ = dA * gp if dcache is None else dA * gp + dcache.z
        dX = dY + read_vjp(1, dZ) if with_dX else None
        return (dU, dZ), dX, MLPBackwardCache(dU, dA, gp)

    def backward_vjp(self, cache, bcache, dY, ddO, read_vjp_vjp):
        """VJP of (dY, z, û, s, and the reads' parameters) ↦ (dU, dZ) of `backward` (dcache None):
        dZ = dA ⊙ gelu'(z) gives z a cotangent ddZ ⊙ dA ⊙ gelu''(z); dU = LN-VJP(dY; û, s) is
        linear in dY and gives û, s theirs. Returns (ddY, MLPCache of cotangents)."""
        z, u_hat, s = cache
        dU, dA, gp = bcache
        ddU, ddZ = ddO
        dz = ddZ * dA * gelu_second(z)
        ddU = ddU + read_vjp_vjp(0, dU, ddZ * gp)
        ddY = layer_norm_vjp(ddU, u_hat, s)
        du_hat = -(ddU * anp.mean(dY * u_hat, axis=-1, keepdims=True)
                   + dY * anp.mean(ddU * u_hat, axis=-1, keepdims=True)) / s
        ds = -anp.sum(ddU * dU, axis=-1, keepdims=True) / s
        return ddY, MLPCache(dz, du_hat, ds)

    def init(self, rng, batch_shape=(), dtype=np.float32):
        """W2 ~ N(0, 1/d), W1 ~ N(0, 1/h): unit-scale pre-activations."""
        rng = np.random.default_rng(rng)
        shape = tuple(batch_shape)
        d, h = self.d_in, self.hidden
        W1 = rng.standard_normal(shape + (d, h)) / math.sqrt(h)
        W2 = rng.standard_normal(shape + (h, d)) / math.sqrt(d)
        return (W1.astype(dtype), W2.astype(dtype))


def linear(d_in, d_out):
    """Matrix memory M(W, k) = W k with W: (..., d_out, d_in)."""
    return Linear("linear", size("d_in", d_in), size("d_out", d_out))


def mlp(d, expansion=4):
    """Two-layer memory M(k) = k + LN(W1 gelu(W2 k)); W1: (..., d, h), W2: (..., h, d), h = expansion·d.

    Use d ≥ 3: the layer norm of a 2-vector is ±(1, −1) whatever its input, so with d = 2 the
    memory's output does not depend on W and its gradient vanishes."""
    d = size("d", d)
    return MLP("mlp", d, d, size("expansion", expansion))
