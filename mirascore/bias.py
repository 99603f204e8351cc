"""Attentional biases: the per-token loss ℓ(M(k), v) the memory is trained on (docs/contract.md §3, paper §3).

Each bias is a NamedTuple (`name` + hyperparameters) with pure methods over y = M(W, k) and v,
both (..., d_out), with r = y − v (the protocol: docs/internals.md):
  loss(y, v, delta=None) -> (...,)        ℓ, written with autodiff ops (differentiable)
  psi(y, v, delta=None)  -> (..., d_out)  hand-derived ψ = ∂ℓ/∂y
  psi_vjp(y, v, delta, dpsi) -> (dy, dv, ddelta)   hand-derived VJP of psi (the anchored scan's
                                          backward); ddelta only for the per-token δ gate, else None
  needs_delta                             True for huber(delta=None): δ comes as the per-token gate
  psi_slope                               l2 (1) and dot (0) only: ψ = psi_slope·y − v, which lets a
                                          linear memory run the exact delta-rule chunked form
A per-token `delta` is a number or an array broadcasting against (...); only huber uses it.
The psi_vjp methods follow the forward's branches exactly: away from the kinks (|r_j| = δ,
‖r‖ = δ, r = 0 for p < 2) they are the exact derivatives; at a kink the inside branch is taken,
as the forward's `≤` does.
"""
from typing import NamedTuple

import numpy as np

import mirascore.autodiff.numpy as anp

from .fusable import fusable
from .gates import abs_power, expand, signed_power
from .validation import choice, hyper


def _norm(r):
    """‖r‖₂ over the last axis, kept as (..., 1)."""
    return anp.sqrt(anp.sum(r * r, axis=-1, keepdims=True))


class Dot(NamedTuple):
    """Hebbian bias (paper Eq. 8): ℓ = −⟨M(k), v⟩, ψ = −v."""
    name: str
    needs_delta = False
    psi_slope = 0.0

    def loss(self, y, v, delta=None):
        return -anp.sum(y * v, axis=-1)

    def psi(self, y, v, delta=None):
        return anp.broadcast_to(-v, np.broadcast_shapes(y.shape, v.shape))

    def psi_vjp(self, y, v, delta, dpsi):
        return 0.0 * dpsi, -dpsi, None              # ψ = −v does not depend on y


class L2(NamedTuple):
    """Delta-rule bias: ℓ = ½‖r‖², ψ = r (the paper's factor 2 is absorbed in lr)."""
    name: str
    needs_delta = False
    psi_slope = 1.0

    def loss(self, y, v, delta=None):
        r = y - v
        return 0.5 * anp.sum(r * r, axis=-1)

    def psi(self, y, v, delta=None):
        return y - v

    def psi_vjp(self, y, v, delta, dpsi):
        return dpsi, -dpsi, None


class Lp(NamedTuple):
    """ℓp bias (paper Eqs. 10–11, Moneta): ℓ = (1/p) Σ|r_j|^p, ψ = sign(r)|r|^(p−1).

    With `slope` set, ψ is Remark 5's surrogate tanh(slope·r)·(r² + eps)^((p−1)/2), smooth at r = 0
    (needed for p < 2 when training through the memory); it is not the gradient of an elementary
    loss, so `loss` then raises NotImplementedError.
    """
    name: str
    p: float
    slope: float | None
    eps: float
    needs_delta = False

    def loss(self, y, v, delta=None):
        if self.slope is not None:
            raise NotImplementedError(
                f"lp(p={self.p}, smooth=...) defines only psi (Remark 5's tanh/sqrt surrogate has no "
                f"elementary loss); use psi, or lp(p) without smoothing for a loss")
        return anp.sum(abs_power(y - v, self.p), axis=-1) / self.p

    def psi(self, y, v, delta=None):
        r = y - v
        if self.slope is not None:
            return anp.tanh(self.slope * r) * (r * r + self.eps) ** (0.5 * (self.p - 1.0))
        return signed_power(r, self.p - 1.0)

    def psi_vjp(self, y, v, delta, dpsi):
        r, p = y - v, self.p
        if self.slope is not None:                   # ψ = tanh(s r)(r² + ε)^((p−1)/2)
            tau, base = anp.tanh(self.slope * r), r * r + self.eps
            dr = dpsi * (self.slope * (1.0 - tau * tau) * base ** (0.5 * (p - 1.0))
                         + tau * (p - 1.0) * r * base ** (0.5 * (p - 3.0)))
        elif p == 1.0:                               # ψ = sign(r): zero derivative a.e.
            dr = 0.0 * dpsi
        else:
            dr = lp_psi_derivative(r, dpsi, p)
        return dr, -dr, None


