"""The anchored chunked scan (docs/contract.md §4) for every rule outside the exact family, with its backward.

Inside a chunk every token's gradient is taken at the chunk's starting exposed weights W̄ (at c_i·W̄
with c = the gate's `gradient_scale(α)`), so the b gradients of a chunk come from one forward and
one backward of the memory over the chunk's keys: rank-1 factor pairs G_i = e_i f_iᵀ per parameter
(chunk/reads.py). The stored quantity s ← α·s + U and the momentum S ← β·S − lr·G are then linear
recurrences in closed form (chunk/coefficients.py):

    s_t = A_t s̄ + m_t S̄ − Σ_{i≤t} C_ti e_i f_iᵀ          (chunk end: one matmul of the factors)

The gate's `prox` is applied once at the chunk end; in-chunk reads see ν̄·s_t in the dual form
(ν̄ = the gate's `read_scale(s̄)`), or the anchor's weights W̄ where read_scale is None; the
chunk's last token reads the returned state. Everything about the rule goes through the methods
of mirascore.protocols, resolved once per call: no spec is recognised by its name. Derivations:
docs/derivations/chunked.md (forward) and docs/derivations/scan-backward.md (backward).

    Y, final_state, saved = anchored_scan_fwd(state, K, V, Q, bias=..., lr=..., alpha=..., chunk=64)
    grads = anchored_scan_bwd(saved, dY, (dparams, dmomentum))
    Y, params, momentum = anchored_scan(params, momentum, K, V, Q, lr, alpha, delta, beta,
                                        memory=..., bias=..., retention=..., algorithm=..., chunk=64)

The last one is the differentiable entry: a `mirascore.autodiff.tree_primitive` whose VJP is
`anchored_scan_bwd`, after the algorithm's `effective_lr` and the gate's `gradient_scale`, which
autodiff differentiates. Arrays are numpy or CuPy (one namespace `xp` per call); the compute
dtype is the inputs' floating dtype. On CuPy the chunk loops are replayed as CUDA graphs
(mirascore.gpu.graph) and fusable spec methods run their fused kernels (docs/internals.md).
"""
from typing import NamedTuple

import numpy as np

from .. import protocols
from .._xp import gemm_precision, namespace
from ..autodiff.core import tree_leaves
from ..autodiff.numpy import unbroadcast
from ..autodiff.structured import defvjp_tree, tree_primitive
from .coefficients import chunk_end, chunk_end_vjp, coefficients, coefficients_vjp
from .reads import DualReads, WeightReads

# ---------------------------------------------------------------- static description of a run


class AnchoredRun(NamedTuple):
    """One anchored scan's static part: the rule's resolved methods (mirascore.protocols), whether
    its algorithm carries momentum, the chunk size, and `key`, the specs and chunk that identify
    the run (the CUDA graph signature)."""
    ops: protocols.RuleMethods
    momentum: bool
    chunk: int
    key: tuple


def anchored_run(memory, bias, retention, algorithm, chunk):
    """Resolve the rule's methods for the anchored scan (MissingMethodError names what is missing)."""
    ops = protocols.anchored(memory, bias, retention, algorithm)
    return AnchoredRun(ops, ops.algorithm.uses_momentum, int(chunk),
                       (memory, bias, retention, algorithm, int(chunk)))


class Tokens(NamedTuple):
    """Per-token inputs, broadcast to the batch: K, Q (..., T, d_in), V (..., T, d_out); gates
    lr (the effective rate), alpha (..., T); delta, beta and scale (the gradient point's c, from
    the gate's `gradient_scale`) (..., T) or None."""
    K: object
    V: object
    Q: object
    lr: object
    alpha: object
    delta: object = None
    beta: object = None
    scale: object = None

    def window(self, start, stop):
        """Tokens start..stop−1."""
        def cut(x, n):
            return None if x is None else x[(Ellipsis, slice(start, stop)) + (slice(None),) * n]
        return Tokens(*(cut(x, 1 if name in _ROWS else 0) for name, x in zip(self._fields, self)))


