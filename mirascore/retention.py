"""Retention gates: how the memory keeps (or lets go of) its past (docs/contract.md §3, paper §4).

A gate stores one array s per parameter matrix (W itself, or a quantity W is exposed from) and
maps (s, U, α) to the next s, where U is the algorithm's update (−lr·G for gd). Every gate is a
NamedTuple (`name` + hyperparameters) with pure methods, one parameter array at a time
(s: (..., m, n); gates `alpha`, `lr`: numbers or arrays broadcasting against the batch dims (...)).
The protocol (docs/internals.md):

per token (step, ref.scan)
  expose(s)                 -> W, the weights the memory uses
  gradient_scale(alpha)     -> c: the gradient is taken at c·W (None: at W itself)
  update(s, U, alpha)       -> s', one token: prox(α·canonical(s) + U)  (`update_from_pieces`)
  objective(s, s_prev, G, lr, alpha) -> (...,), minimised over s by update(s_prev, −lr·G, alpha)
anchored chunked form (scan, ref.scan_chunked; docs/contract.md §4)
  canonical(s)              -> s in the coordinates where the update is α·s + U (kl: log(W/scale))
  prox(s)                   -> the map applied once per chunk end (elastic net's S_γ)
  read_scale(s_anchor)      -> ν: in-chunk reads see ν·s_t (a number, or (..., 1, 1) from the
                               anchor); None: they read the anchor's weights expose(s_anchor)
optional
  stored(W)                 -> s with expose(s) = W, where expose is onto (not kl, sigmoid: their
                               W are positive); mirascore.lm parametrises learned memories by it
and their VJPs, hand-derived here (`expose_vjp(s, W, dW)`, `canonical_vjp(s, ds)`,
`prox_vjp(s, ds)`, `read_scale_vjp(s_anchor, dnu)`, and `anchor_vjp(s, W, dW, dnu)`, the sum of the
first and the last at the chunk's anchor); a gate of one's own may leave them to autodiff.
Capabilities: `uses_alpha` (False for none(): α must be 1) and `delta_rule_gates` (none, l2: the
gates that keep W itself and decay it linearly, so that the exact delta-rule chunked form applies).
"""
from typing import NamedTuple

import mirascore.autodiff.numpy as anp

from .fusable import fusable
from .gates import abs_power, expand, signed_power
from .validation import choice, hyper

_MATRIX = (-2, -1)  # every reduction is per weight matrix (per batch element / head)


def _sum(x):
    return anp.sum(x, axis=_MATRIX)


def update_from_pieces(gate, s, U, alpha):
    """One token's update from the chunked form's pieces: prox(α·canonical(s) + U), and
    prox(canonical(s) + U) for a gate without decay. With chunk = 1 the anchored scan computes
    exactly this, so per-token and chunked semantics share one definition."""
    z = gate.canonical(s)
    z = z + U if not getattr(gate, "uses_alpha", True) else expand(alpha, 2) * z + U
    return gate.prox(z)


def _identity(self, s):
    return s


def _identity_vjp(self, *args):
    """VJP of an identity map: the cotangent (the last argument) passes through."""
    return args[-1]


def _at_weights(self, alpha):
    return None


def _no_scale(self, s_anchor):
    return 1.0


def _proximal(W, W_prev, G, lr, alpha):
    """⟨W, G⟩ + (1/(2 lr))‖W − α W'‖²: the ℓ2 learning–retaining objective (paper §1.5)."""
    return _sum(W * G) + _sum((W - expand(alpha, 2) * W_prev) ** 2) / (2.0 * lr)


def _times(slope, x):
    """slope·x for the delta-rule gates, without a multiplication for slope 0 or 1."""
    return 0.0 if slope == 0 else x if slope == 1 else slope * x


class NoRetention(NamedTuple):
    """No retention: W ← W + U (α must be 1). Objective ⟨W, G⟩ + (1/(2lr))‖W − W'‖²."""
    name: str
    uses_alpha = False
    expose = canonical = prox = stored = _identity
    expose_vjp = canonical_vjp = prox_vjp = _identity_vjp
    gradient_scale = _at_weights
    read_scale = _no_scale
    update = update_from_pieces

    def delta_rule_gates(self, alpha, lr, slope):
        return alpha, _times(slope, lr), lr

    def objective(self, s, s_prev, G, lr, alpha):
        return _proximal(s, s_prev, G, lr, 1.0)


class L2(NamedTuple):
    """Decoupled ℓ2 retention (Titans/Yaad): W ← α·W + U.

    grad_at="retained" takes the gradient at α·W instead (Gated DeltaNet / Mamba2 / RWKV-7 form),
    so with gd W ← α·W − lr·∇ℓ(α·W). Objective ⟨W, G⟩ + (1/(2lr))‖W − αW'‖².
    """
    name: str
    grad_at: str
    expose = canonical = prox = stored = _identity
    expose_vjp = canonical_vjp = prox_vjp = _identity_vjp
    read_scale = _no_scale
    update = update_from_pieces

    def gradient_scale(self, alpha):
        return alpha if self.grad_at == "retained" else None

    def delta_rule_gates(self, alpha, lr, slope):
        """W_t = α W (I − b k kᵀ) + c v kᵀ: with the gradient at W, ψ = slope·(W k) − v gives
        b = slope·lr/α; at α·W, b = slope·lr (docs/derivations/chunked-delta.md)."""
        b = _times(slope, lr)
        return alpha, (b / alpha if self.grad_at == "state" and slope else b), lr

    def objective(self, s, s_prev, G, lr, alpha):
        return _proximal(s, s_prev, G, lr, alpha)


