"""Memory learning algorithms: how a gradient G becomes the update U (docs/contract.md §3, paper §1.7).

Each algorithm is a NamedTuple (`name`) with pure methods over tuples of parameter-shaped arrays
(..., m, n); gates `lr`, `beta` are numbers or arrays broadcasting against the batch dims (...)
(the protocol: docs/internals.md):
  init(params)                       -> momentum state (tuple of zeros) or None
  effective_lr(lr, k)                -> the rate actually used for token k (implicit() rescales it)
  update(G, momentum, lr, beta=None) -> (U, momentum')
  uses_momentum                      True: S ← β·S − lr·G, U = S (the beta= gate); False: U = −lr·G.
                                     The chunked forms run these two recurrences in closed form.
"""
from typing import NamedTuple

import mirascore.autodiff.numpy as anp

from .gates import expand


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
    uses_momentum = False
    init = _no_state
    effective_lr = _plain_lr
    update = _descent


class Momentum(NamedTuple):
    """Gradient descent with momentum (Titans Eqs. 13–14): S ← β·S − lr·G, U = S; S starts at 0."""
    name: str
    uses_momentum = True
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
    uses_momentum = False
    init = _no_state
    update = _descent

    def effective_lr(self, lr, k):
        return lr / (1.0 + lr * anp.sum(k * k, axis=-1))

    def check_rule(self, memory, bias, retention):
        """The implicit step is derived for ψ = y − v (l2), M = W k (linear) and no decay (none())."""
        wrong = [f"{what} {spec!r}" for what, spec, fits in (
            ("bias", bias, getattr(bias, "psi_slope", None) == 1.0),
            ("memory", memory, getattr(memory, "matrix_memory", False)),
            ("retention", retention, not getattr(retention, "uses_alpha", True)
             and hasattr(retention, "delta_rule_gates"))) if spec is not None and not fits]
        if wrong:
            raise ValueError("algorithm implicit() needs l2 bias, linear memory and none() retention; "
                             "got " + ", ".join(wrong))


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
