"""The anchored chunked scan (mirascore/chunk/anchored.py) against the reference anchored loop.

Forward: Y and the final state equal `ref.scan_chunked` for chunk ∈ {1, 3, 16, 64} with T not a
multiple of the chunk, for every memory × bias × retention × algorithm outside the exact family
(linear memory: the whole cross product; mlp: every bias and every retention × algorithm here, the
whole cross product under -m slow); chunk = 1 equals `ref.scan`; chaining at a chunk boundary.
Backward: every gradient (initial stored params and momentum, K, V, Q, lr, α, δ, β) equals autodiff
through the reference with random cotangents on Y and on the final state; finite differences
(`ad.check_grads`) on the primitive and on every hand-derived piece (the specs' VJP methods, the
factor pairs at the anchor, the decay matrices). Long-T
finiteness, broadcasting, T = 0, errors, float32, and the same comparisons on CuPy arrays (gpu).

kl and sigmoid: docs/internals.md has in-chunk tokens read the chunk-start weights W̄ (their
`read_scale` is None); the reference does the same.
"""
import itertools
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mirascore as mc
import mirascore.autodiff as ad
import mirascore.autodiff.numpy as anp
import mirascore.ref as ref
from mirascore import protocols
from mirascore.chunk.anchored import (anchor_gradients, anchor_gradients_vjp, anchored_scan,
                                      anchored_scan_bwd, anchored_scan_fwd)
from mirascore.chunk.coefficients import decay_matrix, decay_matrix_vjp
from mirascore.state import MemoryState, Rule
from mirascore.testing import assert_close
from mirascore.updates import is_exact

RTOL, ATOL = 1e-9, 1e-12          # float64; both sides are exact formulas, only round-off differs
CHUNKS = (1, 3, 16, 64)

# ---------------------------------------------------------------- the catalogue

BIASES = [mc.bias.l2(), mc.bias.dot(), mc.bias.lp(1.0), mc.bias.lp(1.5), mc.bias.lp(3.0),
          mc.bias.lp(1.5, smooth=(4.0, 1e-3)),
          mc.bias.huber(0.7, "coord"), mc.bias.huber(0.7, "norm"), mc.bias.huber(0.7, "mixture"),
          mc.bias.huber(None, "coord"), mc.bias.huber(None, "norm"), mc.bias.huber(None, "mixture"),
          mc.bias.robust(0.5)]
RETENTIONS = [mc.retention.none(), mc.retention.l2(), mc.retention.l2(grad_at="retained"),
              mc.retention.lq(4.0), mc.retention.lq(3.0), mc.retention.kl(), mc.retention.kl(2.0),
              mc.retention.elastic_net(0.05), mc.retention.sigmoid()]
ALGORITHMS = [mc.algorithm.gd(), mc.algorithm.momentum()]
# mlp d = 3: with d = 2 LN's output is always ±(1, −1), its backward projector I − 11ᵀ/d − ûûᵀ/d is
# ≈ 0 and every mlp gradient is a cancellation down to O(ε_LN): round-off, not a test of anything
LINEAR, MLP = mc.memory.linear(3, 2), mc.memory.mlp(3, expansion=2)


def name(spec):
    rest = [str(x) for x in spec[1:] if x is not None]
    return spec.name + ("(" + ",".join(rest) + ")" if rest else "")


def combos(memories, biases=BIASES, retentions=RETENTIONS, algorithms=ALGORITHMS):
    """pytest params for every rule outside the exact family."""
    out = []
    for mem, bias, ret, alg in itertools.product(memories, biases, retentions, algorithms):
        if not is_exact(Rule(mem, bias, ret, alg)):
            out.append(pytest.param(Rule(mem, bias, ret, alg),
                                    id="-".join(map(name, (mem, bias, ret, alg)))))
    return out


# ---------------------------------------------------------------- inputs

