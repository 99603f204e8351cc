"""Presets: each reproduces its model's published recurrence, written out here one model at a time.

Linear models use matrix states S: (d_v, d_k) acting as S k. The MLP models' gradient ∇ℓ comes from
tests/strategies.py's own numpy backprop (paper §5.1), not from mirascore.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirascore as mc
import mirascore.testing as mt
from mirascore.updates import is_exact
import strategies as S
from strategies import outer, matvec

T = 4
RTOL, ATOL = 1e-9, 1e-11     # float64; the MLP's layer norm amplifies rounding (see test_step.py)
D_K, D_V, D = 3, 2, 3   # D = 2 would make the MLP's gradient vanish: LN of a 2-vector is ±(1, −1)


def tokens(data, memory, scalar=False):
    case = data.draw(S.cases((memory, mc.bias.l2(), mc.retention.l2(), mc.algorithm.momentum()), T=T,
                             scalar_gates=st.just(scalar)))
    g = case.gates
    return case.params, case.K, case.V, case.Q, g["lr"], g["alpha"], g["beta"]


def run(rule, params, K, V, Q, **gates):
    """mc.step over the tokens with recalls, and mc.scan(chunk=1); both must agree."""
    state = mc.init(rule.memory, params, retention=rule.retention, algorithm=rule.algorithm)
    Y_scan, _ = mc.scan(state, K, V, Q, bias=rule.bias, chunk=1, **gates)
    ys = []
    for t in range(K.shape[-2]):
        g = {n: x if np.ndim(x) == 0 else x[..., t] for n, x in gates.items()}
        state = mc.step(state, K[..., t, :], V[..., t, :], bias=rule.bias, **g)
        ys.append(mc.recall(state, Q[..., t, :]))
    Y = np.stack(ys, axis=-2)
    mt.assert_close("scan(chunk=1) vs steps", Y_scan, Y, rtol=RTOL, atol=ATOL)
    return Y, state


def at(x, t):
    return x if np.ndim(x) == 0 else x[..., t]


def expand(x, n):
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape + (1,) * n)


def close(name, got, want):
    mt.assert_close(name, got, want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------- linear models


def linear_loop(update, S0, K, V, Q, *gates):
    S_, ys = S0, []
    for t in range(K.shape[-2]):
        S_ = update(S_, K[..., t, :], V[..., t, :], *(at(g, t) for g in gates))
        ys.append(matvec(S_, Q[..., t, :]))
    return np.stack(ys, axis=-2), S_


def eye_minus(beta, k):
    """I − β k kᵀ (batched)."""
    return np.eye(k.shape[-1]) - expand(beta, 2) * outer(k, k)


LINEAR = {
    # name: (preset, gates used, recurrence S_t from S_{t−1}, k, v, gates in that order)
    "gated_deltanet": (mc.presets.gated_deltanet, ("lr", "alpha"),
                       lambda S_, k, v, b, a: expand(a, 2) * S_ @ eye_minus(b, k) + expand(b, 2) * outer(v, k)),
    "deltanet": (mc.presets.deltanet, ("lr",),
                 lambda S_, k, v, b: S_ @ eye_minus(b, k) + expand(b, 2) * outer(v, k)),
    "mamba2": (mc.presets.mamba2, ("lr", "alpha"),
               lambda S_, k, v, lr, a: expand(a, 2) * S_ + expand(lr, 2) * outer(v, k)),
    "linear_attention": (mc.presets.linear_attention, ("lr",),
                         lambda S_, k, v, lr: S_ + expand(lr, 2) * outer(v, k)),
    "retnet": (mc.presets.retnet, ("lr", "alpha"),
               lambda S_, k, v, lr, a: expand(a, 2) * S_ + expand(lr, 2) * outer(v, k)),
    "longhorn": (mc.presets.longhorn, ("lr",),
                 lambda S_, k, v, b: S_ - expand(b / (1 + b * (k * k).sum(-1)), 2) * outer(matvec(S_, k) - v, k)),
    "ttt_linear": (mc.presets.ttt_linear, ("lr",),
                   lambda S_, k, v, lr: S_ - expand(lr, 2) * outer(matvec(S_, k) - v, k)),
}


@pytest.mark.parametrize("name", list(LINEAR))
@given(data=st.data())
def test_linear_presets_reproduce_their_recurrence(name, data):
    preset, names, recurrence = LINEAR[name]
    rule = preset(D_K, D_V)
    (S0,), K, V, Q, lr, alpha, beta = tokens(data, mc.memory.linear(D_K, D_V))
    if name == "longhorn":
        lr = lr * 20                                     # Longhorn's β is not small; the step is implicit
    gates = dict(zip(names, (lr, alpha)))
    Y, state = run(rule, (S0,), K, V, Q, **gates)
    Y_own, S_own = linear_loop(recurrence, S0, K, V, Q, *gates.values())
    close(f"{name}: outputs", Y, Y_own)
    close(f"{name}: state", mc.weights(state)[0], S_own)
    if is_exact(rule):
        Yc, state_c = mc.scan(mc.init(rule.memory, (S0,), retention=rule.retention, algorithm=rule.algorithm),
                              K, V, Q, bias=rule.bias, chunk=3, **gates)
        close(f"{name}: chunked outputs", Yc, Y_own)
        close(f"{name}: chunked state", mc.weights(state_c)[0], S_own)


def test_published_constants():
    """Linear attention and RetNet with lr = 1 (and RetNet's constant γ) as published."""
    rng = np.random.default_rng(0)
    K, V, Q = (rng.standard_normal((5, d)) for d in (D_K, D_V, D_K))
    S0 = np.zeros((D_V, D_K))
    Y, _ = run(mc.presets.linear_attention(D_K, D_V), (S0,), K, V, Q, lr=1.0)
    close("linear attention: y_t = Σ_{i≤t} v_i k_iᵀ q_t", Y,
          np.stack([sum(np.outer(V[i], K[i]) for i in range(t + 1)) @ Q[t] for t in range(5)]))
    Y, _ = run(mc.presets.retnet(D_K, D_V), (S0,), K, V, Q, lr=1.0, alpha=0.9)
    close("retnet: y_t = Σ_{i≤t} γ^(t−i) v_i k_iᵀ q_t", Y,
          np.stack([sum(0.9 ** (t - i) * np.outer(V[i], K[i]) for i in range(t + 1)) @ Q[t] for t in range(5)]))


def test_d_v_defaults_to_d_k():
    for preset in (mc.presets.gated_deltanet, mc.presets.deltanet, mc.presets.mamba2, mc.presets.retnet,
                   mc.presets.linear_attention, mc.presets.longhorn, mc.presets.ttt_linear):
        assert preset(4).memory.param_shapes() == ((4, 4),)
        assert preset(4, 2).memory.param_shapes() == ((2, 4),)


# ---------------------------------------------------------------------------- MLP models


def grad_l2(params, k, v):
    y = S.apply(mc.memory.mlp(D), params, k)
    return S.memory_grad(mc.memory.mlp(D), params, k, y - v)


def grad_of(psi_of_r, params, k, v):
    memory = mc.memory.mlp(D)
    return S.memory_grad(memory, params, k, psi_of_r(S.apply(memory, params, k) - v))


def mlp_loop(update, state0, K, V, Q, expose, *gates):
    s, ys = state0, []
    for t in range(K.shape[-2]):
        s = update(s, K[..., t, :], V[..., t, :], *(at(g, t) for g in gates))
        ys.append(S.apply(mc.memory.mlp(D), expose(s), Q[..., t, :]))
    return np.stack(ys, axis=-2), s


def lq_expose(A, q):
    return tuple(a / (np.abs(a) ** q).sum(axis=(-2, -1), keepdims=True) ** ((q - 2) / q) for a in A)


def softmax_rows(L, scale=1.0):
    return tuple(scale * np.exp(l - l.max(-1, keepdims=True)) / np.exp(l - l.max(-1, keepdims=True)).sum(-1, keepdims=True)
                 for l in L)


@given(data=st.data())
def test_titans(data):
    """S ← β·S − lr·∇ℓ(W); W ← α·W + S (Titans Eqs. 13–14 with Miras' α = 1 − Titans' α)."""
    P, K, V, Q, lr, alpha, beta = tokens(data, mc.memory.mlp(D, 4))

    def update(s, k, v, lr, a, b):
        W, M = s
        M = tuple(expand(b, 2) * m - expand(lr, 2) * g for m, g in zip(M, grad_l2(W, k, v)))
        return tuple(expand(a, 2) * w + m for w, m in zip(W, M)), M

    Y, state = run(mc.presets.titans(D), P, K, V, Q, lr=lr, alpha=alpha, beta=beta)
    Y_own, (W, M) = mlp_loop(update, (P, tuple(np.zeros_like(p) for p in P)), K, V, Q, lambda s: s[0],
                             lr, alpha, beta)
    close("titans: outputs", Y, Y_own)
    for a, b in zip(mc.weights(state) + state.momentum, W + M):
        close("titans: state", a, b)


@given(data=st.data())
def test_ttt_mlp(data):
    """W ← W − lr·∇½‖M(k) − v‖²."""
    P, K, V, Q, lr, _, _ = tokens(data, mc.memory.mlp(D, 4))

    def update(W, k, v, lr):
        return tuple(w - expand(lr, 2) * g for w, g in zip(W, grad_l2(W, k, v)))

    Y, state = run(mc.presets.ttt_mlp(D), P, K, V, Q, lr=lr)
    Y_own, W = mlp_loop(update, P, K, V, Q, lambda s: s, lr)
    close("ttt_mlp: outputs", Y, Y_own)
    for a, b in zip(mc.weights(state), W):
        close("ttt_mlp: state", a, b)


@pytest.mark.parametrize("p,q", [(3, 4), (2, 3), (1.5, 4)])
@given(data=st.data())
def test_moneta(p, q, data):
    """A ← α·A − lr·∇ℓ_p(W), W = A/‖A‖_q^(q−2) per weight matrix (Eq. 24; ψ = sign(r)|r|^(p−1))."""
    P, K, V, Q, lr, alpha, _ = tokens(data, mc.memory.mlp(D, 4))
    A0 = tuple(np.where(np.abs(a) < 0.3, 0.3, a) for a in P)
    psi = lambda r: np.sign(r) * np.abs(r) ** (p - 1)

    def update(A, k, v, lr, a):
        G = grad_of(psi, lq_expose(A, q), k, v)
        return tuple(expand(a, 2) * x - expand(lr, 2) * g for x, g in zip(A, G))

    Y, state = run(mc.presets.moneta(D, p=p, q=q), A0, K, V, Q, lr=lr, alpha=alpha)
    Y_own, A = mlp_loop(update, A0, K, V, Q, lambda s: lq_expose(s, q), lr, alpha)
    close("moneta: outputs", Y, Y_own)
    for a, b in zip(mc.weights(state), lq_expose(A, q)):
        close("moneta: weights", a, b)


@pytest.mark.parametrize("scale", [1.0, 2.0])
@given(data=st.data())
def test_memora(scale, data):
    """L ← α·log(W/scale) − lr·∇ℓ₂(W); W = scale·softmax(L) per row (Eq. 27)."""
    L0, K, V, Q, lr, alpha, _ = tokens(data, mc.memory.mlp(D, 4))

    def update(L, k, v, lr, a):
        W = softmax_rows(L, scale)
        return tuple(expand(a, 2) * np.log(w / scale) - expand(lr, 2) * g
                     for w, g in zip(W, grad_l2(W, k, v)))

    Y, state = run(mc.presets.memora(D, scale=scale), L0, K, V, Q, lr=lr, alpha=alpha)
    Y_own, L = mlp_loop(update, L0, K, V, Q, lambda s: softmax_rows(s, scale), lr, alpha)
    close("memora: outputs", Y, Y_own)
    for a, b in zip(mc.weights(state), softmax_rows(L, scale)):
        close("memora: weights", a, b)


@pytest.mark.parametrize("static", [False, True], ids=["delta gate", "static delta"])
@given(data=st.data())
def test_yaad(static, data):
    """W ← α·W − lr·∇ℓ₂ if ‖M(k) − v‖ ≤ δ else α·W − lr·δ·∇ℓ₁ (Eq. 26)."""
    P, K, V, Q, lr, alpha, _ = tokens(data, mc.memory.mlp(D, 4))
    delta = 0.4 if static else data.draw(mt.deltas(K.shape[:-1], min_value=0.05, max_value=2.0))
    memory = mc.memory.mlp(D)

    def update(W, k, v, lr, a, d):
        r = S.apply(memory, W, k) - v
        small = np.linalg.norm(r, axis=-1, keepdims=True) <= expand(d, 1)
        g2, g1 = S.memory_grad(memory, W, k, r), S.memory_grad(memory, W, k, np.sign(r))
        return tuple(expand(a, 2) * w - expand(lr, 2) * np.where(expand(small[..., 0], 2), x2, expand(d, 2) * x1)
                     for w, x2, x1 in zip(W, g2, g1))

    gates = dict(lr=lr, alpha=alpha) if static else dict(lr=lr, alpha=alpha, delta=delta)
    Y, state = run(mc.presets.yaad(D, delta=0.4 if static else None), P, K, V, Q, **gates)
    Y_own, W = mlp_loop(update, P, K, V, Q, lambda s: s, lr, alpha, delta)
    close("yaad: outputs", Y, Y_own)
    for a, b in zip(mc.weights(state), W):
        close("yaad: state", a, b)


def test_presets_are_the_rows_of_table_1():
    P, b, r, a = mc.presets, mc.bias, mc.retention, mc.algorithm
    mlp = mc.memory.mlp(4)
    assert P.moneta(4) == mc.Rule(mlp, b.lp(3), r.lq(4), a.gd())
    assert P.moneta(4, p=2.5, q=3) == mc.Rule(mlp, b.lp(2.5), r.lq(3), a.gd())
    assert P.yaad(4) == mc.Rule(mlp, b.huber(kind="mixture"), r.l2(), a.gd())
    assert P.yaad(4, delta=0.5) == mc.Rule(mlp, b.huber(0.5, kind="mixture"), r.l2(), a.gd())
    assert P.memora(4, scale=2.0) == mc.Rule(mlp, b.l2(), r.kl(2.0), a.gd())
    assert P.titans(4) == mc.Rule(mlp, b.l2(), r.l2(), a.momentum())
    assert P.ttt_mlp(4) == mc.Rule(mlp, b.l2(), r.none(), a.gd())
    lin = mc.memory.linear(4, 3)
    assert P.gated_deltanet(4, 3) == mc.Rule(lin, b.l2(), r.l2(grad_at="retained"), a.gd())
    assert P.retnet(4, 3) == mc.Rule(lin, b.dot(), r.l2(), a.gd())
    assert P.longhorn(4, 3) == mc.Rule(lin, b.l2(), r.none(), a.implicit())


@pytest.mark.parametrize("name", ["gated_deltanet", "moneta", "yaad", "titans"])
def test_scan_inputs_fit_the_preset_and_repeat_by_seed(name):
    """mt.scan_inputs: shapes and gates a preset's scan takes, unit-norm keys and queries, gates in
    range, the same arrays for the same seed, and a caller's generator continues after them."""
    rule = getattr(mc.presets, name)(4)
    x = mt.scan_inputs(rule, (2, 3), 7, seed=1)
    assert x["K"].shape == x["Q"].shape == x["V"].shape == (2, 3, 7, 4)
    np.testing.assert_allclose(np.linalg.norm(x["K"], axis=-1), 1.0)
    assert set(x["gates"]) == {"lr", "alpha"} | ({"delta"} if name == "yaad" else set()) \
        | ({"beta"} if name == "titans" else set())
    assert all(g.shape == (2, 3, 7) for g in x["gates"].values())
    assert np.all((0.9 < x["gates"]["alpha"]) & (x["gates"]["alpha"] < 1.0))
    mc.scan(mc.init(rule.memory, x["params"], retention=rule.retention, algorithm=rule.algorithm),
            x["K"], x["V"], x["Q"], bias=rule.bias, chunk=4, **x["gates"])
    again = mt.scan_inputs(rule, (2, 3), 7, seed=1)
    assert all(np.array_equal(x[k], again[k]) for k in ("K", "V", "Q"))
    rng = np.random.default_rng(1)
    mt.scan_inputs(rule, (2, 3), 7, seed=1, rng=rng)
    assert rng.standard_normal() != np.random.default_rng(1).standard_normal()
