"""Token mixers: causal softmax attention (Transformer++) and the Miras memory layer.

Each mixer is a small namespace of pure functions over its own parameters (names relative to
the block's "mixer." prefix):
  params(cfg)                       -> {name: Param}       shapes, initialisers, weight decay
  forward(p, x, cfg)                -> y                   x, y (B, T, C)
  init_cache(p, cfg, batch, xp)     -> cache               decoding state before the first token
  step(p, x_t, cache, cfg)          -> (y_t, cache)        x_t, y_t (B, 1, C); equals forward
docs/training.md gives every architectural choice and its reason.
"""
import math
from typing import Any, Callable, NamedTuple

import numpy as np

import mirascore as mc
import mirascore.autodiff.numpy as anp
from mirascore._xp import namespace
from mirascore.autodiff.tracer import unbox

from . import attention
from .layers import (causal_conv, l2_normalize, merge_heads, rms_norm, silu, softplus,
                     split_heads)


class Param(NamedTuple):
    """A parameter's shape, its initialiser init(rng, shape) -> float64 array, and whether AdamW
    decays it (projection matrices: yes; gains, biases, kernels, initial memories: no)."""
    shape: tuple
    init: Callable[[np.random.Generator, tuple], np.ndarray]
    decay: bool


def normal(std):
    return lambda rng, shape: std * rng.standard_normal(shape)


def constant(value):
    return lambda rng, shape: np.broadcast_to(np.asarray(value, dtype=np.float64), shape).copy()


def uniform(bound):
    return lambda rng, shape: rng.uniform(-bound, bound, shape)


def projection(cfg, n_in, n_out, out=False):
    """An n_in × n_out matrix ~ N(0, init_std²); output projections (into the residual stream)
    scaled by 1/sqrt(2·depth), as GPT-2."""
    std = cfg.init_std / math.sqrt(2 * cfg.depth) if out else cfg.init_std
    return Param((n_in, n_out), normal(std), True)


# ---------------------------------------------------------------- Transformer++ attention

class KVCache(NamedTuple):
    keys: Any        # (B, H, T_max, D), RoPE applied
    values: Any      # (B, H, T_max, D)
    length: int      # tokens cached so far


class Attention:
    """Causal multi-head softmax attention with RoPE on q and k; no biases."""

    @staticmethod
    def params(cfg):
        C = cfg.width
        return {"q.weight": projection(cfg, C, C), "k.weight": projection(cfg, C, C),
                "v.weight": projection(cfg, C, C), "out.weight": projection(cfg, C, C, out=True)}

    @staticmethod
    def _qkv(p, x, cfg, positions):
        q, k, v = (split_heads(anp.matmul(x, p[f"{n}.weight"]), cfg.heads) for n in "qkv")
        return attention.rope(q, positions, cfg.rope_base), attention.rope(k, positions, cfg.rope_base), v

    @staticmethod
    def forward(p, x, cfg):
        xp = _xp_of(x)
        q, k, v = Attention._qkv(p, x, cfg, xp.arange(x.shape[1]))
        y = attention.causal_attention(q, k, v, block=cfg.attention_block)
        return anp.matmul(merge_heads(y), p["out.weight"])

    @staticmethod
    def init_cache(p, cfg, batch, xp, max_len):
        shape = (batch, cfg.heads, max_len, cfg.head_dim)
        dtype = p["q.weight"].dtype
        return KVCache(xp.zeros(shape, dtype), xp.zeros(shape, dtype), 0)

    @staticmethod
    def prefill(p, x, cfg, max_len):
        """forward's output for a whole prompt x (B, T, C), and the cache after it (T ≤ max_len)."""
        xp, T = _xp_of(x), x.shape[1]
        q, k, v = Attention._qkv(p, x, cfg, xp.arange(T))
        y = attention.causal_attention(q, k, v, block=cfg.attention_block)
        cache = Attention.init_cache(p, cfg, x.shape[0], xp, max_len)
        cache.keys[:, :, :T], cache.values[:, :, :T] = k, v
        return anp.matmul(merge_heads(y), p["out.weight"]), cache._replace(length=T)

    @staticmethod
    def step(p, x, cache, cfg):
        xp, t = _xp_of(x), cache.length
        if t >= cache.keys.shape[2]:
            raise ValueError(f"the KV cache holds {cache.keys.shape[2]} tokens; decode_step at "
                             f"position {t} needs a larger max_len in init_cache")
        q, k, v = Attention._qkv(p, x, cfg, xp.arange(t, t + 1))
        keys, values = cache.keys.copy(), cache.values.copy()
        keys[:, :, t], values[:, :, t] = k[:, :, 0], v[:, :, 0]
        y = attention.attend_cached(q[:, :, 0], keys, values, t + 1)
        out = anp.matmul(anp.reshape(y, (x.shape[0], 1, cfg.width)), p["out.weight"])
        return out, KVCache(keys, values, t + 1)


