"""Every operation of mirascore.autodiff.numpy, checked to second order (autograd's test_systematic).

Each row of `OPS` is an operation and a hypothesis strategy for its inputs: float64 arrays of
small shapes (size-1 axes and broadcasting pairs included), kept inside the operation's domain
and away from its kinks. The same rows run on numpy and, under `pytest -m gpu`, on CuPy (with
fewer examples), and once more in float32 to check that gradients keep the input's dtype.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

import mirascore.autodiff as ad
import mirascore.autodiff.numpy as anp

# ------------------------------------------------------------------------------ strategies

MARGIN = 0.05        # distance from a kink; far larger than check_grads' step (1e-6)
MAX_SIDE = 4


def shapes(min_dims=0, max_dims=3):
    return npst.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=MAX_SIDE)


@st.composite
def shape_tuples(draw, n=2, min_dims=0, max_dims=3):
    """n shapes that broadcast together: a common shape with leading axes dropped and sides set
    to 1 independently per shape (hypothesis's mutually_broadcastable_shapes rarely pits a
    size-1 side against a larger one, which is where unbroadcast bugs live)."""
    full = draw(shapes(min_dims, max_dims))
    out = []
    for _ in range(n):
        kept = full[draw(st.integers(0, len(full) - min_dims)):]
        out.append(tuple(1 if draw(st.booleans()) else side for side in kept))
    return tuple(out)


def floats(lo=-2.0, hi=2.0, away=()):
    """Finite, normal floats in [lo, hi], at least MARGIN from every point in `away`."""
    s = st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    return s.filter(lambda v: all(abs(v - a) > MARGIN for a in away)) if away else s


def arrays(shape, lo=-2.0, hi=2.0, away=()):
    return npst.arrays(np.float64, shape, elements=floats(lo, hi, away))


def grid(shape, offset=0.0, unique=False):
    """Values on the grid offset + 0.2·k (two grids with offsets 0 and 0.1 never meet); with
    unique=True all values differ, so a maximum has no ties."""
    k = 50 if unique else 12
    return npst.arrays(np.float64, shape, unique=unique,
                       elements=st.integers(-k, k).map(lambda k: offset + 0.2 * k))


def axes(ndim, allow_none=True):
    """An axis argument: None, one axis (maybe negative) or a tuple of distinct axes."""
    options = [st.integers(-ndim, ndim - 1)] if ndim else []
    if ndim:
        options.append(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True)
                       .map(tuple))
    if allow_none or not ndim:
        options.append(st.none())
    return st.one_of(*options)


def case(*args, **kwargs):
    """A strategy for (args, kwargs) from strategies for each."""
    return st.tuples(st.tuples(*args), st.fixed_dictionaries(kwargs))


def unary(lo=-2.0, hi=2.0, away=()):
    return case(shapes().flatmap(lambda s: arrays(s, lo, hi, away)))


@st.composite
def binary(draw, y_lo=-2.0, y_hi=2.0, y_away=(), x_lo=-2.0, x_hi=2.0):
    sx, sy = draw(shape_tuples(2))
    return (draw(arrays(sx, x_lo, x_hi)), draw(arrays(sy, y_lo, y_hi, y_away))), {}


@st.composite
def kinked_pair(draw):
    """x and y on interleaved grids, so x != y everywhere (maximum, minimum)."""
    sx, sy = draw(shape_tuples(2))
    return (draw(grid(sx)), draw(grid(sy, offset=0.1))), {}


@st.composite
def reduction(draw, keepdims=True, unique=False):
    shape = draw(shapes())
    x = draw(grid(shape, unique=True) if unique else arrays(shape))
    kw = {"axis": draw(axes(len(shape)))}
    if keepdims:
        kw["keepdims"] = draw(st.booleans())
    return (x,), kw


@st.composite
def along_axis(draw, allow_none=False):
    shape = draw(shapes(min_dims=1))
    axis = st.integers(-len(shape), len(shape) - 1)
    return (draw(arrays(shape)),), {"axis": draw(axis | st.none() if allow_none else axis)}


@st.composite
def where_case(draw):
    sc, sx, sy = draw(shape_tuples(3))
    return (draw(npst.arrays(np.bool_, sc)), draw(arrays(sx)), draw(arrays(sy))), {}


@st.composite
def clip_case(draw):
    lo, hi = draw(st.sampled_from([(-0.5, 0.5), (None, 0.5), (-0.5, None), (0.0, 1.0)]))
    away = tuple(b for b in (lo, hi) if b is not None)
    return (draw(shapes().flatmap(lambda s: arrays(s, away=away))),), {"lo": lo, "hi": hi}


@st.composite
def matmul_case(draw):
    """vector·vector, vector·stack, stack·vector and broadcast stacks of matrices."""
    n, k, m = draw(st.tuples(*[st.integers(1, MAX_SIDE)] * 3))
    bx, by = draw(shape_tuples(2, max_dims=2))
    kind = draw(st.sampled_from(["vv", "vm", "mv", "mm"]))
    sx = (k,) if kind[0] == "v" else bx + (n, k)
    sy = (k,) if kind[1] == "v" else by + (k, m)
    return (draw(arrays(sx)), draw(arrays(sy))), {}


EINSUM_SPECS = ["ij,jk->ik", "ij,jk", "i,i->", "i,j->ij", "ij->", "ij->ji", "ij->j", "ij,j->",
                "bij,bjk->bik", "ij,jk,kl->il"]
EINSUM_ELLIPSIS_SPECS = ["...ij,...jk->...ik", "...ij,...j->...", "...i,...i->...i", "...i->...",
                         "...ij,...jk"]


@st.composite
def einsum_case(draw, specs=EINSUM_SPECS):
    """Operands for one of `specs`; '...' stands for batch shapes that broadcast together."""
    spec = draw(st.sampled_from(specs))
    ins = spec.split("->")[0].split(",")
    size = {c: draw(st.integers(1, MAX_SIDE)) for c in sorted(set(spec) - set(",->."))}
    batch = draw(shape_tuples(len(ins), max_dims=2))
    operands = []
    for i, b in zip(ins, batch):
        lead = b if i.startswith("...") else ()
        operands.append(draw(arrays(lead + tuple(size[c] for c in i.replace("...", "")))))
    return (spec,) + tuple(operands), {}


@st.composite
def reshape_case(draw):
    shape = draw(shapes())
    size = int(np.prod(shape))
    target = draw(st.sampled_from([shape[::-1], (-1,), (1, size), (size, 1, 1), ()] if size == 1
                                  else [shape[::-1], (-1,), (1, size), (size, 1, 1)]))
    return (draw(arrays(shape)),), {"shape": target}


@st.composite
def transpose_case(draw):
    shape = draw(shapes())
    perm = draw(st.none() | st.permutations(range(len(shape))).map(tuple))
    if perm is not None and draw(st.booleans()):
        perm = tuple(p - len(shape) for p in perm)          # negative axes too
    return (draw(arrays(shape)),), {"axes": perm}


@st.composite
def swapaxes_case(draw):
    shape = draw(shapes(min_dims=1))
    a = st.integers(-len(shape), len(shape) - 1)
    return (draw(arrays(shape)),), {"axis1": draw(a), "axis2": draw(a)}


@st.composite
def broadcast_to_case(draw):
    """x's shape is the target's with some leading axes dropped and some sides set to 1."""
    target = draw(shapes())
    shape = tuple(1 if draw(st.booleans()) else n for n in target[draw(st.integers(0, len(target))):])
    return (draw(arrays(shape)),), {"shape": target}


@st.composite
def expand_dims_case(draw):
    shape = draw(shapes())
    return (draw(arrays(shape)),), {"axis": draw(st.integers(-len(shape) - 1, len(shape)))}


@st.composite
def squeeze_case(draw):
    shape = list(draw(shapes(max_dims=2)))
    for _ in range(draw(st.integers(1, 2))):
        shape.insert(draw(st.integers(0, len(shape))), 1)
    ones = [i for i, n in enumerate(shape) if n == 1]
    axis = draw(st.none() | st.sampled_from(ones) | st.sampled_from(ones).map(lambda i: (i,)))
    return (draw(arrays(tuple(shape))),), {"axis": axis}


@st.composite
def basic_index_case(draw):
    shape = draw(shapes(min_dims=2))
    index = draw(npst.basic_indices(shape, allow_newaxis=True))
    return (draw(arrays(shape)),), {"index": index}


@st.composite
def slice_case(draw):
    shape = draw(shapes(min_dims=1, max_dims=1))
    return (draw(arrays(shape)),), {"index": draw(st.slices(shape[0]))}


@st.composite
def integer_index_case(draw):
    """Integer index arrays, repeats and negative indices included (gradients must add up)."""
    shape = draw(shapes(min_dims=1))
    index = draw(npst.integer_array_indices(shape, result_shape=shapes(min_dims=1, max_dims=2)))
    return (draw(arrays(shape)),), {"index": index}


@st.composite
def mask_index_case(draw):
    shape = draw(shapes(min_dims=1))
    return (draw(arrays(shape)),), {"index": draw(npst.arrays(np.bool_, shape))}


@st.composite
def take_case(draw):
    shape = draw(shapes(min_dims=1))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    indices = draw(npst.arrays(np.int64, draw(shapes(min_dims=1, max_dims=2)), elements=st.integers(-n, n - 1)))
    return (draw(arrays(shape)),), {"indices": indices, "axis": axis}


@st.composite
def untake_case(draw):
    (x,), kw = draw(integer_index_case() | basic_index_case())
    g = draw(arrays(x[kw["index"]].shape))
    return (g,), {"index": kw["index"], "shape": x.shape}


@st.composite
def concatenate_case(draw):
    shape = list(draw(shapes(min_dims=1)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    xs = []
    for _ in range(draw(st.integers(1, 3))):
        shape[axis] = draw(st.integers(1, MAX_SIDE))
        xs.append(draw(arrays(tuple(shape))))
    return tuple(xs), {"axis": axis}


@st.composite
def stack_case(draw):
    shape = draw(shapes())
    axis = draw(st.integers(-len(shape) - 1, len(shape)))
    return tuple(draw(arrays(shape)) for _ in range(draw(st.integers(1, 3)))), {"axis": axis}


@st.composite
def constant_left_case(draw, lo=-2.0, hi=2.0, c_away=()):
    """x (differentiated) and a raw constant array c (a keyword, so it is never boxed)."""
    sx, sc = draw(shape_tuples(2))
    return (draw(arrays(sx, lo, hi)),), {"c": draw(arrays(sc, away=c_away))}


# ------------------------------------------------------------------------------ the table

OPS = {
    # elementwise, one argument
    "negative": (anp.negative, unary()),
    "exp": (anp.exp, unary()),
    "log": (anp.log, unary(0.2, 3.0)),
    "log1p": (anp.log1p, unary(-0.8, 3.0)),
    "tanh": (anp.tanh, unary(-3.0, 3.0)),
    "sqrt": (anp.sqrt, unary(0.2, 3.0)),
    "abs": (anp.abs, unary(away=(0.0,))),
    "sign": (anp.sign, unary(away=(0.0,))),
    "square": (anp.square, unary()),
    "sigmoid": (anp.sigmoid, unary(-6.0, 6.0)),
    "erf": (anp.erf, unary(-3.0, 3.0)),
    # elementwise, two arguments (broadcasting pairs)
    "add": (anp.add, binary()),
    "subtract": (anp.subtract, binary()),
    "multiply": (anp.multiply, binary()),
    "divide": (anp.divide, binary(y_away=(0.0,), y_lo=-2.0, y_hi=2.0).filter(
        lambda c: np.all(np.abs(c[0][1]) > 0.3))),
    "power": (anp.power, binary(x_lo=0.2, x_hi=2.0, y_lo=-2.0, y_hi=2.0)),
    "maximum": (anp.maximum, kinked_pair()),
    "minimum": (anp.minimum, kinked_pair()),
    "where": (anp.where, where_case()),
    "clip": (anp.clip, clip_case()),
    # linear algebra
    "matmul": (anp.matmul, matmul_case()),
    "einsum": (anp.einsum, einsum_case()),
    "einsum_ellipsis": (anp.einsum, einsum_case(EINSUM_ELLIPSIS_SPECS)),
    # reductions
    "sum": (anp.sum, reduction()),
    "mean": (anp.mean, reduction()),
    "max": (anp.max, reduction(unique=True)),
    "cumsum": (anp.cumsum, along_axis(allow_none=True)),     # None: numpy flattens
    "logsumexp": (anp.logsumexp, reduction()),
    "log_softmax": (anp.log_softmax, along_axis()),
    "softmax": (anp.softmax, along_axis()),
    # shapes
    "reshape": (anp.reshape, reshape_case()),
    "transpose": (anp.transpose, transpose_case()),
    "swapaxes": (anp.swapaxes, swapaxes_case()),
    "broadcast_to": (anp.broadcast_to, broadcast_to_case()),
    "expand_dims": (anp.expand_dims, expand_dims_case()),
    "squeeze": (anp.squeeze, squeeze_case()),
    "getitem_basic": (anp.getitem, basic_index_case()),
    "getitem_slice": (anp.getitem, slice_case()),
    "getitem_integer_arrays": (anp.getitem, integer_index_case()),
    "getitem_mask": (anp.getitem, mask_index_case()),
    "take": (anp.take, take_case()),
    "untake": (anp.untake, untake_case()),
    "concatenate": (lambda *xs, axis: anp.concatenate(xs, axis=axis), concatenate_case()),
    "stack": (lambda *xs, axis: anp.stack(list(xs), axis=axis), stack_case()),
    # casts: up to float64 and back to the input's dtype (float32 in the float32 test)
    "astype": (lambda x: anp.astype(anp.astype(x, np.float64) * 1.5, x.dtype), unary()),
    # the Box operators, methods and properties
    "box_add": (lambda x, y: x + y, binary()),
    "box_sub": (lambda x, y: x - y, binary()),
    "box_mul": (lambda x, y: x * y, binary()),
    "box_truediv": (lambda x, y: x / y, binary(y_lo=0.3, y_hi=2.0)),
    "box_pow": (lambda x, y: x ** y, binary(x_lo=0.2, x_hi=2.0)),
    "box_pow_int": (lambda x: x ** 3, unary()),
    "box_matmul": (lambda x, y: x @ y, matmul_case()),
    "box_neg": (lambda x: -x, unary()),
    "box_pos_abs": (lambda x: abs(+x), unary(away=(0.0,))),
    "box_radd": (lambda x, c: c + x, constant_left_case()),
    "box_rsub": (lambda x, c: c - x, constant_left_case()),
    "box_rmul": (lambda x, c: c * x, constant_left_case()),
    "box_rtruediv": (lambda x, c: c / x, constant_left_case(lo=0.3)),
    "box_rpow": (lambda x, c: c ** x, constant_left_case().map(lambda a: (a[0], {"c": np.abs(a[1]["c"]) + np.float64(0.2)}))),
    "box_rpow_float": (lambda x: 2.0 ** x - np.float32(1.5) ** x, unary()),
    "box_rmatmul": (lambda x, c: c @ x, case(arrays((3, 2)), c=arrays((4, 3)))),
    "box_float_ops": (lambda x: (2.0 - x) * 3.0 / (1.5 + x * x) - 0.5, unary()),
    "box_getitem": (lambda x, index: x[index], basic_index_case()),
    "box_getitem_integer_arrays": (lambda x, index: x[index], integer_index_case()),
    "box_T": (lambda x: x.T, unary()),
    "box_sum": (lambda x, axis: x.sum(axis), reduction(keepdims=False)),
    "box_sum_kw": (lambda x, axis, keepdims: x.sum(axis=axis, keepdims=keepdims), reduction()),
    "box_mean": (lambda x, axis, keepdims: x.mean(axis=axis, keepdims=keepdims), reduction()),
    "box_max": (lambda x, axis, keepdims: x.max(axis=axis, keepdims=keepdims), reduction(unique=True)),
    "box_reshape": (lambda x, shape: x.reshape(shape), reshape_case()),
    "box_reshape_star": (lambda x, shape: x.reshape(*shape) if shape else x.reshape(()), reshape_case()),
    "box_transpose": (lambda x, axes: x.transpose(axes) if axes is not None else x.transpose(),
                      transpose_case()),
    "box_swapaxes": (lambda x, axis1, axis2: x.swapaxes(axis1, axis2), swapaxes_case()),
    "box_iter": (lambda x: anp.stack([xi * xi for xi in x]), shapes(min_dims=1).flatmap(
        lambda s: case(arrays(s)))),
}


# ------------------------------------------------------------------------------ helpers

def to_xp(xp, tree):
    """Move every numpy array in nested args/kwargs (index tuples included) to `xp`."""
    if isinstance(tree, np.ndarray):
        return xp.asarray(tree)
    if isinstance(tree, tuple):
        return tuple(to_xp(xp, t) for t in tree)
    if isinstance(tree, list):
        return [to_xp(xp, t) for t in tree]
    if isinstance(tree, dict):
        return {k: to_xp(xp, v) for k, v in tree.items()}
    return tree


def as_float32(tree):
    if isinstance(tree, (np.ndarray, np.generic)) and tree.dtype == np.float64:
        return np.asarray(tree, dtype=np.float32)
    if isinstance(tree, (tuple, list)):
        return type(tree)(as_float32(t) for t in tree)
    if isinstance(tree, dict):
        return {k: as_float32(v) for k, v in tree.items()}
    return tree


def _library(x):
    return type(x).__module__.split(".")[0]      # "numpy" (arrays and scalars) or "cupy"


def examples(xp, n=None):
    """Settings for an inner @given: the profile's count on numpy, a few examples on CuPy."""
    if xp is not np:
        n = 3
    kw = {} if n is None else {"max_examples": n}
    return settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow], **kw)


