"""The memory update: `step` (one token) and `scan` (a sequence) (docs/contract.md §2–4, docs/internals.md).

One token (docs/contract.md §3), through the specs' methods only (mirascore.protocols):
    W  = expose(s)                        per parameter array
    Wg = c·W,  c = gradient_scale(α)      W itself when c is None (α·W for l2(grad_at="retained"))
    ψ  = bias.psi(M(Wg, k), v, δ);  G = memory.grad(Wg, k, ψ)
    U, S = algorithm.update(G, S, lr', β) lr' = effective_lr(lr, k): lr, or lr/(1 + lr·kᵀk)
    s  = update(s, U, α)                  prox(α·canonical(s) + U)
`scan` reads y_t = M(W_t, q_t) after token t's update. Rules whose update is linear in the state
(`is_exact`: declared by the specs' capabilities, never by their names) run the chunked WY/UT form
of the delta rule (mirascore.chunk.delta_rule), equal to this per-token loop for every chunk size;
all others the anchored chunked form of docs/contract.md §4 (mirascore.chunk.anchored). Both are single
primitives of mirascore.autodiff with hand-derived backward passes.
"""
import numpy as np

import mirascore.autodiff.numpy as anp

from . import protocols, validation
from ._xp import namespace
from .autodiff.tracer import unbox
from .gates import expand
from .state import Rule, check_rule_fits


def is_exact(rule):
    """True when the update is linear in the state, so chunked = per-token exactly (docs/contract.md §4):
    a matrix memory (M = W k), a bias with ψ = a·y − v (l2, dot: `psi_slope`), a gate that keeps
    W and decays it linearly (none, l2: `delta_rule_gates`) and no momentum (gd, implicit).
    `rule` is anything with fields memory, bias, retention, algorithm (a Rule)."""
    return bool(getattr(rule.memory, "matrix_memory", False)
                and getattr(rule.bias, "psi_slope", None) is not None
                and hasattr(rule.retention, "delta_rule_gates")
                and getattr(rule.algorithm, "uses_momentum", True) is False)


def step(state, k, v, *, bias, retention=None, algorithm=None, lr, alpha=1.0, delta=None, beta=None,
         check_finite=True):
    """One token's update; pure: returns a new MemoryState.

    k: (..., d_in), v: (..., d_out); gates lr ≥ 0, alpha ∈ (0, 1], delta > 0 (biases without a
    static δ only), beta ∈ [0, 1) (momentum only) broadcast against the batch dims (...).
    `retention=` / `algorithm=`, when given, must equal the state's. check_finite=False skips
    every look at the values (finite inputs, gate ranges): no device synchronisation.
    """
    mem = state.memory
    ops = protocols.per_token(mem, bias, state.retention, state.algorithm)
    check_rule_fits(mem, bias, state.retention, state.algorithm)
    _, _, (k, v), gates = validation.inputs(
        state, bias, retention, algorithm, [("k", k, mem.d_in, "d_in"), ("v", v, mem.d_out, "d_out")],
        {"lr": lr, "alpha": alpha, "delta": delta, "beta": beta}, time=False,
        check_finite=validation.flag("check_finite", check_finite))
    alpha = gates["alpha"] if ops.gate.uses_alpha else 1.0
    W = tuple(ops.gate.expose(s) for s in state.params)
    c = ops.gate.gradient_scale(alpha)
    Wg = W if c is None else tuple(expand(c, 2) * w for w in W)
    psi = ops.bias.psi(ops.memory.apply(Wg, k), v, gates["delta"])
    G = ops.memory.grad(Wg, k, psi)
    U, S = ops.algorithm.update(G, state.momentum, ops.algorithm.effective_lr(gates["lr"], k), gates["beta"])
    params = tuple(ops.gate.update(s, u, alpha) for s, u in zip(state.params, U))
    return state._replace(params=params, momentum=S)


