"""Property-test a rule: hypothesis strategies and float64 checks for biases, memories, gates.

A new attentional bias, memory or retention gate is a NamedTuple with the methods of
`docs/internals.md`; these checks hold it to the identities every rule obeys:

- `check_bias(bias, y, v, delta=None)`: the hand-derived `psi` equals the autodiff gradient of
  `loss` w.r.t. the prediction y;
- `check_memory(memory, params, k, psi)`: `grad` and `grad_input` equal the autodiff gradients of
  ⟨ψ, apply(params, k)⟩ w.r.t. the parameters and the key;
- `check_retention(retention, s_prev, G, lr, alpha)`: the closed-form `update(s_prev, -lr*G, alpha)`
  minimises the gate's `objective(s, s_prev, G, lr, alpha)` (scipy.optimize on small sizes, compared
  through `expose`; gates with an l1 term are checked by their subgradient optimality conditions),
  and equals prox(α·canonical(s_prev) + U), the per-token rule of the chunked scan;
- `check_vjps(spec, *point)`: every VJP a bias or gate writes by hand (`psi_vjp`, `expose_vjp`,
  `canonical_vjp`, `prox_vjp`, `read_scale_vjp`, `anchor_vjp`) equals autodiff of the map it
  differentiates; the ones a spec leaves out are derived by autodiff in mc.scan, so need no check.

Each check computes in float64 and raises AssertionError with a message that names the rule, the
quantity that is wrong and where. The strategies (`arrays`, `batch_shapes`, `memory_params`,
`tokens`, `lrs`, `alphas`, `betas`, `deltas`) draw finite float64 inputs of small sizes; they need
hypothesis, which is imported only when one of them is called, so the checks work without it.
`scan_inputs(rule, batch_shape, T, seed)` draws one seeded set of a whole scan's inputs (no
hypothesis), as the precision tests and benchmarks use them.

Example (docs/adding-a-rule.md walks through a whole new bias)::

    from hypothesis import given
    import mirascore.testing as mt

    @given(y=mt.arrays((3,)), v=mt.arrays((3,)))
    def test_my_bias(y, v):
        mt.check_bias(MyBias(), y, v)
"""
import numpy as np

import mirascore.autodiff as ad
import mirascore.autodiff.numpy as anp
from mirascore import protocols
from mirascore._xp import to_numpy
from mirascore.memory import Linear
from mirascore.retention import update_from_pieces

__all__ = [
    "arrays", "batch_shapes", "memory_params", "tokens", "lrs", "alphas", "betas", "deltas",
    "check_bias", "check_memory", "check_retention", "check_vjps", "assert_close", "scan_inputs",
]


# --------------------------------------------------------------------------------------------
# comparisons


def _f64(x):
    return None if x is None else np.asarray(to_numpy(x), dtype=np.float64)


def assert_close(what, got, want, *, rtol=1e-7, atol=1e-10, context=""):
    """Assert |got - want| <= atol + rtol·max|want| everywhere; the message says where it is not.

    The tolerance scales with the largest entry of `want` rather than entry by entry, so an entry
    that is zero by cancellation is judged on the scale of its array.
    """
    got, want = _f64(got), _f64(want)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {got.shape}, expected {want.shape}{context}")
    if not np.all(np.isfinite(got)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(got))[0])
        raise AssertionError(f"{what}: non-finite value {float(got[bad])} at index {bad}{context}")
    if not np.all(np.isfinite(want)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(want))[0])
        raise AssertionError(f"{what}: the reference value is non-finite ({float(want[bad])}) at "
                             f"index {bad}{context}")
    err = np.abs(got - want)
    tol = atol + rtol * (float(np.max(np.abs(want))) if want.size else 0.0)
    if want.size and float(np.max(err)) > tol:
        worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape))
        raise AssertionError(
            f"{what}: max abs error {float(np.max(err)):.3e} > tolerance {tol:.3e} at index "
            f"{worst} (got {float(got[worst])!r}, expected {float(want[worst])!r}){context}")


def _inputs(**named):
    lines = []
    for name, x in named.items():
        if x is None:
            continue
        lines.append(f"  {name} = {np.array2string(np.asarray(x), precision=17, separator=', ')}")
    return "\n" + "\n".join(lines) if lines else ""


# --------------------------------------------------------------------------------------------
# checks