@fusable
def lp_psi_derivative(r, dpsi, p):
    """dpsi ⊙ ∂ψ/∂r for ψ = sign(r)|r|^(p−1): dpsi·(p−1)|r|^(p−2)."""
    return dpsi * ((p - 1.0) * abs_power(r, p - 2.0))


class Huber(NamedTuple):
    """Huber bias (paper Eqs. 13–16) with threshold δ, static or the per-token `delta` gate.

    kind="coord"   ℓ = Σ_j H_δ(r_j)                         ψ = clip(r, −δ, δ)
    kind="norm"    ℓ = H_δ(‖r‖)                             ψ = r·min(1, δ/‖r‖)
    kind="mixture" ℓ = ½‖r‖² if ‖r‖ ≤ δ else δ‖r‖₁ (Yaad, Eq. 26)   ψ = r if ‖r‖ ≤ δ else δ·sign(r)
    with H_δ(a) = ½a² for |a| ≤ δ, δ(|a| − ½δ) beyond. The mixture loss is discontinuous at
    ‖r‖ = δ (as Eq. 26 is); its gradient is ψ everywhere else.
    """
    name: str
    delta: float | None
    kind: str

    @property
    def needs_delta(self):
        return self.delta is None

    def _delta(self, delta):
        """δ as a number or as (..., 1) against r."""
        if (delta is None) == (self.delta is None):
            raise ValueError(f"huber needs δ exactly once: static delta={self.delta!r}, gate "
                             f"delta={'None' if delta is None else 'given'}")
        return self.delta if delta is None else expand(delta, 1)

    def loss(self, y, v, delta=None):
        d, r = self._delta(delta), y - v
        if self.kind == "coord":
            # H_δ(a) = ½m² + δ(a − m), m = min(a, δ): one expression for both pieces; ½ outside
            # the sum so that δ → ∞ gives l2's ½Σr² to the last bit
            a = anp.abs(r)
            m = anp.minimum(a, d)
            return 0.5 * anp.sum(m * m, axis=-1) + anp.sum(d * (a - m), axis=-1)
        sq = anp.sum(r * r, axis=-1, keepdims=True)
        inside = sq <= d * d
        if self.kind == "norm":
            # the outer branch's norm is floored at δ so that no 0/0 reaches the gradient at r = 0
            outer = d * (anp.sqrt(anp.maximum(sq, d * d)) - 0.5 * d)
            return anp.where(inside, 0.5 * sq, outer)[..., 0]
        return anp.where(inside, 0.5 * sq, d * anp.sum(anp.abs(r), axis=-1, keepdims=True))[..., 0]

    def psi(self, y, v, delta=None):
        d, r = self._delta(delta), y - v
        if self.kind == "coord":
            return anp.minimum(anp.maximum(r, -d), d)
        if self.kind == "norm":
            return r * (d / anp.maximum(_norm(r), d))       # = r·min(1, δ/‖r‖), no 0/0 at r = 0
        return anp.where(anp.sum(r * r, axis=-1, keepdims=True) <= d * d, r, d * anp.sign(r))

    def psi_vjp(self, y, v, delta, dpsi):
        d, r = self._delta(delta), y - v
        gate = self.delta is None
        if self.kind == "coord":                     # ψ = clip(r, −δ, δ)
            inside = anp.abs(r) <= d
            dr = anp.where(inside, dpsi, 0.0)
            ddelta = anp.sum(anp.where(inside, 0.0, dpsi * anp.sign(r)), axis=-1)
            return dr, -dr, ddelta if gate else None
        n = anp.sqrt(anp.sum(r * r, axis=-1, keepdims=True))
        inside = n <= d
        if self.kind == "norm":                      # ψ = r·min(1, δ/‖r‖)
            n_out = anp.where(inside, 1.0, n)        # outside, ‖r‖ > δ > 0
            r_hat = r / n_out
            proj = anp.sum(r_hat * dpsi, axis=-1, keepdims=True)
            dr = anp.where(inside, dpsi, (d / n_out) * (dpsi - r_hat * proj))
            ddelta = anp.where(inside, 0.0, proj)[..., 0]
        else:                                        # mixture: ψ = r or δ·sign(r)
            dr = anp.where(inside, dpsi, 0.0)
            ddelta = anp.where(inside, 0.0, anp.sum(dpsi * anp.sign(r), axis=-1, keepdims=True))[..., 0]
        return dr, -dr, ddelta if gate else None


