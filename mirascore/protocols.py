"""The protocols between a rule's four specs and the code that runs them (docs/internals.md).

`step`, `scan` and the reference loops never look at a spec's name: they call its methods,
resolved here once per call into records of callables (`per_token`, `anchored`, `reference`).
A method a spec leaves out is derived from the ones it has (VJPs by mirascore.autodiff, e.g.
ψ's VJP from `psi`; `update` from `canonical` and `prox`), or resolution stops the call before any
work with MissingMethodError, which names the spec, the method and what needs it. Nothing missing
is ever taken to be the identity.
"""
from typing import Any, Callable, NamedTuple

import numpy as np

import mirascore.autodiff as ad
import mirascore.autodiff.numpy as anp

from . import memory as _memory
from . import retention as _retention


class MissingMethodError(ValueError):
    """A spec lacks a method (or capability attribute) that a call needs and that cannot be
    derived from its other methods."""


# ---------------------------------------------------------------- the resolved records

class BiasMethods(NamedTuple):
    spec: Any
    psi: Callable            # (y, v, delta) -> ψ
    psi_vjp: Callable        # (y, v, delta, dpsi) -> (dy, dv, ddelta)
    needs_delta: bool


class GateMethods(NamedTuple):
    spec: Any
    expose: Callable         # s -> W
    gradient_scale: Callable  # alpha -> c or None (gradient at c·W)
    update: Callable         # (s, U, alpha) -> s'
    canonical: Callable      # s -> s in the coordinates of the linear recurrence
    prox: Callable           # s -> s at a chunk's end
    read_scale: Callable     # s_anchor -> ν (in-chunk reads ν·s) or None (reads W̄)
    expose_vjp: Callable     # (s, W, dW) -> ds
    canonical_vjp: Callable  # (s, ds̄) -> ds
    prox_vjp: Callable       # (s, ds) -> ds_in
    anchor_vjp: Callable     # (s̄, W̄, dW̄, dν or None) -> ds̄
    uses_alpha: bool


class MemoryMethods(NamedTuple):
    spec: Any
    apply: Callable          # (params, k) -> y
    grad: Callable           # (params, k, psi) -> G per parameter
    forward: Callable        # (read, X) -> (Y, cache)
    backward: Callable       # (cache, dY, read_vjp, with_dX, dcache) -> (dO, dX, bcache)
    backward_vjp: Callable   # (cache, bcache, dY, ddO, read_vjp_vjp) -> (ddY, dcache)


class AlgorithmMethods(NamedTuple):
    spec: Any
    init: Callable           # params -> momentum or None
    effective_lr: Callable   # (lr, k) -> lr'
    update: Callable         # (G, momentum, lr, beta) -> (U, momentum')
    uses_momentum: bool


class RuleMethods(NamedTuple):
    memory: MemoryMethods
    bias: BiasMethods
    gate: GateMethods
    algorithm: AlgorithmMethods


# ---------------------------------------------------------------- purposes

PER_TOKEN = "mc.step (and mc.scan's per-token checks)"
ANCHORED = "mc.scan's anchored chunked form"
REFERENCE = "mirascore.ref's loops"

_NEEDS = {
    PER_TOKEN: {"memory": ("apply", "grad"), "bias": ("psi",),
                "gate": ("expose", "gradient_scale", "update"),
                "algorithm": ("init", "effective_lr", "update", "uses_momentum")},
    ANCHORED: {"memory": ("forward", "backward", "backward_vjp"), "bias": ("psi", "psi_vjp"),
               "gate": ("expose", "gradient_scale", "canonical", "prox", "read_scale",
                        "expose_vjp", "canonical_vjp", "prox_vjp", "anchor_vjp"),
               "algorithm": ("init", "effective_lr", "uses_momentum")},
    REFERENCE: {"memory": ("apply",), "bias": ("psi",),
                "gate": ("expose", "gradient_scale", "update", "canonical", "prox", "read_scale"),
                "algorithm": ("init", "effective_lr", "uses_momentum")},
}


def per_token(memory, bias, retention, algorithm):
    """The methods `mc.step` calls."""
    return _resolve(memory, bias, retention, algorithm, PER_TOKEN)


def anchored(memory, bias, retention, algorithm):
    """The methods the anchored chunked scan calls (forward and backward)."""
    return _resolve(memory, bias, retention, algorithm, ANCHORED)


