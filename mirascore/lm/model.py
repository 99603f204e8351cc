"""The language model: Llama-style pre-norm blocks around a token mixer (docs/training.md,
"Architecture").

    embedding → depth × [x += mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))] → RMSNorm → logits

With cfg.dropout > 0 and a `dropout_seed` (training only), inverted dropout acts on the embedding
and on each mixer and SwiGLU output before it joins the residual stream, as nanoGPT's; without a
seed (evaluation, sampling, decoding) there is none.

Parameters are a flat dict of arrays keyed by dotted names (the safetensors keys), e.g.
"blocks.0.mixer.q.weight". Names ending in ".weight" are projection matrices, the only ones AdamW
decays; ".gain" (norms), ".bias", ".kernel" (convolutions) and "memory.<i>" (learned initial
memories) are not decayed.
"""
from typing import NamedTuple

import numpy as np

import mirascore.autodiff.numpy as anp
from mirascore._xp import namespace
from mirascore.autodiff.tracer import unbox

from . import mixers
from .layers import cross_entropy, dropout, dropout_rng, embed, rms_norm, swiglu
from .mixers import Param, constant, normal, projection


def param_specs(cfg):
    """{name: Param}: every parameter's shape, initialiser and weight decay, in a fixed order."""
    C, F = cfg.width, cfg.ffn
    specs = {"embed.weight": Param((cfg.vocab, C), normal(cfg.init_std), True)}
    mixer = mixers.mixer(cfg)
    for i in range(cfg.depth):
        block = f"blocks.{i}."
        specs[block + "mixer_norm.gain"] = Param((C,), constant(1.0), False)
        specs.update({block + "mixer." + n: p for n, p in mixer.params(cfg).items()})
        specs[block + "ffn_norm.gain"] = Param((C,), constant(1.0), False)
        specs[block + "ffn.gate.weight"] = projection(cfg, C, F)
        specs[block + "ffn.up.weight"] = projection(cfg, C, F)
        specs[block + "ffn.down.weight"] = projection(cfg, F, C, out=True)
    specs["norm.gain"] = Param((C,), constant(1.0), False)
    if not cfg.tie_embeddings:
        specs["head.weight"] = projection(cfg, C, cfg.vocab)
    return specs


def init(cfg, seed=0, dtype=None, xp=np):
    """A fresh params dict (numpy, or CuPy with xp=cupy); dtype defaults to cfg.dtype. The values
    are drawn in float64 on the host from one generator, so they do not depend on dtype or device
    beyond the final rounding."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(cfg.dtype if dtype is None else dtype)
    return {name: xp.asarray(spec.init(rng, spec.shape).astype(dtype))
            for name, spec in param_specs(cfg).items()}


def decays(name):
    """Whether AdamW's weight decay applies to parameter `name` (projection matrices only)."""
    return name.endswith(".weight")


def param_count(cfg, embeddings=True):
    """Number of parameters (with embeddings=False: without the token embedding)."""
    specs = param_specs(cfg)
    return sum(int(np.prod(s.shape)) for n, s in specs.items() if embeddings or n != "embed.weight")


def _block(params, i):
    prefix = f"blocks.{i}."
    return {n[len(prefix):]: a for n, a in params.items() if n.startswith(prefix)}


def _sub(params, prefix):
    return {n[len(prefix):]: a for n, a in params.items() if n.startswith(prefix)}


def _ffn(block, x, cfg):
    h = rms_norm(x, block["ffn_norm.gain"], cfg.norm_eps)
    return swiglu(h, block["ffn.gate.weight"], block["ffn.up.weight"], block["ffn.down.weight"])


def _logits(params, x, cfg):
    x = rms_norm(x, params["norm.gain"], cfg.norm_eps)
    head = params["head.weight"] if "head.weight" in params else anp.transpose(params["embed.weight"])
    return anp.matmul(x, head)


def forward(params, tokens, cfg, dropout_seed=None):
    """Logits (B, T, vocab) for int tokens (B, T); causal: position t sees tokens ≤ t only.
    dropout_seed (an int or a tuple of ints; training only): draw cfg.dropout's masks from it; None:
    no dropout. The same seed draws the same masks."""
    tokens = _tokens("tokens", tokens, cfg, ndim=2)
    mixer = mixers.mixer(cfg)
    rng = _dropout_rng(params, cfg, dropout_seed)
    x = dropout(embed(params["embed.weight"], tokens), cfg.dropout, rng)
    for i in range(cfg.depth):
        block = _block(params, i)
        h = rms_norm(x, block["mixer_norm.gain"], cfg.norm_eps)
        x = x + dropout(mixer.forward(_sub(block, "mixer."), h, cfg), cfg.dropout, rng)
        x = x + dropout(_ffn(block, x, cfg), cfg.dropout, rng)
    return _logits(params, x, cfg)


def _dropout_rng(params, cfg, dropout_seed):
    """One generator for all of a forward pass's masks (drawn in a fixed order: embedding, then
    each block's mixer and SwiGLU), on the parameters' device; None when nothing is dropped. One
    per pass, not one per mask: a CuPy generator's setup initialises a state per GPU thread."""
    if dropout_seed is None or not cfg.dropout:
        return None
    return dropout_rng(namespace(unbox(params["embed.weight"])), dropout_seed)   # (a Box under autodiff)


