"""Retention gates: how the memory keeps (or lets go of) its past (DESIGN §3, paper §4).

A gate stores one array s per parameter matrix (W itself, or a quantity W is exposed from) and
maps (s, U, α) to the next s, where U is the algorithm's update (−lr·G for gd). Every gate is a
NamedTuple (`name` + hyperparameters) with pure methods, one parameter array at a time
(s: (..., m, n); gates `alpha`, `lr`: numbers or arrays broadcasting against the batch dims (...)):
  expose(s)                            -> W, the weights the memory uses
  retained(W, alpha)                   -> where the gradient is taken (W, or α·W)
  update(s, U, alpha)                  -> s', one token; = prox(accumulate(canonical(s), U, alpha))
  objective(s, s_prev, G, lr, alpha)   -> (...,), minimised over s by update(s_prev, −lr·G, alpha)
and the pieces the anchored chunked form (DESIGN §4) uses:
  canonical(s)                -> s in the coordinates where the update is linear (kl: log(W/scale))
  accumulate(s, U, alpha)     -> α·s + U, the linear recurrence followed inside a chunk
  prox(s)                     -> the map applied once per chunk end (elastic net's S_γ)
  read(s, s_anchor)           -> the in-chunk read weights: linear in s, or W̄ (docs/internals.md)
"""
from typing import NamedTuple

import mirascore.autodiff.numpy as anp

from ._checks import choice, expand, hyper

_MATRIX = (-2, -1)  # every reduction is per weight matrix (per batch element / head)


def _sum(x):
    return anp.sum(x, axis=_MATRIX)


def _identity(self, s):
    return s


def _no_shift(self, W, alpha):
    return W


def _accumulate(self, s, U, alpha):
    return expand(alpha, 2) * s + U


def _update(self, s, U, alpha):
    return self.prox(self.accumulate(self.canonical(s), U, alpha))


def _read_linear(self, s, s_anchor):
    return s


def _proximal(W, W_prev, G, lr, alpha):
    """⟨W, G⟩ + (1/(2 lr))‖W − α W'‖²: the ℓ2 learning–retaining objective (paper §1.5)."""
    return _sum(W * G) + _sum((W - expand(alpha, 2) * W_prev) ** 2) / (2.0 * lr)


class NoRetention(NamedTuple):
    """No retention: W ← W + U (α must be 1). Objective ⟨W, G⟩ + (1/(2lr))‖W − W'‖²."""
    name: str
    expose = canonical = prox = _identity
    retained = _no_shift
    read = _read_linear
    update = _update

    def accumulate(self, s, U, alpha):
        return s + U

    def objective(self, s, s_prev, G, lr, alpha):
        return _proximal(s, s_prev, G, lr, 1.0)


class L2(NamedTuple):
    """Decoupled ℓ2 retention (Titans/Yaad): W ← α·W + U.

    grad_at="retained" takes the gradient at α·W instead (Gated DeltaNet / Mamba2 / RWKV-7 form),
    so with gd W ← α·W − lr·∇ℓ(α·W). Objective ⟨W, G⟩ + (1/(2lr))‖W − αW'‖².
    """
    name: str
    grad_at: str
    expose = canonical = prox = _identity
    accumulate = _accumulate
    read = _read_linear
    update = _update

    def retained(self, W, alpha):
        return expand(alpha, 2) * W if self.grad_at == "retained" else W

    def objective(self, s, s_prev, G, lr, alpha):
        return _proximal(s, s_prev, G, lr, alpha)


class Lq(NamedTuple):
    """ℓq retention (Moneta, paper Eq. 24): stores the accumulator A, A ← α·A + U, exposed as
    W = A / max(‖A‖_q, eps)^(q−2) with ‖·‖_q over each weight matrix (per batch element / head).

    objective: the ℓ2-proximal objective on A itself, ⟨A, G⟩ + (1/(2lr))‖A − αA'‖², whose minimiser
    is the update. For q ≠ 2 Eq. 24's normalisation is not the gradient of a convex potential (no
    mirror map; q = 4 is outside the paper's 1 < q ≤ 2 derivation), so no objective over the
    exposed W exists; for q = 2, W = A and this is the l2 objective.
    In-chunk reads freeze the anchor's normaliser: A_t / max(‖Ā‖_q, eps)^(q−2).
    """
    name: str
    q: float
    eps: float
    canonical = prox = _identity
    retained = _no_shift
    accumulate = _accumulate
    update = _update

    def _scale(self, A):
        """max(‖A‖_q, eps)^(2−q): (..., 1, 1)."""
        norm = anp.sum(anp.abs(A) ** self.q, axis=_MATRIX, keepdims=True) ** (1.0 / self.q)
        return anp.maximum(norm, self.eps) ** (2.0 - self.q)

    def expose(self, s):
        return s * self._scale(s)

    def read(self, s, s_anchor):
        return s * self._scale(s_anchor)

    def objective(self, s, s_prev, G, lr, alpha):
        return _proximal(s, s_prev, G, lr, alpha)