_ROWS = ("K", "V", "Q")


class Saved(NamedTuple):
    """What the backward needs: the run, the broadcast inputs, each chunk's starting stored
    quantity and momentum, per parameter stacked over chunks (everything inside a chunk is
    recomputed), and the inputs' shapes."""
    run: AnchoredRun
    tokens: Tokens
    s_in: tuple
    S_in: tuple | None
    shapes: dict


class Grads(NamedTuple):
    """Gradients of the anchored scan, each in its input's shape (None where the input was None)."""
    params: tuple
    momentum: tuple | None
    K: object
    V: object
    Q: object
    lr: object
    alpha: object
    delta: object
    beta: object
    scale: object


# ---------------------------------------------------------------- forward


def anchored_scan_fwd(state, K, V, Q, *, bias, lr, alpha=1.0, delta=None, beta=None, scale=None,
                      chunk=64):
    """The anchored chunked scan of docs/contract.md §4 on raw arrays.

    state: anything with memory, retention, algorithm, params (the stored quantity) and momentum
    (a MemoryState); K, Q (..., T, d_in), V (..., T, d_out); gates broadcast against (..., T): lr
    as used (the algorithm's effective rate), scale the gradient point's c (None: at W̄). Returns
    (Y (..., T, d_out), final state, saved), Y read after each token's update.
    """
    run = anchored_run(state.memory, bias, state.retention, state.algorithm, chunk)
    return _run_forward(run, state, Tokens(K, V, Q, lr, alpha, delta, beta, scale))


def _run_forward(run, state, tokens):
    _check_gates(run, tokens.delta, tokens.beta)
    params, momentum, tokens, shapes = _broadcast(run, state.params, state.momentum, tokens)
    Y, s, S, s_in, S_in = _device_call(_forward, run, params, momentum, tokens)
    return Y, state._replace(params=s, momentum=S), Saved(run, tokens, s_in, S_in, shapes)


def _check_gates(run, delta, beta):
    if run.momentum and beta is None:
        raise ValueError(f"algorithm {run.ops.algorithm.spec!r} carries momentum: it needs the beta= gate")
    if run.ops.bias.needs_delta and delta is None:
        raise ValueError(f"bias {run.ops.bias.spec!r} has no static δ: it needs the delta= gate")


def _forward(run, params, momentum, tokens):
    """The chunk loop: (Y, final params, final momentum, each chunk's starting params and
    momentum stacked along a new leading axis). Results are written into preallocated arrays:
    CuPy's concatenate of many pieces copies pointers from the host, which a CUDA graph cannot
    capture."""
    xp, T = namespace(*params, tokens.K), tokens.K.shape[-2]
    bounds = _bounds(T, run.chunk)
    Y = xp.empty(tokens.K.shape[:-2] + (T, run.ops.memory.spec.d_out), dtype=tokens.K.dtype)

    def stack(states):
        return None if states is None or not bounds else \
            tuple(xp.empty((len(bounds),) + x.shape, dtype=x.dtype) for x in states)
    s, S = params, momentum
    s_in, S_in = stack(s), stack(S)
    for c, (start, stop) in enumerate(bounds):
        for into, state in ((s_in, s), (S_in, S)):
            for buffer, x in zip(into or (), state or ()):
                buffer[c] = x
        Yc, s, S, _ = _chunk_forward(run, xp, s, S, tokens.window(start, stop))
        Y[..., start:stop, :] = Yc
    return Y, tuple(s), None if S is None else tuple(S), s_in, S_in


def _bounds(T, chunk):
    return [(start, min(start + chunk, T)) for start in range(0, T, chunk)]