class Robust(NamedTuple):
    """Value-shift-robust bias (paper Eq. 17): ℓ = ½(‖r‖ + Δ)², ψ = r + Δ·r/sqrt(‖r‖² + eps).

    `loss` uses the same eps, ½(sqrt(‖r‖² + eps) + Δ)², so that ψ is its exact gradient.
    """
    name: str
    radius: float
    eps: float
    needs_delta = False

    def loss(self, y, v, delta=None):
        r = y - v
        return 0.5 * (anp.sqrt(anp.sum(r * r, axis=-1) + self.eps) + self.radius) ** 2

    def psi(self, y, v, delta=None):
        r = y - v
        return r + self.radius * r / anp.sqrt(anp.sum(r * r, axis=-1, keepdims=True) + self.eps)

    def psi_vjp(self, y, v, delta, dpsi):
        # ψ = r + Δ r/n, n = sqrt(‖r‖² + ε): ∂ψ/∂r = I + Δ(I/n − r rᵀ/n³), symmetric
        r = y - v
        n = anp.sqrt(anp.sum(r * r, axis=-1, keepdims=True) + self.eps)
        dr = dpsi + self.radius * (dpsi / n - r * anp.sum(r * dpsi, axis=-1, keepdims=True) / (n * n * n))
        return dr, -dr, None


def dot():
    """ℓ = −⟨M(k), v⟩ (linear attention, RetNet, Mamba2)."""
    return Dot("dot")


def l2():
    """ℓ = ½‖M(k) − v‖² (delta rule, TTT, Titans, Memora)."""
    return L2("l2")


def lp(p, smooth=None):
    """ℓ = (1/p)‖M(k) − v‖_p^p, p ≥ 1 (Moneta). smooth = slope or (slope, eps), eps = 1e-6 unless
    given: ψ becomes tanh(slope·r)·(r² + eps)^((p−1)/2) (paper Remark 5)."""
    p = hyper("p", p, ge=1)
    if smooth is None:
        return Lp("lp", p, None, 1e-6)
    slope, eps = smooth if isinstance(smooth, tuple) else (smooth, 1e-6)
    return Lp("lp", p, hyper("smooth slope", slope, gt=0), hyper("smooth eps", eps, gt=0))


def huber(delta=None, kind="coord"):
    """Huber bias with threshold δ > 0; delta=None makes δ the per-token `delta=` gate of step/scan.
    kind: "coord" (Eq. 14), "norm" (Eq. 15) or "mixture" (Yaad, Eqs. 16/26)."""
    kind = choice("kind", kind, ("coord", "norm", "mixture"))
    return Huber("huber", None if delta is None else hyper("delta", delta, gt=0), kind)


def robust(radius, eps=1e-6):
    """ℓ = ½(‖M(k) − v‖ + Δ)² with radius Δ ≥ 0 (paper Eq. 17)."""
    return Robust("robust", hyper("radius", radius, ge=0), hyper("eps", eps, gt=0))
