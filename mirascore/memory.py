"""Memory architectures: the small model M(W, k) that is trained at test time (DESIGN §3).

Each memory is a NamedTuple of its sizes with pure methods:
  param_shapes()              shapes of the parameter arrays, without batch dims
  apply(params, k)            M(W, k), written with `mirascore.autodiff.numpy` ops (differentiable)
  grad(params, k, psi)        hand-derived ∇_W ℓ = J_W(k)ᵀ ψ, one array per parameter
  grad_input(params, k, psi)  hand-derived J_k(k)ᵀ ψ
  init(rng, batch_shape, dtype)  a random start (numpy arrays; move them to the GPU yourself)
Leading dimensions of every array are batch dimensions and broadcast.
"""
import math
from typing import NamedTuple

import numpy as np

import mirascore.autodiff.numpy as anp

from ._checks import size

LN_EPS = 1e-5  # layer norm inside the mlp memory (TTT / paper §5.1)


def _matvec(W, x):
    """W x over batch dims: (..., m, n), (..., n) -> (..., m)."""
    return anp.einsum("...mn,...n->...m", W, x)


def _vecmat(x, W):
    """Wᵀ x over batch dims: (..., m), (..., m, n) -> (..., n)."""
    return anp.einsum("...m,...mn->...n", x, W)


def _outer(a, b):
    """a bᵀ over batch dims: (..., m), (..., n) -> (..., m, n)."""
    return anp.expand_dims(a, -1) * anp.expand_dims(b, -2)


class Linear(NamedTuple):
    """Matrix memory M(W, k) = W k;  W: (..., d_out, d_in), k: (..., d_in) -> (..., d_out)."""
    name: str
    d_in: int
    d_out: int

    def param_shapes(self):
        return ((self.d_out, self.d_in),)

    def apply(self, params, k):
        (W,) = params
        return _matvec(W, k)

    def grad(self, params, k, psi):
        """∇_W ℓ = ψ kᵀ: (..., d_out, d_in)."""
        return (_outer(psi, k),)

    def grad_input(self, params, k, psi):
        """J_kᵀ ψ = Wᵀ ψ: (..., d_in)."""
        (W,) = params
        return _vecmat(psi, W)

    def init(self, rng, batch_shape=(), dtype=np.float32):
        """W ~ N(0, 1/d_in), so that W k keeps the scale of k."""
        rng = np.random.default_rng(rng)
        W = rng.standard_normal(tuple(batch_shape) + (self.d_out, self.d_in)) / math.sqrt(self.d_in)
        return (W.astype(dtype),)


class MLP(NamedTuple):
    """Two-layer residual memory (paper §5.1, TTT-MLP): M(k) = k + LN(W1 gelu(W2 k)).

    W1: (..., d, h), W2: (..., h, d), h = expansion·d, k: (..., d) -> (..., d). gelu is the exact
    (erf) form; LN(u) = (u − mean u)/sqrt(var u + 1e-5) with the biased variance and no affine
    parameters.
    """
    name: str
    d_in: int
    d_out: int
    expansion: int

    @property
    def hidden(self):
        return self.expansion * self.d_in

    def param_shapes(self):
        d, h = self.d_in, self.hidden
        return ((d, h), (h, d))

    def _forward(self, params, k):
        """The forward pass with the intermediates the hand gradients need."""
        W1, W2 = params
        z = _matvec(W2, k)                                  # (..., h)
        a = z * _gauss_cdf(z)                               # gelu(z)
        u = _matvec(W1, a)                                  # (..., d)
        c = u - anp.mean(u, axis=-1, keepdims=True)
        s = anp.sqrt(anp.mean(c * c, axis=-1, keepdims=True) + LN_EPS)
        return z, a, c / s, s

    def apply(self, params, k):
        _, _, u_hat, _ = self._forward(params, k)
        return k + u_hat

    def _backward(self, params, k, psi):
        """g_u = (ψ − mean ψ − û·mean(ψ ⊙ û))/s (LN backward); g_z = (W1ᵀ g_u) ⊙ gelu'(z)."""
        W1, _ = params
        z, a, u_hat, s = self._forward(params, k)
        g_u = (psi - anp.mean(psi, axis=-1, keepdims=True)
               - u_hat * anp.mean(psi * u_hat, axis=-1, keepdims=True)) / s
        g_z = _vecmat(g_u, W1) * (_gauss_cdf(z) + z * _gauss_pdf(z))
        return a, g_u, g_z

    def grad(self, params, k, psi):
        """Paper §5.1 without LN affine: ∇W1 = g_u aᵀ (..., d, h), ∇W2 = g_z kᵀ (..., h, d)."""
        a, g_u, g_z = self._backward(params, k, psi)
        return (_outer(g_u, a), _outer(g_z, k))

    def grad_input(self, params, k, psi):
        """J_kᵀ ψ = ψ + W2ᵀ g_z (the residual path plus the MLP path): (..., d)."""
        _, W2 = params
        _, _, g_z = self._backward(params, k, psi)
        return psi + _vecmat(g_z, W2)

    def init(self, rng, batch_shape=(), dtype=np.float32):
        """W2 ~ N(0, 1/d), W1 ~ N(0, 1/h): unit-scale pre-activations."""
        rng = np.random.default_rng(rng)
        shape = tuple(batch_shape)
        d, h = self.d_in, self.hidden
        W1 = rng.standard_normal(shape + (d, h)) / math.sqrt(h)
        W2 = rng.standard_normal(shape + (h, d)) / math.sqrt(d)
        return (W1.astype(dtype), W2.astype(dtype))


def _gauss_cdf(z):
    """Φ(z) = ½(1 + erf(z/√2))."""
    return 0.5 * (1.0 + anp.erf(z * (1.0 / math.sqrt(2.0))))


def _gauss_pdf(z):
    """φ(z) = exp(−z²/2)/√(2π)."""
    return anp.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))


def linear(d_in, d_out):
    """Matrix memory M(W, k) = W k with W: (..., d_out, d_in)."""
    return Linear("linear", size("d_in", d_in), size("d_out", d_out))


def mlp(d, expansion=4):
    """Two-layer memory M(k) = k + LN(W1 gelu(W2 k)); W1: (..., d, h), W2: (..., h, d), h = expansion·d.

    Use d ≥ 3: the layer norm of a 2-vector is ±(1, −1) whatever its input, so with d = 2 the
    memory's output does not depend on W and its gradient vanishes."""
    d = size("d", d)
    return MLP("mlp", d, d, size("expansion", expansion))