class Problem:
    """A rule with its inputs: stored params P, momentum S (None for gd), K, V, Q and gates."""

    def __init__(self, rule, rng, batch, T, smooth_gates=False):
        mem, ret = rule.memory, rule.retention
        self.rule = rule
        self.P = tuple(rng.uniform(-1.0, 1.0, batch + s) for s in mem.param_shapes())
        self.S = None
        if rule.algorithm.name == "momentum":       # a carried (nonzero) momentum, as when chaining
            self.S = tuple(rng.uniform(-0.3, 0.3, batch + s) for s in mem.param_shapes())
        self.K = unit_rows(rng.standard_normal(batch + (T, mem.d_in)))
        self.Q = unit_rows(rng.standard_normal(batch + (T, mem.d_in)))
        self.V = rng.uniform(-1.0, 1.0, batch + (T, mem.d_out))
        u = rng.uniform(size=batch + (T,))
        self.lr = np.where(u < 0.1, 0.0, rng.uniform(0.0, 0.5, batch + (T,)))
        if ret.name == "none":
            self.alpha = np.ones(batch + (T,))
        elif smooth_gates:                           # finite differences need α ± ε inside (0, 1]
            self.alpha = rng.uniform(0.3, 0.95, batch + (T,))
        elif ret.name == "lq":
            # α ≈ 0 collapses the accumulator (‖A‖_q → 1e-10), and W = A/‖A‖_q^(q−2) then amplifies
            # round-off by ~1e8 in the reference itself: keep ‖A‖ away from 0, as strategies.py does
            self.alpha = rng.uniform(0.5, 1.0, batch + (T,))
        else:                                        # exactly 1, tiny, and everything between
            u = rng.uniform(size=batch + (T,))
            self.alpha = np.where(u < 0.2, 1.0, np.where(u < 0.3, 1e-6, rng.uniform(0.05, 1.0, batch + (T,))))
        self.delta = rng.uniform(0.2, 2.0, batch + (T,)) if rule.bias.needs_delta else None
        self.beta = None
        if rule.algorithm.name == "momentum":
            u = rng.uniform(size=batch + (T,))
            self.beta = (rng.uniform(0.1, 0.9, batch + (T,)) if smooth_gates else
                         np.where(u < 0.25, 0.0, rng.uniform(0.0, 0.95, batch + (T,))))

    @property
    def args(self):
        return (self.P, self.S, self.K, self.V, self.Q, self.lr, self.alpha, self.delta, self.beta)

    def state(self, P=None, S=None):
        r = self.rule
        return MemoryState(r.memory, r.retention, r.algorithm, self.P if P is None else P,
                           self.S if S is None else S)


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@st.composite
def problems(draw, rule, max_T=20, batches=((), (2,), (2, 1)), smooth_gates=False):
    """Shapes from hypothesis, values from a numpy generator it seeds (so that no value sits
    exactly on a kink of ψ: r = 0, |r| = δ)."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    batch = draw(st.sampled_from(batches))
    T = draw(st.integers(1, max_T))
    return Problem(rule, rng, batch, T, smooth_gates)


# ---------------------------------------------------------------- the judges and the kernel

def gates(lr, alpha, delta, beta):
    return {k: v for k, v in dict(lr=lr, alpha=alpha, delta=delta, beta=beta).items() if v is not None}


def judge(rule, chunk):
    """(P, S, K, V, Q, lr, α, δ, β) -> (Y, P', S') by the reference anchored loop, differentiable
    by autodiff."""
    mem, ret, alg = rule.memory, rule.retention, rule.algorithm

    def f(P, S, K, V, Q, lr, alpha, delta, beta):
        state = MemoryState(mem, ret, alg, tuple(P), None if S is None else tuple(S))
        Y, out = ref.scan_chunked(state, K, V, Q, bias=rule.bias, chunk=chunk,
                                  **gates(lr, alpha, delta, beta))
        return Y, out.params, out.momentum
    return f


def kernel(rule, chunk):
    """The primitive with the judge's signature."""
    def f(P, S, K, V, Q, lr, alpha, delta, beta):
        return anchored_scan(P, S, K, V, Q, lr, alpha, delta, beta, memory=rule.memory,
                             bias=rule.bias, retention=rule.retention, algorithm=rule.algorithm,
                             chunk=chunk)
    return f


def weights(ret, params):
    return tuple(ret.expose(p) for p in params)


def assert_outputs(rule, got, want, ctx):
    """Y, exposed weights and momentum; kl's stored logits only matter up to row constants."""
    (Yg, Pg, Sg), (Yw, Pw, Sw) = got, want
    assert_close("Y", Yg, Yw, rtol=RTOL, atol=ATOL, context=ctx)
    for i, (a, b) in enumerate(zip(weights(rule.retention, Pg), weights(rule.retention, Pw))):
        assert_close(f"W{i}", a, b, rtol=RTOL, atol=ATOL, context=ctx)
    if rule.retention.name != "kl":
        for i, (a, b) in enumerate(zip(Pg, Pw)):
            assert_close(f"params[{i}]", a, b, rtol=RTOL, atol=ATOL, context=ctx)
    for i, (a, b) in enumerate(zip(Sg or (), Sw or ())):
        assert_close(f"momentum[{i}]", a, b, rtol=RTOL, atol=ATOL, context=ctx)


def _leaves(x):
    return [a for a in (x if isinstance(x, tuple) else (x,)) for a in (
        _leaves(a) if isinstance(a, tuple) else [a]) if a is not None]


def _agree(a, b, rtol):
    """assert_close's criterion (max error against rtol·max|b| + ATOL), as a bool, over trees."""
    return all(np.max(np.abs(x - y), initial=0.0) <= ATOL + rtol * np.max(np.abs(y), initial=0.0)
               for x, y in zip(_leaves(a), _leaves(b)))


def _perturbed(prob, rng):
    """prob.args with K moved by 2e-16 relative: round-off-sized."""
    P, S, K, *rest = prob.args
    return (P, S, K * (1.0 + 2e-16 * rng.standard_normal(K.shape)), *rest)