# ---------------------------------------------------------------- the Miras memory layer

class MemoryCache(NamedTuple):
    history: dict     # "q", "k", "v" -> (B, K−1, C): the conv inputs before the next token
    anchor: Any       # mc.MemoryState at the start of the current chunk
    tokens: dict      # "K", "V", "Q" -> (B, H, chunk, D) and gate name -> (B, H, chunk):
                      #   the current chunk's tokens so far, padded with do-nothing tokens
    filled: int       # tokens of the current chunk seen so far


# A padding token leaves the memory as it is: no write (lr = 0), no decay (alpha = 1).
_NEUTRAL_GATE = {"lr": 0.0, "alpha": 1.0, "delta": 1.0, "beta": 0.0}


def gate_names(rule):
    """The per-token gates this rule takes, in the order of the gate projection's outputs."""
    names = ["lr"]
    if getattr(rule.retention, "uses_alpha", True):     # none() keeps everything: alpha is 1
        names.append("alpha")
    if getattr(rule.bias, "needs_delta", False):
        names.append("delta")
    if getattr(rule.algorithm, "uses_momentum", False):
        names.append("beta")
    return names


def _alpha_bias(heads):
    """Per-head retention at initialisation: −log α spread log-uniformly over [1e-3, 1e-1]
    (α from 0.905 to 0.999: memories from ~10 to ~1000 tokens), stored through softplus⁻¹."""
    forget = np.exp(np.linspace(math.log(1e-3), math.log(1e-1), heads))
    return np.log(np.expm1(forget))


def _delta_bias(heads, head_dim):
    """Huber's threshold at initialisation: δ = 1/√head_dim. Yaad's mixture takes ψ = δ·sign(r)
    beyond ‖r‖ = δ, whose norm is δ·√head_dim: this δ makes that ℓ1 step a unit-norm one (a
    sign-descent memory, bounded whatever the residual), the ℓ2 branch taking the residuals
    smaller than δ. With δ = 1 the ℓ1 steps have norm √head_dim and the gradient through a
    512-token context reached 1e5–1e7 (measured; docs/training.md)."""
    return np.full(heads, math.log(math.expm1(1.0 / math.sqrt(head_dim))))


_GATE_BIAS = {"lr": lambda H, D: np.zeros(H),                    # lr = lr_gate_max / 2
              "alpha": lambda H, D: _alpha_bias(H),
              "delta": _delta_bias,
              "beta": lambda H, D: np.zeros(H)}                  # momentum decay 1/2


def _squash(name, g, cfg):
    """Gate pre-activations (B, H, T) to their ranges: lr ∈ (0, lr_gate_max),
    alpha ∈ (alpha_floor, 1), delta > 0, beta ∈ (0, 1)."""
    if name == "lr":
        return cfg.lr_gate_max * anp.sigmoid(g)
    if name == "alpha":
        decay = anp.exp(-softplus(g))
        return decay if not cfg.alpha_floor else cfg.alpha_floor + (1.0 - cfg.alpha_floor) * decay
    if name == "delta":
        return softplus(g)
    return anp.sigmoid(g)


def _initial_memory(rule, index):
    """Initialiser of the learned initial memory (stored quantity) of parameter `index`, per head:
    the memory's own random start mapped through the gate's inverse `stored`; for gates without
    one (kl and sigmoid, whose stored quantities are logits), N(0, 1) (rows of scale·softmax vary).
    The memory's own start is drawn for inputs of unit-variance coordinates, but the layer feeds
    it ℓ2-normalised keys (coordinates of size 1/√d): the matrix applied to the key (the mlp's W2)
    is scaled by √d, so that its pre-activations have unit scale as intended. Smaller ones put
    the memory's LN near its eps, where the inner loss's curvature (∝ 1/var) is large."""
    stored = getattr(rule.retention, "stored", None)

    def init(rng, shape):
        if stored is None:
            return rng.standard_normal(shape)
        W = rule.memory.init(rng, batch_shape=shape[:1], dtype=np.float64)[index]
        if isinstance(rule.memory, mc.memory.MLP) and index == 1:
            W = W * math.sqrt(rule.memory.d_in)
        return stored(W)
    return init