def _device_call(fn, run, *args):
    """fn(run, *args); on CuPy replayed as a CUDA graph once the shapes repeat
    (mirascore.gpu.graph), which removes the Python cost of each chunk's hundred small kernels."""
    if namespace(*tree_leaves(args)) is np:
        return fn(run, *args)
    from ..gpu import graph
    return graph.call(lambda *a: fn(run, *a), args, key=(fn.__name__, run.key))


def _broadcast(run, params, momentum, tokens):
    """Everything broadcast to one batch shape and the compute dtype; the original shapes kept
    for summing gradients back (`unbroadcast`)."""
    K, V, Q = tokens.K, tokens.V, tokens.Q
    xp = namespace(*params, K, V, Q)
    dtype = np.result_type(*(x.dtype for x in (*params, K, V, Q)))
    gates = {n: getattr(tokens, n) for n in Tokens._fields if n not in _ROWS}
    gates["beta"] = gates["beta"] if run.momentum else None
    gates = {n: None if g is None else xp.asarray(g, dtype=dtype) for n, g in gates.items()}
    if gates["alpha"] is None:                   # made on the device: no copy from the host
        gates["alpha"] = xp.ones((), dtype=dtype)
    T = K.shape[-2]
    batch = np.broadcast_shapes(*(p.shape[:-2] for p in params),
                                *(m.shape[:-2] for m in momentum or ()),
                                K.shape[:-2], V.shape[:-2], Q.shape[:-2],
                                *(g.shape[:-1] for g in gates.values() if g is not None and g.ndim))
    shapes = {"params": [p.shape for p in params],
              "momentum": None if momentum is None else [m.shape for m in momentum],
              "K": K.shape, "V": V.shape, "Q": Q.shape,
              **{n: None if g is None else g.shape for n, g in gates.items()}}

    def to(x, tail):
        return xp.broadcast_to(xp.asarray(x, dtype=dtype), batch + tail)
    params = tuple(to(p, p.shape[-2:]) for p in params)
    if run.momentum:
        momentum = tuple(to(m, m.shape[-2:]) for m in momentum) if momentum is not None else \
            tuple(xp.zeros(p.shape, dtype=dtype) for p in params)
    else:
        momentum = None
    tokens = Tokens(to(K, (T, K.shape[-1])), to(V, (T, V.shape[-1])), to(Q, (T, Q.shape[-1])),
                    **{n: None if g is None else to(g, (T,)) for n, g in gates.items()})
    return params, momentum, tokens, shapes


class AnchorGradients(NamedTuple):
    """The gradients of a chunk's tokens at its anchor, and what their VJP needs."""
    reads: WeightReads    # the reads at the gradient point c·W̄
    mcache: object        # memory forward over the chunk's keys
    bcache: object        # memory backward at ψ
    Y: object             # M(c_i·W̄, k_i): (..., b, d_out)
    psi: object           # ψ_i: (..., b, d_out)
    factors: tuple        # (E, F) per parameter: G_i = e_i f_iᵀ


def anchor_gradients(ops, xp, W_bar, K, V, delta=None, scale=None):
    """G_i = J_W(k_i)ᵀ ψ(M(c_i·W̄, k_i), v_i) for every row of K, as rank-1 factor pairs per
    parameter: the memory's backward at dY = ψ gives the left factors (the cotangents dO_p of its
    reads), the reads' inputs the right ones (docs/derivations/chunked.md §1)."""
    reads = WeightReads(xp, W_bar, scale)
    Y, mcache = ops.memory.forward(reads.read, K)
    psi = ops.bias.psi(Y, V, delta)
    dO, _, bcache = ops.memory.backward(mcache, psi, reads.input_vjp, with_dX=False)
    return AnchorGradients(reads, mcache, bcache, Y, psi, tuple(zip(dO, reads.inputs)))