def assume_well_posed(compute, prob, value):
    """Discard examples that float64 cannot resolve: if the judge's own `value` moves by more than
    RTOL/10 when K moves by round-off, the comparison at RTOL would judge noise (e.g. α ≈ 0 under
    sigmoid retention leaves W ≈ 0.5 everywhere, LN's `u − mean u` cancels and is divided by
    s ≈ √1e-5). Both sides are exact formulas; only such examples are filtered, never loosened."""
    again = compute(*_perturbed(prob, np.random.default_rng(0)))
    assume(_agree(again, value, RTOL / 10))


def check_forward(prob, chunk):
    want = judge(prob.rule, chunk)(*prob.args)
    assume_well_posed(judge(prob.rule, chunk), prob, want)
    got = kernel(prob.rule, chunk)(*prob.args)
    assert_outputs(prob.rule, got, want, f" (chunk={chunk}, T={prob.K.shape[-2]})")


def cotangents(rng, rule, outputs):
    """Random cotangents on Y and the final state; kl's rows centred (L is defined up to row
    constants, so only centred cotangents are meaningful)."""
    Y, P, S = outputs
    dP = tuple(rng.standard_normal(p.shape) for p in P)
    if rule.retention.name == "kl":
        dP = tuple(d - d.mean(axis=-1, keepdims=True) for d in dP)
    dS = None if S is None else tuple(rng.standard_normal(s.shape) for s in S)
    return rng.standard_normal(Y.shape), dP, dS


GRAD_NAMES = ("params", "momentum", "K", "V", "Q", "lr", "alpha", "delta", "beta")


def check_gradients(prob, chunk, seed=0):
    out_w, pull_w = ad.vjp(judge(prob.rule, chunk), *prob.args)
    cot = cotangents(np.random.default_rng(seed), prob.rule, out_w)
    grads_w = pull_w(cot)
    assume_well_posed(lambda *a: ad.vjp(judge(prob.rule, chunk), *a)[1](cot), prob, grads_w)
    out_g, pull_g = ad.vjp(kernel(prob.rule, chunk), *prob.args)
    ctx = f" (chunk={chunk}, T={prob.K.shape[-2]})"
    for nm, g, w in zip(GRAD_NAMES, pull_g(cot), grads_w):
        if w is None:
            assert g is None, nm
            continue
        for i, (a, b) in enumerate(zip(g, w) if isinstance(w, tuple) else [(g, w)]):
            assert_close(f"d{nm}[{i}]", a, b, rtol=RTOL, atol=ATOL, context=ctx)


# ---------------------------------------------------------------- forward against the reference

@pytest.mark.parametrize("rule", combos([LINEAR]))
@settings(max_examples=2)
@given(data=st.data())
def test_forward_linear_every_rule(rule, data):
    prob = data.draw(problems(rule))
    for chunk in CHUNKS:
        check_forward(prob, chunk)


MLP_SWEEP = (combos([MLP], retentions=[mc.retention.l2(grad_at="retained")],
                    algorithms=[mc.algorithm.momentum()])
             + combos([MLP], biases=[mc.bias.huber(None, "norm")]))


@pytest.mark.parametrize("rule", MLP_SWEEP)
@settings(max_examples=2)
@given(data=st.data())
def test_forward_mlp_every_bias_and_retention(rule, data):
    prob = data.draw(problems(rule, max_T=8, batches=((), (2,))))
    for chunk in CHUNKS:
        check_forward(prob, chunk)


@pytest.mark.slow
@pytest.mark.parametrize("rule", combos([MLP]))
@settings(max_examples=2)
@given(data=st.data())
def test_forward_mlp_every_rule(rule, data):
    prob = data.draw(problems(rule, max_T=20))
    for chunk in CHUNKS:
        check_forward(prob, chunk)


@pytest.mark.parametrize("rule", combos([LINEAR, MLP], biases=[mc.bias.lp(3.0)]))
@settings(max_examples=3)
@given(data=st.data())
def test_chunk_1_is_the_per_token_rule(rule, data):
    """b = 1: every gradient at the current state, every read exact (docs/contract.md §4)."""
    prob = data.draw(problems(rule, max_T=8))
    state = prob.state()
    Y, out = ref.scan(state, prob.K, prob.V, prob.Q, bias=rule.bias,
                      **gates(prob.lr, prob.alpha, prob.delta, prob.beta))
    got = kernel(rule, 1)(*prob.args)
    assert_outputs(rule, got, (Y, out.params, out.momentum), " (chunk=1 vs ref.scan)")


@pytest.mark.parametrize("rule", combos([LINEAR, MLP], biases=[mc.bias.huber(None, "mixture")],
                                        retentions=RETENTIONS[2:]))
