"""Input validation and gate broadcasting (DESIGN §2, last list).

Every bad input raises `ValueError` naming the argument and the sizes or values involved; nothing
is clipped or ignored silently. The checks cost one reduction per array (`isfinite(...).all()`,
fused with the range test for gates); values are looked at in detail only to word an error.
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


# ---------------------------------------------------------------- gates inside the spec methods

def expand(g, n):
    """The one gate-broadcasting helper: a gate shaped like the batch dims (...) (or a Python
    number) made to broadcast against arrays with n more trailing axes, (...) -> (..., 1 × n)."""
    if isinstance(g, numbers.Number):
        return g
    for _ in range(n):
        g = anp.expand_dims(g, -1)
    return g


# ---------------------------------------------------------------- arrays and gates of step/scan

# name: (low, low closed, high, high closed): lr ≥ 0, α ∈ (0, 1], δ > 0, β ∈ [0, 1)
_GATE_RANGES = {"lr": (0.0, True, math.inf, True), "alpha": (0.0, False, 1.0, True),
                "delta": (0.0, False, math.inf, True), "beta": (0.0, True, 1.0, False)}


def finite(name, x):
    """x must hold only finite numbers (looked at through any autodiff boxes)."""
    x = unbox(x)
    if not bool(namespace(x).isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf); shape {tuple(x.shape)}")


def gate(name, g, xp, dtype, shape, shape_words):
    """Gate `name` as an array of the compute dtype; it must broadcast to `shape` (described by
    `shape_words`), be finite and lie in its range. Returns the array in its own (small) shape,
    still boxed if it is being differentiated."""
    boxed = g
    g = xp.asarray(unbox(g))   # checked in its own precision, then cast to the compute dtype
    if _broadcast(g.shape, shape) != tuple(shape):
        raise ValueError(f"{name} has shape {g.shape}, which does not broadcast to {tuple(shape)} "
                         f"({shape_words})")
    lo, lo_closed, hi, hi_closed = _GATE_RANGES[name]
    inside = xp.isfinite(g) & (g >= lo if lo_closed else g > lo) & (g <= hi if hi_closed else g < hi)
    if not bool(inside.all()):
        bad = to_numpy(g)[~to_numpy(inside)]
        interval = (f"{'[' if lo_closed else '('}{lo:g}, "
                    + ("∞)" if hi == math.inf else f"{hi:g}{']' if hi_closed else ')'}"))
        raise ValueError(f"{name} must be finite and in {interval}; {bad.size} value(s) are not, "
                         f"e.g. {bad.ravel()[:4].tolist()}")
    if boxed is not unbox(boxed):
        return anp.astype(boxed, dtype) if g.dtype != dtype else boxed
    return g.astype(dtype, copy=False)


def _broadcast(*shapes):
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        return None


def last_axis(name, x, d, what):
    """x: (..., d)."""
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; its last axis must be {what} = {d}")


# ---------------------------------------------------------------- specs and states

def params(memory, params):
    """Parameters for `memory`: right count and trailing shapes, batch dims that broadcast,
    finite values. Returns the broadcast batch shape."""
    shapes = memory.param_shapes()
    if len(params) != len(shapes):
        wanted = ", ".join(f"(..., {_dims(s)})" for s in shapes)
        raise ValueError(f"params has {len(params)} array(s); {memory.name} memory takes "
                         f"{len(shapes)}: {wanted}")
    batches = []
    for i, (p, s) in enumerate(zip(params, shapes)):
        if p.ndim < len(s) or tuple(p.shape[p.ndim - len(s):]) != s:
            raise ValueError(f"params[{i}] has shape {tuple(p.shape)}; {memory.name} memory "
                             f"needs (..., {_dims(s)})")
        batches.append(tuple(p.shape[:p.ndim - len(s)]))
    batch = _broadcast(*batches)
    if batch is None:
        raise ValueError(f"params have batch shapes {batches}, which do not broadcast together")
    for i, p in enumerate(params):
        finite(f"params[{i}]", p)
    return batch


def _dims(shape):
    return ", ".join(map(str, shape))


def spec(name, x, method):
    """x must be a spec of kind `name` (it has `method`), e.g. a retention gate, not a bias."""
    if not hasattr(x, method):
        raise ValueError(f"{name}={x!r} is not a {name} spec (it has no {method}()); "
                         f"use one of mirascore.{name}'s factories")


def spec_match(state, retention, algorithm):
    """A retention=/algorithm= given to step or scan must equal the state's."""
    for name, given, held in (("retention", retention, state.retention),
                              ("algorithm", algorithm, state.algorithm)):
        if given is not None and given != held:
            raise ValueError(f"{name}={given!r} does not match the state's {name} {held!r}; "
                             f"start a state with it via mc.init(..., {name}=...)")


def implicit_fits(memory, retention, bias=None):
    """implicit() (Longhorn) is derived only for l2 bias, linear memory and none() retention."""
    parts = [("memory", memory.name, "linear"), ("retention", retention.name, "none")]
    if bias is not None:
        parts.append(("bias", bias.name, "l2"))
    wrong = [f"{what} {got!r}" for what, got, want in parts if got != want]
    if wrong:
        raise ValueError("algorithm implicit() needs l2 bias, linear memory and none() retention; "
                         "got " + ", ".join(wrong))


def gate_options(state, bias, delta, beta):
    """Which optional gates this rule takes: δ exactly when huber has no static δ, β exactly for
    momentum."""
    if bias.needs_delta and delta is None:
        raise ValueError(f"{bias!r} has no static delta: pass the per-token delta= gate")
    if delta is not None and not bias.needs_delta:
        if bias.name == "huber":
            raise ValueError(f"delta given twice: huber(delta={bias.delta!r}) and delta=; give one")
        raise ValueError(f"delta= is a gate of huber(delta=None) only; bias {bias.name!r} takes none")
    momentum = state.algorithm.name == "momentum"
    if momentum and beta is None:
        raise ValueError("algorithm momentum() needs the beta= gate (momentum decay, in [0, 1))")
    if beta is not None and not momentum:
        raise ValueError(f"beta= is a gate of momentum() only; the state's algorithm is "
                         f"{state.algorithm.name!r}")
    if state.algorithm.name == "implicit":
        implicit_fits(state.memory, state.retention, bias)


def call(state, bias, retention, algorithm, arrays, gates, *, time=False):
    """Validate one step (time=False) or scan (time=True: T from the first array) call.

    arrays: (name, array, size of its last axis, name of that size) for k, v or K, V, Q, whose
    time axis (scan) is second to last. gates: {name: value or None}. Returns (xp, dtype, arrays as
    xp arrays, {name: gate array or None}); the gates have the compute dtype, the result dtype of
    the state's params and the arrays.
    """
    spec("bias", bias, "psi")
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
    for name, a, _, _ in arrays:
        finite(name, a)
    dtype = xp.result_type(*map(unbox, (*state.params, *(a for _, a, _, _ in arrays))))
    words = "the batch dims (...)" if not lead else "the batch dims and time, (..., T)"
    out = {name: None if g is None else gate(name, g, xp, dtype, batch + tuple(lead), words)
           for name, g in gates.items()}
    alpha = out.get("alpha")
    if state.retention.name == "none" and alpha is not None and bool((unbox(alpha) != 1).any()):
        bad = to_numpy(unbox(alpha))
        raise ValueError(f"alpha must be 1 with retention none(), which keeps everything (use "
                         f"retention.l2() for a decaying memory); got e.g. {bad[bad != 1].ravel()[:4].tolist()}")
    return xp, dtype, tuple(a for _, a, _, _ in arrays), out