def anchor_gradients_vjp(ops, grads, V, delta, dE, dF, dW_bar):
    """VJP of (W̄, K, V, δ, c) ↦ factor pairs, given the pairs' cotangents dE, dF (per parameter):
    the second-order terms through the memory's `backward_vjp` and the bias's `psi_vjp`, then the
    memory's backward of the forward. Accumulates dW̄ into the list dW_bar; returns (dK, dV,
    ddelta, dc) (ddelta, dc None where δ, c are not per-token arrays)."""
    mem, dscale = ops.memory, [None]
    ddY, dcache = mem.backward_vjp(grads.mcache, grads.bcache, grads.psi, tuple(dE),
                                   grads.reads.input_vjp_vjp(dW_bar, dscale))
    dY, dV, ddelta = ops.bias.psi_vjp(grads.Y, V, delta, ddY)
    _, dK, _ = mem.backward(grads.mcache, dY, grads.reads.vjp(dW_bar, dscale, dF), dcache=dcache)
    return dK, dV, ddelta, None if grads.reads.c is None else dscale[0]


class _ChunkCache(NamedTuple):
    """One chunk's forward intermediates, recomputed in the backward."""
    s_in: tuple           # stored quantity handed in by the previous chunk, per param
    s_bar: tuple          # canonical stored quantity at the chunk start (the anchor), per param
    W_bar: tuple          # exposed anchor weights
    S_bar: tuple | None   # momentum at the chunk start
    grads: AnchorGradients
    factors: tuple        # (E, F) per parameter
    coef: object            # Coefficients
    s_lin: tuple          # chunk-end stored quantity before prox
    s_out: tuple
    W_out: tuple
    last: WeightReads     # the last token's read of the returned state
    lcache: object
    reads: object         # in-chunk reads (DualReads or WeightReads of W̄), None when b = 1
    rcache: object


def _chunk_forward(run, xp, s_in, S_in, tok):
    """One chunk: (Y (..., b, d_out), s_out, S_out, cache)."""
    mem, gate = run.ops.memory, run.ops.gate
    s_bar = tuple(gate.canonical(x) for x in s_in)
    W_bar = tuple(gate.expose(x) for x in s_bar)
    grads = anchor_gradients(run.ops, xp, W_bar, tok.K, tok.V, tok.delta, tok.scale)
    factors = grads.factors
    coef = coefficients(xp, tok.lr, tok.alpha, tok.beta)
    s_lin, S_out = chunk_end(xp, coef, s_bar, S_in, factors)
    s_out = tuple(gate.prox(x) for x in s_lin)
    W_out = tuple(gate.expose(x) for x in s_out)
    last = WeightReads(xp, W_out)
    Y, lcache = mem.forward(last.read, tok.Q[..., -1:, :])
    reads = rcache = None
    b = tok.Q.shape[-2]
    if b > 1:
        reads = _in_chunk_reads(xp, gate, coef, s_bar, W_bar, S_in, factors, b - 1)
        Y_in, rcache = mem.forward(reads.read, tok.Q[..., :-1, :])
        Y = xp.concatenate([Y_in, Y], axis=-2)
    cache = _ChunkCache(s_in, s_bar, W_bar, S_in, grads, factors, coef, s_lin, s_out, W_out, last,
                        lcache, reads, rcache)
    return Y, s_out, S_out, cache


def _in_chunk_reads(xp, gate, coef, s_bar, W_bar, S_bar, factors, t):
    """The reads of rows 0..t−1 (docs/internals.md): ν̄·s_t in the dual form, or W̄."""
    nu = tuple(gate.read_scale(x) for x in s_bar)
    if nu[0] is None:
        return WeightReads(xp, W_bar)
    rows = (coef.A[..., :t], None if coef.m is None else coef.m[..., :t], coef.C[..., :t, :])
    return DualReads(xp, rows, s_bar, S_bar, factors, nu)


# ---------------------------------------------------------------- backward