def check_bias(bias, y, v, delta=None, *, rtol=1e-7, atol=1e-10):
    """Check `bias.psi(y, v, delta)` against the autodiff gradient of `bias.loss` w.r.t. y (float64).

    y, v: (..., d_out) predictions and values; delta: None, a number or an array broadcasting against
    (...) (the per-token Huber gate). `loss` must return one number per token, shape (...).
    Raises AssertionError naming the bias and the first wrong entry.
    """
    y, v, delta = _f64(y), _f64(v), _f64(delta)
    ctx = _inputs(y=y, v=v, delta=delta)
    loss = _f64(bias.loss(y, v, delta=delta))
    if loss.shape != y.shape[:-1]:
        raise AssertionError(f"{bias!r}: loss has shape {loss.shape}, expected one number per token "
                             f"{y.shape[:-1]}{ctx}")
    psi = bias.psi(y, v, delta=delta)
    if _dtype(psi) != np.float64:
        raise AssertionError(f"{bias!r}: psi returned dtype {_dtype(psi)} for float64 inputs{ctx}")
    auto = ad.grad(lambda yy: anp.sum(bias.loss(yy, v, delta=delta)))(y)
    assert_close(f"{bias!r}: psi(y, v) vs autodiff d loss/dy", psi, auto, rtol=rtol, atol=atol,
                 context=ctx)


def check_memory(memory, params, k, psi, *, rtol=1e-7, atol=1e-10):
    """Check `memory.grad` and `memory.grad_input` against autodiff of ⟨ψ, apply(params, k)⟩
    (for a memory that writes only forward/backward, the ones derived from them; grad_input is
    skipped for a memory that has neither it nor a backward).

    params: a tuple with one array per entry of `memory.param_shapes()`, each with the batch shape
    (...) of k in front; k: (..., d_in); psi: (..., d_out), the cotangent at the memory's output.
    Raises AssertionError naming the memory and the wrong gradient (`params[i]` or `k`).
    """
    params = tuple(_f64(p) for p in params)
    k, psi = _f64(k), _f64(psi)
    ctx = _inputs(**{f"params[{i}]": p for i, p in enumerate(params)}, k=k, psi=psi)
    apply, grad, grad_input = protocols.memory_gradients(memory)
    y = apply(params, k)
    if tuple(np.shape(y)) != psi.shape:
        raise AssertionError(f"{memory!r}: apply returned shape {np.shape(y)}, psi has {psi.shape}{ctx}")

    def inner(P, kk):
        return anp.sum(apply(P, kk) * psi)

    auto_p, auto_k = ad.grad(inner, argnums=(0, 1))(params, k)
    hand_p = grad(params, k, psi)
    if len(hand_p) != len(params):
        raise AssertionError(f"{memory!r}: grad returned {len(hand_p)} arrays for {len(params)} "
                             f"parameters{ctx}")
    for i, (h, a) in enumerate(zip(hand_p, auto_p)):
        assert_close(f"{memory!r}: grad(params, k, psi)[{i}] (params[{i}], shape {params[i].shape}) "
                     f"vs autodiff", h, a, rtol=rtol, atol=atol, context=ctx)
    if grad_input is not None:
        assert_close(f"{memory!r}: grad_input(params, k, psi) (k) vs autodiff",
                     grad_input(params, k, psi), auto_k, rtol=rtol, atol=atol, context=ctx)


