"""The layers every model shares, as pure functions of arrays (autodiff ops or small primitives).

Shapes: x (B, T, C) activations; weights are plain arrays from the params dict.
The derivations of the hand-written VJPs (cross-entropy) are in docs/derivations/lm-layers.md.
"""
import numpy as np

import mirascore.autodiff as ad
import mirascore.autodiff.numpy as anp
from mirascore._xp import namespace
from mirascore.autodiff.tracer import unbox


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x²) + eps) ⊙ weight over the last axis."""
    return x / anp.sqrt(anp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):
    return x * anp.sigmoid(x)


def softplus(x):
    """log(1 + eˣ), stable for large |x|."""
    return anp.maximum(x, 0.0) + anp.log1p(anp.exp(-anp.abs(x)))


def l2_normalize(x, eps=1e-6):
    """x / sqrt(‖x‖² + eps) over the last axis (the q, k normalisation of the Miras layer)."""
    return x / anp.sqrt(anp.sum(x * x, axis=-1, keepdims=True) + eps)


def swiglu(x, w_gate, w_up, w_down):
    """(silu(x W_gate) ⊙ x W_up) W_down: the feed-forward block."""
    return anp.matmul(silu(anp.matmul(x, w_gate)) * anp.matmul(x, w_up), w_down)


def dropout_rng(xp, seed):
    """The generator of one forward pass's dropout masks, on xp's device: xp.random.default_rng of
    one int derived from `seed` (an int or a tuple of ints ≥ 0). CuPy's generator draws on the GPU
    (nothing is drawn on the host and copied), and it takes one int, hence the derivation."""
    entropy = list(seed) if isinstance(seed, (tuple, list)) else [seed]
    if not entropy or any(isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 0
                          for e in entropy):
        raise ValueError(f"dropout_seed must be an integer ≥ 0 or a tuple of them, got {seed!r}")
    return xp.random.default_rng(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))


def dropout_mask(rng, shape, rate, dtype):
    """Inverted dropout's mask: 0 with probability `rate`, else 1/(1 − rate), so that E[mask ⊙ x] = x
    and evaluation needs no rescaling. The uniforms are float32 whatever dtype (the same masks in
    float32 and float64 runs, and half the draws' memory)."""
    keep = rng.random(shape, dtype=np.float32) >= np.float32(rate)
    return keep.astype(dtype) * np.dtype(dtype).type(1.0 / (1.0 - rate))


def dropout(x, rate, rng):
    """x ⊙ mask (inverted dropout); the identity when rng is None (evaluation) or rate is 0. The mask
    is a plain array, a constant to autodiff: the gradient is g ⊙ mask with no primitive of its own."""
    if rng is None or rate == 0:
        return x
    value = unbox(x)
    return x * dropout_mask(rng, value.shape, rate, value.dtype)


def causal_conv(x, weight, history=None):
    """Causal depthwise convolution along time: y_t = Σ_j weight[j] ⊙ x_{t−K+1+j}.

    x (B, T, C), weight (K, C). `history` (B, K−1, C) holds the inputs before x (zeros at the
    start of a sequence); the new history, the last K−1 inputs, is returned beside y for decoding.
    """
    K, T = weight.shape[0], x.shape[1]
    if history is None:
        xp = namespace(unbox(x))
        history = xp.zeros((x.shape[0], K - 1, x.shape[2]), dtype=unbox(x).dtype)
    padded = anp.concatenate([history, x], axis=1) if K > 1 else x
    y = padded[:, 0:T] * weight[0]
    for j in range(1, K):
        y = y + padded[:, j:j + T] * weight[j]
    return y, padded[:, padded.shape[1] - (K - 1):]


def split_heads(x, heads):
    """(B, T, H·D) -> (B, H, T, D)."""
    B, T, C = x.shape
    return anp.transpose(anp.reshape(x, (B, T, heads, C // heads)), (0, 2, 1, 3))


def merge_heads(x):
    """(B, H, T, D) -> (B, T, H·D)."""
    B, H, T, D = x.shape
    return anp.reshape(anp.transpose(x, (0, 2, 1, 3)), (B, T, H * D))


@ad.primitive
def embed(weight, tokens):
    """weight[tokens]: the rows of weight (V, C) for int tokens (...) -> (..., C)."""
    return weight[tokens]


def _embed_vjp(ans, weight, tokens):
    """∂/∂weight = onehot(tokens)ᵀ · g, as one matrix product: deterministic on the GPU, where
    a scatter-add of the rows (atomics) sums in a different order on every run and would break
    bit-exact resume."""
    def vjp(g):
        xp = namespace(weight)
        flat = tokens.reshape(-1)
        onehot = (flat[:, None] == xp.arange(weight.shape[0])[None, :]).astype(weight.dtype)
        return xp.matmul(onehot.T, g.reshape(flat.shape[0], weight.shape[1]))
    return vjp


ad.defvjp(embed, _embed_vjp, None)


@ad.primitive
def cross_entropy(logits, targets):
    """Mean of −log softmax(logits)[target] over all positions: logits (..., V), int targets (...)."""
    xp = namespace(logits)
    flat = logits.reshape(-1, logits.shape[-1])
    shift = flat - flat.max(axis=-1, keepdims=True)
    log_z = xp.log(xp.exp(shift).sum(axis=-1))
    picked = shift[xp.arange(flat.shape[0]), targets.reshape(-1)]
    return (log_z - picked).mean()


def _cross_entropy_vjp(ans, logits, targets):
    """∂/∂logits = (softmax(logits) − onehot(target)) / N (docs/derivations/lm-layers.md).
    Plain array code: first-order only."""
    def vjp(g):
        xp = namespace(logits)
        flat = logits.reshape(-1, logits.shape[-1])
        p = xp.exp(flat - flat.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        p[xp.arange(flat.shape[0]), targets.reshape(-1)] -= 1.0
        return (p * (g / flat.shape[0])).reshape(logits.shape)
    return vjp


ad.defvjp(cross_entropy, _cross_entropy_vjp, None)
