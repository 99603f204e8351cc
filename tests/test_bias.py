"""Attentional biases: hand ψ and ∇_W ℓ against autodiff of the loss, the contract's formulas (docs/contract.md §3), and limits.

Residuals are drawn directly (v = M(W, k) − r) so that they can be kept away from the points where
a loss is not differentiable: r_j = 0 for lp with p < 2, ‖r‖ = δ for Yaad's discontinuous mixture.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirascore as mc
import mirascore.autodiff as ad
import mirascore.autodiff.numpy as anp
import mirascore.testing as mt
from mirascore._xp import to_numpy
import strategies as S

D = 3
KINK = 1e-2          # distance kept from the non-differentiable points


def off_kinks(bias, r, delta=None):
    """r moved away from bias's non-differentiable points (a deterministic map, not a filter)."""
    if bias.name == "lp" and bias.p < 2:
        r = np.where(r >= 0, 1.0, -1.0) * (KINK + np.abs(r))
    if bias.name == "huber" and bias.kind == "mixture":
        d = np.asarray(bias.delta if delta is None else delta)[..., None]
        n = np.linalg.norm(r, axis=-1, keepdims=True)
        r = np.where(np.abs(n - d) < KINK, r * (1 + 3 * KINK / np.maximum(n, KINK)) + KINK, r)
    return r


def residuals(batch=mt.batch_shapes()):
    """(y, r) pairs of shape (..., D)."""
    return batch.flatmap(lambda b: st.tuples(mt.arrays(b + (D,)), mt.arrays(b + (D,))))


@pytest.mark.parametrize("bias", S.biases(), ids=S.ids)
@given(yr=residuals())
def test_psi_is_the_gradient_of_the_loss(bias, yr):
    y, r = yr
    r = off_kinks(bias, r)
    mt.check_bias(bias, y, y - r)


@given(p=st.floats(1.0, 4.0), yr=residuals())
def test_lp_psi_is_the_gradient_of_the_loss_for_every_p(p, yr):
    y, r = yr
    bias = mc.bias.lp(p)
    mt.check_bias(bias, y, y - off_kinks(bias, r))


@pytest.mark.parametrize("kind", ["coord", "norm", "mixture"])
@given(data=st.data())
def test_huber_delta_gate_psi_is_the_gradient_of_the_loss(kind, data):
    batch = data.draw(mt.batch_shapes())
    y, r = data.draw(mt.arrays(batch + (D,))), data.draw(mt.arrays(batch + (D,)))
    delta = data.draw(mt.deltas(batch, min_value=0.05))
    bias = mc.bias.huber(kind=kind)
    mt.check_bias(bias, y, y - off_kinks(bias, r, delta), delta=delta)


@pytest.mark.parametrize("kind", ["norm", "mixture"])
@pytest.mark.parametrize("r", [0.0, 1e-205], ids=["zero", "underflowing"])
def test_norm_huber_loss_is_differentiable_at_zero_residual(kind, r):
    """‖r‖ = sqrt(Σr²) has an infinite slope at 0: a loss written naively gets a NaN gradient there
    (also when r² underflows)."""
    y = np.array([0.5, -1.0, 2.0])
    mt.check_bias(mc.bias.huber(0.7, kind), y, y - r)


@pytest.mark.parametrize("kind", ["coord", "norm", "mixture"])
@given(yr=residuals(), delta=mt.deltas(min_value=0.05))
def test_huber_gate_equals_static_delta(kind, yr, delta):
    y, r = yr
    static, gated = mc.bias.huber(delta, kind), mc.bias.huber(kind=kind)
    np.testing.assert_array_equal(gated.psi(y, y - r, delta=delta), static.psi(y, y - r))
    np.testing.assert_array_equal(gated.loss(y, y - r, delta=delta), static.loss(y, y - r))


@pytest.mark.parametrize("bias", S.biases() + [mc.bias.lp(1.2, smooth=5.0), mc.bias.lp(3, smooth=(2.0, 1e-3))],
                         ids=S.ids)