def loss(params, tokens, cfg, dropout_seed=None):
    """Mean next-token cross-entropy (nats) of int tokens (B, T) over the T − 1 predicted positions;
    dropout_seed as forward's (None: no dropout)."""
    tokens = _tokens("tokens", tokens, cfg, ndim=2)
    if tokens.shape[1] < 2:
        raise ValueError(f"loss needs at least 2 tokens per sequence, got shape {tuple(tokens.shape)}")
    return cross_entropy(forward(params, tokens[:, :-1], cfg, dropout_seed), tokens[:, 1:])


class Cache(NamedTuple):
    """Decoding state: one mixer cache per block and the next position."""
    layers: tuple
    position: int


def init_cache(params, cfg, batch, max_len=None):
    """The decoding state before the first token. Miras mixers keep O(chunk) state; the
    transformer a KV cache of max_len tokens (default: cfg.context)."""
    xp = namespace(params["embed.weight"])
    mixer = mixers.mixer(cfg)
    max_len = cfg.context if max_len is None else max_len
    layers = tuple(mixer.init_cache(_sub(_block(params, i), "mixer."), cfg, batch, xp, max_len)
                   for i in range(cfg.depth))
    return Cache(layers, 0)


def prefill(params, tokens, cfg, max_len=None):
    """A whole prompt at once: int tokens (B, T) -> (logits (B, T, vocab), the cache after them),
    the logits equal to forward's and the cache to that of T decode_steps, at the cost of one
    forward pass. max_len: as init_cache's (default cfg.context), at least T."""
    tokens = _tokens("tokens", tokens, cfg, ndim=2)
    T = tokens.shape[1]
    max_len = cfg.context if max_len is None else max_len
    if not 1 <= T <= max_len:
        raise ValueError(f"prefill needs 1 to max_len = {max_len} tokens per sequence, got shape "
                         f"{tuple(tokens.shape)}")
    mixer = mixers.mixer(cfg)
    x = embed(params["embed.weight"], tokens)
    layers = []
    for i in range(cfg.depth):
        block = _block(params, i)
        y, layer_cache = mixer.prefill(_sub(block, "mixer."), rms_norm(x, block["mixer_norm.gain"], cfg.norm_eps),
                                       cfg, max_len)
        layers.append(layer_cache)
        x = x + y
        x = x + _ffn(block, x, cfg)
    return _logits(params, x, cfg), Cache(tuple(layers), T)


def decode_step(params, cache, tokens, cfg):
    """One token per sequence: int tokens (B,) -> (logits (B, vocab), new cache). Equal to
    forward's logits at this position (docs/training.md, "Sampling")."""
    tokens = _tokens("tokens", tokens, cfg, ndim=1)
    mixer = mixers.mixer(cfg)
    x = embed(params["embed.weight"], tokens[:, None])
    layers = []
    for i, layer_cache in enumerate(cache.layers):
        block = _block(params, i)
        h = rms_norm(x, block["mixer_norm.gain"], cfg.norm_eps)
        y, layer_cache = mixer.step(_sub(block, "mixer."), h, layer_cache, cfg)
        layers.append(layer_cache)
        x = x + y
        x = x + _ffn(block, x, cfg)
    return _logits(params, x, cfg)[:, 0], Cache(tuple(layers), cache.position + 1)


def _tokens(name, tokens, cfg, ndim):
    """Validate an int token array: its rank, and on the host its values in [0, vocab) (on the
    GPU that would cost a synchronisation per call)."""
    if not hasattr(tokens, "dtype") or np.dtype(tokens.dtype).kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got {getattr(tokens, 'dtype', type(tokens))}")
    if tokens.ndim != ndim:
        want = "(B, T)" if ndim == 2 else "(B,)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(tokens.shape)}")
    if isinstance(tokens, np.ndarray) and tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab):
        raise ValueError(f"{name} must lie in [0, {cfg.vocab}), got values from {tokens.min()} to {tokens.max()}")
    return tokens


def flops_per_token(cfg):
    """Training FLOPs per token (forward + backward), the MFU convention of docs/training.md:
    6·N over the projection matrices (every ".weight" but the embedding lookup, plus the output
    projection, tied or not) and the mixer's sequence term: causal attention 6·depth·context·width;
    a Miras memory 6·depth·heads·(3 passes × 2·|W| per token), an estimate of its work at the
    anchor (forward, gradient) and its read."""
    specs = param_specs(cfg)
    n = sum(int(np.prod(s.shape)) for name, s in specs.items()
            if decays(name) and name not in ("embed.weight", "head.weight")) + cfg.vocab * cfg.width
    if cfg.is_transformer:
        seq = 6 * cfg.depth * cfg.context * cfg.width
    else:
        memory = cfg.preset().memory
        size = sum(int(np.prod(s)) for s in memory.param_shapes())
        seq = 6 * cfg.depth * cfg.heads * 3 * 2 * size
    return 6 * n + seq
