"""Memory architectures: forward pass against docs/contract.md §3, hand VJPs against autodiff and paper §5.1."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirascore as mc
import mirascore.testing as mt
from mirascore._xp import to_numpy
import strategies as S

MEMORIES = [mc.memory.linear(3, 2), mc.memory.linear(1, 1), mc.memory.mlp(2, expansion=2),
            mc.memory.mlp(3, expansion=1), mc.memory.mlp(4, expansion=2), mc.memory.mlp(1, expansion=3)]


def memory_inputs(memory, max_dims=2):
    """(params, k, psi) with one small batch shape."""
    return mt.batch_shapes(max_dims=max_dims).flatmap(lambda b: st.tuples(
        mt.memory_params(memory, b), mt.tokens(memory.d_in, b), mt.arrays(b + (memory.d_out,))))


@pytest.mark.parametrize("memory", MEMORIES, ids=S.ids)
@given(data=st.data())
def test_hand_gradients_equal_autodiff(memory, data):
    params, k, psi = data.draw(memory_inputs(memory))
    mt.check_memory(memory, params, k, psi)


@pytest.mark.parametrize("memory", MEMORIES, ids=S.ids)
@given(data=st.data())
def test_apply_and_grad_follow_the_design(memory, data):
    """M(W, k) = W k or k + LN(W1 gelu(W2 k)); ∇_W = J_Wᵀψ by paper §5.1's formulas (own numpy)."""
    params, k, psi = data.draw(memory_inputs(memory))
    mt.assert_close(f"{memory!r}.apply", memory.apply(params, k), S.apply(memory, params, k),
                    rtol=1e-12, atol=1e-13)
    for i, (got, want) in enumerate(zip(memory.grad(params, k, psi), S.memory_grad(memory, params, k, psi))):
        mt.assert_close(f"{memory!r}.grad[{i}]", got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", MEMORIES, ids=S.ids)
def test_batch_elements_are_independent(memory):
    """A batched call equals the calls on each batch element (leading dims are batch dims)."""
    rng = np.random.default_rng(1)
    params = memory.init(rng, (2, 3), np.float64)
    k = rng.standard_normal((2, 3, memory.d_in))
    psi = rng.standard_normal((2, 3, memory.d_out))
    y, G = memory.apply(params, k), memory.grad(params, k, psi)
    gk = memory.grad_input(params, k, psi)
    for i in np.ndindex(2, 3):
        P = tuple(p[i] for p in params)
        np.testing.assert_allclose(y[i], memory.apply(P, k[i]), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(gk[i], memory.grad_input(P, k[i], psi[i]), rtol=1e-13, atol=1e-15)
        for g, g1 in zip(G, memory.grad(P, k[i], psi[i])):
            np.testing.assert_allclose(g[i], g1, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("memory", MEMORIES, ids=S.ids)
def test_shared_params_broadcast_over_the_token_batch(memory):
    """Parameters without batch dims serve a batch of tokens (apply broadcasts)."""
    rng = np.random.default_rng(2)
    params = memory.init(rng, (), np.float64)
    k = rng.standard_normal((4, memory.d_in))
    y = memory.apply(params, k)
    assert y.shape == (4, memory.d_out)
    for i in range(4):
        np.testing.assert_allclose(y[i], memory.apply(params, k[i]), rtol=1e-13, atol=1e-15)


def test_param_shapes_follow_the_contract():
    assert mc.memory.linear(3, 5).param_shapes() == ((5, 3),)
    assert mc.memory.mlp(3).param_shapes() == ((3, 12), (12, 3))
    assert mc.memory.mlp(3, expansion=2).param_shapes() == ((3, 6), (6, 3))


@pytest.mark.parametrize("memory", MEMORIES, ids=S.ids)
def test_init_shapes_and_dtypes(memory):
    default = memory.init(0, (2, 1))
    assert all(p.dtype == np.float32 for p in default)
    assert [p.shape for p in default] == [(2, 1) + s for s in memory.param_shapes()]
    assert all(p.dtype == np.float64 for p in memory.init(0, (), np.float64))
    np.testing.assert_array_equal(memory.init(7)[0], memory.init(7)[0])


def test_mlp_output_is_key_plus_normalised_hidden():
    """The residual and layer norm of M(k) = k + LN(u): M(k) − k has mean 0 and variance ≈ 1."""
    memory = mc.memory.mlp(4)
    rng = np.random.default_rng(3)
    params = memory.init(rng, (5,), np.float64)
    k = rng.standard_normal((5, 4))
    n = memory.apply(params, k) - k
    np.testing.assert_allclose(n.mean(-1), 0, atol=1e-12)
    assert np.all(np.abs(n.var(-1) - 1) < 1e-3)


@pytest.mark.parametrize("memory", [mc.memory.linear(3, 2), mc.memory.mlp(3, expansion=2)], ids=S.ids)
def test_memory_keeps_array_type_and_dtype(xp, memory):
    rng = np.random.default_rng(4)
    for dtype in (xp.float32, xp.float64):
        params = tuple(xp.asarray(p, dtype=dtype) for p in memory.init(rng, (2,), np.float64))
        k = xp.asarray(rng.standard_normal((2, memory.d_in)), dtype=dtype)
        psi = xp.asarray(rng.standard_normal((2, memory.d_out)), dtype=dtype)
        outs = [memory.apply(params, k), memory.grad_input(params, k, psi), *memory.grad(params, k, psi)]
        assert all(type(o) is type(k) and o.dtype == dtype for o in outs)
        host = lambda x: to_numpy(x).astype(np.float64)
        P64 = tuple(host(p) for p in params)
        want = [S.apply(memory, P64, host(k)), *S.memory_grad(memory, P64, host(k), host(psi))]
        got = [outs[0], *outs[2:]]
        for g, w in zip(got, want):
            mt.assert_close(f"{memory!r} on {xp.__name__} {np.dtype(dtype)}", g, w,
                            rtol=1e-11 if dtype == xp.float64 else 2e-5, atol=1e-5)