class Miras:
    """q, k, v projections, each a causal depthwise conv (kernel `conv`) and SiLU; q, k ℓ2-normalised
    per head; per-head gates from a low-rank projection of x; one memory per head trained at test
    time by mc.scan with chunk `chunk`; output RMSNorm(y) ⊙ SiLU(x W_g), then W_o."""

    @staticmethod
    def params(cfg):
        rule, C, H = cfg.preset(), cfg.width, cfg.heads
        gates = gate_names(rule)
        out = {}
        for n in "qkv":
            out[f"{n}.weight"] = projection(cfg, C, C)
            out[f"{n}_conv.kernel"] = Param((cfg.conv, C), uniform(1.0 / math.sqrt(cfg.conv)), False)
        out["gates.down.weight"] = projection(cfg, C, cfg.gate_rank)
        out["gates.up.weight"] = projection(cfg, cfg.gate_rank, len(gates) * H)
        out["gates.bias"] = Param((len(gates) * H,), constant(np.concatenate(
            [_GATE_BIAS[g](H, cfg.head_dim) for g in gates])), False)
        if not isinstance(rule.memory, mc.memory.Linear):   # a linear memory starts empty, as in FLA
            for i, shape in enumerate(rule.memory.param_shapes()):
                out[f"memory.{i}"] = Param((H,) + shape, _initial_memory(rule, i), False)
        out["out_norm.gain"] = Param((cfg.head_dim,), constant(1.0), False)
        out["out_gate.weight"] = projection(cfg, C, C)
        out["out.weight"] = projection(cfg, C, C, out=True)
        return out

    @staticmethod
    def _inputs(p, x, cfg, history=None):
        """K, V, Q (B, H, T, D), gates {name: (B, H, T)} and the new conv histories."""
        history = history or {}
        streams, new_history = {}, {}
        for n in "qkv":
            h, new_history[n] = causal_conv(anp.matmul(x, p[f"{n}.weight"]), p[f"{n}_conv.kernel"],
                                            history.get(n))
            streams[n] = split_heads(silu(h), cfg.heads)
        rule, H = cfg.preset(), cfg.heads
        pre = anp.matmul(anp.matmul(x, p["gates.down.weight"]), p["gates.up.weight"]) + p["gates.bias"]
        gates = {}
        for i, name in enumerate(gate_names(rule)):
            g = anp.transpose(pre[:, :, i * H:(i + 1) * H], (0, 2, 1))
            gates[name] = _squash(name, g, cfg)
        tokens = {"K": l2_normalize(streams["k"]), "V": streams["v"], "Q": l2_normalize(streams["q"])}
        return tokens, gates, new_history

    @staticmethod
    def _initial_state(p, cfg, xp, dtype):
        rule = cfg.preset()
        if isinstance(rule.memory, mc.memory.Linear):
            params = tuple(xp.zeros((cfg.heads,) + s, dtype) for s in rule.memory.param_shapes())
        else:
            params = tuple(p[f"memory.{i}"] for i in range(len(rule.memory.param_shapes())))
        return mc.init(rule.memory, params, retention=rule.retention, algorithm=rule.algorithm,
                       check_finite=False)

    @staticmethod
    def _output(p, Y, x, cfg):
        y = merge_heads(rms_norm(Y, p["out_norm.gain"], cfg.norm_eps))
        return anp.matmul(y * silu(anp.matmul(x, p["out_gate.weight"])), p["out.weight"])

    @staticmethod
    def _scan(state, tokens, gates, cfg):
        # The squashed gates are in range by construction, and a look at the values would cost a
        # device synchronisation per layer: validation stops at shapes (check_finite=False).
        rule = cfg.preset()
        return mc.scan(state, tokens["K"], tokens["V"], tokens["Q"], bias=rule.bias,
                       chunk=cfg.chunk, check_finite=False, **gates)

    @staticmethod
    def forward(p, x, cfg):
        tokens, gates, _ = Miras._inputs(p, x, cfg)
        T = x.shape[1]
        # Pad to whole chunks with do-nothing tokens, so that every position reads the memory as
        # it would inside a longer sequence: logits at t never depend on the sequence's length.
        pad = -T % cfg.chunk
        if pad:
            tokens = {n: _pad_time(a, pad, 0.0, axis=2) for n, a in tokens.items()}
            gates = {n: _pad_time(g, pad, _NEUTRAL_GATE[n], axis=2) for n, g in gates.items()}
        xp, dtype = _xp_of(x), _dtype_of(x)
        Y, _ = Miras._scan(Miras._initial_state(p, cfg, xp, dtype), tokens, gates, cfg)
        return Miras._output(p, Y[:, :, :T], x, cfg)

    @staticmethod
    def init_cache(p, cfg, batch, xp, max_len=None):
        dtype = p["q.weight"].dtype
        C, H, D, b = cfg.width, cfg.heads, cfg.head_dim, cfg.chunk
        history = {n: xp.zeros((batch, cfg.conv - 1, C), dtype) for n in "qkv"}
        state = Miras._initial_state(p, cfg, xp, dtype)
        return MemoryCache(history, state, Miras._empty_chunk(cfg, batch, xp, dtype), 0)

    @staticmethod
    def _empty_chunk(cfg, batch, xp, dtype):
        H, D, b = cfg.heads, cfg.head_dim, cfg.chunk
        chunk = {n: xp.zeros((batch, H, b, D), dtype) for n in ("K", "V", "Q")}
        for name in gate_names(cfg.preset()):
            chunk[name] = xp.full((batch, H, b), _NEUTRAL_GATE[name], dtype)
        return chunk

    @staticmethod
    def _scan_chunk(anchor, chunk, cfg):
        """A chunk buffer (tokens and gates; do-nothing padding after the filled ones) scanned from
        its anchor state: (Y, the state at the chunk's end)."""
        return Miras._scan(anchor, chunk, {n: chunk[n] for n in gate_names(cfg.preset())}, cfg)

    @staticmethod
    def prefill(p, x, cfg, max_len=None):
        """forward's output for a whole prompt x (B, T, C), and the cache that `step` continues
        from: the whole chunks in one scan give the anchor state; the last partial chunk is
        scanned from it as `step` would, its tokens kept for the next steps."""
        tokens, gates, history = Miras._inputs(p, x, cfg)
        xp, dtype, T = _xp_of(x), _dtype_of(x), x.shape[1]
        full, filled = T - T % cfg.chunk, T % cfg.chunk
        anchor, outputs = Miras._initial_state(p, cfg, xp, dtype), []
        if full:
            Y, anchor = Miras._scan(anchor, {n: a[:, :, :full] for n, a in tokens.items()},
                                    {n: g[:, :, :full] for n, g in gates.items()}, cfg)
            outputs.append(Y)
        chunk = Miras._empty_chunk(cfg, x.shape[0], xp, dtype)
        if filled:
            for name, a in {**tokens, **gates}.items():
                chunk[name][:, :, :filled] = a[:, :, full:]
            outputs.append(Miras._scan_chunk(anchor, chunk, cfg)[0][:, :, :filled])
        Y = outputs[0] if len(outputs) == 1 else xp.concatenate(outputs, axis=2)
        return Miras._output(p, Y, x, cfg), MemoryCache(history, anchor, chunk, filled)

    @staticmethod
    def step(p, x, cache, cfg):
        """One token: the current chunk is re-scanned from its anchor state with the tokens so far
        (the rest do-nothing padding), which is exactly what forward computes at this position."""
        new_tokens, new_gates, history = Miras._inputs(p, x, cfg, cache.history)
        n = cache.filled
        chunk = {name: a.copy() for name, a in cache.tokens.items()}
        for name, a in {**new_tokens, **new_gates}.items():
            chunk[name][:, :, n] = a[:, :, 0]
        Y, end = Miras._scan_chunk(cache.anchor, chunk, cfg)
        y = Miras._output(p, Y[:, :, n:n + 1], x, cfg)
        if n + 1 < cfg.chunk:
            return y, MemoryCache(history, cache.anchor, chunk, n + 1)
        xp = _xp_of(x)
        return y, MemoryCache(history, end, Miras._empty_chunk(cfg, x.shape[0], xp, _dtype_of(x)), 0)


def _pad_time(a, pad, value, axis):
    xp = _xp_of(a)
    shape = list(a.shape)
    shape[axis] = pad
    return anp.concatenate([a, xp.full(tuple(shape), value, _dtype_of(a))], axis=axis)


def _xp_of(x):
    return namespace(unbox(x))


def _dtype_of(x):
    return unbox(x).dtype


def mixer(cfg):
    """The mixer namespace of a config: Attention for "transformer", Miras for every preset."""
    return Attention if cfg.is_transformer else Miras
