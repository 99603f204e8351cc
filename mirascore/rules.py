"""The memory update: init / step / scan / weights / recall (DESIGN §2–4, docs/internals.md).

One token (DESIGN §3):
    W  = expose(s)                        per parameter array
    Wg = retained(W, α)                   W, or α·W for l2(grad_at="retained")
    ψ  = bias.psi(M(Wg, k), v, δ);  G = memory.grad(Wg, k, ψ)
    U, S = algorithm.update(G, S, lr', β) lr' = lr, or lr/(1 + lr·kᵀk) for implicit()
    s  = retention.update(s, U, α)
`scan` reads y_t = M(W_t, q_t) after token t's update. Rules whose update is linear in the state
(`is_exact`) run the chunked WY/UT form (mirascore.chunk.delta), equal to this per-token loop for
every chunk size; all others the anchored chunked form of DESIGN §4 (mirascore.chunk.anchored).
Both are single primitives of mirascore.autodiff with hand-derived backward passes.
"""
from typing import Any, NamedTuple


import numpy as np

import mirascore.autodiff.numpy as anp

from . import _checks
from . import algorithm as _algorithm
from . import retention as _retention
from ._xp import namespace
from .autodiff.tracer import unbox


class MemoryState(NamedTuple):
    """A memory being trained: static specs plus arrays.

    params:   tuple of arrays (..., m, n), the quantity the retention gate stores (W, A, L or Z)
    momentum: tuple of arrays like params for momentum(), else None
    """
    memory: Any
    retention: Any
    algorithm: Any
    params: tuple
    momentum: tuple | None


class Rule(NamedTuple):
    """A point of the Miras design space (a row of the paper's Table 1)."""
    memory: Any
    bias: Any
    retention: Any
    algorithm: Any


def is_exact(rule):
    """True when the update is linear in the state, so chunked = per-token exactly (DESIGN §4):
    linear memory, dot or l2 bias, none or l2 retention (either grad_at), gd or implicit.
    `rule` is anything with fields memory, bias, retention, algorithm (a Rule)."""
    return (rule.memory.name == "linear" and rule.bias.name in ("dot", "l2")
            and rule.retention.name in ("none", "l2") and rule.algorithm.name in ("gd", "implicit"))


def init(memory, params, retention=_retention.none(), algorithm=_algorithm.gd()):
    """A MemoryState from the stored quantity `params` (W; A₀ for lq, L₀ for kl, Z₀ for sigmoid),
    one array per `memory.param_shapes()` entry with optional batch dims; momentum starts at 0."""
    if hasattr(params, "shape"):
        params = (params,)
    xp = namespace(*map(unbox, params))
    params = tuple(p if p is not unbox(p) else xp.asarray(p) for p in params)
    _checks.spec("memory", memory, "apply")
    _checks.spec("retention", retention, "expose")
    _checks.spec("algorithm", algorithm, "effective_lr")
    _checks.params(memory, params)
    if algorithm.name == "implicit":
        _checks.implicit_fits(memory, retention)
    return MemoryState(memory, retention, algorithm, params, algorithm.init(params))


def weights(state):
    """The exposed parameters, e.g. (W1, W2) for the mlp memory."""
    return tuple(state.retention.expose(s) for s in state.params)


def recall(state, q):
    """M(W_t, q): q (..., d_in) -> (..., d_out)."""
    xp = namespace(*map(unbox, (*state.params, q)))
    q = q if q is not unbox(q) else xp.asarray(q)
    _checks.last_axis("q", q, state.memory.d_in, "d_in")
    _checks.finite("q", q)
    return state.memory.apply(weights(state), q)


def step(state, k, v, *, bias, retention=None, algorithm=None, lr, alpha=1.0, delta=None, beta=None):
    """One token's update; pure: returns a new MemoryState.

    k: (..., d_in), v: (..., d_out); gates lr ≥ 0, alpha ∈ (0, 1], delta > 0 (huber(delta=None)
    only), beta ∈ [0, 1) (momentum() only) broadcast against the batch dims (...).
    `retention=` / `algorithm=`, when given, must equal the state's.
    """
    mem = state.memory
    _, _, (k, v), g = _checks.call(
        state, bias, retention, algorithm, [("k", k, mem.d_in, "d_in"), ("v", v, mem.d_out, "d_out")],
        {"lr": lr, "alpha": alpha, "delta": delta, "beta": beta})
    ret = state.retention
    U, S = _direction(state, bias, weights(state), state.momentum, k, v, g)
    params = tuple(ret.update(s, u, g["alpha"]) for s, u in zip(state.params, U))
    return state._replace(params=params, momentum=S)