class _Cotangents:
    """One chunk's cotangent accumulator of its anchor-side quantities (mutable, chunk-local)."""

    def __init__(self, xp, cache, t):
        zeros = xp.zeros_like
        n = len(cache.s_bar)
        self.ds_bar = [zeros(x) for x in cache.s_bar]
        self.dS_bar = None if cache.S_bar is None else [zeros(x) for x in cache.S_bar]
        self.dW_bar = [None] * n                 # filled by the reads' VJPs
        self.dnu = [None] * n
        self.dE = [zeros(E) for E, _ in cache.factors]
        self.dF = [zeros(F) for _, F in cache.factors]
        coef = cache.coef
        self.dA_rows = zeros(coef.A[..., :t])
        self.dm_rows = None if coef.m is None else zeros(coef.m[..., :t])
        self.dC_rows = zeros(coef.C[..., :t, :])


def _chunk_backward(run, xp, cache, tok, dY, ds_out, dS_out):
    """Reverse one chunk. dY (..., b, d_out); ds_out, dS_out: cotangents of the chunk's returned
    stored quantity and momentum (per param). Returns (ds_in, dS_in, token grads as a Tokens)."""
    mem, gate, coef = run.ops.memory, run.ops.gate, cache.coef
    b = tok.K.shape[-2]
    acc = _Cotangents(xp, cache, b - 1)

    # the last token's read of the returned state, W_out = expose(s_out), s_out = prox(s_lin)
    dW_out = [None] * len(cache.W_out)
    _, dQ, _ = mem.backward(cache.lcache, dY[..., -1:, :], cache.last.vjp(dW_out, None))
    dW_out = [_accumulated(xp, d, W) for d, W in zip(dW_out, cache.W_out)]
    ds_lin = [gate.prox_vjp(s_lin, ds + gate.expose_vjp(s_out, W_out, dW))
              for s_lin, ds, s_out, W_out, dW in zip(cache.s_lin, ds_out, cache.s_out,
                                                       cache.W_out, dW_out)]
    dA_b, dm_b, dP_end, dC_b, dw = chunk_end_vjp(xp, coef, cache.s_bar, cache.S_bar, cache.factors,
                                                 ds_lin, dS_out, acc)
    if b > 1:                                      # the in-chunk reads
        _, dQin, _ = mem.backward(cache.rcache, dY[..., :-1, :], cache.reads.in_chunk_vjp(acc))
        dQ = xp.concatenate([dQin, dQ], axis=-2)

    # coefficients -> gates
    dA = xp.concatenate([acc.dA_rows, dA_b[..., None]], axis=-1)
    dC = xp.concatenate([acc.dC_rows, dC_b[..., None, :]], axis=-2)
    dm = None if coef.m is None else xp.concatenate([acc.dm_rows, dm_b[..., None]], axis=-1)
    dlr, dalpha, dbeta = coefficients_vjp(xp, coef, dA, dC, dm, dP_end, dw)

    # factors -> anchor, keys, values, δ and the gradient point's c
    dK, dV, ddelta, dscale = anchor_gradients_vjp(run.ops, cache.grads, tok.V, tok.delta, acc.dE,
                                                  acc.dF, acc.dW_bar)

    # anchor -> the stored quantity handed in
    dW_bar = [_accumulated(xp, d, W) for d, W in zip(acc.dW_bar, cache.W_bar)]
    ds_in = [gate.canonical_vjp(s_in, ds + gate.anchor_vjp(s_bar, W_bar, dW, dnu))
             for s_in, ds, s_bar, W_bar, dW, dnu in zip(cache.s_in, acc.ds_bar, cache.s_bar,
                                                         cache.W_bar, dW_bar, acc.dnu)]
    return ds_in, acc.dS_bar, Tokens(dK, dV, dQ, dlr, dalpha, ddelta, dbeta, dscale)


def _accumulated(xp, d, like):
    """An accumulated cotangent, or zeros if nothing arrived (a parameter no read touched)."""
    return xp.zeros_like(like) if d is None else d