@settings(max_examples=5)
@given(data=st.data())
def test_chaining_at_a_chunk_boundary(rule, data):
    prob = data.draw(problems(rule, max_T=24))
    chunk = data.draw(st.sampled_from([1, 3, 4]))
    T = prob.K.shape[-2]
    split = chunk * data.draw(st.integers(0, T // chunk))
    f = kernel(rule, chunk)
    P, S, K, V, Q, lr, alpha, delta, beta = prob.args
    cut = (lambda x, a, b: None if x is None else x[..., a:b])
    pieces = [(0, split), (split, T)]
    ys = []
    for a, b in pieces:
        Y, P, S = f(P, S, K[..., a:b, :], V[..., a:b, :], Q[..., a:b, :], cut(lr, a, b),
                    cut(alpha, a, b), cut(delta, a, b), cut(beta, a, b))
        ys.append(Y)
    chained = (np.concatenate(ys, axis=-2), P, S)
    assert_outputs(rule, chained, f(*prob.args), f" (chunk={chunk}, split={split}, T={T})")


# ---------------------------------------------------------------- backward against autodiff

GRAD_SWEEP = (combos([LINEAR, MLP], retentions=[mc.retention.l2(grad_at="retained")],
                     algorithms=[mc.algorithm.momentum()])
              + combos([LINEAR, MLP], biases=[mc.bias.huber(None, "norm")]))


@pytest.mark.parametrize("rule", GRAD_SWEEP)
@settings(max_examples=2)
@given(data=st.data())
def test_gradients_match_autodiff_through_ref(rule, data):
    """Every bias (through ψ's Jacobian, the α-scaled anchor and momentum) and every retention ×
    algorithm (with the δ gate), cotangents on Y and on the final state."""
    prob = data.draw(problems(rule, max_T=9 if rule.memory.name == "mlp" else 12,
                              batches=((), (2,))))
    check_gradients(prob, data.draw(st.sampled_from([1, 3, 16])), seed=data.draw(st.integers(0, 99)))


@pytest.mark.slow
@pytest.mark.parametrize("rule", combos([LINEAR, MLP]))
@settings(max_examples=2)
@given(data=st.data())
def test_gradients_every_rule(rule, data):
    prob = data.draw(problems(rule, max_T=12))
    for chunk in (1, 3, 16):
        check_gradients(prob, chunk)


@pytest.mark.parametrize("rule", [
    Rule(MLP, mc.bias.lp(3.0), mc.retention.lq(4.0), mc.algorithm.gd()),                 # Moneta
    Rule(MLP, mc.bias.huber(None, "mixture"), mc.retention.l2(), mc.algorithm.momentum()),
    Rule(MLP, mc.bias.l2(), mc.retention.kl(), mc.algorithm.gd()),                       # Memora
    Rule(LINEAR, mc.bias.robust(0.5), mc.retention.elastic_net(0.05), mc.algorithm.momentum()),
    Rule(LINEAR, mc.bias.huber(None, "coord"), mc.retention.sigmoid(), mc.algorithm.momentum()),
    Rule(LINEAR, mc.bias.lp(1.5, smooth=4.0), mc.retention.l2(grad_at="retained"), mc.algorithm.gd()),
], ids=lambda r: "-".join(map(name, r)))
def test_check_grads_on_the_primitive(rule):
    """Finite differences on the primitive itself (gates kept away from the kinks)."""
    prob = Problem(rule, np.random.default_rng(7), (2,), 7, smooth_gates=True)

    def f(*args):
        Y, P, S = kernel(rule, 3)(*args)
        return Y, weights(rule.retention, P), S       # kl: the exposed weights, not the logits
    ad.check_grads(f, *prob.args, order=1)


# ---------------------------------------------------------------- the hand-derived pieces

def _decay(gate):
    return decay_matrix(np, gate)


def _decay_vjp(D, dD):
    return decay_matrix_vjp(np, D, dD)


def _primitive(forward, vjp_of):
    """forward(*args) -> tuple of arrays, registered as a tree primitive with the hand VJP
    `vjp_of(args, cotangents)` (None cotangent entries mean zero), so that ad.check_grads tests
    the hand VJP."""
    f = ad.tree_primitive(lambda *args: (tuple(forward(*args)), None))
    ad.defvjp_tree(f, lambda result, _, args, kw: lambda g: vjp_of(args, tuple(g)))
    return f


def _zeros(xs, ds):
    return tuple(np.zeros_like(x) if d is None else d for x, d in zip(xs, ds))


@pytest.mark.parametrize("bias", BIASES, ids=name)
def test_psi_vjp(bias):
    """ψ-VJP per bias: finite differences, and equal to autodiff of bias.psi."""
    rng = np.random.default_rng(3)
    y, v = rng.uniform(-1.5, 1.5, (4, 3)), rng.uniform(-1.5, 1.5, (4, 3))
    delta = rng.uniform(0.3, 2.0, (4,)) if bias.needs_delta else None

    def fwd(y, v, *d):
        return (bias.psi(y, v, d[0] if d else None),)

    def vjp(args, g):
        dy, dv, dd = bias.psi_vjp(args[0], args[1], args[2] if len(args) > 2 else None, g[0])
        return (dy, dv) + ((dd,) if len(args) > 2 else ())
    args = (y, v) + ((delta,) if delta is not None else ())
    ad.check_grads(_primitive(fwd, vjp), *args, order=1)
    dpsi = rng.standard_normal((4, 3))
    want = ad.vjp(lambda *a: fwd(*a)[0], *args)[1](dpsi)
    got = vjp(args, (dpsi,))
    for nm, a, b in zip(("dy", "dv", "ddelta"), got, want):
        assert_close(nm, a, b, rtol=1e-12, atol=1e-14)


def _factor_problem(memory, bias, rng, use_c):
    b = 4
    params = tuple(rng.uniform(-1, 1, (2,) + s) for s in memory.param_shapes())
    K = rng.standard_normal((2, b, memory.d_in))
    V = rng.uniform(-1, 1, (2, b, memory.d_out))
    delta = rng.uniform(0.3, 2.0, (2, b)) if bias.needs_delta else None
    c = rng.uniform(0.3, 1.0, (2, b)) if use_c else None
    return params, K, V, delta, c


@pytest.mark.parametrize("memory", [LINEAR, MLP], ids=name)
@pytest.mark.parametrize("bias", [mc.bias.l2(), mc.bias.lp(3.0), mc.bias.huber(None, "norm"),
                                  mc.bias.robust(0.5)], ids=name)
@pytest.mark.parametrize("use_c", [False, True], ids=["c=1", "c=alpha"])
def test_factors_vjp(memory, bias, use_c):
    """(W̄, K, V, δ, c) ↦ rank-1 gradient factors: the second-order VJP through ψ's Jacobian, LN,
    GELU and the memory's backward — finite differences and autodiff of memory.grad."""
    rng = np.random.default_rng(4)
    args = _factor_problem(memory, bias, rng, use_c)
    ops = protocols.anchored(memory, bias, mc.retention.l2(), mc.algorithm.gd())

    def vjp(args, g):
        P, K, V, d, c = args
        ag = anchor_gradients(ops, np, P, K, V, d, c)
        dE, dF = zip(*(_zeros(pair, dpair or (None, None)) for pair, dpair in zip(ag.factors, g)))
        dP = [np.zeros_like(p) for p in P]
        dK, dV, dd, dc = anchor_gradients_vjp(ops, ag, V, d, dE, dF, dP)
        return tuple(dP), dK, dV, dd, dc
    factors = ad.tree_primitive(lambda *a: (anchor_gradients(ops, np, *a).factors, None))
    ad.defvjp_tree(factors, lambda result, _, a, kw: lambda g: vjp(a, g))
    ad.check_grads(factors, *args, order=1)

    # and against autodiff of the library's memory.grad at per-token weights c_i·W̄
    def grads(P, K, V, d, c):
        scale = 1.0 if c is None else anp.expand_dims(anp.expand_dims(c, -1), -1)
        Pg = tuple(anp.expand_dims(p, -3) * scale for p in P)
        return memory.grad(Pg, K, bias.psi(memory.apply(Pg, K), V, d))
    G, pull = ad.vjp(grads, *args)
    dG = tuple(rng.standard_normal(x.shape) for x in G)
    want = pull(dG)
    g = tuple((np.einsum("...bmn,...bn->...bm", dg, F), np.einsum("...bmn,...bm->...bn", dg, E))
              for dg, (E, F) in zip(dG, anchor_gradients(ops, np, *args).factors))
    got = vjp(args, g)                          # ⟨dG_i, e_i f_iᵀ⟩ -> (dG_i f_i, dG_iᵀ e_i)
    for i, (a, b) in enumerate(zip(_leaves(got), _leaves(want))):
        assert_close(f"leaf {i}", a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ret", [mc.retention.lq(4.0), mc.retention.lq(3.0), mc.retention.lq(1.5),
                                 mc.retention.kl(2.0), mc.retention.sigmoid(),
                                 mc.retention.elastic_net(0.3)], ids=name)
def test_exposing_map_vjps(ret):
    """expose (lq incl. its normaliser, kl's softmax, σ), kl's canonical log_softmax and the
    soft threshold: finite differences."""
    rng = np.random.default_rng(5)
    s = rng.uniform(-1, 1, (2, 3, 4))
    s = np.where(np.abs(np.abs(s) - 0.3) < 0.05, s + 0.1, s)          # off the threshold's kinks
    ad.check_grads(_primitive(lambda x: (ret.prox(x),),
                              lambda a, g: (ret.prox_vjp(a[0], g[0]),)), s, order=1)
    ad.check_grads(_primitive(lambda x: (ret.expose(x),),
                              lambda a, g: (ret.expose_vjp(a[0], ret.expose(a[0]), g[0]),)),
                   s, order=1)
    ad.check_grads(_primitive(lambda x: (ret.canonical(x),),
                              lambda a, g: (ret.canonical_vjp(a[0], g[0]),)), s, order=1)
    nu = ret.read_scale(s)
    if nu is not None and not isinstance(nu, float):
        ad.check_grads(_primitive(lambda x: (ret.read_scale(x),),
                                  lambda a, g: (ret.read_scale_vjp(a[0], g[0]),)), s, order=1)
        dW, dnu = rng.standard_normal(s.shape), rng.standard_normal(nu.shape)
        assert_close("anchor_vjp", ret.anchor_vjp(s, ret.expose(s), dW, dnu),
                     ret.expose_vjp(s, ret.expose(s), dW) + ret.read_scale_vjp(s, dnu),
                     rtol=1e-13, atol=1e-15)


def test_lq_eps_branch_has_a_constant_normaliser():
    ret = mc.retention.lq(4.0, eps=1.0)
    A = np.full((2, 2), 0.01)                          # ‖A‖_4 = 0.02 < eps
    nu = ret.read_scale(A)
    assert float(nu[0, 0]) == 1.0
    assert np.all(ret.read_scale_vjp(A, np.ones_like(nu)) == 0.0)


@pytest.mark.parametrize("shape", [(5,), (2, 7)])
def test_decay_gate_derivative_without_division(shape):
    """dgate_j = Σ_t D_tj (dD Dᵀ)_{t,j−1}: finite differences, and exact at gate = 0 (one-sided)."""
    rng = np.random.default_rng(6)
    g = rng.uniform(0.2, 0.9, shape)
    dD = np.tril(rng.standard_normal(shape[:-1] + (shape[-1] + 1,) * 2))
    ad.check_grads(_primitive(lambda x: (_decay(x),), lambda a, c: (_decay_vjp(_decay(a[0]), c[0]),)),
                   g, order=1)
    g[..., 2] = 0.0                                     # β = 0: the product is linear in g_2
    eps = 1e-7
    for j in range(shape[-1]):
        e = np.zeros(shape)
        e[..., j] = eps
        fd = ((_decay(g + e) - _decay(g)) * dD).sum(axis=(-2, -1)) / eps
        got = _decay_vjp(_decay(g), dD)[..., j]
        assert np.all(np.isfinite(got))
        assert_close(f"dgate[{j}]", got, fd, rtol=1e-6, atol=1e-8)


def test_decay_matrix_has_exact_zeros_and_no_nan():
    g = np.array([0.5, 0.0, 1e-300, 1.0, 0.0])
    D = _decay(g)
    assert np.all(np.isfinite(D))
    assert np.all(np.triu(D, 1) == 0.0) and np.all(np.diag(D) == 1.0)
    assert D[2, 0] == 0.0 and D[5, 4] == 0.0 and D[4, 3] == 1.0      # exact zeros and ones
    assert_close("D[3, 2]", D[3, 2], 1e-300, rtol=1e-13, atol=0.0)   # exp(log(1e-300))


# ---------------------------------------------------------------- long sequences, shapes, errors

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ret", [mc.retention.l2(), mc.retention.lq(4.0), mc.retention.kl()], ids=name)
def test_long_sequences_stay_finite(dtype, ret):
    """T = 65,536 with α near 0 and near 1 and β = 0 / near 1: the log-space coefficients never
    produce inf or NaN, forward and backward."""
    rng = np.random.default_rng(8)
    T = 65_536
    tiny = np.finfo(dtype).tiny
    alpha = np.where(rng.uniform(size=T) < 0.5, 1e-30 if dtype == np.float64 else tiny, 1 - 1e-7)
    beta = np.where(rng.uniform(size=T) < 0.3, 0.0, 0.999)
    P = (rng.uniform(-0.5, 0.5, (4, 4)),)
    K, Q = unit_rows(rng.standard_normal((T, 4))), unit_rows(rng.standard_normal((T, 4)))
    V = rng.uniform(-1, 1, (T, 4))
    state = mc.init(mc.memory.linear(4, 4), tuple(x.astype(dtype) for x in P), retention=ret,
                    algorithm=mc.algorithm.momentum())
    cast = (lambda x: x.astype(dtype))
    Y, out, saved = anchored_scan_fwd(state, cast(K), cast(V), cast(Q), bias=mc.bias.huber(1.0, "norm"),
                                      lr=cast(np.full(T, 0.05)), alpha=cast(alpha), beta=cast(beta),
                                      chunk=64)
    g = anchored_scan_bwd(saved, np.ones_like(Y), (tuple(np.ones_like(p) for p in out.params), None))
    assert Y.dtype == dtype
    for x in (Y, *out.params, *out.momentum, *g.params, *g.momentum, g.K, g.V, g.Q, g.lr, g.alpha, g.beta):
        assert np.all(np.isfinite(x))


@pytest.mark.slow
@pytest.mark.ci          # long but cheap: CI keeps it
def test_long_mlp_sequence_stays_finite():
    rng = np.random.default_rng(9)
    T, mem = 65_536, mc.memory.mlp(8, expansion=2)
    P = tuple(rng.uniform(-0.3, 0.3, s) for s in mem.param_shapes())
    K, Q = unit_rows(rng.standard_normal((T, 8))), unit_rows(rng.standard_normal((T, 8)))
    state = mc.init(mem, P, retention=mc.retention.l2(), algorithm=mc.algorithm.momentum())
    Y, out, saved = anchored_scan_fwd(state, K, rng.uniform(-1, 1, (T, 8)), Q, bias=mc.bias.l2(),
                                      lr=np.full(T, 0.01), alpha=rng.uniform(0.99, 1.0, T),
                                      beta=np.where(rng.uniform(size=T) < 0.3, 0.0, 0.9), chunk=64)
    g = anchored_scan_bwd(saved, np.ones_like(Y))
    for x in (Y, *out.params, *g.params, g.K, g.V, g.Q, g.lr, g.alpha, g.beta):
        assert np.all(np.isfinite(x))


def test_broadcasting_and_scalar_gates():
    """Unbatched params and momentum against batched tokens; lr a Python float, α (B, 1), β (T,):
    outputs broadcast, gradients come back in each input's shape and equal the reference's."""
    rng = np.random.default_rng(10)
    rule = Rule(LINEAR, mc.bias.lp(3.0), mc.retention.lq(3.0), mc.algorithm.momentum())
    P, S = (rng.uniform(-1, 1, (2, 3)),), (rng.uniform(-0.3, 0.3, (2, 3)),)
    K, Q = unit_rows(rng.standard_normal((3, 5, 3))), unit_rows(rng.standard_normal((5, 3)))
    V = rng.uniform(-1, 1, (1, 5, 2))
    args = (P, S, K, V, Q, 0.3, rng.uniform(0.5, 1.0, (3, 1)), None, rng.uniform(0.0, 0.9, (5,)))

    def judge_batched(P, S, *rest):          # the reference gets its params broadcast explicitly
        wide = (lambda xs: tuple(anp.broadcast_to(x, (3,) + x.shape) for x in xs))
        return judge(rule, 2)(wide(P), wide(S), *rest)  # (see test_ref_with_unbatched_params)
    out_w, pull_w = ad.vjp(judge_batched, *args)
    out_g, pull_g = ad.vjp(kernel(rule, 2), *args)
    assert_outputs(rule, out_g, out_w, "")
    cot = cotangents(rng, rule, out_w)
    for nm, g, w, x in zip(GRAD_NAMES, pull_g(cot), pull_w(cot), args):
        if x is None:
            continue
        g, w = (g[0], w[0]) if isinstance(x, tuple) else (g, w)
        assert np.shape(g) == np.shape(x[0] if isinstance(x, tuple) else x), nm
        assert_close(nm, g, w, rtol=RTOL, atol=ATOL)


def test_ref_with_unbatched_params():
    """Unbatched params with batched tokens: each batch element trains its own copy."""
    W = np.array([[1.0, 0.0]])                                  # (d_out=1, d_in=2), no batch dims
    K = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])                  # 2 batch elements, T = 1
    state = mc.init(mc.memory.linear(2, 1), (W,))
    _, out = ref.scan(state, K, np.zeros((2, 1, 1)), K, bias=mc.bias.l2(), lr=1.0)
    # by hand: element 0 has r = 1 -> W − [1, 0]; element 1 has r = 0 -> W unchanged
    np.testing.assert_array_equal(out.params[0], [[[0.0, 0.0]], [[1.0, 0.0]]])


