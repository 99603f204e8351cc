"""Retention gates: closed-form update = argmin of the gate's objective, the contract's table (docs/contract.md §3), limits."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirascore as mc
import mirascore.testing as mt
from mirascore._xp import to_numpy
import strategies as S

SHAPES = st.sampled_from([(1, 1), (1, 3), (2, 2), (3, 1), (2, 1, 2)])   # small: scipy optimizes all entries


@st.composite
def problems(draw, retention):
    """(s_prev, G, lr, alpha) for one stored array, lr kept away from 0 (the objective has 1/lr)."""
    shape = draw(SHAPES)
    s_prev = draw(mt.arrays(shape))
    if retention.name == "lq":
        s_prev = np.where(np.abs(s_prev) < 0.1, 0.1, s_prev)      # keep A away from the 0 of its norm
    G = draw(mt.arrays(shape))
    lr = draw(mt.lrs(min_value=0.05))
    alpha = 1.0 if retention.name == "none" else draw(mt.alphas(min_value=0.2))
    return s_prev, G, lr, alpha


@pytest.mark.parametrize("retention", S.retentions(), ids=S.ids)
@given(data=st.data())
def test_update_minimises_the_objective(retention, data):
    s_prev, G, lr, alpha = data.draw(problems(retention))
    mt.check_retention(retention, s_prev, G, lr, alpha)


@pytest.mark.parametrize("retention", S.retentions(), ids=S.ids)
@given(data=st.data())
def test_stored_inverts_expose_where_the_gate_has_it(retention, data):
    """stored(W) is an s with expose(s) = W (lq: for every q ≠ 3); kl and sigmoid have none
    (their exposed weights are positive), and mirascore.lm draws their logits instead."""
    if not hasattr(retention, "stored"):
        assert retention.name in ("kl", "sigmoid")
        return
    W = data.draw(mt.arrays(data.draw(SHAPES)))
    if retention.name == "lq":
        W = np.where(np.abs(W) < 0.1, 0.1, W)                    # ‖A‖_q above the gate's eps
        if retention.q == 3:                                       # only unit-norm matrices are exposed
            W = W / np.sum(np.abs(W) ** 3, axis=(-2, -1), keepdims=True) ** (1 / 3)
    np.testing.assert_allclose(retention.expose(retention.stored(W)), W, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 5.0])
@given(data=st.data())
def test_elastic_net_meets_the_subgradient_conditions(gamma, data):
    """Explicitly non-smooth: a large γ zeroes most entries, γ = 0 none."""
    retention = mc.retention.elastic_net(gamma)
    s_prev, G, lr, alpha = data.draw(problems(retention))
    mt.check_retention(retention, s_prev, G, lr, alpha, smooth=False)


@pytest.mark.parametrize("retention", S.retentions(), ids=S.ids)
@given(data=st.data())
def test_update_and_expose_follow_the_design_table(retention, data):
    s_prev, G, lr, alpha = data.draw(problems(retention))
    U = -lr * G
    mt.assert_close(f"{retention!r}.expose", retention.expose(s_prev), S.expose(retention, s_prev),
                    rtol=1e-13, atol=1e-15)
    got, want = retention.update(s_prev, U, alpha), S.update(retention, s_prev, U, alpha)
    mt.assert_close(f"{retention!r}.expose(update)", retention.expose(got), S.expose(retention, want),
                    rtol=1e-12, atol=1e-14)
    W = retention.expose(s_prev)
    c = retention.gradient_scale(alpha)
    mt.assert_close(f"{retention!r}.gradient_scale", W if c is None else c * W,
                    S.grad_point(retention, W, alpha), rtol=0, atol=0)


@pytest.mark.parametrize("retention", [mc.retention.l2(), mc.retention.lq(4.0), mc.retention.kl(),
                                       mc.retention.elastic_net(0.1), mc.retention.sigmoid()], ids=S.ids)
def test_per_token_gates_act_per_batch_element(retention):
    """alpha shaped like the batch dims (...) scales each batch element's matrix by its own α."""
    rng = np.random.default_rng(0)
    s, U = rng.standard_normal((3, 2, 2, 3)), rng.standard_normal((3, 2, 2, 3))
    alpha = rng.uniform(0.2, 1.0, (3, 2))
    out = retention.update(s, U, alpha)
    for i in np.ndindex(3, 2):
        mt.assert_close(f"{retention!r} at batch {i}", retention.expose(out[i]),
                        retention.expose(retention.update(s[i], U[i], float(alpha[i]))), rtol=1e-14)


def test_lq_norm_is_per_weight_matrix():
    """‖A‖_q runs over each matrix (per batch element / head), not over the whole batch."""
    ret = mc.retention.lq(4.0)
    A = np.random.default_rng(1).standard_normal((3, 2, 2))
    W = ret.expose(A)
    for i in range(3):
        np.testing.assert_allclose(W[i], A[i] / np.sum(A[i] ** 4) ** 0.5, rtol=1e-14)
    assert np.allclose(np.sum(np.abs(W) ** 4, axis=(-2, -1)) ** 0.25 * np.sum(np.abs(A) ** 4, axis=(-2, -1)) ** 0.25, 1)