def anchored_scan_bwd(saved, dY, dfinal=None):
    """Gradients of `anchored_scan_fwd`'s outputs' cotangents w.r.t. its inputs.

    dY (..., T, d_out) or None; dfinal = (dparams, dmomentum) for the final state, each a tuple
    (entries may be None) or None. Returns Grads, every entry summed back to its input's shape.
    """
    run, tok = saved.run, saved.tokens
    xp = namespace(tok.K)
    dparams, dmom = (None, None) if dfinal is None else dfinal
    if saved.s_in is None:                       # T = 0
        return _grads(saved, xp, None, None, None, dparams, dmom)
    # the final state's cotangents, full (broadcast) shape; the stored quantity keeps its shape
    like = [x[0] for x in saved.s_in]
    ds = tuple(_zeros_or(xp, d, x) for d, x in zip(dparams or (None,) * len(like), like))
    dS = tuple(_zeros_or(xp, d, x) for d, x in zip(dmom or (None,) * len(like), like)) \
        if run.momentum else None
    dY = None if dY is None else xp.broadcast_to(dY, tok.Q.shape[:-1] + (run.ops.memory.spec.d_out,))
    ds, dS, dtok = _device_call(_backward, run, tok, saved.s_in, saved.S_in, dY, ds, dS)
    return _grads(saved, xp, dtok, ds, dS, dparams, dmom)


def _backward(run, tok, s_in, S_in, dY, ds, dS):
    """The chunk loop in reverse: (ds, dS at the scan's start, token gradients as a Tokens of
    full-length arrays, None where the input was None)."""
    xp = namespace(tok.K)
    grads = dict.fromkeys(Tokens._fields)           # full-length arrays, filled chunk by chunk
    for c, (start, stop) in reversed(list(enumerate(_bounds(tok.K.shape[-2], run.chunk)))):
        window = tok.window(start, stop)
        _, _, _, cache = _chunk_forward(run, xp, tuple(x[c] for x in s_in),
                                        None if S_in is None else tuple(x[c] for x in S_in), window)
        dYc = xp.zeros(window.Q.shape[:-1] + (run.ops.memory.spec.d_out,), dtype=tok.K.dtype) \
            if dY is None else dY[..., start:stop, :]
        ds, dS, dtok = _chunk_backward(run, xp, cache, window, dYc, ds, dS)
        for name, g in zip(Tokens._fields, dtok):
            if g is None:
                continue
            if grads[name] is None:
                grads[name] = xp.empty(getattr(tok, name).shape, dtype=g.dtype)
            cut = (Ellipsis, slice(start, stop)) + ((slice(None),) if name in _ROWS else ())
            grads[name][cut] = g
    return tuple(ds), None if dS is None else tuple(dS), Tokens(**grads)


def _zeros_or(xp, d, like):
    """A full-shape cotangent: d broadcast to like's shape, or zeros."""
    if d is None:
        return xp.zeros(like.shape, dtype=like.dtype)
    return xp.broadcast_to(xp.asarray(d, dtype=like.dtype), like.shape)


def _grads(saved, xp, dtok, ds, dS, dparams, dmom):
    """Everything summed back to the inputs' shapes; dtok None for T = 0."""
    sh = saved.shapes
    if dtok is None:                              # T = 0: the scan is the identity on the state
        zeros = [xp.zeros(s) for s in sh["params"]]
        params = tuple(z if d is None else unbroadcast(xp.asarray(d), s)
                       for z, d, s in zip(zeros, dparams or (None,) * len(zeros), sh["params"]))
        mom = None
        if sh["momentum"] is not None:
            mom = tuple(xp.zeros(s) if d is None else unbroadcast(xp.asarray(d), s)
                        for d, s in zip(dmom or (None,) * len(sh["momentum"]), sh["momentum"]))
        empty = {n: None if sh[n] is None else xp.zeros(sh[n]) for n in Tokens._fields}
        return Grads(params, mom, **empty)

    def back(name):
        g = getattr(dtok, name)
        return None if g is None or sh[name] is None else unbroadcast(g, sh[name])
    params = tuple(unbroadcast(d, s) for d, s in zip(ds, sh["params"]))
    mom = None if sh["momentum"] is None or dS is None else \
        tuple(unbroadcast(d, s) for d, s in zip(dS, sh["momentum"]))
    return Grads(params, mom, *(back(n) for n in Tokens._fields))


