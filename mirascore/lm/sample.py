"""Autoregressive byte generation through `decode_step` (docs/training.md, "Sampling").

    text = generate(params, cfg, b"ROMEO:", 200, temperature=0.8, seed=0)   # bytes, prompt excluded

The prompt goes through `prefill` (one forward pass that also builds the decoding cache), each new
byte through `decode_step`; both compute what `forward` computes. Each byte is drawn from
softmax(logits / temperature) by a numpy generator seeded with `seed`; temperature 0 takes the
argmax (greedy).
"""
import numpy as np

from mirascore._xp import namespace, to_numpy

from . import model as lm_model

DEFAULT_TEMPERATURE = 0.8


def pick(logits, temperature, rng):
    """The next byte from one row of logits (host float array of length vocab)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def generate(params, cfg, prompt, n_bytes, temperature=DEFAULT_TEMPERATURE, seed=0, model=lm_model):
    """`n_bytes` bytes that continue `prompt` (non-empty bytes), as bytes."""
    if not prompt:
        raise ValueError("prompt must not be empty: the model needs a first byte to condition on")
    if n_bytes < 0:
        raise ValueError(f"tokens must be ≥ 0, got {n_bytes}")
    if not temperature >= 0:                       # (also NaN)
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    xp = namespace(*params.values())
    rng = np.random.default_rng(seed)
    logits, cache = model.prefill(params, xp.asarray(np.frombuffer(prompt, np.uint8)[None].astype(np.int32)),
                                  cfg, max_len=len(prompt) + n_bytes)
    logits, out = logits[:, -1], []
    for i in range(n_bytes):
        out.append(pick(to_numpy(logits[0]), temperature, rng))
        if i + 1 < n_bytes:
            logits, cache = model.decode_step(params, cache, xp.asarray(out[-1:], dtype=np.int32), cfg)
    return bytes(out)


def decode_text(data):
    """Bytes as text, with invalid UTF-8 shown as U+FFFD."""
    return data.decode("utf-8", errors="replace")