@fusable
def lq_power_sum(A, q):
    """Σ|A_ij|^q over each matrix: (..., 1, 1)."""
    return anp.sum(abs_power(A, q), axis=_MATRIX, keepdims=True)


@fusable
def lq_norm_vjp(A, nu, dW, coef, q):
    """nu·dW + coef·sign(A)|A|^(q−1): the VJP of A ↦ ν(A)·A; nu, dW None for ν(A) alone."""
    dA = coef * signed_power(A, q - 1.0)
    return dA if nu is None else nu * dW + dA


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
    canonical_vjp = prox_vjp = _identity_vjp
    gradient_scale = _at_weights
    update = update_from_pieces

    def _scale(self, A):
        """(ν, n): ν = max(n, eps)^(2−q), n = ‖A‖_q; both (..., 1, 1)."""
        n = lq_power_sum(A, self.q) ** (1.0 / self.q)
        return anp.maximum(n, self.eps) ** (2.0 - self.q), n

    def read_scale(self, s_anchor):
        return self._scale(s_anchor)[0]

    def expose(self, s):
        return s * self.read_scale(s)

    def stored(self, W):
        """A with expose(A) = W (for ‖A‖_q > eps): ‖W‖_q = ‖A‖_q^(3−q), so A = W·‖W‖_q^((q−2)/(3−q)).
        q = 3 exposes only matrices of unit ℓ3 norm (W/‖W‖₃): W itself is returned."""
        if self.q == 3:
            return W
        # |W|**q as a float power, not lq_power_sum's products: the 1e-16 difference would move
        # the learned initial memories, and Adam turns rounding-level gradients into ±lr steps
        norm = anp.sum(anp.abs(W) ** self.q, axis=_MATRIX, keepdims=True) ** (1.0 / self.q)
        return W * norm ** ((self.q - 2.0) / (3.0 - self.q))

    def _scale_vjp(self, A, n, dnu, nu=None, dW=None):
        """dA of ν(A) for dν; with nu and dW, plus the VJP of A ↦ ν·A at fixed ν. The ν part is
        zero on the eps branch (ν constant there): dν (2−q) n^(2−2q) sign(A)|A|^(q−1) for n > eps."""
        big = n > self.eps
        n_safe = anp.where(big, n, 1.0)
        coef = anp.where(big, dnu * (2.0 - self.q) * n_safe ** (2.0 - 2.0 * self.q), 0.0)
        return lq_norm_vjp(A, nu, dW, coef, self.q)

    def read_scale_vjp(self, s_anchor, dnu):
        return self._scale_vjp(s_anchor, self._scale(s_anchor)[1], dnu)

    def expose_vjp(self, s, W, dW):
        return self.anchor_vjp(s, W, dW, None)

    def anchor_vjp(self, s, W, dW, dnu):
        """expose_vjp(s, W, dW) + read_scale_vjp(s, dnu) with one norm and one pass (W = ν·s:
        dν collects ⟨dW, s⟩ and the reads' dν)."""
        nu, n = self._scale(s)
        dnu_all = anp.sum(dW * s, axis=_MATRIX, keepdims=True)
        return self._scale_vjp(s, n, dnu_all if dnu is None else dnu_all + dnu, nu, dW)

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
    prox = _identity
    prox_vjp = _identity_vjp
    gradient_scale = _at_weights
    update = update_from_pieces

    def expose(self, s):
        e = anp.exp(s - anp.max(s, axis=-1, keepdims=True))
        return self.scale * e / anp.sum(e, axis=-1, keepdims=True)

    def expose_vjp(self, s, W, dW):
        return W * (dW - anp.sum(dW * W, axis=-1, keepdims=True) / self.scale)

    def canonical(self, s):
        """log_softmax(L) = log(W/scale), shifted by the row maximum (whose derivative cancels)."""
        z = s - anp.max(s, axis=-1, keepdims=True)
        return z - anp.log(anp.sum(anp.exp(z), axis=-1, keepdims=True))

    def canonical_vjp(self, s, ds):
        return ds - self.expose(s) / self.scale * anp.sum(ds, axis=-1, keepdims=True)

    def read_scale(self, s_anchor):
        return None

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
    objective_is_smooth = False     # an l1 term: mirascore.testing checks it by subgradients
    expose = canonical = stored = _identity
    expose_vjp = canonical_vjp = _identity_vjp
    gradient_scale = _at_weights
    read_scale = _no_scale
    update = update_from_pieces

    def prox(self, s):
        return anp.sign(s) * anp.maximum(anp.abs(s) - self.gamma, 0.0)

    def prox_vjp(self, s, ds):
        return anp.where(anp.abs(s) > self.gamma, ds, 0.0)

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
    canonical_vjp = prox_vjp = _identity_vjp
    gradient_scale = _at_weights
    update = update_from_pieces

    def expose(self, s):
        return anp.sigmoid(s)

    def expose_vjp(self, s, W, dW):
        return dW * W * (1.0 - W)

    def read_scale(self, s_anchor):
        return None

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