class KL(NamedTuple):
    """KL retention on the scaled simplex (Memora, paper Eqs. 21/27), per row of each matrix.

    Stores logits L; W = scale·softmax(L) over the last (input) axis. Update
    L ← α·log(W/scale) + U = α·log_softmax(L) + U (L is defined up to per-row constants).
    Objective over L, with W = scale·softmax(L), W' = scale·softmax(L_prev):
        ⟨W, G⟩ + (1/lr) Σ W·[log(W/scale) − α·log(W'/scale)].
    In-chunk reads use the anchor's weights W̄ (docs/internals.md: a linearised softmax would cost
    O(b²·d_in·d_out) per chunk).
    """
    name: str
    scale: float
    retained = _no_shift
    accumulate = _accumulate
    prox = _identity
    update = _update

    def expose(self, s):
        return self.scale * anp.softmax(s, axis=-1)

    def canonical(self, s):
        return anp.log_softmax(s, axis=-1)

    def read(self, s, s_anchor):
        return self.expose(s_anchor)

    def objective(self, s, s_prev, G, lr, alpha):
        W = self.expose(s)
        log_ratio = anp.log_softmax(s, axis=-1) - expand(alpha, 2) * anp.log_softmax(s_prev, axis=-1)
        return _sum(W * G) + _sum(W * log_ratio) / lr


class ElasticNet(NamedTuple):
    """Elastic-net retention (paper Eq. 22): W ← S_γ(α·W + U), S_γ(z) = sign(z)·max(|z| − γ, 0).

    Objective ⟨W, G⟩ + (1/(2lr))‖W − αW'‖² + (γ/lr)‖W‖₁. In the anchored chunked form the
    threshold is applied once, at the chunk's end; in-chunk reads use the unthresholded state.
    """
    name: str
    gamma: float
    expose = canonical = _identity
    retained = _no_shift
    accumulate = _accumulate
    read = _read_linear
    update = _update

    def prox(self, s):
        return anp.sign(s) * anp.maximum(anp.abs(s) - self.gamma, 0.0)

    def objective(self, s, s_prev, G, lr, alpha):
        return _proximal(s, s_prev, G, lr, alpha) + self.gamma * _sum(anp.abs(s)) / lr


class Sigmoid(NamedTuple):
    """Bregman retention with the binary-entropy potential (paper §4.6, Variant 5): mirror descent
    in log-odds. Stores Z, W = σ(Z), Z ← α·logit(W) + U = α·Z + U.

    Objective over Z, with W = σ(Z), W' = σ(Z_prev):
        ⟨W, G⟩ + (1/lr)[Σ W log W + (1−W) log(1−W) − α⟨logit(W'), W⟩].
    In-chunk reads use the anchor's weights σ(Z̄), as kl does (docs/internals.md).
    """
    name: str
    canonical = prox = _identity
    retained = _no_shift
    accumulate = _accumulate
    update = _update

    def expose(self, s):
        return anp.sigmoid(s)

    def read(self, s, s_anchor):
        return anp.sigmoid(s_anchor)

    def objective(self, s, s_prev, G, lr, alpha):
        W = anp.sigmoid(s)
        # log W = −softplus(−Z), log(1 − W) = −softplus(Z): no log(0) for large |Z|
        entropy = -W * _softplus(-s) - (1.0 - W) * _softplus(s)
        return _sum(W * G) + _sum(entropy - expand(alpha, 2) * s_prev * W) / lr


def _softplus(x):
    """log(1 + eˣ) without overflow."""
    return anp.logsumexp(anp.stack([anp.zeros_like(x), x]), axis=0)


def none():
    """No retention: W ← W + U (passing alpha ≠ 1 to step/scan is an error)."""
    return NoRetention("none")


def l2(grad_at="state"):
    """W ← α·W + U; grad_at="retained" takes the gradient at α·W (Gated DeltaNet form)."""
    return L2("l2", choice("grad_at", grad_at, ("state", "retained")))


def lq(q, eps=1e-6):
    """Moneta's ℓq retention, q > 1: A ← α·A + U, W = A / max(‖A‖_q, eps)^(q−2) per matrix."""
    return Lq("lq", hyper("q", q, gt=1), hyper("eps", eps, gt=0))


def kl(scale=1.0):
    """Memora's KL retention: logits L ← α·log(W/scale) + U, W = scale·softmax(L) per row; scale > 0."""
    return KL("kl", hyper("scale", scale, gt=0))


def elastic_net(gamma):
    """W ← S_γ(α·W + U), soft threshold γ ≥ 0 (paper Eq. 22)."""
    return ElasticNet("elastic_net", hyper("gamma", gamma, ge=0))


def sigmoid():
    """Mirror descent in log-odds: Z ← α·Z + U, W = σ(Z) (paper Variant 5)."""
    return Sigmoid("sigmoid")