def check_retention(retention, s_prev, G, lr, alpha=1.0, *, smooth=None, rtol=1e-5, atol=1e-8):
    """Check that `update(s_prev, -lr*G, alpha)` minimises `objective(s, s_prev, G, lr, alpha)` over s.

    s_prev: one stored parameter array (..., m, n) (keep it small: scipy optimizes all entries
    jointly); G: the gradient at the exposed weights, same shape; lr > 0 and alpha in (0, 1] numbers.
    Smooth objectives are minimised numerically with scipy.optimize (BFGS with autodiff gradients,
    started away from the closed form); the two minimisers must agree, either as stored quantities or
    through `expose` (the stored quantity may be defined only up to an invariance, like the row
    constants of kl's logits), and the closed form must reach an objective value no worse than the
    numerical one.
    `smooth=False` declares a convex objective that is smooth plus a separable l1 term (None: the
    gate's `objective_is_smooth` attribute, True when absent); it is not differentiable where
    entries are zero, so the closed form is checked by the subgradient optimality conditions,
    entry by entry, instead.
    Raises AssertionError naming the gate and the first wrong entry.
    """
    s_prev, G = _f64(s_prev), _f64(G)
    if not lr > 0:
        raise ValueError(f"check_retention needs lr > 0 (the objective divides by it), got {lr}")
    ctx = _inputs(s_prev=s_prev, G=G, lr=lr, alpha=alpha)
    update = getattr(retention, "update", None)
    closed = _f64((update or (lambda *a: update_from_pieces(retention, *a)))(s_prev, -lr * G, alpha))
    if closed.shape != s_prev.shape:
        raise AssertionError(f"{retention!r}: update returned shape {closed.shape}, "
                             f"expected {s_prev.shape}{ctx}")
    if update is not None and hasattr(retention, "canonical") and hasattr(retention, "prox"):
        assert_close(f"{retention!r}: update(s_prev, U, alpha) vs prox(α·canonical(s_prev) + U), "
                     f"what the chunked scan computes per token", closed,
                     update_from_pieces(retention, s_prev, -lr * G, alpha), rtol=1e-12, atol=1e-14,
                     context=ctx)
    shape = s_prev.shape

    objective = getattr(retention, "objective", None)
    if objective is None or objective(s_prev, s_prev, G, lr, alpha) is None:
        raise AssertionError(f"{retention!r} has no objective to check its update against{ctx}")

    def f(s):
        return anp.sum(objective(s, s_prev, G, lr, alpha))

    scale = _objective_scale(s_prev, G, lr)
    if smooth is None:
        smooth = bool(getattr(retention, "objective_is_smooth", True))
    if not smooth:
        _check_subgradient(retention, f, closed, lr, scale, ctx)
        return
    value_and_grad = ad.value_and_grad(f)

    def fun(x):
        val, g = value_and_grad(x.reshape(shape))
        return float(val), np.asarray(g, dtype=np.float64).ravel()

    f_closed, g_closed = fun(closed.ravel())
    from scipy.optimize import minimize
    start = (s_prev + 0.1 * np.sign(G + 0.5) * (1.0 + np.abs(s_prev))).ravel()
    res = minimize(fun, start, jac=True, method="BFGS",
                   options={"gtol": 1e-11 * scale, "maxiter": 2000})
    if not np.all(np.isfinite(res.x)):
        raise AssertionError(f"{retention!r}: scipy.optimize diverged ({res.message}){ctx}")
    if f_closed > res.fun + 1e-9 * (1.0 + abs(res.fun)):
        raise AssertionError(
            f"{retention!r}: the closed-form update is not a minimiser of the objective: objective "
            f"{f_closed!r} at update(s_prev, -lr*G, alpha), {res.fun!r} at the scipy minimiser "
            f"(gradient norm at the update {np.linalg.norm(g_closed):.3e}){ctx}")
    numeric = res.x.reshape(shape)
    try:     # the same stored quantity: done (expose may amplify tiny differences, e.g. lq near A = 0)
        assert_close("", closed, numeric, rtol=rtol, atol=atol)
    except AssertionError:
        assert_close(f"{retention!r}: expose(update(s_prev, -lr*G, alpha)) vs expose(scipy argmin "
                     f"of objective)", retention.expose(closed), retention.expose(numeric),
                     rtol=rtol, atol=atol, context=ctx)


_GATE_VJPS = (("expose_vjp", "expose"), ("canonical_vjp", "canonical"), ("prox_vjp", "prox"),
              ("read_scale_vjp", "read_scale"))