def scan(state, K, V, Q, *, bias, retention=None, algorithm=None, lr, alpha=1.0, delta=None,
         beta=None, chunk=64, backend="auto", check_finite=True, precision=None):
    """Run a sequence: K (..., T, d_in), V (..., T, d_out), Q (..., T, d_in) -> (Y, final state).

    Y (..., T, d_out) holds y_t = M(W_t, q_t), read after token t's update. Gates broadcast against
    (..., T). Exact rules (`is_exact`) give the per-token result for any `chunk`; the others the
    anchored chunked form of docs/contract.md §4 with chunks of `chunk` tokens (chunk=1: per-token).
    backend: "auto" (numpy/CuPy) or "ref" (mirascore.ref, float64, cast back to the input dtype).
    check_finite=False skips every look at the values (finite inputs, gate ranges), so that the
    call never synchronises with the device (shapes and specs are still checked on the host).
    precision: the GEMM precision of this scan and of its backward on CuPy float32 arrays, one of
    "fp32", "tf32", "bf16", "fp16", or None for the setting in force at the call
    (mirascore.gpu.settings; docs/contract.md §5). The anchored form keeps fp32 products at every precision
    (`mirascore.chunk.anchored.anchored_precision`); numpy and float64 arrays ignore it.
    """
    chunk = validation.size("chunk", chunk)
    validation.choice("backend", backend, ("auto", "ref"))
    precision = _precision(precision)
    protocols.require("algorithm", state.algorithm, ("uses_momentum",), "mc.scan")
    mem = state.memory
    _, dtype, (K, V, Q), gates = validation.inputs(
        state, bias, retention, algorithm,
        [("K", K, mem.d_in, "d_in"), ("V", V, mem.d_out, "d_out"), ("Q", Q, mem.d_in, "d_in")],
        {"lr": lr, "alpha": alpha, "delta": delta, "beta": beta}, time=True,
        check_finite=validation.flag("check_finite", check_finite))
    check_rule_fits(mem, bias, state.retention, state.algorithm)
    rule = Rule(mem, bias, state.retention, state.algorithm)
    if backend == "ref":
        return _via_ref(state, K, V, Q, bias, gates, chunk, is_exact(rule), dtype)
    if is_exact(rule):
        return _exact(state, bias, K, V, Q, gates, chunk, precision)
    return _anchored(state, bias, K, V, Q, gates, chunk, precision)


def _precision(precision):
    """A GEMM precision validated, None resolved to the setting now (so that the backward,
    called later, runs at the forward's)."""
    from .gpu import settings
    return settings.current().precision if precision is None else settings.precision(precision)


def delta_rule_gates(rule, lr, alpha, K):
    """(α, b, c) with which an exact rule's update is W_t = α W (I − b k kᵀ) + c v kᵀ
    (docs/derivations/chunked-delta.md): lr' = effective_lr(lr, k) (implicit(): lr/(1 + lr·kᵀk)),
    then the gate's `delta_rule_gates(α, lr', psi_slope)`; gates broadcast against (..., T)."""
    lr = rule.algorithm.effective_lr(lr, K)
    return rule.retention.delta_rule_gates(alpha, lr, rule.bias.psi_slope)


def _exact(state, bias, K, V, Q, gates, chunk, precision):
    """Exact rules: the chunked WY/UT form of the delta rule, equal to the per-token loop for
    every chunk size."""
    from .chunk.delta_rule import delta_rule_scan
    if K.shape[-2] == 0:                  # nothing to scan: the state is unchanged
        xp = namespace(*map(unbox, (*state.params, K, V, Q)))
        batch = np.broadcast_shapes(*(p.shape[:-2] for p in state.params), K.shape[:-2], Q.shape[:-2])
        dtype = xp.result_type(*map(unbox, (*state.params, K, V, Q)))
        return xp.zeros(batch + (0, state.memory.d_out), dtype=dtype), state
    rule = Rule(state.memory, bias, state.retention, state.algorithm)
    alpha = gates["alpha"] if getattr(state.retention, "uses_alpha", True) else 1.0
    a, b, c = delta_rule_gates(rule, gates["lr"], alpha, K)
    Y, W = delta_rule_scan(state.params[0], K, V, Q, a, b, c, chunk=chunk, precision=precision)
    return Y, state._replace(params=(W,))


def _anchored(state, bias, K, V, Q, gates, chunk, precision):
    """All other rules: the anchored chunked form, one primitive with a hand-derived backward."""
    from .chunk.anchored import anchored_precision, anchored_scan
    Y, params, momentum = anchored_scan(
        state.params, state.momentum, K, V, Q, gates["lr"], gates["alpha"], gates["delta"], gates["beta"],
        memory=state.memory, bias=bias, retention=state.retention, algorithm=state.algorithm,
        chunk=chunk, precision=anchored_precision(precision))
    return Y, state._replace(params=params, momentum=momentum)


def _via_ref(state, K, V, Q, bias, gates, chunk, exact, dtype):
    """backend="ref": the float64 judge, results cast back to the input dtype."""
    from . import ref
    given = {name: x for name, x in gates.items() if x is not None}
    if exact:
        Y, out = ref.scan(state, K, V, Q, bias=bias, **given)
    else:
        Y, out = ref.scan_chunked(state, K, V, Q, bias=bias, chunk=chunk, **given)
    cast = lambda arrays: None if arrays is None else tuple(anp.astype(a, dtype) for a in arrays)  # noqa: E731
    return anp.astype(Y, dtype), out._replace(params=cast(out.params), momentum=cast(out.momentum))