@given(yr=residuals())
def test_psi_follows_the_design_table(bias, yr):
    y, r = yr
    mt.assert_close(f"{bias!r}.psi", bias.psi(y, y - r), S.psi(bias, y, y - r), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("memory", S.memories(), ids=S.ids)
@pytest.mark.parametrize("bias", S.biases(), ids=S.ids)
@given(data=st.data())
def test_weight_gradient_is_the_gradient_of_the_loss(memory, bias, data):
    """∇_W ℓ = memory.grad(W, k, ψ(M(W, k), v)) equals autodiff of ℓ(M(W, k), v) w.r.t. W."""
    batch = data.draw(mt.batch_shapes(max_dims=1))
    params = data.draw(mt.memory_params(memory, batch))
    k = data.draw(mt.tokens(memory.d_in, batch))
    r = off_kinks(bias, data.draw(mt.arrays(batch + (memory.d_out,))))
    y = memory.apply(params, k)
    v = y - r
    mt.check_bias(bias, y, v)
    mt.check_memory(memory, params, k, bias.psi(y, v))
    auto = ad.grad(lambda P: anp.sum(bias.loss(memory.apply(P, k), v)))(params)
    hand = memory.grad(params, k, bias.psi(y, v))
    for i, (h, a) in enumerate(zip(hand, auto)):
        mt.assert_close(f"{bias!r} x {memory!r}: grad_W[{i}]", h, a, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------------- smoothed lp


@pytest.mark.parametrize("p", [1.0, 1.5, 3.0])
@given(yr=residuals())
def test_smooth_lp_tends_to_exact_lp_away_from_zero(p, yr):
    """tanh(s·r)(r² + eps)^((p−1)/2) → sign(r)|r|^(p−1) as s → ∞, eps → 0, for |r_j| ≥ 0.05."""
    y, r = yr
    r = np.where(r >= 0, 1.0, -1.0) * (0.05 + np.abs(r))
    exact = mc.bias.lp(p).psi(y, y - r)
    errors = [np.max(np.abs(mc.bias.lp(p, smooth=(s, e)).psi(y, y - r) - exact))
              for s, e in [(10.0, 1e-2), (100.0, 1e-4), (1e4, 1e-10)]]
    assert errors[-1] <= 1e-8 * (1 + np.max(np.abs(exact))), errors
    assert errors[0] >= errors[1] >= errors[2], errors


@pytest.mark.parametrize("p", [1.0, 1.5])
@given(v=mt.arrays((D,)))
def test_smooth_lp_is_differentiable_at_zero(p, v):
    """Where the exact ψ of p < 2 has an infinite slope (r = 0) the surrogate's slope is finite and
    equals slope·eps^((p−1)/2), and ψ(0) = 0."""
    slope, eps = 7.0, 1e-4
    bias = mc.bias.lp(p, smooth=(slope, eps))
    np.testing.assert_array_equal(bias.psi(v, v), np.zeros(D))
    jac_diag = ad.grad(lambda y: anp.sum(bias.psi(y, v)))(v.copy())
    mt.assert_close("d psi/dr at r = 0", jac_diag, np.full(D, slope * eps ** ((p - 1) / 2)),
                    rtol=1e-12)


@given(yr=residuals())
def test_smooth_lp_is_odd(yr):
    _, r = yr
    bias = mc.bias.lp(1.5, smooth=3.0)
    zero = np.zeros_like(r)
    mt.assert_close("psi(-r)", bias.psi(-r, zero), -bias.psi(r, zero), rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------- limits


@pytest.mark.parametrize("kind", ["coord", "norm", "mixture"])
@given(yr=residuals())
def test_huber_with_huge_delta_is_l2(kind, yr):
    y, r = yr
    l2 = mc.bias.l2()
    for bias, delta in [(mc.bias.huber(1e8, kind), None), (mc.bias.huber(kind=kind), 1e8)]:
        mt.assert_close(f"huber({kind}, δ→∞).psi", bias.psi(y, y - r, delta=delta), l2.psi(y, y - r),
                        rtol=1e-15, atol=0)
        mt.assert_close(f"huber({kind}, δ→∞).loss", bias.loss(y, y - r, delta=delta),
                        l2.loss(y, y - r), rtol=1e-13, atol=0)


@given(yr=residuals())
def test_lp2_and_robust0_are_l2(yr):
    y, r = yr
    l2 = mc.bias.l2()
    for bias in [mc.bias.lp(2), mc.bias.robust(0.0)]:
        mt.assert_close(f"{bias!r}.psi", bias.psi(y, y - r), l2.psi(y, y - r), rtol=1e-15, atol=0)
    mt.assert_close("lp(2).loss", mc.bias.lp(2).loss(y, y - r), l2.loss(y, y - r), rtol=1e-13, atol=0)
    robust = mc.bias.robust(0.0, eps=1e-6)          # ½(‖r‖² + eps): l2 shifted by eps/2
    mt.assert_close("robust(0).loss", robust.loss(y, y - r), l2.loss(y, y - r) + 0.5e-6,
                    rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("memory", S.memories(), ids=S.ids)
def test_step_with_limit_biases_equals_l2(memory):
    """The limits hold through mc.step too (the gate and the static forms)."""
    rng = np.random.default_rng(0)
    params = memory.init(rng, (2,), np.float64)
    k, v = rng.standard_normal((2, memory.d_in)), rng.standard_normal((2, memory.d_out))
    state = mc.init(memory, params, retention=mc.retention.l2())
    want = mc.step(state, k, v, bias=mc.bias.l2(), lr=0.3, alpha=0.9).params
    for bias, kw in [(mc.bias.huber(1e8), {}), (mc.bias.huber(kind="norm"), {"delta": 1e8}),
                     (mc.bias.huber(1e8, "mixture"), {}), (mc.bias.lp(2), {}),
                     (mc.bias.robust(0.0), {})]:
        got = mc.step(state, k, v, bias=bias, lr=0.3, alpha=0.9, **kw).params
        for g, w in zip(got, want):
            mt.assert_close(f"step with {bias!r}", g, w, rtol=1e-14, atol=0)


def test_dot_psi_ignores_the_prediction():
    y, v = np.arange(6.0).reshape(2, 3), np.ones((1, 3))
    np.testing.assert_array_equal(mc.bias.dot().psi(y, v), -np.ones((2, 3)))


@pytest.mark.parametrize("bias", S.biases(), ids=S.ids)
def test_bias_keeps_array_type_and_dtype(xp, bias):
    rng = np.random.default_rng(0)
    for dtype in (xp.float32, xp.float64):
        y = xp.asarray(rng.standard_normal((2, D)), dtype=dtype)
        v = xp.asarray(rng.standard_normal((2, D)), dtype=dtype)
        out = bias.psi(y, v)
        assert type(out) is type(y) and out.dtype == dtype and out.shape == (2, D)
        loss = bias.loss(y, v)
        assert type(loss) is type(y) and loss.dtype == dtype and loss.shape == (2,)
        want = S.psi(bias, to_numpy(y).astype(np.float64), to_numpy(v).astype(np.float64))
        mt.assert_close(f"{bias!r}.psi on {xp.__name__} {dtype}", out, want,
                        rtol=1e-12 if dtype == xp.float64 else 1e-5, atol=1e-6)