# ---------------------------------------------------------------- one autodiff primitive


class _State(NamedTuple):
    memory: object
    retention: object
    algorithm: object
    params: tuple
    momentum: tuple | None


@tree_primitive
def _anchored_core(params, momentum, tokens, *, run, precision=None):
    memory, _, retention, algorithm, _ = run.key
    with gemm_precision(precision, tokens.K):
        Y, final, saved = _run_forward(run, _State(memory, retention, algorithm, params, momentum),
                                       tokens)
    return (Y, final.params, final.momentum), saved


def _anchored_vjp(result, saved, args, kwargs):
    def vjp(g):
        dY, dparams, dmom = g
        with gemm_precision(kwargs.get("precision"), saved.tokens.K):
            gr = anchored_scan_bwd(saved, dY, (dparams, dmom))
        return gr.params, gr.momentum, Tokens(gr.K, gr.V, gr.Q, gr.lr, gr.alpha, gr.delta, gr.beta,
                                              gr.scale)
    return vjp


defvjp_tree(_anchored_core, _anchored_vjp)


def anchored_precision(precision):
    """The GEMM precision `mc.scan` runs the anchored scan at when asked for `precision`: always
    fp32, because no reduced precision keeps every anchored rule within the contract's 1e-2
    (docs/contract.md §5; measured with benchmarks/cpu_precision.py, docs/benchmarks.md "Low
    precision"). With every product in bf16 (the decay algebra aside) the worst relative error over
    Y and the gradients is 0.9–1.8e-2 for Moneta and Titans at d = 64–128, 5e-2 and more for Memora
    and Yaad (ill-conditioned at these inputs: float32 errs up to 3e-4), and above 1e-2 for all four
    at d = 8, where the rules amplify rounding most. No single product carries it: each of the
    chunk's ~25 product sites alone adds 1–5e-3. TF32 and fp16 (10 mantissa bits) reach 4e-2
    (Memora) and 8e-2 to 1.3 (Yaad) at d = 64–128, and fp16 underflows small cotangents."""
    return "fp32"


def anchored_scan(params, momentum, K, V, Q, lr, alpha=None, delta=None, beta=None, *, memory, bias,
                  retention, algorithm, chunk=64, precision=None):
    """The anchored chunked scan as one differentiable operation of `mirascore.autodiff`.

    params: the stored quantity (one array per memory parameter); momentum: one per parameter for
    an algorithm with momentum, else None; gates as `mc.scan` takes them (alpha None: 1; delta,
    beta None where the rule takes none). Keywords are the static specs, the chunk size and the
    GEMM precision of the forward and the backward on CuPy (None: the setting in force at each;
    applied as given here, where `mc.scan` first maps it through `anchored_precision`).
    Returns (Y, params', momentum'). The rate goes through the algorithm's `effective_lr` and α
    through the gate's `gradient_scale` here, so autodiff carries their gradients.
    """
    run = anchored_run(memory, bias, retention, algorithm, chunk)
    if not run.ops.gate.uses_alpha:
        alpha = None                               # W ← W + U: validation has checked α = 1
    scale = run.ops.gate.gradient_scale(1.0 if alpha is None else alpha)
    tokens = Tokens(K, V, Q, run.ops.algorithm.effective_lr(lr, K), alpha, delta,
                    beta if run.momentum else None, scale)
    return _anchored_core(tuple(params), None if momentum is None else tuple(momentum), tokens,
                          run=run, precision=precision)
