"""AdamW, the learning-rate schedule and global-norm clipping, as pure functions of param dicts.

    state = adamw_init(params)
    grads, norm = clip_by_global_norm(grads, cfg.clip)
    params, state = adamw_update(params, grads, state, learning_rate(step, cfg), cfg, decays)

Every array stays where the params live (numpy or CuPy): the norm and the clip factor are 0-d
arrays on the device, so a step never waits for the host. Python floats (the learning rate, the
bias corrections) multiply float32 arrays without promoting them.
"""
import math
from typing import NamedTuple

from mirascore._xp import namespace


class AdamState(NamedTuple):
    """Adam's moments: `step` updates taken so far; m, v dicts shaped like the params."""
    step: int
    m: dict
    v: dict


def adamw_init(params):
    """Zero moments for every parameter."""
    xp = namespace(*params.values())
    return AdamState(0, *({name: xp.zeros_like(p) for name, p in params.items()} for _ in "mv"))


def learning_rate(step, cfg):
    """The learning rate of optimizer step `step` (0-based): linear warm-up lr·(step+1)/warmup over
    the first `warmup` steps, then a cosine from lr down to lr·min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = cfg.steps - 1 - cfg.warmup
    progress = 1.0 if span <= 0 else (step - cfg.warmup) / span
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def global_norm(grads):
    """sqrt(Σ ‖g‖²) over every gradient: a 0-d array on the gradients' device. Summed in the
    order of the names, so the result does not depend on the dict's order (a checkpoint's
    params come back in another order than init's, and resuming must compute the same bits)."""
    xp = namespace(*grads.values())
    return xp.sqrt(sum(xp.sum(grads[name] * grads[name]) for name in sorted(grads)))


def clip_by_global_norm(grads, max_norm):
    """(grads scaled so their global norm is at most max_norm, the norm before clipping).
    max_norm = 0 leaves the gradients unchanged (the norm is still returned, for the logs)."""
    norm = global_norm(grads)
    if not max_norm:
        return grads, norm
    xp = namespace(norm)
    scale = xp.minimum(1.0, max_norm / (norm + 1e-6)).astype(norm.dtype)
    return {name: g * scale for name, g in grads.items()}, norm


def adamw_update(params, grads, state, lr, cfg, decays):
    """One AdamW step (Loshchilov & Hutter): p ← p − lr·wd·p where decays(name), then
    p ← p − lr·m̂/(sqrt(v̂) + eps) with bias-corrected moments m̂, v̂. Returns (params, state)."""
    t = state.step + 1
    b1, b2 = cfg.beta1, cfg.beta2
    step_size = lr / (1.0 - b1 ** t)              # m̂ = m/(1 − b1ᵗ)
    root_correction = math.sqrt(1.0 - b2 ** t)    # sqrt(v̂) = sqrt(v)/sqrt(1 − b2ᵗ)
    new_params, m, v = {}, {}, {}
    xp = namespace(*params.values())
    for name, p in params.items():
        g = grads[name]
        m[name] = b1 * state.m[name] + (1.0 - b1) * g
        v[name] = b2 * state.v[name] + (1.0 - b2) * (g * g)
        if cfg.weight_decay and decays(name):
            p = p - (lr * cfg.weight_decay) * p
        denominator = xp.sqrt(v[name]) / root_correction + cfg.adam_eps
        new_params[name] = p - step_size * (m[name] / denominator)
    return new_params, AdamState(t, m, v)
