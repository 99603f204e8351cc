"""Reference loops (docs/contract.md §3 per-token, §4 anchored): the judge, slow on purpose.

Everything is float64 and one token at a time, one line per equation of the contract. The loops
call a rule's specs through their per-token protocol methods (mirascore.protocols: the bias's
`psi`, the gate's `expose`, `gradient_scale`, `update`, `canonical`, `prox`, `read_scale`, the
memory's `apply`), so they run a user's own specs as well; what they judge is everything else:
the chunked algebra, the hand-derived gradients and their VJPs, the fused kernels. G comes from
autodiff of `memory.apply`, never from a hand-derived gradient; the momentum recurrence is written
out here. Only autodiff ops touch the data, so the tape can differentiate through these loops
(inputs that arrive boxed stay on the tape; everything else is converted to float64). A spec's own
formula (e.g. a new ψ) is judged by mirascore.testing's checks, not by these loops.
"""
import numpy as np

import mirascore.autodiff.numpy as anp

from .. import protocols, validation
from .._xp import namespace
from ..gates import expand


def scan(state, K, V, Q, *, bias, lr, alpha=1.0, delta=None, beta=None, retention=None,
         algorithm=None):
    """Per-token recurrence: for t = 1..T, update with (k_t, v_t), then read y_t = M(W_t, q_t).

    K (..., T, d_in), V (..., T, d_out), Q (..., T, d_in); gates broadcast against (..., T).
    Returns (Y (..., T, d_out), final MemoryState), float64.
    """
    ops = protocols.reference(state.memory, bias, state.retention, state.algorithm)
    s, S, (K, V, Q), gates = _start(state, K, V, Q, bias, retention, algorithm, lr, alpha, delta, beta)
    gate, ys = ops.gate, []
    for t in range(K.shape[-2]):
        W = tuple(gate.expose(x) for x in s)
        U, S = _direction(ops, W, S, K[..., t, :], V[..., t, :], gates, t)
        s = tuple(gate.update(x, u, gates["alpha"][..., t]) for x, u in zip(s, U))
        ys.append(ops.memory.apply(tuple(gate.expose(x) for x in s), Q[..., t, :]))
    return _stack(ys, s, Q, state.memory.d_out), state._replace(params=s, momentum=S)


def scan_chunked(state, K, V, Q, *, bias, lr, chunk, alpha=1.0, delta=None, beta=None,
                 retention=None, algorithm=None):
    """Anchored chunked loop (docs/contract.md §4): chunks of `chunk` tokens; at each chunk's start
    s̄ = canonical(s) and W̄ = expose(s̄); within the chunk every gradient is taken at c_t·W̄
    (c = gradient_scale(α_t)), the stored quantity follows s ← α·s + U and momentum S ← β·S − lr·G;
    prox once at the chunk's end; in-chunk reads see read_scale(s̄)·s, or W̄ where read_scale is
    None (docs/internals.md); the chunk's last token reads the returned state. chunk=1 equals
    `scan`. Returns (Y, final MemoryState), float64.
    """
    chunk = validation.size("chunk", chunk)
    ops = protocols.reference(state.memory, bias, state.retention, state.algorithm)
    s, S, (K, V, Q), gates = _start(state, K, V, Q, bias, retention, algorithm, lr, alpha, delta, beta)
    gate, ys, T = ops.gate, [], K.shape[-2]
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        s = s_bar = tuple(gate.canonical(x) for x in s)
        W_bar = tuple(gate.expose(x) for x in s_bar)
        for t in range(start, end):
            a = expand(gates["alpha"][..., t], 2) if gate.uses_alpha else 1.0   # none(): W ← W + U
            U, S = _direction(ops, W_bar, S, K[..., t, :], V[..., t, :], gates, t)
            s = tuple(a * x + u for x, u in zip(s, U))
            if t < end - 1:
                W = tuple(_read(gate, x, x_bar, w_bar) for x, x_bar, w_bar in zip(s, s_bar, W_bar))
            else:
                s = tuple(gate.prox(x) for x in s)
                W = tuple(gate.expose(x) for x in s)
            ys.append(ops.memory.apply(W, Q[..., t, :]))
    return _stack(ys, s, Q, state.memory.d_out), state._replace(params=s, momentum=S)


# ---------------------------------------------------------------- one token

def _direction(ops, W, S, k, v, gates, t):
    """(U, S') for token t with the gradient taken at c·W (docs/contract.md §3)."""
    c = ops.gate.gradient_scale(gates["alpha"][..., t])
    if c is not None:
        W = tuple(expand(c, 2) * w for w in W)
    delta = None if gates["delta"] is None else gates["delta"][..., t]
    y, pullback = protocols.apply_with_pullback(ops.memory.apply, W, k)
    G = pullback(ops.bias.psi(y, v, delta))                          # J_Wᵀ ψ by autodiff
    lr = expand(ops.algorithm.effective_lr(gates["lr"][..., t], k), 2)
    if ops.algorithm.uses_momentum:
        beta = expand(gates["beta"][..., t], 2)
        S = tuple(beta * s_ - lr * G_ for s_, G_ in zip(S, G))      # S ← β·S − lr·G
        return S, S                                                  # U = S
    return tuple(-lr * G_ for G_ in G), S                            # U = −lr·G


def _read(gate, s, s_bar, W_bar):
    """In-chunk read weights of the anchored form: ν̄·s, or the anchor's weights W̄."""
    nu = gate.read_scale(s_bar)
    return W_bar if nu is None else nu * s


# ---------------------------------------------------------------- set-up

def _start(state, K, V, Q, bias, retention, algorithm, lr, alpha, delta, beta):
    """Validate (on the raw values) and convert to float64; gates become (..., T) series."""
    raw = anp.stop_gradient
    mem = state.memory
    gates = {"lr": lr, "alpha": alpha, "delta": delta, "beta": beta}
    xp, _, (Kr, _, _), _ = validation.inputs(
        state._replace(params=tuple(raw(p) for p in state.params)), bias, retention, algorithm,
        [("K", raw(K), mem.d_in, "d_in"), ("V", raw(V), mem.d_out, "d_out"), ("Q", raw(Q), mem.d_in, "d_in")],
        {name: None if x is None else raw(x) for name, x in gates.items()}, time=True,
        check_finite=True)
    T = Kr.shape[-2]

    def f64(x):
        return x if raw(x) is not x else xp.asarray(x, dtype=xp.float64)

    def series(x):
        x = f64(x)
        return anp.broadcast_to(x, tuple(x.shape[:-1]) + (T,) if x.ndim else (T,))

    s = tuple(f64(p) for p in state.params)
    S = None if state.momentum is None else tuple(f64(m) for m in state.momentum)
    return s, S, (f64(K), f64(V), f64(Q)), {name: None if x is None else series(x)
                                            for name, x in gates.items()}


def _stack(ys, s, Q, d_out):
    """Reads along time, (..., T, d_out); an empty sequence gives an empty float64 array."""
    if ys:
        return anp.stack(ys, axis=-2)
    batch = np.broadcast_shapes(*(x.shape[:-2] for x in s), Q.shape[:-2])
    xp = namespace(anp.stop_gradient(Q))
    return xp.zeros(batch + (0, d_out), dtype=xp.float64)