def check_vjps(spec, *point, delta=None, rtol=1e-7, atol=1e-10, seed=0):
    """Check the VJPs a spec writes by hand against autodiff of the maps they differentiate,
    at `point` (float64) with random cotangents.

    A bias: point = (y, v), with `delta` for a bias without a static δ: `psi_vjp(y, v, delta,
    dpsi)` against autodiff of `psi`. A retention gate: point = (s,), one stored matrix: each of
    `expose_vjp(s, W, dW)`, `canonical_vjp(s, ds)`, `prox_vjp(s, ds)`, `read_scale_vjp(s, dnu)`
    and `anchor_vjp(s, W, dW, dnu)` the gate has. Keep the point off the maps' kinks (a soft
    threshold's ±γ). Raises AssertionError naming the spec and the method.
    """
    rng = np.random.default_rng(seed)
    point = tuple(_f64(x) for x in point)
    ctx = _inputs(**{f"point[{i}]": x for i, x in enumerate(point)}, delta=delta)
    delta = _f64(delta)
    if hasattr(spec, "psi"):
        y, v = point
        gate = delta is not None and np.ndim(delta) > 0
        args = (y, v, delta) if gate else (y, v)
        out, pull = ad.vjp(lambda *a: spec.psi(a[0], a[1], a[2] if gate else delta), *args)
        if hasattr(spec, "psi_vjp"):
            g = rng.standard_normal(np.shape(out))
            got = spec.psi_vjp(y, v, delta, g)
            for name, a, b in zip(("dy", "dv", "ddelta"), got, pull(g)):
                assert_close(f"{spec!r}: psi_vjp's {name} vs autodiff of psi", a, b, rtol=rtol,
                             atol=atol, context=ctx)
        return
    (s,) = point
    for method, source in _GATE_VJPS:
        if not hasattr(spec, method):
            continue
        out, pull = ad.vjp(getattr(spec, source), s)
        if out is None or isinstance(out, (int, float)):
            continue                                   # a constant: nothing to differentiate
        g = rng.standard_normal(np.shape(out))
        args = (s, out, g) if method == "expose_vjp" else (s, g)
        assert_close(f"{spec!r}: {method} vs autodiff of {source}", getattr(spec, method)(*args),
                     pull(g)[0], rtol=rtol, atol=atol, context=ctx)
    if hasattr(spec, "anchor_vjp"):
        W, nu = spec.expose(s), spec.read_scale(s)
        dW = rng.standard_normal(W.shape)
        dnu = None if nu is None or isinstance(nu, (int, float)) else rng.standard_normal(np.shape(nu))
        f = (lambda x: anp.sum(spec.expose(x) * dW)
             + (0.0 if dnu is None else anp.sum(spec.read_scale(x) * dnu)))
        assert_close(f"{spec!r}: anchor_vjp vs autodiff of expose and read_scale",
                     spec.anchor_vjp(s, W, dW, dnu), ad.grad(f)(s), rtol=rtol, atol=atol, context=ctx)


def _objective_scale(s_prev, G, lr):
    """The size of the objective's gradient terms: G and (s − s_prev)/lr."""
    return max(1.0, float(np.max(np.abs(G))), float(np.max(np.abs(s_prev))) / lr)


def _check_subgradient(retention, f, closed, lr, scale, ctx):
    """0 ∈ ∂f(closed) for a convex f that is smooth plus separable l1: coordinate by coordinate.

    Where an entry is nonzero f is differentiable in it and the central difference must vanish;
    where it is zero the one-sided derivatives must both be non-negative (0 lies in the
    subdifferential). For a piecewise quadratic f the central difference is exact up to rounding
    and a one-sided one is off by the curvature term (≤ h/lr for the 1/(2 lr) proximal term), which
    the tolerance allows for.
    """
    fv = lambda s: float(f(s))
    s = closed
    f0 = fv(s)
    h = 1e-6 * max(1.0, float(np.max(np.abs(s))))
    tol = 1e-6 * scale + h / lr
    flat = s.ravel()
    for j in range(flat.size):
        e = np.zeros_like(flat)
        e[j] = h
        up = (fv((flat + e).reshape(s.shape)) - f0) / h
        down = (fv((flat - e).reshape(s.shape)) - f0) / h
        where = tuple(int(i) for i in np.unravel_index(j, s.shape))
        if abs(flat[j]) > h:
            if abs(up - down) / 2 > tol:
                raise AssertionError(
                    f"{retention!r}: at entry {where} the update is nonzero ({float(flat[j])!r}) "
                    f"but the objective's derivative there is {(up - down) / 2:.3e}, not 0{ctx}")
        elif up < -tol or down < -tol:
            raise AssertionError(
                f"{retention!r}: at entry {where} the update is 0 but the objective decreases "
                f"moving it (one-sided derivatives {up:.3e} up, {down:.3e} down): 0 is not a "
                f"subgradient{ctx}")


def _dtype(x):
    return np.dtype(getattr(x, "dtype", np.float64))


# --------------------------------------------------------------------------------------------
# strategies (hypothesis is imported when one is called)


def _st():
    import hypothesis.strategies as st
    import hypothesis.extra.numpy as hnp
    return st, hnp


def arrays(shape, *, min_value=-2.0, max_value=2.0, dtype=np.float64):
    """Arrays of `shape` (a tuple or a strategy of tuples) with finite entries in [min_value, max_value].

    Subnormals are excluded (a GPU may flush them to zero); `dtype=np.float32` draws values exactly
    representable in float32.
    """
    st, hnp = _st()
    width = 32 if np.dtype(dtype) == np.float32 else 64
    elements = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False,
                         allow_subnormal=False, width=width)
    return hnp.arrays(dtype, shape, elements=elements)


def batch_shapes(*, max_dims=2, max_side=3):
    """Small batch shapes: () up to `max_dims` axes of sizes 1..max_side (size-1 axes included)."""
    _, hnp = _st()
    return hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=1, max_side=max_side)


