"""The autodiff core: grad/value_and_grad/vjp, nested differentiation, extension and errors.

The per-operation checks are in test_autodiff_ops.py; this file tests what the core promises
(docs/contract.md §2.1): argnums, pytrees, constants, nested differentiation against closed forms and
finite differences, primitive/defvjp/defvjp_argnums, check_grads catching wrong VJPs, dtypes,
devices, and that importing the package pulls in neither CuPy nor numba.
"""
import gc
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

import mirascore.autodiff as ad
import mirascore.autodiff.numpy as anp


def rand(xp, *shape, seed=0, lo=None):
    x = np.random.default_rng(seed).standard_normal(shape)
    if lo is not None:
        x = lo + np.abs(x)
    return xp.asarray(x)


def close(xp, got, want, rtol=1e-9, atol=1e-12):
    assert type(got).__module__.split(".")[0] == xp.__name__, f"{type(got)} is not an {xp.__name__} array"
    np.testing.assert_allclose(_host(got), _host(want), rtol=rtol, atol=atol)


def _host(x):
    return x.get() if type(x).__module__.startswith("cupy") else np.asarray(x)


def vector(lo=-2.0, hi=2.0, max_side=5):
    return npst.arrays(np.float64, st.integers(1, max_side),
                       elements=st.floats(lo, hi, allow_nan=False, allow_subnormal=False))


# ------------------------------------------------------------------------------ grad, value_and_grad, vjp

def test_grad_argnums(xp):
    x, y = rand(xp, 3, seed=1), rand(xp, 3, seed=2)

    def f(x, y, scale=1.0):
        return anp.sum(x * x * y) * scale
    close(xp, ad.grad(f)(x, y), 2 * x * y)
    close(xp, ad.grad(f, argnums=1)(x, y), x * x)
    close(xp, ad.grad(f, argnums=-1)(x, y), x * x)
    gx, gy = ad.grad(f, argnums=(0, 1))(x, y, scale=3.0)          # keyword arguments pass through
    close(xp, gx, 6 * x * y)
    close(xp, gy, 3 * x * x)
    (gy_only,) = ad.grad(f, argnums=(1,))(x, y)                    # a 1-tuple gives a 1-tuple
    close(xp, gy_only, x * x)
    with pytest.raises(ValueError, match="argnums"):
        ad.grad(f, argnums=2)(x, y)


def test_value_and_grad(xp):
    x = rand(xp, 2, 3)
    value, g = ad.value_and_grad(lambda x: anp.sum(anp.exp(x)))(x)
    close(xp, g, xp.exp(x))
    assert abs(float(value) - float(xp.exp(x).sum())) < 1e-12
    value, (g0, g1) = ad.value_and_grad(lambda a, b: anp.sum(a * b), argnums=(0, 1))(x, 2 * x)
    close(xp, g0, 2 * x)
    close(xp, g1, x)


def test_grad_of_python_floats():
    assert ad.grad(lambda x: x * x * x)(2.0) == pytest.approx(12.0)
    gx, gy = ad.grad(lambda x, y: x / y, argnums=(0, 1))(3.0, 2.0)
    assert (gx, gy) == (pytest.approx(0.5), pytest.approx(-0.75))
    assert ad.grad(lambda x: x)(2.0) == 1.0                         # the output is the input box


class Params(NamedTuple):
    W: object
    b: object


