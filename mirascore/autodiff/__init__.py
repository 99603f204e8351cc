"""A minimal reverse-mode autodiff over numpy and CuPy arrays (HIPS-autograd style).

    import mirascore.autodiff as ad
    import mirascore.autodiff.numpy as anp
    ad.grad(lambda x: anp.sum(anp.tanh(x) ** 2))(x)

See docs/autodiff.md for how it works, how to add a primitive, and `tree_primitive` for an
operation with several array inputs and outputs.
"""
from . import numpy  # noqa: F401  (registers the operations and the Box operators)
from .check import check_grads
from .core import grad, value_and_grad, vjp
from .structured import defvjp_tree, tree_primitive
from .tracer import defvjp, defvjp_argnums, primitive

__all__ = ["grad", "value_and_grad", "vjp", "primitive", "defvjp", "defvjp_argnums", "check_grads",
           "tree_primitive", "defvjp_tree"]
