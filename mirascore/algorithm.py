"""Memory learning algorithms: how a gradient G becomes the update U (DESIGN §3, paper §1.7).

Each algorithm is a NamedTuple (`name`) with pure methods over tuples of parameter-shaped arrays
(..., m, n); gates `lr`, `beta` are numbers or arrays broadcasting against the batch dims (...):
  init(params)                       -> momentum state (tuple of zeros) or None
  effective_lr(lr, k)                -> the rate actually used for token k (implicit() rescales it)
  update(G, momentum, lr, beta=None) -> (U, momentum')
"""
from typing import NamedTuple

import mirascore.autodiff.numpy as anp

from ._checks import expand


def _no_state(self, params):
    return None


def _plain_lr(self, lr, k):
    return lr


def _descent(self, G, momentum, lr, beta=None):
    """U = −lr·G."""
    lr = expand(lr, 2)
    return tuple(-lr * g for g in G), None


class GD(NamedTuple):
    """Online gradient descent (paper Eq. 5): U = −lr·G."""
    name: str
    init = _no_state
    effective_lr = _plain_lr
    update = _descent


class Momentum(NamedTuple):
    """Gradient descent with momentum (Titans Eqs. 13–14): S ← β·S − lr·G, U = S; S starts at 0."""
    name: str
    effective_lr = _plain_lr

    def init(self, params):
        return tuple(anp.zeros_like(p) for p in params)

    def update(self, G, momentum, lr, beta=None):
        lr, beta = expand(lr, 2), expand(beta, 2)
        S = tuple(beta * s - lr * g for s, g in zip(momentum, G))
        return S, S


class Implicit(NamedTuple):
    """Implicit (proximal-point) GD for l2 bias, linear memory, no retention (Longhorn):
    W ← W − (lr/(1 + lr·kᵀk))·(W k − v) kᵀ, i.e. gd with the effective rate lr/(1 + lr·kᵀk)."""
    name: str
    init = _no_state
    update = _descent

    def effective_lr(self, lr, k):
        return lr / (1.0 + lr * anp.sum(k * k, axis=-1))


def gd():
    """U = −lr·G."""
    return GD("gd")


def momentum():
    """S ← β·S − lr·G, U = S (needs the `beta=` gate, β ∈ [0, 1))."""
    return Momentum("momentum")


def implicit():
    """Longhorn's implicit step: gd with rate lr/(1 + lr·kᵀk); only with l2 bias, linear memory and
    none() retention."""
    return Implicit("implicit")
