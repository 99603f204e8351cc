"""A memory being trained: its state, its rule, and reading it (docs/contract.md §2).

    state = init(memory, params, retention=..., algorithm=...)   # -> MemoryState
    W     = weights(state)                                       # the exposed parameters
    y     = recall(state, q)                                     # M(W_t, q)
"""
from typing import Any, NamedTuple

from . import algorithm as _algorithm
from . import protocols, validation
from . import retention as _retention
from ._xp import namespace
from .autodiff.tracer import unbox


class MemoryState(NamedTuple):
    """A memory being trained: static specs plus arrays.

    params:   tuple of arrays (..., m, n), the quantity the retention gate stores (W, A, L or Z)
    momentum: tuple of arrays like params for momentum(), else None
    """
    memory: Any
    retention: Any
    algorithm: Any
    params: tuple
    momentum: tuple | None


class Rule(NamedTuple):
    """A point of the Miras design space (a row of the paper's Table 1): four specs."""
    memory: Any
    bias: Any
    retention: Any
    algorithm: Any


def check_rule_fits(memory, bias, retention, algorithm):
    """An algorithm derived for particular specs (implicit()) checks that it gets them."""
    check = getattr(algorithm, "check_rule", None)
    if check is not None:
        check(memory, bias, retention)


def init(memory, params, retention=_retention.none(), algorithm=_algorithm.gd(), *, check_finite=True):
    """A MemoryState from the stored quantity `params` (W; A₀ for lq, L₀ for kl, Z₀ for sigmoid),
    one array per `memory.param_shapes()` entry with optional batch dims; momentum starts at 0.
    check_finite=False skips the look at the values (no device synchronisation)."""
    if hasattr(params, "shape"):
        params = (params,)
    xp = namespace(*map(unbox, params))
    params = tuple(p if p is not unbox(p) else xp.asarray(p) for p in params)
    protocols.require("memory", memory, ("param_shapes", "d_in", "d_out"), "mc.init")
    protocols.require("retention", retention, ("expose",), "mc.init")
    protocols.require("algorithm", algorithm, ("init",), "mc.init")
    validation.params(memory, params)
    if validation.flag("check_finite", check_finite):
        for i, p in enumerate(params):
            validation.finite(f"params[{i}]", p)
    check_rule_fits(memory, None, retention, algorithm)
    return MemoryState(memory, retention, algorithm, params, algorithm.init(params))


def weights(state):
    """The exposed parameters, e.g. (W1, W2) for the mlp memory."""
    return tuple(state.retention.expose(s) for s in state.params)


def recall(state, q, *, check_finite=True):
    """M(W_t, q): q (..., d_in) -> (..., d_out)."""
    xp = namespace(*map(unbox, (*state.params, q)))
    q = q if q is not unbox(q) else xp.asarray(q)
    validation.last_axis("q", q, state.memory.d_in, "d_in")
    if validation.flag("check_finite", check_finite):
        validation.finite("q", q)
    return protocols.memory_apply(state.memory)(weights(state), q)