def test_empty_sequence():
    rule = Rule(MLP, mc.bias.l2(), mc.retention.sigmoid(), mc.algorithm.momentum())
    prob = Problem(rule, np.random.default_rng(11), (2,), 0)
    Y, out, saved = anchored_scan_fwd(prob.state(), prob.K, prob.V, prob.Q, bias=rule.bias,
                                      lr=prob.lr, alpha=prob.alpha, beta=prob.beta, chunk=4)
    assert Y.shape == (2, 0, 3)
    for a, b in zip(out.params + out.momentum, prob.P + prob.S):
        assert np.array_equal(a, b)
    dP = tuple(np.ones_like(p) for p in prob.P)
    g = anchored_scan_bwd(saved, None, (dP, None))
    assert all(np.array_equal(a, b) for a, b in zip(g.params, dP))
    assert g.K.shape == prob.K.shape and g.lr.shape == prob.lr.shape


def test_float32_in_float32_out():
    rule = Rule(MLP, mc.bias.huber(0.7, "mixture"), mc.retention.l2(), mc.algorithm.gd())
    prob = Problem(rule, np.random.default_rng(12), (2,), 11)
    P32 = tuple(p.astype(np.float32) for p in prob.P)
    f32 = (lambda x: x.astype(np.float32))
    Y, out, saved = anchored_scan_fwd(prob.state(P=P32), f32(prob.K), f32(prob.V), f32(prob.Q),
                                      bias=rule.bias, lr=f32(prob.lr), alpha=f32(prob.alpha), chunk=4)
    Y64, out64, _ = anchored_scan_fwd(prob.state(), prob.K, prob.V, prob.Q, bias=rule.bias,
                                      lr=prob.lr, alpha=prob.alpha, chunk=4)
    assert Y.dtype == np.float32 and all(p.dtype == np.float32 for p in out.params)
    assert_close("Y", Y, Y64, rtol=1e-4, atol=1e-5)
    g = anchored_scan_bwd(saved, np.ones_like(Y))
    assert all(x.dtype == np.float32 for x in (*g.params, g.K, g.V, g.Q, g.lr, g.alpha))