def scan(state, K, V, Q, *, bias, retention=None, algorithm=None, lr, alpha=1.0, delta=None,
         beta=None, chunk=64, backend="auto"):
    """Run a sequence: K (..., T, d_in), V (..., T, d_out), Q (..., T, d_in) -> (Y, final state).

    Y (..., T, d_out) holds y_t = M(W_t, q_t), read after token t's update. Gates broadcast against
    (..., T). Exact rules (`is_exact`) give the per-token result for any `chunk`; the others the
    anchored chunked form of DESIGN §4 with chunks of `chunk` tokens (chunk=1: per-token).
    backend: "auto" (numpy/CuPy) or "ref" (mirascore.ref, float64, cast back to the input dtype).
    """
    chunk = _checks.size("chunk", chunk)
    _checks.choice("backend", backend, ("auto", "ref"))
    mem = state.memory
    _, dtype, (K, V, Q), g = _checks.call(
        state, bias, retention, algorithm,
        [("K", K, mem.d_in, "d_in"), ("V", V, mem.d_out, "d_out"), ("Q", Q, mem.d_in, "d_in")],
        {"lr": lr, "alpha": alpha, "delta": delta, "beta": beta}, time=True)
    exact = is_exact(Rule(mem, bias, state.retention, state.algorithm))
    if backend == "ref":
        return _via_ref(state, K, V, Q, bias, g, chunk, exact, dtype)
    if exact:
        return _exact(state, bias, K, V, Q, g, chunk)
    return _anchored(state, bias, K, V, Q, g, chunk)


def delta_gates(rule, lr, alpha, K):
    """(α, b, c) with which an exact rule's update is W_t = α W (I − b k kᵀ) + c v kᵀ
    (docs/derivations/chunked-delta.md): dot bias b = 0, c = lr; l2 bias with none() or
    l2(grad_at="retained") b = c = lr; l2(grad_at="state") b = lr/α, c = lr (W ← αW − lr(Wk − v)kᵀ);
    implicit() b = c = lr/(1 + lr·kᵀk), α = 1. Gates broadcast against (..., T)."""
    if rule.bias.name == "dot":
        return alpha, 0.0, lr
    if rule.algorithm.name == "implicit":
        lr = lr / (1.0 + lr * anp.sum(K * K, axis=-1))
    if rule.retention.name == "l2" and rule.retention.grad_at == "state":
        return alpha, lr / alpha, lr
    return alpha, lr, lr


def _exact(state, bias, K, V, Q, g, chunk):
    """Exact rules: the chunked WY/UT form (mirascore.chunk.chunk_delta), equal to the per-token
    loop for every chunk size."""
    from .chunk import chunk_delta
    if K.shape[-2] == 0:                  # nothing to scan: the state is unchanged
        xp = namespace(*map(unbox, (*state.params, K, V, Q)))
        batch = np.broadcast_shapes(*(p.shape[:-2] for p in state.params), K.shape[:-2], Q.shape[:-2])
        dtype = xp.result_type(*map(unbox, (*state.params, K, V, Q)))
        return xp.zeros(batch + (0, state.memory.d_out), dtype=dtype), state
    rule = Rule(state.memory, bias, state.retention, state.algorithm)
    alpha = 1.0 if g["alpha"] is None else g["alpha"]
    a, b, c = delta_gates(rule, g["lr"], alpha, K)
    Y, W = chunk_delta(state.params[0], K, V, Q, a, b, c, chunk=chunk)
    return Y, state._replace(params=(W,))


def _direction(state, bias, W, S, k, v, g):
    """The update U and new momentum for one token whose gradient is taken at exposed weights W."""
    mem, ret, alg = state.memory, state.retention, state.algorithm
    Wg = tuple(ret.retained(w, g["alpha"]) for w in W)
    psi = bias.psi(mem.apply(Wg, k), v, g["delta"])
    G = mem.grad(Wg, k, psi)
    return alg.update(G, S, alg.effective_lr(g["lr"], k), g["beta"])


def _anchored(state, bias, K, V, Q, g, chunk):
    """All other rules: the anchored chunked form (mirascore.chunk.anchored), one primitive with
    a hand-derived backward."""
    from .chunk.anchored import anchored_scan
    n = len(state.params)
    momentum = state.momentum or ()
    out = anchored_scan(*state.params, *momentum, K, V, Q, g["lr"], g["alpha"], g["delta"],
                        g["beta"], memory=state.memory, bias=bias, retention=state.retention,
                        algorithm=state.algorithm, chunk=chunk)
    params, momentum = tuple(out[1:1 + n]), tuple(out[1 + n:])
    return out[0], state._replace(params=params, momentum=momentum or None)


def _via_ref(state, K, V, Q, bias, g, chunk, exact, dtype):
    """backend="ref": the float64 judge, results cast back to the input dtype."""
    from . import ref
    gates = {name: x for name, x in g.items() if x is not None}
    if exact:
        Y, out = ref.scan(state, K, V, Q, bias=bias, **gates)
    else:
        Y, out = ref.scan_chunked(state, K, V, Q, bias=bias, chunk=chunk, **gates)
    cast = lambda arrays: None if arrays is None else tuple(a.astype(dtype) for a in arrays)
    return Y.astype(dtype), out._replace(params=cast(out.params), momentum=cast(out.momentum))