def test_every_op_is_in_the_table():
    """A new differentiable op in autodiff.numpy must get a row here."""
    names = {n for n, v in vars(anp).items() if callable(v) and not n.startswith("_")
             and getattr(getattr(v, "__wrapped__", v), "__module__", None) == anp.__name__}
    untested = names - set(OPS) - {"getitem", "unbroadcast", "stop_gradient", "zeros_like", "ones_like"}
    assert not untested, f"ops without a systematic test: {sorted(untested)}"


# ------------------------------------------------------------------------------ the tests

@pytest.mark.parametrize("name", sorted(OPS))
def test_op_grads(name, xp):
    """check_grads(order=2): first and second reverse-mode derivatives vs central differences."""
    fun, strategy = OPS[name]

    @examples(xp)
    @given(strategy)
    def check(c):
        args, kwargs = to_xp(xp, c)
        ad.check_grads(lambda *a: fun(*a, **kwargs), *args, order=2)

    check()


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_float32(name, xp):
    """float32 in -> float32 value and float32 gradients, at first and second order."""
    fun, strategy = OPS[name]

    @examples(xp, n=5)
    @given(strategy)
    def check(c):
        args, kwargs = to_xp(xp, as_float32(c))

        def f(*a):
            return fun(*a, **kwargs)
        floats = [i for i, a in enumerate(args) if getattr(a, "dtype", None) == np.float32]
        value, vjp_fn = ad.vjp(f, *args)
        assert value.dtype == np.float32, value.dtype
        w = xp.ones_like(value)
        for i in floats:
            g = vjp_fn(w)[i]
            assert _library(g) == _library(args[i]), (type(g), type(args[i]))   # no host<->device copy
            assert g.dtype == np.float32, f"gradient of argument {i} is {g.dtype}"
            assert g.shape == args[i].shape, (g.shape, args[i].shape)

        def vjp_of_f(*a):                     # second order: differentiate the VJP itself
            return anp.sum(ad.vjp(f, *a)[1](w)[floats[0]] ** 2)
        for i, g2 in enumerate(ad.grad(vjp_of_f, argnums=tuple(range(len(args))))(*args)):
            if i in floats:
                assert g2.dtype == np.float32, f"second-order gradient of argument {i} is {g2.dtype}"

    check()