class _Plain(NamedTuple):
    """An algorithm that does not say whether it carries momentum."""
    name: str = "plain"

    def init(self, params):
        return None

    def effective_lr(self, lr, k):
        return lr


def test_errors():
    rule = Rule(LINEAR, mc.bias.l2(), mc.retention.none(), mc.algorithm.gd())
    prob = Problem(rule, np.random.default_rng(13), (), 3)
    with pytest.raises(protocols.MissingMethodError, match="algorithm _Plain.*uses_momentum"):
        anchored_scan_fwd(prob.state()._replace(algorithm=_Plain()), prob.K, prob.V, prob.Q,
                          bias=rule.bias, lr=prob.lr)
    state = prob.state()._replace(algorithm=mc.algorithm.momentum(), momentum=prob.P)
    with pytest.raises(ValueError, match="beta"):
        anchored_scan_fwd(state, prob.K, prob.V, prob.Q, bias=rule.bias, lr=prob.lr)
    with pytest.raises(ValueError, match="delta"):
        anchored_scan_fwd(prob.state()._replace(algorithm=mc.algorithm.gd()), prob.K, prob.V,
                          prob.Q, bias=mc.bias.huber(None), lr=prob.lr)


# ---------------------------------------------------------------- CuPy (param "cupy" is gpu-marked)

