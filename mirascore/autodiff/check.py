"""check_grads: a float64 dot-product test of reverse-mode gradients, to any order."""
import numpy as np

from .._xp import namespace
from .core import is_differentiable, tree_leaves, tree_map, vjp


def _as_float64(x):
    if type(x) is float:
        return x
    if is_differentiable(x):
        return x.astype(namespace(x).float64)
    return x


def _random_like(rng):
    def draw(x):
        if x is None or not is_differentiable(x):
            return None
        r = rng.standard_normal(np.shape(x))
        return float(r) if type(x) is float else namespace(x).asarray(r)
    return draw


def _vdot(a, b):
    """Sum over the leaves of <a, b>, skipping None leaves."""
    total = 0.0
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        if x is not None and y is not None:
            total += float(namespace(x, y).sum(namespace(x, y).asarray(x) * y))
    return total


def _axpy(eps, u, x):
    return tree_map(lambda ui, xi: xi if ui is None else xi + eps * ui, u, x)


def _check(f, args, order, name, eps, rtol, atol, rng):
    value, vjp_fn = vjp(f, *args)
    w = tree_map(_random_like(rng), value)
    grads = vjp_fn(w)
    for i, (a, ga) in enumerate(zip(args, grads)):
        for x, gx in zip(tree_leaves(a), tree_leaves(ga)):
            # the dot test alone would pass a gradient left broadcast to the output's shape
            if gx is not None and np.shape(gx) != np.shape(x):
                raise AssertionError(f"{name}: gradient with respect to argument {i} has shape "
                                     f"{np.shape(gx)}, the argument has shape {np.shape(x)}")
        u = tree_map(_random_like(rng), a)
        if not any(x is not None for x in tree_leaves(u)):
            continue
        plus = list(args)
        minus = list(args)
        plus[i], minus[i] = _axpy(eps, u, a), _axpy(-eps, u, a)
        f_plus, f_minus = f(*plus), f(*minus)
        numeric = (_vdot(w, f_plus) - _vdot(w, f_minus)) / (2 * eps)
        analytic = _vdot(ga, u)
        scale = abs(_vdot(tree_map(lambda x: None if x is None else abs(x), w),
                          tree_map(lambda x: None if x is None else abs(x), value)))
        if not abs(analytic - numeric) <= rtol * (abs(analytic) + abs(numeric)) + atol * (1 + scale):
            raise AssertionError(
                f"{name}: gradient with respect to argument {i} is wrong: "
                f"<u, J^T w> = {analytic!r} but finite differences give {numeric!r}")
    if order > 1:
        def vjp_of_f(*args_and_w):
            return vjp(f, *args_and_w[:-1])[1](args_and_w[-1])
        _check(vjp_of_f, tuple(args) + (w,), order - 1, f"VJP of {name}", eps, rtol, atol, rng)


def check_grads(f, *args, order=2, eps=1e-6, rtol=1e-5, atol=1e-8, seed=0):
    """Check f's reverse-mode gradients (and, with order=2, those of its VJP) numerically.

    For random directions u (per argument) and w (over the output), compares <u, Jᵀw> from
    `vjp` with <w, (f(x+εu) − f(x−εu))/2ε>. Floating-point arguments are cast to float64; integer
    and boolean arguments are constants. Raises AssertionError naming the argument whose gradient
    is wrong. Works on numpy and CuPy arrays, and on nested tuples/lists/dicts of them.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order!r}")
    args = tuple(tree_map(_as_float64, a) for a in args)
    rng = np.random.default_rng(seed)
    _check(f, args, order, getattr(f, "__name__", "f"), eps, rtol, atol, rng)
