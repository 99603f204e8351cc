"""Validation at the boundary of step / scan / init / recall (docs/contract.md §2, last list).

Every bad input raises `ValueError` naming the argument and the sizes or values involved; nothing
is clipped or ignored silently. Shapes, specs and hyperparameters are checked on the host, from
the arrays' metadata alone. The values themselves (finite inputs, gates within their ranges) are
looked at only with `check_finite=True` (scipy's convention): one reduction per array and one
device-to-host transfer per check, which a caller that has validated upstream, or that records
a CUDA graph, turns off with `check_finite=False`.
"""
import math
import numbers
import operator

import numpy as np

import mirascore.autodiff.numpy as anp

from ._xp import namespace, to_numpy
from .autodiff.tracer import unbox


# ---------------------------------------------------------------- hyperparameters (factories)

def size(name, x):
    """A positive integer size (d, d_in, expansion, chunk)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
        raise ValueError(f"{name} must be a positive integer, got {x!r}")
    return int(x)


_COMPARE = (("gt", ">", operator.gt), ("ge", "≥", operator.ge),
            ("lt", "<", operator.lt), ("le", "≤", operator.le))


def hyper(name, x, **bounds):
    """A finite real hyperparameter within `bounds` (gt=, ge=, lt=, le=), returned as a float."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite real number, got {x!r}")
    for key, word, holds in _COMPARE:
        if key in bounds and not holds(x, bounds[key]):
            raise ValueError(f"{name} must be {word} {bounds[key]}, got {x!r}")
    return float(x)


def choice(name, x, options):
    """x must be one of `options`."""
    if x not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {x!r}")
    return x


def flag(name, x):
    """A bool keyword (check_finite)."""
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be True or False, got {x!r}")
    return x


# ---------------------------------------------------------------- values (check_finite=True)

# name: (low, low closed, high, high closed): lr ≥ 0, α ∈ (0, 1], δ > 0, β ∈ [0, 1)
_GATE_RANGES = {"lr": (0.0, True, math.inf, True), "alpha": (0.0, False, 1.0, True),
                "delta": (0.0, False, math.inf, True), "beta": (0.0, True, 1.0, False)}


def finite(name, x):
    """x must hold only finite numbers (looked at through any autodiff boxes)."""
    x = unbox(x)
    if not bool(namespace(x).isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf); shape {tuple(x.shape)}")


def gate_range(name, g):
    """Gate `name` (a raw array) must be finite and lie in its range."""
    xp = namespace(g)
    lo, lo_closed, hi, hi_closed = _GATE_RANGES[name]
    inside = xp.isfinite(g) & (g >= lo if lo_closed else g > lo) & (g <= hi if hi_closed else g < hi)
    if not bool(inside.all()):
        bad = to_numpy(g)[~to_numpy(inside)]
        interval = (f"{'[' if lo_closed else '('}{lo:g}, "
                    + ("∞)" if hi == math.inf else f"{hi:g}{']' if hi_closed else ')'}"))
        raise ValueError(f"{name} must be finite and in {interval}; {bad.size} value(s) are not, "
                         f"e.g. {bad.ravel()[:4].tolist()}")


def alpha_is_one(alpha, retention):
    """A gate without decay (uses_alpha False, e.g. none()) takes α = 1 only."""
    raw = namespace(unbox(alpha)).asarray(unbox(alpha))
    if bool((raw != 1).any()):
        bad = to_numpy(raw)
        raise ValueError(f"alpha must be 1 with retention {retention!r}, which keeps everything "
                         f"(use retention.l2() for a decaying memory); got e.g. "
                         f"{bad[bad != 1].ravel()[:4].tolist()}")


# ---------------------------------------------------------------- shapes

def _broadcast(*shapes):
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        return None


def _dims(shape):
    return ", ".join(map(str, shape))


def last_axis(name, x, d, what):
    """x: (..., d)."""
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; its last axis must be {what} = {d}")


def params(memory, params):
    """Parameters for `memory`: right count and trailing shapes, batch dims that broadcast.
    Returns the broadcast batch shape."""
    shapes, kind = memory.param_shapes(), getattr(memory, "name", type(memory).__name__)
    if len(params) != len(shapes):
        wanted = ", ".join(f"(..., {_dims(s)})" for s in shapes)
        raise ValueError(f"params has {len(params)} array(s); {kind} memory takes "
                         f"{len(shapes)}: {wanted}")
    batches = []
    for i, (p, s) in enumerate(zip(params, shapes)):
        if p.ndim < len(s) or tuple(p.shape[p.ndim - len(s):]) != s:
            raise ValueError(f"params[{i}] has shape {tuple(p.shape)}; {kind} memory "
                             f"needs (..., {_dims(s)})")
        batches.append(tuple(p.shape[:p.ndim - len(s)]))
    batch = _broadcast(*batches)
    if batch is None:
        raise ValueError(f"params have batch shapes {batches}, which do not broadcast together")
    return batch


