"""Named models as points of the Miras design space (paper Table 1), each a `Rule`.

Start one with `mc.init(rule.memory, params, retention=rule.retention, algorithm=rule.algorithm)`
and run it with `mc.scan(state, K, V, Q, bias=rule.bias, lr=..., alpha=...)`. Each docstring gives
the model's published recurrence in our gates (lr = η, alpha = α, beta = momentum decay, delta = δ);
G = ∇_W ℓ at the weights before the token.
"""
from . import algorithm, bias, memory, retention
from .state import Rule


def _linear(d_k, d_v, bias_, retention_, algorithm_=None):
    return Rule(memory.linear(d_k, d_k if d_v is None else d_v), bias_, retention_,
                algorithm.gd() if algorithm_ is None else algorithm_)


def moneta(d, p=3, q=4):
    """Moneta (Eq. 24): A ← α·A − lr·∇ℓ_p(W), W = A/‖A‖_q^(q−2); mlp memory, (1/p)‖r‖_p^p bias."""
    return Rule(memory.mlp(d), bias.lp(p), retention.lq(q), algorithm.gd())


def yaad(d, delta=None):
    """Yaad (Eq. 26): W ← α·W − lr·J_Wᵀψ, ψ = r if ‖r‖ ≤ δ else δ·sign(r); δ=None: the delta= gate."""
    return Rule(memory.mlp(d), bias.huber(delta, kind="mixture"), retention.l2(), algorithm.gd())


def memora(d, scale=1.0):
    """Memora (Eq. 27): W ← scale·softmax(α·log(W/scale) − lr·∇ℓ₂(W)) per row; mlp memory."""
    return Rule(memory.mlp(d), bias.l2(), retention.kl(scale), algorithm.gd())


def titans(d):
    """Titans LMM (Eqs. 13–14): S ← β·S − lr·∇ℓ₂(W), W ← α·W + S; mlp memory (α = 1 − Titans' α)."""
    return Rule(memory.mlp(d), bias.l2(), retention.l2(), algorithm.momentum())


def ttt_mlp(d):
    """TTT-MLP: W ← W − lr·∇½‖M(k) − v‖², M(k) = k + LN(W1 gelu(W2 k))."""
    return Rule(memory.mlp(d), bias.l2(), retention.none(), algorithm.gd())


def ttt_linear(d_k, d_v=None):
    """TTT-Linear: W ← W − lr·(W k − v) kᵀ."""
    return _linear(d_k, d_v, bias.l2(), retention.none())


def deltanet(d_k, d_v=None):
    """DeltaNet: W ← W (I − lr·k kᵀ) + lr·v kᵀ (lr is DeltaNet's β)."""
    return _linear(d_k, d_v, bias.l2(), retention.none())


def gated_deltanet(d_k, d_v=None):
    """Gated DeltaNet: W ← α·W (I − lr·k kᵀ) + lr·v kᵀ (gradient at the retained α·W)."""
    return _linear(d_k, d_v, bias.l2(), retention.l2(grad_at="retained"))


def linear_attention(d_k, d_v=None):
    """Linear attention: W ← W + lr·v kᵀ (lr = 1 in the original)."""
    return _linear(d_k, d_v, bias.dot(), retention.none())


def mamba2(d_k, d_v=None):
    """Mamba2 (SSD): W ← α_t·W + lr_t·v kᵀ (α_t = exp(Δ_t·A) with A < 0, lr_t = Δ_t; k = B, v = x, q = C)."""
    return _linear(d_k, d_v, bias.dot(), retention.l2())


def retnet(d_k, d_v=None):
    """RetNet: W ← α·W + lr·v kᵀ with a constant per-head decay α (= RetNet's γ)."""
    return _linear(d_k, d_v, bias.dot(), retention.l2())


def longhorn(d_k, d_v=None):
    """Longhorn: W ← W − (lr/(1 + lr·kᵀk))·(W k − v) kᵀ (implicit online regression; lr = β)."""
    return _linear(d_k, d_v, bias.l2(), retention.none(), algorithm.implicit())