def test_vjp_pytrees(xp):
    """Tuple/dict/NamedTuple inputs, tuple outputs; each gradient has its argument's structure."""
    p = Params(rand(xp, 3, 2, seed=1), rand(xp, 2, seed=2))
    d = {"x": rand(xp, 4, 3, seed=3), "scale": 2.0}

    def f(p, d):
        h = d["x"] @ p.W + p.b
        return anp.tanh(h), (anp.sum(h * h) * d["scale"], d["x"])
    (y, (s, xout)), vjp_fn = ad.vjp(f, p, d)
    gy, gs, gx = rand(xp, 4, 2, seed=4), 1.5, rand(xp, 4, 3, seed=5)
    gp, gd = vjp_fn((gy, (gs, gx)))
    assert isinstance(gp, Params) and set(gd) == {"x", "scale"}

    h = d["x"] @ p.W + p.b
    gh = gy * (1 - xp.tanh(h) ** 2) + 2 * gs * d["scale"] * h
    close(xp, gp.W, d["x"].T @ gh)
    close(xp, gp.b, gh.sum(0))
    close(xp, gd["x"], gh @ p.W.T + gx)
    assert float(gd["scale"]) == pytest.approx(float(gs * (h * h).sum()))
    with pytest.raises(ValueError, match="leaves"):
        vjp_fn((gy, gs))


def test_vjp_output_independent_of_input(xp):
    x = rand(xp, 3)
    value, vjp_fn = ad.vjp(lambda x, y: (y * 2.0, anp.sum(x)), x, rand(xp, 2))
    gx, gy = vjp_fn((None, 1.0))                                   # None cotangent: no gradient
    close(xp, gx, xp.ones(3))
    close(xp, gy, xp.zeros(2))
    close(xp, ad.grad(lambda x: 3.0)(x), xp.zeros(3))


def test_integer_and_boolean_inputs_are_constants(xp):
    x = rand(xp, 5, 3)
    idx = xp.asarray(np.array([4, 0, 4, 2]))                        # an embedding lookup, with a repeat
    mask = xp.asarray(np.array([True, False, True, True, False]))

    def f(x, idx, mask):
        return anp.sum(x[idx] ** 2) + anp.sum(anp.where(mask[:, None], x, 0.0))
    gx, gidx, gmask = ad.grad(f, argnums=(0, 1, 2))(x, idx, mask)
    assert gidx is None and gmask is None
    counts = xp.asarray(np.bincount([4, 0, 4, 2], minlength=5)[:, None].astype(float))
    close(xp, gx, 2 * counts * x + mask[:, None])


def test_grad_needs_one_number(xp):
    x = rand(xp, 3)
    with pytest.raises(ValueError, match="one number"):
        ad.grad(lambda x: x * 2.0)(x)
    with pytest.raises(ValueError, match="one number"):
        ad.grad(lambda x: (anp.sum(x), anp.sum(x)))(x)
    close(xp, ad.grad(lambda x: x[:1] * 2.0)(x), xp.asarray([2.0, 0.0, 0.0]))   # size 1 is fine


def test_float32_stays_float32(xp):
    """A float32 MLP loss: value and every gradient, first and second order, stay float32."""
    W1, W2, X = (rand(xp, *s, seed=i).astype(xp.float32) for i, s in enumerate([(3, 4), (4, 2), (5, 3)]))

    def loss(W1, W2):
        return anp.mean(anp.logsumexp(anp.sigmoid(X @ W1) @ W2, axis=-1)) + 0.5 * anp.sum(W2 ** 2)
    value, (g1, g2) = ad.value_and_grad(loss, argnums=(0, 1))(W1, W2)
    assert value.dtype == g1.dtype == g2.dtype == np.float32
    hvp = ad.grad(lambda W1: anp.sum(ad.grad(loss)(W1, W2) * W1))(W1)
    assert hvp.dtype == np.float32


# ------------------------------------------------------------------------------ nested differentiation