@pytest.mark.parametrize("rule", [
    Rule(MLP, mc.bias.lp(3.0), mc.retention.lq(4.0), mc.algorithm.momentum()),
    Rule(MLP, mc.bias.huber(None, "mixture"), mc.retention.kl(), mc.algorithm.gd()),
    Rule(LINEAR, mc.bias.robust(0.5), mc.retention.elastic_net(0.05), mc.algorithm.momentum()),
    Rule(LINEAR, mc.bias.huber(None, "coord"), mc.retention.sigmoid(), mc.algorithm.gd()),
], ids=lambda r: "-".join(map(name, r)))
def test_on_xp_arrays(xp, rule):
    """The same float64 forward and backward on the fixture's arrays (CuPy: cuBLAS matmuls),
    equal to the numpy result; results stay on the device. Three calls with different tokens: on
    CuPy the first runs eagerly, the second captures a CUDA graph, the third replays it."""
    prob = Problem(rule, np.random.default_rng(14), (2,), 21)
    on = (lambda x: None if x is None else xp.asarray(x))
    state = prob.state(P=tuple(map(on, prob.P)), S=None if prob.S is None else tuple(map(on, prob.S)))
    for call in range(3):
        K = prob.K + 0.1 * call
        Y, out, saved = anchored_scan_fwd(state, on(K), on(prob.V), on(prob.Q), bias=rule.bias,
                                          lr=on(prob.lr), alpha=on(prob.alpha), delta=on(prob.delta),
                                          beta=on(prob.beta), chunk=8)
        Yn, outn, savedn = anchored_scan_fwd(prob.state(), K, prob.V, prob.Q, bias=rule.bias,
                                             lr=prob.lr, alpha=prob.alpha, delta=prob.delta,
                                             beta=prob.beta, chunk=8)
        assert type(Y) is type(on(prob.K))
        assert_close("Y", Y, Yn, rtol=RTOL, atol=ATOL)
        for a, b in zip(out.params, outn.params):
            assert_close("final params", a, b, rtol=RTOL, atol=ATOL)
        dY = np.random.default_rng(15 + call).standard_normal(Yn.shape)
        g, gn = anchored_scan_bwd(saved, on(dY)), anchored_scan_bwd(savedn, dY)
        for nm, a, b in [("K", g.K, gn.K), ("V", g.V, gn.V), ("Q", g.Q, gn.Q), ("lr", g.lr, gn.lr),
                         ("alpha", g.alpha, gn.alpha)] + [(f"P{i}", a, b) for i, (a, b) in
                                                          enumerate(zip(g.params, gn.params))]:
            assert type(a) is type(Y), nm
            assert_close(nm, a, b, rtol=RTOL, atol=ATOL)
    if xp is not np:
        from mirascore.gpu import graph, settings
        assert settings.current().cuda_graphs and graph.memory_bytes() > 0, \
            "the repeated calls were not replayed"