def memory_params(memory, batch_shape=(), *, scale=1.0):
    """A tuple of parameter arrays for `memory` (shapes `batch_shape + memory.param_shapes()[i]`).

    Entries are in [-scale, scale]; `batch_shape` may be a tuple or a strategy of tuples.
    """
    st, _ = _st()

    @st.composite
    def draw_params(draw):
        batch = draw(batch_shape) if not isinstance(batch_shape, tuple) else batch_shape
        return tuple(draw(arrays(tuple(batch) + tuple(s), min_value=-scale, max_value=scale))
                     for s in memory.param_shapes())
    return draw_params()


def tokens(d, batch_shape=(), T=None, *, scale=1.0, normalize=False):
    """Token vectors (..., d), or sequences (..., T, d) when T is given (an int or a strategy of ints).

    `normalize=True` scales every token to unit l2 norm (as the Miras layer does for q and k);
    tokens that are exactly zero stay zero.
    """
    st, _ = _st()

    @st.composite
    def draw_tokens(draw):
        batch = draw(batch_shape) if not isinstance(batch_shape, tuple) else batch_shape
        length = () if T is None else (T if isinstance(T, int) else draw(T),)
        x = draw(arrays(tuple(batch) + length + (d,), min_value=-scale, max_value=scale))
        if normalize:
            n = np.linalg.norm(x, axis=-1, keepdims=True)
            x = np.where(n > 0, x / np.where(n > 0, n, 1.0), 0.0)
        return x
    return draw_tokens()


def _gate(shape, lo, hi, *, exclude_min=False, exclude_max=False):
    st, hnp = _st()
    elements = st.floats(lo, hi, exclude_min=exclude_min, exclude_max=exclude_max,
                         allow_nan=False, allow_subnormal=False)
    if shape is None:
        return elements
    return hnp.arrays(np.float64, shape, elements=elements)


def lrs(shape=None, *, min_value=0.0, max_value=1.0):
    """Learning rates lr >= 0: a float (shape None) or an array of `shape` (e.g. batch or (..., T))."""
    if min_value < 0:
        raise ValueError(f"lr must be >= 0, min_value={min_value}")
    return _gate(shape, min_value, max_value)


def alphas(shape=None, *, min_value=0.0):
    """Retention gates alpha in (0, 1] (with alpha > min_value): a float or an array of `shape`."""
    return _gate(shape, min_value, 1.0, exclude_min=True)


def betas(shape=None, *, max_value=1.0):
    """Momentum gates beta in [0, 1) (beta < max_value): a float or an array of `shape`."""
    return _gate(shape, 0.0, max_value, exclude_max=True)


def deltas(shape=None, *, min_value=0.0, max_value=4.0):
    """Huber thresholds delta > 0 (delta > min_value): a float or an array of `shape`."""
    return _gate(shape, min_value, max_value, exclude_min=True)


# --------------------------------------------------------------------------------------------
# seeded inputs of a whole scan

def scan_inputs(rule, batch_shape, T, seed=0, rng=None):
    """dict(params, K, V, Q, gates): float64 inputs of `mc.scan` for `rule` (a preset's Rule) over
    `T` tokens of `batch_shape`: K, Q with unit rows, V ~ N(0, 1); lr = sigmoid (linear memories:
    the delta rule's β) or 0.1·sigmoid, α = 0.9 + 0.1·sigmoid of N(0, 1), δ = 1 + softplus where the
    bias takes one, β = 0.9 with momentum; params = rule.memory.init(seed). Drawn in that order from
    `rng` (default: numpy's default_rng(seed)), so a caller can go on drawing from it."""
    rng = np.random.default_rng(seed) if rng is None else rng
    batch = tuple(batch_shape)

    def normal(*shape):
        return rng.standard_normal(batch + shape)
    d_in, d_out = rule.memory.d_in, rule.memory.d_out
    K, Q = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (normal(T, d_in), normal(T, d_in)))
    exact = isinstance(rule.memory, Linear)
    gates = dict(lr=(1.0 if exact else 0.1) * anp.sigmoid(normal(T)), alpha=0.9 + 0.1 * anp.sigmoid(normal(T)))
    if getattr(rule.bias, "needs_delta", False):
        gates["delta"] = 1 + np.logaddexp(0, normal(T))
    if rule.algorithm.uses_momentum:
        gates["beta"] = np.full(batch + (T,), 0.9)
    params = rule.memory.init(seed, batch_shape=batch, dtype=np.float64)
    return dict(params=params, K=K, V=normal(T, d_out), Q=Q, gates=gates)