def gate_shape(name, g, shape, shape_words):
    """Gate `name` must broadcast to `shape` (described by `shape_words`)."""
    if _broadcast(np.shape(unbox(g)), shape) != tuple(shape):
        raise ValueError(f"{name} has shape {np.shape(unbox(g))}, which does not broadcast to "
                         f"{tuple(shape)} ({shape_words})")


# ---------------------------------------------------------------- specs

def spec_match(state, retention, algorithm):
    """A retention=/algorithm= given to step or scan must equal the state's."""
    for name, given, held in (("retention", retention, state.retention),
                              ("algorithm", algorithm, state.algorithm)):
        if given is not None and given != held:
            raise ValueError(f"{name}={given!r} does not match the state's {name} {held!r}; "
                             f"start a state with it via mc.init(..., {name}=...)")


def gate_options(state, bias, delta, beta):
    """Which optional gates this rule takes: δ exactly when the bias takes a per-token δ
    (`needs_delta`), β exactly for an algorithm with momentum (`uses_momentum`)."""
    if getattr(bias, "needs_delta", False) and delta is None:
        raise ValueError(f"{bias!r} has no static delta: pass the per-token delta= gate")
    if delta is not None and not getattr(bias, "needs_delta", False):
        raise ValueError(f"delta= is the per-token gate of a bias without a static δ "
                         f"(huber(delta=None)); {bias!r} takes none (delta given twice?)")
    momentum = state.algorithm.uses_momentum
    if momentum and beta is None:
        raise ValueError(f"algorithm {state.algorithm!r} needs the beta= gate (momentum decay, "
                         f"in [0, 1))")
    if beta is not None and not momentum:
        raise ValueError(f"beta= is the momentum gate; the state's algorithm {state.algorithm!r} "
                         f"has no momentum")


# ---------------------------------------------------------------- one step / scan call

def inputs(state, bias, retention, algorithm, arrays, gates, *, time, check_finite):
    """Validate one step (time=False) or scan (time=True: T from the first array) call.

    arrays: (name, array, size of its last axis, name of that size) for k, v or K, V, Q, whose
    time axis (scan) is second to last. gates: {name: value or None}. Returns (xp, dtype, arrays as
    xp arrays, {name: gate array or None}); the gates have the compute dtype, the result dtype of
    the state's params and the arrays, and keep their own (small) shapes.
    """
    spec_match(state, retention, algorithm)
    gate_options(state, bias, gates.get("delta"), gates.get("beta"))
    xp = namespace(*map(unbox, (*state.params, *(a for _, a, _, _ in arrays), *gates.values())))
    arrays = [(name, a if a is not unbox(a) else xp.asarray(a), d, words)
              for name, a, d, words in arrays]
    lead = ()
    if time:
        first, a = arrays[0][0], arrays[0][1]
        if a.ndim < 2:
            raise ValueError(f"{first} has shape {tuple(a.shape)}; scan needs (..., T, {arrays[0][3]})")
        lead = (a.shape[-2],)
    batch = params(state.memory, state.params)
    for name, a, d, words in arrays:
        last_axis(name, a, d, words)
        if a.ndim < 1 + len(lead) or tuple(a.shape[a.ndim - 1 - len(lead):-1]) != tuple(lead):
            raise ValueError(f"{name} has shape {tuple(a.shape)}; expected (..., "
                             f"{_dims(tuple(lead) + (d,))}) like {arrays[0][0]}")
        batch = _broadcast(batch, a.shape[:a.ndim - 1 - len(lead)])
        if batch is None:
            shapes = {n: tuple(x.shape) for n, x, _, _ in arrays}
            raise ValueError(f"the batch dims of params {[tuple(p.shape) for p in state.params]} "
                             f"and of the inputs {shapes} do not broadcast together")
    words = "the batch dims (...)" if not lead else "the batch dims and time, (..., T)"
    for name, g in gates.items():
        if g is not None:
            gate_shape(name, g, batch + tuple(lead), words)
    if check_finite:
        for i, p in enumerate(state.params):
            finite(f"params[{i}]", p)
        for name, a, _, _ in arrays:
            finite(name, a)
        for name, g in gates.items():
            if g is not None:
                gate_range(name, xp.asarray(unbox(g)))   # in its own precision
        if gates.get("alpha") is not None and not getattr(state.retention, "uses_alpha", True):
            alpha_is_one(gates["alpha"], state.retention)
    dtype = xp.result_type(*map(unbox, (*state.params, *(a for _, a, _, _ in arrays))))
    out = {name: None if g is None else _as_dtype(g, xp, dtype) for name, g in gates.items()}
    return xp, dtype, tuple(a for _, a, _, _ in arrays), out


def _as_dtype(g, xp, dtype):
    """A gate as an array of the compute dtype, still boxed if it is being differentiated."""
    raw = xp.asarray(unbox(g))
    if g is not unbox(g):
        return anp.astype(g, dtype) if raw.dtype != dtype else g
    return raw.astype(dtype, copy=False)