def reference(memory, bias, retention, algorithm):
    """The methods mirascore.ref's loops call."""
    return _resolve(memory, bias, retention, algorithm, REFERENCE)


def _resolve(memory, bias, retention, algorithm, purpose):
    needs = _NEEDS[purpose]
    return RuleMethods(_memory_methods(memory, needs["memory"], purpose),
                       _bias_methods(bias, needs["bias"], purpose),
                       _gate_methods(retention, needs["gate"], purpose),
                       _algorithm_methods(algorithm, needs["algorithm"], purpose))


def memory_apply(memory):
    """M(W, k) of a memory: its own `apply`, or one from its `forward`."""
    return _memory_methods(memory, ("apply",), "mc.recall").apply


def memory_gradients(memory):
    """(apply, grad, grad_input or None) of a memory, its own or derived (mirascore.testing)."""
    methods = _memory_methods(memory, ("apply", "grad"), "mirascore.testing.check_memory")
    grad_input = getattr(memory, "grad_input", None)
    if grad_input is None and hasattr(memory, "forward") and hasattr(memory, "backward"):
        grad_input = lambda params, k, psi: _memory.grad_input_by_backward(memory, params, k, psi)  # noqa: E731
    return methods.apply, methods.grad, grad_input


def require(kind, spec, names, purpose):
    """Raise MissingMethodError unless `spec` has every attribute in `names`."""
    for name in names:
        if not hasattr(spec, name):
            raise _missing(kind, spec, name, purpose)


# ---------------------------------------------------------------- resolution per axis

def _missing(kind, spec, name, purpose, sources=()):
    alternative = f" (nor {' and '.join(sources)}, from which it is derived)" if sources else ""
    return MissingMethodError(
        f"{kind} {spec!r} has no {name}{alternative}, which {purpose} needs; the {kind} protocol "
        f"is in docs/internals.md")


def _pick(kind, spec, name, needed, purpose, derive=None, sources=()):
    """The spec's own method `name`, else its derivation (derive() -> callable or None, when the
    spec has the `sources` it is derived from), else: an error now if the call needs it, or a
    stand-in that raises the same error if anything calls it later."""
    own = getattr(spec, name, None)
    if own is not None:
        return own
    derived = derive() if derive is not None and all(hasattr(spec, s) for s in sources) else None
    if derived is not None:
        return derived
    error = _missing(kind, spec, name, purpose, sources)
    if name in needed:
        raise error

    def unavailable(*args, **kwargs):
        raise error
    return unavailable


def _flag(kind, spec, name, needed, purpose, default):
    value = getattr(spec, name, None)
    if value is None:
        if name in needed:
            raise _missing(kind, spec, name, purpose)
        return default
    return bool(value)


def _bias_methods(bias, needed, purpose):
    def get(name, derive=None, sources=()):
        return _pick("bias", bias, name, needed, purpose, derive, sources)
    psi = get("psi", lambda: _psi_from_loss(bias), ("loss",))
    if hasattr(bias, "psi_vjp") or not (hasattr(bias, "psi") or hasattr(bias, "loss")):
        psi_vjp = get("psi_vjp")
    else:                                            # ψ is there (its own, or from the loss)
        psi_vjp = _psi_vjp_by_autodiff(bias, psi)
    return BiasMethods(bias, psi, psi_vjp, bool(getattr(bias, "needs_delta", False)))


def _gate_methods(gate, needed, purpose):
    def get(name, derive=None, sources=()):
        return _pick("retention", gate, name, needed, purpose, derive, sources)

    def vjp_of(source):
        return lambda: _vjp_by_autodiff(gate, "retention", source)
    expose = get("expose")
    expose_vjp = get("expose_vjp", lambda: _drop_middle(vjp_of("expose")()), ("expose",))
    read_scale_vjp = get("read_scale_vjp", vjp_of("read_scale"), ("read_scale",))
    return GateMethods(
        gate, expose, get("gradient_scale"),
        get("update", lambda: lambda s, U, alpha: _retention.update_from_pieces(gate, s, U, alpha),
            ("canonical", "prox")),
        get("canonical"), get("prox"), get("read_scale"),
        expose_vjp,
        get("canonical_vjp", vjp_of("canonical"), ("canonical",)),
        get("prox_vjp", vjp_of("prox"), ("prox",)),
        get("anchor_vjp", lambda: _anchor_vjp(expose_vjp, read_scale_vjp), ("expose", "read_scale")),
        bool(getattr(gate, "uses_alpha", True)))