SECOND_DERIVATIVES = {           # f, f'' in closed form, domain
    "tanh": (anp.tanh, lambda x: -2 * np.tanh(x) * (1 - np.tanh(x) ** 2), (-3, 3)),
    "sigmoid": (anp.sigmoid, lambda x: (s := 1 / (1 + np.exp(-x))) * (1 - s) * (1 - 2 * s), (-6, 6)),
    "erf": (anp.erf, lambda x: -4 * x / math.sqrt(math.pi) * np.exp(-x * x), (-3, 3)),
    "log": (anp.log, lambda x: -1 / x ** 2, (0.2, 3)),
    "sqrt": (anp.sqrt, lambda x: -0.25 * x ** -1.5, (0.2, 3)),
    "x_exp": (lambda x: x * anp.exp(x), lambda x: (x + 2) * np.exp(x), (-2, 2)),
    "pow": (lambda x: x ** 3.5, lambda x: 3.5 * 2.5 * x ** 1.5, (0.2, 3)),
    "softplus": (lambda x: anp.logsumexp(anp.stack([x, 0 * x]), axis=0),
                 lambda x: (s := 1 / (1 + np.exp(-x))) * (1 - s), (-4, 4)),
}


@pytest.mark.parametrize("name", sorted(SECOND_DERIVATIVES))
def test_grad_of_grad_closed_form(name):
    f, f2, (lo, hi) = SECOND_DERIVATIVES[name]
    d2 = ad.grad(lambda x: anp.sum(ad.grad(lambda y: anp.sum(f(y)))(x)))

    @given(vector(lo, hi))
    def check(x):
        np.testing.assert_allclose(d2(x), f2(x), rtol=1e-10, atol=1e-12)
    check()


def test_third_order():
    d3 = ad.grad(ad.grad(ad.grad(lambda x: x ** 4 - 2 * x ** 3)))
    assert d3(1.5) == pytest.approx(24 * 1.5 - 12)
    assert ad.grad(ad.grad(ad.grad(anp.tanh)))(0.3) == pytest.approx(
        -2 * (1 - np.tanh(0.3) ** 2) * (1 - 3 * np.tanh(0.3) ** 2))


def _mlp_loss(W1, W2, X, Y):
    h = anp.tanh(X @ W1)
    out = anp.log_softmax(h @ W2 + anp.sum(anp.square(W1), axis=0)[:3], axis=-1)
    return -anp.mean(anp.sum(out * Y, axis=-1)) + anp.mean(anp.maximum(h, 0.3 * h) ** 2)


