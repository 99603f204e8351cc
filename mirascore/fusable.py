"""Optional fused implementations of formulas: the numpy formula lives once, a CuPy kernel may
stand in for it.

    @fusable
    def gelu(z):                      # the formula: numpy or CuPy arrays, or being differentiated
        return z * gauss_cdf(z)

    register(gelu, gelu_kernel)       # mirascore.gpu.fused: the same function as one CUDA kernel

A call runs the registered kernel when at least one argument is a raw CuPy array and none is
being differentiated (an autodiff box): the tape needs the formula's own operations. A kernel may
return NotImplemented for arguments it does not cover (a hyperparameter, a dtype); the formula
then runs. Formulas and spec methods alike can be fusable (for a method the kernel receives the
spec as its first argument), so a spec that delegates to a built-in one gets the same kernels.
Kernels are registered by `mirascore.gpu.fused`, imported on the first call with a CuPy array.
"""
import functools

from .autodiff.tracer import Box

_kernels = {}
_loaded = False


def fusable(formula):
    """Mark `formula` as one a fused kernel may implement on CuPy arrays (see the module doc)."""
    @functools.wraps(formula)
    def call(*args, **kwargs):
        on_gpu = False
        for a in args:
            t = type(a)
            if t is Box:
                return formula(*args, **kwargs)
            if t.__module__.startswith("cupy"):
                on_gpu = True
        if on_gpu:
            kernel = kernel_for(call)
            if kernel is not None:
                out = kernel(*args, **kwargs)
                if out is not NotImplemented:
                    return out
        return formula(*args, **kwargs)
    call.formula = formula
    return call


def register(formula, kernel):
    """Make `kernel(*args, **kwargs)` the CuPy implementation of the fusable `formula`."""
    if not hasattr(formula, "formula"):
        raise ValueError(f"{formula!r} is not marked @fusable; mark the formula first")
    _kernels[formula] = kernel


def kernel_for(formula):
    """The registered kernel of a fusable formula, or None (loads mirascore.gpu.fused once)."""
    global _loaded
    if not _loaded:
        _loaded = True
        from .gpu import fused  # noqa: F401  (registers the kernels)
    return _kernels.get(formula)
