"""Differentiable numpy-named operations over numpy or CuPy arrays.

Each operation picks its array module from its arguments (never copying between host and
device), is a `primitive`, and has its VJP registered right below it. The VJPs are written with
these same operations, so gradients of gradients work.
"""
import builtins

import numpy as np

from .._xp import cupy_namespace
from .tracer import Box, defvjp, defvjp_argnums, primitive, unbox


def _xp(*xs):
    """numpy, or mirascore's CuPy namespace (matmul capture-safe), from the first array in xs."""
    for x in xs:
        t = type(x)
        if t is np.ndarray:
            return np
        if t.__module__.startswith("cupy"):
            return cupy_namespace()
    return np


def _shape(x):
    return getattr(x, "shape", ())


def _axes(axis, ndim):
    """axis (None, int or tuple) as a sorted tuple of non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(sorted(a % ndim for a in axis))


def unbroadcast(g, shape):
    """Sum g down to `shape`, undoing numpy broadcasting (the VJP of every broadcasting op)."""
    gshape = _shape(g)
    if gshape == tuple(shape):
        return g
    lead = len(gshape) - len(shape)
    if lead:
        g = sum(g, axis=tuple(range(lead)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and _shape(g)[i] != 1)
    if axes:
        g = sum(g, axis=axes, keepdims=True)
    return g


# ---------------------------------------------------------------- elementwise, one argument

def _unary(name):
    def raw(x):
        return getattr(_xp(x), name)(x)
    raw.__name__ = name
    return primitive(raw)


negative = _unary("negative")
exp = _unary("exp")
log = _unary("log")
log1p = _unary("log1p")
tanh = _unary("tanh")
sqrt = _unary("sqrt")
abs = _unary("abs")
sign = _unary("sign")
square = _unary("square")

defvjp(negative, lambda ans, x: lambda g: -g)
defvjp(exp, lambda ans, x: lambda g: g * ans)
defvjp(log, lambda ans, x: lambda g: g / x)
defvjp(log1p, lambda ans, x: lambda g: g / (1.0 + x))
defvjp(tanh, lambda ans, x: lambda g: g * (1.0 - ans * ans))
defvjp(sqrt, lambda ans, x: lambda g: g / (2.0 * ans))
defvjp(abs, lambda ans, x: lambda g: g * sign(x))
defvjp(sign, None)                      # zero almost everywhere
defvjp(square, lambda ans, x: lambda g: g * (2.0 * x))


@primitive
def sigmoid(x):
    """Logistic function, computed without overflow for any sign of x."""
    xp = _xp(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


defvjp(sigmoid, lambda ans, x: lambda g: g * ans * (1.0 - ans))

_erf_impl = {}


@primitive
def erf(x):
    """Error function (numpy via scipy.special, CuPy via cupyx.scipy.special)."""
    xp = _xp(x)
    f = _erf_impl.get(xp)
    if f is None:
        if xp is np:
            from scipy.special import erf as f
        else:
            from cupyx.scipy.special import erf as f
        _erf_impl[xp] = f
    return f(x)


_TWO_OVER_SQRT_PI = float(2.0 / np.sqrt(np.pi))   # a Python float: a numpy scalar would promote float32
defvjp(erf, lambda ans, x: lambda g: g * _TWO_OVER_SQRT_PI * exp(-x * x))


# ---------------------------------------------------------------- elementwise, two arguments

@primitive
def add(x, y):
    return x + y


@primitive
def subtract(x, y):
    return x - y


@primitive
def multiply(x, y):
    return x * y


@primitive
def divide(x, y):
    return x / y


@primitive
def power(x, y):
    return x ** y


@primitive
def maximum(x, y):
    return _xp(x, y).maximum(x, y)


@primitive
def minimum(x, y):
    return _xp(x, y).minimum(x, y)


defvjp(add, lambda ans, x, y: lambda g: unbroadcast(g, _shape(x)),
            lambda ans, x, y: lambda g: unbroadcast(g, _shape(y)))
defvjp(subtract, lambda ans, x, y: lambda g: unbroadcast(g, _shape(x)),
                 lambda ans, x, y: lambda g: unbroadcast(-g, _shape(y)))
defvjp(multiply, lambda ans, x, y: lambda g: unbroadcast(g * y, _shape(x)),
                 lambda ans, x, y: lambda g: unbroadcast(g * x, _shape(y)))
defvjp(divide, lambda ans, x, y: lambda g: unbroadcast(g / y, _shape(x)),
               lambda ans, x, y: lambda g: unbroadcast(-g * x / (y * y), _shape(y)))


def _safe_log(x):
    if isinstance(x, (int, float, np.generic)):
        # a constant base such as 2.0 ** x: stay a Python float, which mixes with CuPy arrays
        # (the array path below would make a numpy array of it)
        return float(np.log(x)) if x > 0 else 0.0
    positive = unbox(x) > 0
    return where(positive, log(where(positive, x, 1.0)), 0.0)


defvjp(power, lambda ans, x, y: lambda g: unbroadcast(g * y * x ** (y - 1.0), _shape(x)),
              lambda ans, x, y: lambda g: unbroadcast(g * ans * _safe_log(x), _shape(y)))
# ties go to the first argument
defvjp(maximum, lambda ans, x, y: lambda g: unbroadcast(g * (unbox(x) >= unbox(y)), _shape(x)),
                lambda ans, x, y: lambda g: unbroadcast(g * (unbox(x) < unbox(y)), _shape(y)))
defvjp(minimum, lambda ans, x, y: lambda g: unbroadcast(g * (unbox(x) <= unbox(y)), _shape(x)),
                lambda ans, x, y: lambda g: unbroadcast(g * (unbox(x) > unbox(y)), _shape(y)))


@primitive
def where(condition, x, y):
    """Elementwise choice; `condition` is a constant (boolean) array."""
    return _xp(condition, x, y).where(condition, x, y)


defvjp(where, None,
       lambda ans, c, x, y: lambda g: unbroadcast(where(c, g, 0.0), _shape(x)),
       lambda ans, c, x, y: lambda g: unbroadcast(where(c, 0.0, g), _shape(y)))


@primitive
def clip(x, lo, hi):
    """Clip to [lo, hi] (either may be None); the bounds are constants."""
    return _xp(x).clip(x, lo, hi)


def _clip_mask(x, lo, hi):
    x = unbox(x)
    xp = _xp(x)
    mask = xp.ones(_shape(x), dtype=bool)
    if lo is not None:
        mask &= x >= unbox(lo)
    if hi is not None:
        mask &= x <= unbox(hi)
    return mask


defvjp(clip, lambda ans, x, lo, hi: (lambda m: lambda g: g * m)(_clip_mask(x, lo, hi)), None, None)


# ---------------------------------------------------------------- linear algebra

@primitive
def matmul(x, y):
    return _xp(x, y).matmul(x, y)


def _matmul_vjp_x(ans, x, y):
    xs, ys = _shape(x), _shape(y)
    if len(ys) == 1:                       # (..., k) @ (k,) -> (...)
        return lambda g: unbroadcast(expand_dims(g, -1) * y, xs)
    if len(xs) == 1:                       # (k,) @ (..., k, m) -> (..., m)
        return lambda g: unbroadcast(matmul(y, expand_dims(g, -1))[..., 0], xs)
    return lambda g: unbroadcast(matmul(g, swapaxes(y, -1, -2)), xs)


def _matmul_vjp_y(ans, x, y):
    xs, ys = _shape(x), _shape(y)
    if len(ys) == 1:
        return lambda g: unbroadcast(expand_dims(g, -1) * x, ys)
    if len(xs) == 1:
        return lambda g: unbroadcast(expand_dims(x, -1) * expand_dims(g, -2), ys)
    return lambda g: unbroadcast(matmul(swapaxes(x, -1, -2), g), ys)


defvjp(matmul, _matmul_vjp_x, _matmul_vjp_y)


@primitive
def einsum(subscripts, *operands):
    return _xp(*operands).einsum(subscripts, *operands)


def _einsum_parse(subscripts, shapes):
    """Explicit subscripts per operand and output, with '...' spelled out as letters."""
    s = subscripts.replace(" ", "")
    lhs, out = s.split("->") if "->" in s else (s, None)
    ins = lhs.split(",")
    if "..." in s:
        free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in s]
        nell = builtins.max(len(sh) - (len(i) - 3) for i, sh in zip(ins, shapes) if "..." in i)
        ell = "".join(free[:nell])
        ins = [i.replace("...", ell[nell - (len(sh) - (len(i) - 3)):]) if "..." in i else i
               for i, sh in zip(ins, shapes)]
        out = None if out is None else out.replace("...", ell)
    if out is None:
        letters = "".join(ins)
        lead = ell if "..." in s else ""
        out = lead + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in lead))
    return ins, out


def _einsum_vjp(argnums, ans, args, kwargs):
    subscripts, operands = args[0], args[1:]
    ins, out = _einsum_parse(subscripts, [_shape(o) for o in operands])
    for i in ins:
        if len(set(i)) != len(i):
            raise NotImplementedError(f"einsum VJP with a repeated index in one operand ({subscripts!r})")

    def grad_operand(g, j):
        others = [k for k in range(len(operands)) if k != j]
        seen = set(out).union(*(ins[k] for k in others))
        keep = "".join(c for c in ins[j] if c in seen)
        spec = ",".join([out] + [ins[k] for k in others]) + "->" + keep
        gj = einsum(spec, g, *(operands[k] for k in others))
        shape = _shape(operands[j])
        if keep != ins[j]:                 # indices summed out of operand j alone: broadcast back
            sizes = dict(zip(keep, _shape(gj)))   # gj's sizes, which may exceed a broadcast '...' of operand j
            gj = reshape(gj, tuple(sizes.get(c, 1) for c in ins[j]))
            gj = broadcast_to(gj, tuple(sizes.get(c, n) for c, n in zip(ins[j], shape)))
        return unbroadcast(gj, shape)

    return lambda g: tuple(None if a == 0 else grad_operand(g, a - 1) for a in argnums)


defvjp_argnums(einsum, _einsum_vjp)


# ---------------------------------------------------------------- reductions

@primitive
def sum(x, axis=None, keepdims=False):
    return _xp(x).sum(x, axis=axis, keepdims=keepdims)


@primitive
def mean(x, axis=None, keepdims=False):
    return _xp(x).mean(x, axis=axis, keepdims=keepdims)


@primitive
def max(x, axis=None, keepdims=False):
    return _xp(x).max(x, axis=axis, keepdims=keepdims)


def _keep(g, xs, axis, keepdims):
    """g of a reduction, reshaped so that it broadcasts against the input."""
    if keepdims:
        return g
    axes = _axes(axis, len(xs))
    return reshape(g, tuple(1 if i in axes else n for i, n in enumerate(xs)))


def _count(xs, axis):
    return int(np.prod([xs[a] for a in _axes(axis, len(xs))], dtype=np.int64))


defvjp(sum, lambda ans, x, axis=None, keepdims=False:
       lambda g: broadcast_to(_keep(g, _shape(x), axis, keepdims), _shape(x)))
defvjp(mean, lambda ans, x, axis=None, keepdims=False:
       lambda g: broadcast_to(_keep(g, _shape(x), axis, keepdims), _shape(x)) / _count(_shape(x), axis))


def _max_vjp(ans, x, axis=None, keepdims=False):
    xs = _shape(x)
    hit = unbox(x) == unbox(_keep(ans, xs, axis, keepdims))
    share = (hit / hit.sum(axis=axis, keepdims=True)).astype(unbox(x).dtype)   # ties share it
    return lambda g: _keep(g, xs, axis, keepdims) * share


defvjp(max, _max_vjp)


@primitive
def cumsum(x, axis):
    return _xp(x).cumsum(x, axis=axis)


def _cumsum_vjp(ans, x, axis):
    # the transpose of a cumulative sum is the cumulative sum from the other end
    if axis is None:                       # numpy flattens x first: unflatten the gradient
        return lambda g: reshape(sum(g, keepdims=True) - cumsum(g, 0) + g, _shape(x))
    return lambda g: sum(g, axis=axis, keepdims=True) - cumsum(g, axis) + g


defvjp(cumsum, _cumsum_vjp)


@primitive
def logsumexp(x, axis=None, keepdims=False):
    """log(sum(exp(x))) over `axis`, shifted by the maximum so it never overflows."""
    xp = _xp(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else xp.squeeze(out, axis=_axes(axis, x.ndim))


defvjp(logsumexp, lambda ans, x, axis=None, keepdims=False:
       lambda g: _keep(g, _shape(x), axis, keepdims) * exp(x - _keep(ans, _shape(x), axis, keepdims)))


@primitive
def log_softmax(x, axis=-1):
    return x - logsumexp.__wrapped__(x, axis=axis, keepdims=True)


@primitive
def softmax(x, axis=-1):
    return _xp(x).exp(log_softmax.__wrapped__(x, axis=axis))


defvjp(log_softmax, lambda ans, x, axis=-1: lambda g: g - exp(ans) * sum(g, axis=axis, keepdims=True))
defvjp(softmax, lambda ans, x, axis=-1: lambda g: ans * (g - sum(g * ans, axis=axis, keepdims=True)))


# ---------------------------------------------------------------- shapes

@primitive
def reshape(x, shape):
    return _xp(x).reshape(x, shape)


@primitive
def transpose(x, axes=None):
    return _xp(x).transpose(x, axes)


@primitive
def swapaxes(x, axis1, axis2):
    return _xp(x).swapaxes(x, axis1, axis2)


@primitive
def broadcast_to(x, shape):
    return _xp(x).broadcast_to(x, shape)


@primitive
def expand_dims(x, axis):
    return _xp(x).expand_dims(x, axis)


@primitive
def squeeze(x, axis=None):
    return _xp(x).squeeze(x, axis=axis)


defvjp(reshape, lambda ans, x, shape: lambda g: reshape(g, _shape(x)))
defvjp(transpose, lambda ans, x, axes=None: lambda g: transpose(
    g, None if axes is None else tuple(np.argsort([a % len(_shape(x)) for a in axes]))))
defvjp(swapaxes, lambda ans, x, axis1, axis2: lambda g: swapaxes(g, axis1, axis2))
defvjp(broadcast_to, lambda ans, x, shape: lambda g: unbroadcast(g, _shape(x)))
defvjp(expand_dims, lambda ans, x, axis: lambda g: reshape(g, _shape(x)))
defvjp(squeeze, lambda ans, x, axis=None: lambda g: reshape(g, _shape(x)))


def _is_fancy(index):
    index = index if isinstance(index, tuple) else (index,)
    return any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index)


@primitive
def getitem(x, index):
    return x[index]


@primitive
def untake(g, index, shape):
    """Scatter g into zeros of `shape` at `index`, adding where an index repeats."""
    xp = _xp(g)
    out = xp.zeros(shape, dtype=g.dtype)
    if not _is_fancy(index):
        out[index] = g
    elif hasattr(xp.add, "at"):            # numpy, and CuPy >= 13 (where scatter_add is deprecated)
        xp.add.at(out, index, g)
    else:
        import cupyx
        cupyx.scatter_add(out, index, g)
    return out


defvjp(getitem, lambda ans, x, index: lambda g: untake(g, index, _shape(x)))
defvjp(untake, lambda ans, g, index, shape: lambda h: getitem(h, index))


def take(x, indices, axis=0):
    """x[..., indices, ...] along `axis` (integer array indices, e.g. an embedding lookup)."""
    axis = axis % len(_shape(x))
    return getitem(x, (slice(None),) * axis + (indices,))


@primitive
def _concatenate(axis, *arrays):
    return _xp(*arrays).concatenate(arrays, axis=axis)


def _concatenate_vjp(argnums, ans, args, kwargs):
    axis, arrays = args[0], args[1:]
    axis = axis % len(_shape(ans))
    bounds = np.cumsum([0] + [_shape(a)[axis] for a in arrays])
    lead = (slice(None),) * axis
    return lambda g: tuple(None if i == 0 else g[lead + (slice(bounds[i - 1], bounds[i]),)]
                           for i in argnums)


defvjp_argnums(_concatenate, _concatenate_vjp)


def concatenate(arrays, axis=0):
    return _concatenate(axis, *arrays)


@primitive
def _stack(axis, *arrays):
    return _xp(*arrays).stack(arrays, axis=axis)


def _stack_vjp(argnums, ans, args, kwargs):
    axis = args[0] % len(_shape(ans))
    lead = (slice(None),) * axis
    return lambda g: tuple(None if i == 0 else g[lead + (i - 1,)] for i in argnums)


defvjp_argnums(_stack, _stack_vjp)


def stack(arrays, axis=0):
    return _stack(axis, *arrays)


@primitive
def astype(x, dtype):
    """x cast to `dtype`; the gradient is cast back to x's dtype."""
    return x.astype(dtype, copy=False)