@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 2 ** 31 - 1))
def test_hessian_vector_product_vs_finite_differences(n, d, seed):
    """HVP = d/dε ∇f(W + εV) of an MLP-like loss: grad of <grad, V> vs central differences."""
    rng = np.random.default_rng(seed)
    W1, W2, V1, V2 = (rng.standard_normal(s) for s in [(d, 4), (4, 3), (d, 4), (4, 3)])
    X, Y = rng.standard_normal((n, d)), np.eye(3)[rng.integers(0, 3, n)]
    grads = ad.grad(_mlp_loss, argnums=(0, 1))

    def directional(W1, W2):
        g1, g2 = grads(W1, W2, X, Y)
        return anp.sum(g1 * V1) + anp.sum(g2 * V2)
    H1, H2 = ad.grad(directional, argnums=(0, 1))(W1, W2)
    eps = 1e-5
    p1, p2 = grads(W1 + eps * V1, W2 + eps * V2, X, Y)
    m1, m2 = grads(W1 - eps * V1, W2 - eps * V2, X, Y)
    np.testing.assert_allclose(H1, (p1 - m1) / (2 * eps), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(H2, (p2 - m2) / (2 * eps), rtol=1e-5, atol=1e-7)


def test_hessian_vs_scipy_differentiate():
    """An independent oracle: scipy's Richardson-extrapolated Jacobian of our gradient."""
    differentiate = pytest.importorskip("scipy.differentiate")
    A = rand(np, 4, 4, seed=3)

    def f(x):
        return anp.logsumexp(A @ anp.tanh(x)) + anp.sum(x ** 4) / 4
    g = ad.grad(f)

    def g_vectorized(xs):                 # scipy passes (4, ...) with batch axes after the first
        cols = xs.reshape(4, -1)
        return np.stack([g(cols[:, j]) for j in range(cols.shape[1])], -1).reshape(xs.shape)
    x = rand(np, 4, seed=4)
    H = np.stack([ad.grad(lambda x, i=i: g(x)[i])(x) for i in range(4)])
    res = differentiate.jacobian(g_vectorized, x)
    assert np.all(res.success)
    np.testing.assert_allclose(H, res.df, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(H, H.T, rtol=1e-12)


def test_grad_through_a_function_that_calls_grad():
    """The inner grad closes over the outer box x; the outer trace sees through it."""
    y0 = np.array([0.5, -1.0, 2.0])

    def f(x):
        g = ad.grad(lambda y: anp.sum(x * y ** 2))(y0)            # = 2·x·y0
        return anp.sum(g * x)                                      # = 2·Σ x²·y0
    x = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(ad.grad(f)(x), 4 * x * y0)
    # perturbation confusion (Siskind & Pearlmutter): d/dx [x · d/dy (x + y)] = 1, not 2
    assert ad.grad(lambda x: x * ad.grad(lambda y: x + y)(1.0))(2.0) == pytest.approx(1.0)
    # the inner gradient w.r.t. an argument it ignores is a constant zero array, not a box
    inner = ad.grad(lambda a, b: anp.sum(a ** 2), argnums=(0, 1))
    g = ad.grad(lambda x: anp.sum(inner(x, x)[1] * x) + anp.sum(inner(x, x)[0] * x))(x)
    assert g.dtype == np.float64
    np.testing.assert_allclose(g, 4 * x)


def test_nested_on_device(xp):
    """Grad of grad on the array library under test: closed form, results on the same device."""
    x = rand(xp, 4, seed=7)
    d2 = ad.grad(lambda x: anp.sum(ad.grad(lambda y: anp.sum(anp.tanh(y) * y))(x)))(x)
    t = xp.tanh(x)
    close(xp, d2, 2 * (1 - t ** 2) - 2 * x * t * (1 - t ** 2))


def test_stop_gradient_at_every_order(xp):
    x = rand(xp, 3)
    close(xp, ad.grad(lambda x: anp.sum(x * anp.stop_gradient(x)))(x), x)
    close(xp, ad.grad(lambda x: anp.sum(ad.grad(lambda y: anp.sum(y ** 2 * anp.stop_gradient(x)))(x)))(x),
          2 * x)


def test_long_chain_does_not_recurse():
    """The backward pass is iterative: a 20,000-op chain needs no deep recursion."""
    def f(x):
        for _ in range(20_000):
            x = x * 1.0001
        return x
    assert ad.grad(f)(1.0) == pytest.approx(1.0001 ** 20_000)


def test_graph_is_freed_after_grad():
    """Nothing global keeps a trace alive: intermediates die once grad returns."""
    refs = []

    def f(x):
        t = anp.exp(x)
        refs.append(weakref.ref(anp.stop_gradient(t)))              # the raw array inside the box
        return anp.sum(t * t)
    ad.grad(f)(np.ones(1000))
    gc.collect()
    assert refs[0]() is None


# ------------------------------------------------------------------------------ extending: primitive, defvjp

@ad.primitive
def softplus(x):
    return np.logaddexp(x, 0.0)


ad.defvjp(softplus, lambda ans, x: lambda g: g * anp.sigmoid(x))   # VJP via primitives: order 2 works


@ad.primitive
def scaled_dot(x, y, scale):
    return scale * np.sum(x * y)


ad.defvjp(scaled_dot,
          lambda ans, x, y, scale: lambda g: g * scale * y,
          None,                                                     # y: declared constant
          lambda ans, x, y, scale: lambda g: g * ans / scale)


def test_user_primitive_with_defvjp():
    x = rand(np, 3, 2)
    ad.check_grads(softplus, x, order=2)
    ad.check_grads(lambda x: anp.sum(softplus(x) ** 2), x, order=2)
    np.testing.assert_allclose(ad.grad(lambda x: anp.sum(softplus(x)))(x), 1 / (1 + np.exp(-x)))


def test_defvjp_none_maker_means_no_gradient():
    x, y = rand(np, 3, seed=1), rand(np, 3, seed=2)
    gx, gy, gs = ad.grad(scaled_dot, argnums=(0, 1, 2))(x, y, 2.0)
    np.testing.assert_allclose(gx, 2 * y)
    np.testing.assert_allclose(gy, 0.0)                              # no rule: treated as constant
    assert gs == pytest.approx(np.sum(x * y))


def test_defvjp_argnums_fused_maker():
    """One maker computes the gradients of all requested arguments in one pass."""
    calls = []

    @ad.primitive
    def affine(W, b, x):
        return x @ W + b

    def affine_vjp(argnums, ans, args, kwargs):
        W, b, x = args
        calls.append(argnums)

        def vjp(g):
            grads = {0: anp.swapaxes(x, -1, -2) @ g, 1: anp.sum(g, axis=0), 2: g @ anp.swapaxes(W, -1, -2)}
            return tuple(grads[i] for i in argnums)
        return vjp
    ad.defvjp_argnums(affine, affine_vjp)

    W, b, x = rand(np, 3, 2, seed=1), rand(np, 2, seed=2), rand(np, 4, 3, seed=3)
    ad.check_grads(affine, W, b, x, order=2)
    assert (0, 1, 2) in calls
    calls.clear()
    ad.grad(lambda b: anp.sum(affine(W, b, x) ** 2))(b)
    assert calls == [(1,)]                                           # only the boxed argument asked for


def test_op_without_vjp_names_itself():
    @ad.primitive
    def frobnicate(x):
        return x * 2

    np.testing.assert_allclose(frobnicate(np.ones(2)), 2.0)          # raw arrays need no VJP
    with pytest.raises(NotImplementedError, match="frobnicate"):
        ad.grad(lambda x: anp.sum(frobnicate(x)))(np.ones(2))


def test_einsum_summed_index_with_broadcast_ellipsis():
    """Regression: an index summed out of one operand while '...' broadcasts (1 vs 5)."""
    a, b = rand(np, 1, 3, 4, seed=1), rand(np, 5, 4, seed=2)
    ad.check_grads(lambda a, b: anp.einsum("...ij,...j->...", a, b), a, b)


def test_cumsum_without_axis_flattens():
    """Regression: numpy's cumsum(axis=None) flattens; the gradient must come back in x's shape."""
    x = rand(np, 2, 3)
    np.testing.assert_allclose(ad.grad(lambda x: anp.sum(anp.cumsum(x, None) ** 2) / 2)(x),
                               np.cumsum(np.cumsum(x)[::-1])[::-1].reshape(2, 3))


def test_einsum_repeated_index_is_a_documented_limit():
    with pytest.raises(NotImplementedError, match="repeated index"):
        ad.grad(lambda x: anp.einsum("ii->", x))(np.eye(3))


# ------------------------------------------------------------------------------ check_grads catches wrong VJPs

@ad.primitive
def mul_wrong(x, y):
    return x * y


ad.defvjp(mul_wrong, lambda ans, x, y: lambda g: g * y,
                     lambda ans, x, y: lambda g: 1.01 * g * x)       # 1% off for argument 1


@ad.primitive
def sin_raw_vjp(x):
    return np.sin(x)


# right at first order, but written with raw numpy on the unboxed value: no second order
ad.defvjp(sin_raw_vjp, lambda ans, x: lambda g: g * np.cos(anp.stop_gradient(x)))


@ad.primitive
def sin_good(x):
    return np.sin(x)


@ad.primitive
def cos_good(x):
    return np.cos(x)


ad.defvjp(sin_good, lambda ans, x: lambda g: g * cos_good(x))
ad.defvjp(cos_good, lambda ans, x: lambda g: -g * sin_good(x))


def test_check_grads_first_order_names_the_argument():
    x, y = rand(np, 3, seed=1), rand(np, 3, seed=2)
    with pytest.raises(AssertionError, match="argument 1"):
        ad.check_grads(mul_wrong, x, y, order=1)
    ad.check_grads(lambda x: mul_wrong(x, y), x, order=1)            # argument 0's rule is right


def test_check_grads_second_order_catches_a_nondifferentiable_vjp():
    x = rand(np, 4)
    ad.check_grads(sin_raw_vjp, x, order=1)
    with pytest.raises(AssertionError, match="VJP of .*argument 0"):
        ad.check_grads(sin_raw_vjp, x, order=2)
    ad.check_grads(sin_good, x, order=3)


def test_check_grads_pytrees_constants_and_order():
    p = {"W": rand(np, 3, 2), "n": np.arange(3)}
    ad.check_grads(lambda p, s: anp.sum(anp.tanh(p["W"] * s) * p["n"][:, None]), p, 0.7)
    with pytest.raises(ValueError, match="order"):
        ad.check_grads(anp.exp, np.ones(2), order=4)


def test_check_grads_is_not_fooled_by_a_missing_gradient():
    """clip's bounds are constants: a differentiated bound gets no gradient, and the check says so."""
    x, lo = rand(np, 5), np.full(5, -0.25)
    with pytest.raises(AssertionError, match="argument 1"):
        ad.check_grads(lambda x, lo: anp.clip(x, lo, 0.25), x, lo, order=1)


# ------------------------------------------------------------------------------ boxes

def test_box_comparisons_and_truth(xp):
    seen = []

    def f(x):
        mask = x > 0                                                # comparisons give raw booleans
        seen.append(type(mask).__module__.split(".")[0])
        with pytest.raises(TypeError, match="truth value"):
            bool(anp.sum(x))
        return anp.sum(anp.where(mask, x, -x))                       # |x|
    x = rand(xp, 4)
    close(xp, ad.grad(f)(x), xp.sign(x))
    assert seen == [xp.__name__]


def test_max_ties_share_the_gradient(xp):
    x = xp.asarray([1.0, 3.0, 3.0, -2.0])
    close(xp, ad.grad(anp.max)(x), xp.asarray([0.0, 0.5, 0.5, 0.0]))
    close(xp, ad.grad(lambda x: anp.sum(anp.maximum(x, 1.0)))(x[:1]), xp.asarray([1.0]))   # tie -> first


# ------------------------------------------------------------------------------ devices and imports

@pytest.mark.gpu
def test_no_host_device_copies(monkeypatch):
    """On CuPy every value and gradient stays a CuPy array; nothing calls cupy.asnumpy."""
    import cupy

    def refuse(*a, **k):
        raise AssertionError("a device-to-host copy (cupy.asnumpy) in the autodiff path")
    monkeypatch.setattr(cupy, "asnumpy", refuse)
    W1, W2, X = (cupy.asarray(rand(np, *s, seed=i)) for i, s in enumerate([(3, 4), (4, 2), (5, 3)]))
    idx = cupy.asarray(np.array([0, 2, 2]))

    def loss(W1, W2):
        h = anp.erf(X[idx] @ W1)
        return anp.sum(anp.softmax(h @ W2, axis=-1) * anp.clip(h[:, :2], -0.5, 0.5)) + anp.max(W1)
    value, grads = ad.value_and_grad(loss, argnums=(0, 1))(W1, W2)
    hvp = ad.grad(lambda W1: anp.sum(ad.grad(loss)(W1, W2) * W1))(W1)
    for a in (value, *grads, hvp):
        assert isinstance(a, cupy.ndarray), type(a)


def test_import_pulls_in_neither_cupy_nor_numba():
    root = Path(ad.__file__).resolve().parents[2]
    code = ("import sys, numpy as np, mirascore.autodiff as ad, mirascore.autodiff.numpy as anp\n"
            "ad.grad(lambda x: anp.sum(anp.tanh(x) @ x))(np.ones((2, 2)))\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx', 'numba'))\n"
            "assert not bad, bad\n")
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- tree primitives

class _Pair(NamedTuple):
    a: object
    b: object


@ad.tree_primitive
def _affine_tree(x, params, *, scale):
    """Trees in and out: ({"y": W x + c, "z": scale·x}, W²) from x and params = _Pair(W, c)."""
    W, c = params
    return ({"y": W @ x + c, "z": _Pair(scale * x, None)}, W * W), W


def _affine_tree_vjp(result, W, args, kwargs):
    x, params = args

    def vjp(g):
        (gd, gW2) = g
        gy, gz = gd["y"], gd["z"].a
        dx = (0.0 if gy is None else W.T @ gy) + (0.0 if gz is None else kwargs["scale"] * gz)
        dW = (0.0 if gy is None else np.outer(gy, x)) + (0.0 if gW2 is None else 2 * W * gW2)
        return dx, _Pair(dW, gy)          # c's gradient: gy (None when y was not used)
    return vjp


ad.defvjp_tree(_affine_tree, _affine_tree_vjp)


def _affine_tree_ad(x, params, scale):
    W, c = params
    return {"y": anp.matmul(W, x) + c, "z": _Pair(scale * x, None)}, W * W


def test_tree_primitive_gradients_equal_autodiff_of_its_formula():
    rng = np.random.default_rng(0)
    x, W, c = rng.standard_normal(3), rng.standard_normal((2, 3)), rng.standard_normal(2)
    raw = _affine_tree(x, _Pair(W, c), scale=0.5)         # raw arrays: no tape, the function itself
    assert isinstance(raw[0]["y"], np.ndarray) and raw[0]["z"].b is None

    def total(f):                                          # uses every output leaf
        def g(x, W, c):
            (d, W2) = f(x, _Pair(W, c))
            return anp.sum(d["y"] ** 2) + anp.sum(anp.tanh(d["z"].a)) + anp.sum(W2)
        return g
    got = ad.grad(total(lambda x, p: _affine_tree(x, p, scale=0.5)), argnums=(0, 1, 2))(x, W, c)
    want = ad.grad(total(lambda x, p: _affine_tree_ad(x, p, 0.5)), argnums=(0, 1, 2))(x, W, c)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    ad.check_grads(lambda x, W, c: _affine_tree(x, _Pair(W, c), scale=0.5), x, W, c, order=1)


def test_tree_primitive_unused_outputs_repeated_inputs_and_float_leaves():
    rng = np.random.default_rng(1)
    x, W = rng.standard_normal(3), rng.standard_normal((2, 3))
    # only z used: y's and W²'s cotangents arrive as None; c is a Python float: a float gradient
    dc = ad.grad(lambda c: anp.sum(_affine_tree(x, _Pair(W, c), scale=2.0)[0]["y"]))(0.25)
    assert type(dc) is float and dc == 2.0
    dx = ad.grad(lambda x: anp.sum(_affine_tree(x, _Pair(W, 0.0), scale=2.0)[0]["z"].a))(x)
    np.testing.assert_allclose(dx, np.full(3, 2.0))
    # the same box as two leaves: both contributions add up
    dW = ad.grad(lambda W: anp.sum(_affine_tree(x, _Pair(W, W[:, 0]), scale=1.0)[0]["y"]))(W)
    want = np.outer(np.ones(2), x)
    want[:, 0] += 1.0
    np.testing.assert_allclose(dW, want, rtol=1e-12)


def test_tree_primitive_refuses_second_order():
    rng = np.random.default_rng(2)
    x, W, c = rng.standard_normal(3), rng.standard_normal((2, 3)), rng.standard_normal(2)
    with pytest.raises(NotImplementedError, match="_affine_tree.*first order"):
        ad.check_grads(lambda x: _affine_tree(x, _Pair(W, c), scale=1.0)[0]["y"], x, order=2)