@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0])
def test_kl_weights_lie_on_the_scaled_simplex_per_row(scale):
    ret = mc.retention.kl(scale)
    L = 5 * np.random.default_rng(2).standard_normal((2, 3, 4))
    W = ret.expose(ret.update(L, np.ones_like(L), 0.7))
    assert np.all(W > 0)
    np.testing.assert_allclose(W.sum(-1), scale, rtol=1e-14)


def test_kl_is_blind_to_row_constants():
    """The stored logits are defined up to per-row constants: expose and update ignore them."""
    ret = mc.retention.kl(2.0)
    rng = np.random.default_rng(3)
    L, U, c = rng.standard_normal((2, 3)), rng.standard_normal((2, 3)), rng.standard_normal((2, 1))
    np.testing.assert_allclose(ret.expose(L + c), ret.expose(L), rtol=1e-14)
    np.testing.assert_allclose(ret.expose(ret.update(L + c, U, 0.6)), ret.expose(ret.update(L, U, 0.6)),
                               rtol=1e-13)


def test_elastic_net_zeroes_exactly_what_is_within_gamma():
    ret = mc.retention.elastic_net(0.5)
    W, U = np.array([[1.0, -0.2, 0.4, -2.0]]), np.array([[0.0, 0.0, 0.05, 0.1]])
    np.testing.assert_array_equal(ret.update(W, U, 1.0), np.array([[0.5, 0.0, 0.0, -1.4]]))


@given(w=mt.arrays((2, 3), min_value=-30, max_value=30))
def test_sigmoid_weights_stay_in_the_unit_interval(w):
    ret = mc.retention.sigmoid()
    W = ret.expose(ret.update(w, -w, 0.5))
    assert np.all((W >= 0) & (W <= 1))
    np.testing.assert_allclose(ret.expose(0 * w), 0.5)


# ---------------------------------------------------------------------------- limits


@given(data=st.data())
def test_elastic_net_zero_and_lq2_are_l2(data):
    s_prev, G, lr, alpha = data.draw(problems(mc.retention.l2()))
    U = -lr * G
    l2 = mc.retention.l2()
    want = l2.expose(l2.update(s_prev, U, alpha))
    for ret in [mc.retention.elastic_net(0.0), mc.retention.lq(2.0)]:
        mt.assert_close(f"{ret!r}", ret.expose(ret.update(s_prev, U, alpha)), want, rtol=1e-15, atol=0)
        mt.assert_close(f"{ret!r}.expose", ret.expose(s_prev), s_prev, rtol=0, atol=0)


@pytest.mark.parametrize("memory", S.memories(), ids=S.ids)
def test_scan_with_limit_gates_equals_l2(memory):
    rng = np.random.default_rng(4)
    params = memory.init(rng, (2,), np.float64)
    K, V, Q = (rng.standard_normal((2, 5, d)) for d in (memory.d_in, memory.d_out, memory.d_in))
    alpha, lr = rng.uniform(0.5, 1, (2, 5)), rng.uniform(0, 0.5, (2, 5))
    run = lambda ret: mc.scan(mc.init(memory, params, retention=ret), K, V, Q, bias=mc.bias.l2(),
                              lr=lr, alpha=alpha, chunk=1)
    Y, state = run(mc.retention.l2())
    for ret in [mc.retention.elastic_net(0.0), mc.retention.lq(2.0)]:
        Y2, state2 = run(ret)
        mt.assert_close(f"scan with {ret!r}: Y", Y2, Y, rtol=1e-13, atol=1e-14)
        for a, b in zip(mc.weights(state2), mc.weights(state)):
            mt.assert_close(f"scan with {ret!r}: weights", a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("retention", S.retentions(), ids=S.ids)
def test_retention_keeps_array_type_and_dtype(xp, retention):
    rng = np.random.default_rng(5)
    for dtype in (xp.float32, xp.float64):
        s = xp.asarray(rng.standard_normal((2, 2, 3)), dtype=dtype)
        U = xp.asarray(rng.standard_normal((2, 2, 3)), dtype=dtype)
        alpha = 1.0 if retention.name == "none" else xp.asarray([0.9, 0.5], dtype=dtype)
        out = retention.update(s, U, alpha)
        W = retention.expose(out)
        assert type(W) is type(s) and W.dtype == dtype and W.shape == s.shape
        assert out.dtype == dtype
        want = S.expose(retention, S.update(retention, to_numpy(s).astype(np.float64), to_numpy(U).astype(np.float64),
                                            alpha if retention.name == "none" else to_numpy(alpha).astype(np.float64)))
        mt.assert_close(f"{retention!r} on {xp.__name__} {np.dtype(dtype)}", W, want,
                        rtol=1e-12 if dtype == xp.float64 else 1e-5, atol=1e-6)