defvjp(astype, lambda ans, x, dtype: lambda g: astype(g, unbox(x).dtype))


# ---------------------------------------------------------------- constants

def stop_gradient(x):
    """x as a constant: no gradient flows through it, at any order."""
    return unbox(x)


def zeros_like(x, dtype=None):
    x = unbox(x)
    return _xp(x).zeros_like(x, dtype=dtype)


def ones_like(x, dtype=None):
    x = unbox(x)
    return _xp(x).ones_like(x, dtype=dtype)


# ---------------------------------------------------------------- operators on boxes

def _compare(op):
    return lambda self, other: op(unbox(self), unbox(other))


Box.__add__ = lambda a, b: add(a, b)
Box.__radd__ = lambda a, b: add(b, a)
Box.__sub__ = lambda a, b: subtract(a, b)
Box.__rsub__ = lambda a, b: subtract(b, a)
Box.__mul__ = lambda a, b: multiply(a, b)
Box.__rmul__ = lambda a, b: multiply(b, a)
Box.__truediv__ = lambda a, b: divide(a, b)
Box.__rtruediv__ = lambda a, b: divide(b, a)
Box.__pow__ = lambda a, b: power(a, b)
Box.__rpow__ = lambda a, b: power(b, a)
Box.__matmul__ = lambda a, b: matmul(a, b)
Box.__rmatmul__ = lambda a, b: matmul(b, a)
Box.__neg__ = lambda a: negative(a)
Box.__pos__ = lambda a: a
Box.__abs__ = lambda a: abs(a)
Box.__getitem__ = lambda a, index: getitem(a, index)
Box.__lt__ = _compare(lambda a, b: a < b)
Box.__le__ = _compare(lambda a, b: a <= b)
Box.__gt__ = _compare(lambda a, b: a > b)
Box.__ge__ = _compare(lambda a, b: a >= b)
Box.__eq__ = _compare(lambda a, b: a == b)
Box.__ne__ = _compare(lambda a, b: a != b)
Box.__hash__ = object.__hash__
Box.T = property(lambda a: transpose(a))
Box.reshape = lambda a, *shape: reshape(a, shape[0] if len(shape) == 1 else shape)
Box.sum = lambda a, axis=None, keepdims=False: sum(a, axis, keepdims)
Box.mean = lambda a, axis=None, keepdims=False: mean(a, axis, keepdims)
Box.max = lambda a, axis=None, keepdims=False: max(a, axis, keepdims)
Box.transpose = lambda a, *axes: transpose(a, axes[0] if len(axes) == 1 else (axes or None))
Box.swapaxes = lambda a, i, j: swapaxes(a, i, j)
