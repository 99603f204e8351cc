"""mirascore.gpu.fused against the numpy formulas of mirascore.chunk.second_order (GPU only): the
same function called with numpy and with CuPy arrays, float32 and float64, on random inputs that
include exact zeros (sign(0) = 0) and both signs."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirascore.chunk import second_order as so

pytestmark = pytest.mark.gpu

shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 9))
dtypes = st.sampled_from([np.float32, np.float64])


def _data(rng, shape, dtype, zeros=True):
    x = rng.standard_normal(shape) * 2
    if zeros:
        x[rng.random(shape) < 0.2] = 0.0
    return x.astype(dtype)


def _check(fn, *arrays, dtype):
    import cupy
    want = fn(*arrays)
    got = fn(*(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in arrays))
    want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert type(g).__module__.startswith("cupy") and g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g.get(), w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))


@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2 ** 16))
def test_gelu_family(shape, dtype, seed):
    z = _data(np.random.default_rng(seed), shape, dtype)
    for fn in (so.gelu, so.gelu_prime, so.gelu_second):
        _check(fn, z, dtype=dtype)


@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2 ** 16))
def test_ln_project(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    u_hat, s = so.layer_norm(_data(rng, shape, np.float64, zeros=False))
    _check(so.ln_project, _data(rng, shape, dtype), u_hat.astype(dtype), s.astype(dtype), dtype=dtype)


@given(shape=shapes, dtype=dtypes, q=st.sampled_from([1.5, 2.0, 3.0, 4.0]), seed=st.integers(0, 2 ** 16))
def test_lq_maps(shape, dtype, q, seed):
    import mirascore as mc
    rng = np.random.default_rng(seed)
    A, dW = _data(rng, shape, dtype), _data(rng, shape, dtype)
    ret = mc.retention.lq(q)
    _check(lambda A: so.lq_scale(A, q, ret.eps), A, dtype=dtype)
    _check(lambda A, dW: so.expose_vjp(ret, A, so.expose(ret, A), dW), A, dW, dtype=dtype)
    n = so.lq_scale(A, q, ret.eps)[1]
    dnu = _data(rng, n.shape, dtype, zeros=False)
    _check(lambda A, n, dnu: so.lq_scale_vjp(A, q, ret.eps, n, dnu), A, n, dnu, dtype=dtype)


@given(shape=shapes, dtype=dtypes, p=st.sampled_from([1.5, 3.0, 4.0]), seed=st.integers(0, 2 ** 16))
def test_lp_psi_vjp(shape, dtype, p, seed):
    import mirascore as mc
    rng = np.random.default_rng(seed)
    y, g = (_data(rng, shape, dtype, zeros=False) for _ in range(2))
    r = rng.standard_normal(shape)
    v = (y - np.sign(r) * (np.abs(r) + 0.05)).astype(dtype)    # |r| ≥ 0.05: |r|^(p−2) stays finite
    _check(lambda y, v, g: so.psi_vjp(mc.bias.lp(p), y, v, None, g), y, v, g, dtype=dtype)
