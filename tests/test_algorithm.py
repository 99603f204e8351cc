"""Memory learning algorithms: gd, momentum (Titans Eqs. 13–14), implicit (Longhorn)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirascore as mc
import mirascore.testing as mt
import strategies as S


@st.composite
def grads(draw, n=2):
    batch = draw(mt.batch_shapes(max_dims=1))
    G = tuple(draw(mt.arrays(batch + (2, 3))) for _ in range(n))
    return batch, G


@given(bg=grads(), lr=mt.lrs())
def test_gd_update_is_minus_lr_times_gradient(bg, lr):
    _, G = bg
    alg = mc.algorithm.gd()
    assert alg.init(G) is None
    U, S_ = alg.update(G, None, lr)
    assert S_ is None
    for u, g in zip(U, G):
        mt.assert_close("gd U", u, -lr * g, rtol=0, atol=0)


@given(data=st.data())
def test_momentum_follows_its_recurrence(data):
    """S ← β·S − lr·G, U = S, from S = 0, with per-batch gates, over three tokens."""
    batch, G0 = data.draw(grads())
    alg = mc.algorithm.momentum()
    S_ = alg.init(G0)
    assert all(s.shape == g.shape and s.dtype == g.dtype and not s.any() for s, g in zip(S_, G0))
    want = tuple(np.zeros_like(g) for g in G0)
    for _ in range(3):
        G = tuple(data.draw(mt.arrays(g.shape)) for g in G0)
        lr, beta = data.draw(mt.lrs(batch)), data.draw(mt.betas(batch))
        U, S_ = alg.update(G, S_, lr, beta)
        want = tuple(beta[..., None, None] * w - lr[..., None, None] * g for w, g in zip(want, G))
        for u, s, w in zip(U, S_, want):
            mt.assert_close("momentum U", u, w, rtol=1e-15, atol=0)
            mt.assert_close("momentum S", s, w, rtol=1e-15, atol=0)


@given(bg=grads(), lr=mt.lrs())
def test_momentum_with_zero_beta_is_gd(bg, lr):
    _, G = bg
    alg = mc.algorithm.momentum()
    U, _ = alg.update(G, tuple(np.ones_like(g) for g in G), lr, 0.0)
    Ugd, _ = mc.algorithm.gd().update(G, None, lr)
    for u, v in zip(U, Ugd):
        mt.assert_close("momentum(β=0) U", u, v, rtol=0, atol=0)


@pytest.mark.parametrize("memory", S.memories(), ids=S.ids)
@pytest.mark.parametrize("retention", [mc.retention.none(), mc.retention.l2(), mc.retention.kl()], ids=S.ids)
def test_momentum_with_zero_beta_is_gd_through_scan(memory, retention):
    rng = np.random.default_rng(0)
    params = memory.init(rng, (2,), np.float64)
    K, V, Q = (rng.standard_normal((2, 6, d)) for d in (memory.d_in, memory.d_out, memory.d_in))
    lr = rng.uniform(0, 0.5, (2, 6))
    alpha = 1.0 if retention.name == "none" else rng.uniform(0.5, 1, (2, 6))
    Y, st_gd = mc.scan(mc.init(memory, params, retention=retention), K, V, Q, bias=mc.bias.l2(),
                       lr=lr, alpha=alpha, chunk=1)
    Ym, st_m = mc.scan(mc.init(memory, params, retention=retention, algorithm=mc.algorithm.momentum()),
                       K, V, Q, bias=mc.bias.l2(), lr=lr, alpha=alpha, beta=0.0, chunk=1)
    mt.assert_close("momentum(β=0) Y", Ym, Y, rtol=1e-14, atol=1e-15)
    for a, b in zip(mc.weights(st_m), mc.weights(st_gd)):
        mt.assert_close("momentum(β=0) weights", a, b, rtol=1e-14, atol=1e-15)


@given(data=st.data())
def test_implicit_step_solves_the_proximal_problem(data):
    """Longhorn's W' = W − (lr/(1 + lr·kᵀk))(W k − v) kᵀ is the implicit step W' = W − lr (W' k − v) kᵀ,
    i.e. the minimiser of ½‖W' k − v‖² + (1/(2 lr))‖W' − W‖²."""
    batch = data.draw(mt.batch_shapes(max_dims=1))
    memory = mc.memory.linear(3, 2)
    (W,) = data.draw(mt.memory_params(memory, batch))
    k, v = data.draw(mt.tokens(3, batch, scale=2.0)), data.draw(mt.tokens(2, batch))
    lr = data.draw(mt.lrs(batch, max_value=5.0))
    state = mc.init(memory, (W,), algorithm=mc.algorithm.implicit())
    (W1,) = mc.step(state, k, v, bias=mc.bias.l2(), lr=lr).params
    lr_ = lr[..., None, None]
    mt.assert_close("implicit fixed point W' = W − lr (W'k − v)kᵀ", W1,
                    W - lr_ * S.outer(S.matvec(W1, k) - v, k), rtol=1e-12, atol=1e-13)
    eff = lr / (1 + lr * (k * k).sum(-1))
    mt.assert_close("implicit effective lr", mc.algorithm.implicit().effective_lr(lr, k), eff,
                    rtol=1e-15, atol=0)


def test_implicit_is_gd_with_the_effective_rate():
    rng = np.random.default_rng(1)
    memory = mc.memory.linear(3, 2)
    (W,) = memory.init(rng, (4,), np.float64)
    k, v, lr = rng.standard_normal((4, 3)), rng.standard_normal((4, 2)), rng.uniform(0, 2, 4)
    implicit = mc.step(mc.init(memory, (W,), algorithm=mc.algorithm.implicit()), k, v,
                       bias=mc.bias.l2(), lr=lr).params[0]
    gd = mc.step(mc.init(memory, (W,)), k, v, bias=mc.bias.l2(), lr=lr / (1 + lr * (k * k).sum(-1))).params[0]
    mt.assert_close("implicit vs gd(lr_eff)", implicit, gd, rtol=1e-14, atol=1e-15)