def _memory_methods(memory, needed, purpose):
    def get(name, derive=None, sources=()):
        return _pick("memory", memory, name, needed, purpose, derive, sources)
    apply = get("apply", lambda: lambda params, k: _memory.apply_by_forward(memory, params, k),
                ("forward",))
    if hasattr(memory, "grad"):
        grad = memory.grad
    elif hasattr(memory, "forward") and hasattr(memory, "backward"):
        grad = lambda params, k, psi: _memory.grad_by_backward(memory, params, k, psi)  # noqa: E731
    else:
        grad = get("grad", lambda: lambda params, k, psi: grad_by_autodiff(apply, params, k, psi),
                   ("apply",))
    return MemoryMethods(memory, apply, grad, get("forward"), get("backward"), get("backward_vjp"))


def _algorithm_methods(algorithm, needed, purpose):
    def get(name):
        return _pick("algorithm", algorithm, name, needed, purpose)
    return AlgorithmMethods(algorithm, get("init"), get("effective_lr"), get("update"),
                            _flag("algorithm", algorithm, "uses_momentum", needed, purpose, False))


# ---------------------------------------------------------------- derivations

def _autodiff_failed(kind, spec, method, source, exc):
    return TypeError(f"{kind} {spec!r} has no {method}, and autodiff of its {source} failed "
                     f"({type(exc).__name__}: {exc}); write {source} with "
                     f"mirascore.autodiff.numpy operations, or give {method}")


def _psi_from_loss(bias):
    """ψ = ∂ℓ/∂y by autodiff of `loss` (one number per token: their sum has the same gradient)."""
    def psi(y, v, delta=None):
        try:
            return ad.grad(lambda yy: anp.sum(bias.loss(yy, v, delta)))(y)
        except TypeError as exc:
            raise _autodiff_failed("bias", bias, "psi", "loss", exc) from exc
    return psi


def _psi_vjp_by_autodiff(bias, psi):
    """(dy, dv, ddelta) by autodiff of ψ (ddelta None when δ is not a per-token array)."""
    def psi_vjp(y, v, delta, dpsi):
        try:
            if delta is None or not hasattr(delta, "shape"):
                _, pull = ad.vjp(lambda y_, v_: psi(y_, v_, delta), y, v)
                return (*pull(dpsi), None)
            _, pull = ad.vjp(lambda y_, v_, d_: psi(y_, v_, d_), y, v, delta)
            return pull(dpsi)
        except TypeError as exc:
            raise _autodiff_failed("bias", bias, "psi_vjp", "psi", exc) from exc
    return psi_vjp


def _vjp_by_autodiff(spec, kind, source):
    """(x, dy) -> dx by autodiff of spec.<source>(x); a constant result (a Python number) has a
    zero VJP."""
    f = getattr(spec, source)

    def vjp(x, dy):
        try:
            _, pull = ad.vjp(f, x)
            return pull(dy)[0]
        except TypeError as exc:
            raise _autodiff_failed(kind, spec, f"{source}_vjp", source, exc) from exc
    return vjp


def _drop_middle(vjp):
    """expose_vjp takes (s, W, dW): W is a hint a derived VJP does not need."""
    return lambda s, W, dW: vjp(s, dW)


def _anchor_vjp(expose_vjp, read_scale_vjp):
    """VJP at the chunk's anchor of W̄ = expose(s̄) and ν̄ = read_scale(s̄) together."""
    def anchor_vjp(s, W, dW, dnu):
        ds = expose_vjp(s, W, dW)
        return ds if dnu is None else ds + read_scale_vjp(s, dnu)
    return anchor_vjp


def apply_with_pullback(apply, params, k):
    """(M(W, k), ψ ↦ J_W(k)ᵀ ψ) by autodiff of `apply`, one memory per batch element: the
    parameters are broadcast to the batch first, or the VJP would sum G over the batch."""
    batch = np.broadcast_shapes(k.shape[:-1], *(p.shape[:-2] for p in params))
    params = tuple(anp.broadcast_to(p, batch + tuple(p.shape[-2:])) for p in params)
    y, pull = ad.vjp(lambda P: apply(P, k), params)
    return y, lambda psi: pull(psi)[0]


def grad_by_autodiff(apply, params, k, psi):
    """J_W(k)ᵀ ψ by autodiff of `apply`."""
    return apply_with_pullback(apply, params, k)[1](psi)
