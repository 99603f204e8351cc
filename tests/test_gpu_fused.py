"""mirascore.gpu.fused against the numpy formulas they stand in for (GPU only): every registered
kernel is called through its @fusable formula with CuPy arrays and compared with the formula
itself on numpy arrays, float32 and float64, on random inputs that include exact zeros
(sign(0) = 0) and both signs. A kernel registered without a case here fails the last test."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirascore import bias, fusable, memory, retention

pytestmark = pytest.mark.gpu

shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 9))
dtypes = st.sampled_from([np.float32, np.float64])


def _data(rng, shape, dtype, zeros=True):
    x = rng.standard_normal(shape) * 2
    if zeros:
        x[rng.random(shape) < 0.2] = 0.0
    return x.astype(dtype)


def _check(formula, *args, dtype):
    """formula on CuPy arrays (its kernel) equals the formula's own numpy result."""
    import cupy
    assert fusable.kernel_for(formula) is not None, f"no kernel registered for {formula.__name__}"
    want = formula.formula(*args)
    got = formula(*(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args))
    want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for g, w in zip(got, want):
        assert type(g).__module__.startswith("cupy") and g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g.get(), w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))


def _gelu_family(rng, shape, dtype):
    return [(f, (_data(rng, shape, dtype),)) for f in (memory.gelu, memory.gelu_prime, memory.gelu_second)]


def _layer_norm_vjp(rng, shape, dtype):
    u_hat, s = memory.layer_norm(_data(rng, shape, np.float64, zeros=False))
    return [(memory.layer_norm_vjp, (_data(rng, shape, dtype), u_hat.astype(dtype), s.astype(dtype)))]


def _lq(rng, shape, dtype):
    A, dW = _data(rng, shape, dtype), _data(rng, shape, dtype)
    nu = np.abs(_data(rng, shape[:-2] + (1, 1), dtype, zeros=False))
    coef = _data(rng, shape[:-2] + (1, 1), dtype, zeros=False)
    q = float(rng.choice([1.5, 2.0, 3.0, 4.0]))     # a Python float, as the specs hold it
    return [(retention.lq_power_sum, (A, q)), (retention.lq_norm_vjp, (A, nu, dW, coef, q)),
            (retention.lq_norm_vjp, (A, None, None, coef, q))]


def _lp(rng, shape, dtype):
    r = rng.standard_normal(shape)
    r = (np.sign(r) * (np.abs(r) + 0.05)).astype(dtype)      # |r| ≥ 0.05: |r|^(p−2) stays finite
    return [(bias.lp_psi_derivative, (r, _data(rng, shape, dtype, zeros=False), float(rng.choice([1.5, 3.0, 4.0]))))]


CASES = {memory.gelu: _gelu_family, memory.gelu_prime: _gelu_family, memory.gelu_second: _gelu_family,
         memory.layer_norm_vjp: _layer_norm_vjp, retention.lq_power_sum: _lq,
         retention.lq_norm_vjp: _lq, bias.lp_psi_derivative: _lp}


@pytest.mark.parametrize("formula", list(CASES), ids=lambda f: f.__qualname__)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2 ** 16))
def test_kernel_equals_its_formula(formula, shape, dtype, seed):
    for f, args in CASES[formula](np.random.default_rng(seed), shape, dtype):
        if f is formula:
            _check(f, *args, dtype=dtype)


def test_every_registered_kernel_is_tested():
    fusable.kernel_for(memory.gelu)                      # loads mirascore.gpu.fused
    assert set(fusable._kernels) == set(CASES)


def test_boxes_run_the_formula():
    """Being differentiated, a fusable formula runs its own operations (the tape needs them)."""
    import cupy

    import mirascore.autodiff as ad
    z = cupy.asarray(np.linspace(-2, 2, 7))
    got = ad.grad(lambda x: memory.gelu(x).sum())(z)
    np.testing.assert_allclose(got.get(), memory.gelu_prime.formula(z.get()), rtol=1e-12)
