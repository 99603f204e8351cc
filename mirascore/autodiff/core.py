"""Reverse mode: vjp, grad, value_and_grad over nested tuples, lists and dicts of arrays.

Floating-point leaves (numpy or CuPy arrays, Python floats) are differentiated; integer and
boolean leaves are constants and get `None` as their gradient.
"""
import numpy as np

from .._xp import namespace
from .tracer import Box, Node, backward, new_trace, unbox


def is_differentiable(x):
    if isinstance(x, float):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and np.dtype(dtype).kind in "fc"


def tree_map(f, tree, *rest):
    """Apply f to the leaves of nested tuples/lists/dicts (NamedTuples keep their type)."""
    if isinstance(tree, (list, tuple)):
        kids = [tree_map(f, t, *(r[i] for r in rest)) for i, t in enumerate(tree)]
        if hasattr(tree, "_fields"):
            return type(tree)(*kids)
        return type(tree)(kids)
    if isinstance(tree, dict):
        return {k: tree_map(f, v, *(r[k] for r in rest)) for k, v in tree.items()}
    return f(tree, *rest)


def tree_leaves(tree):
    out = []
    tree_map(out.append, tree)
    return out


def _zeros_like(x):
    x = unbox(x)  # a zero gradient is a constant, also when x is a box of an outer trace
    if isinstance(x, float):
        return 0.0
    return namespace(x).zeros_like(x)


def _cotangent(g, out):
    """g as an array of out's type when it comes as a Python number: VJPs that reshape a Python
    float would otherwise make a numpy array and then mix it with CuPy arrays."""
    raw = unbox(out)
    if isinstance(g, (int, float)) and hasattr(raw, "dtype"):
        return namespace(raw).asarray(g, dtype=raw.dtype)
    return g


def vjp(f, *args):
    """Evaluate f(*args) and return (value, vjp_fn).

    `vjp_fn(g)` takes a cotangent with the structure of the value and returns a tuple with one
    gradient per positional argument (each with that argument's structure).
    """
    trace = new_trace()
    starts = []

    def start(x):
        if not is_differentiable(x):
            return x
        box = Box(x, trace, Node(None, ()))
        starts.append(box)
        return box

    boxed = tree_map(start, args)
    out = f(*boxed)

    def ours(o):
        return type(o) is Box and o._trace == trace

    value = tree_map(lambda o: o._value if ours(o) else o, out)

    def vjp_fn(g):
        outs, gs = tree_leaves(out), tree_leaves(g)
        if len(outs) != len(gs):
            raise ValueError(f"cotangent has {len(gs)} leaves, the value has {len(outs)}")
        pairs = [(o._node, _cotangent(gi, o)) for o, gi in zip(outs, gs) if ours(o) and gi is not None]
        if len(pairs) == 1:
            grads = backward(*pairs[0])
        elif pairs:
            root = Node(lambda _: tuple(gi for _, gi in pairs), tuple(n for n, _ in pairs))
            grads = backward(root, True)
        else:
            grads = {}

        def collect(x):
            if type(x) is not Box or x._trace != trace:
                return None
            gx = grads.get(x._node)
            return _zeros_like(x._value) if gx is None else gx
        return tree_map(collect, boxed)

    return value, vjp_fn


def _select(f, args, argnums, kwargs):
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for i in nums:
        if not -len(args) <= i < len(args):
            raise ValueError(f"argnums {argnums} out of range for {len(args)} positional arguments")

    def f_selected(*chosen):
        full = list(args)
        for i, c in zip(nums, chosen):
            full[i] = c
        return f(*full, **kwargs)
    return f_selected, [args[i] for i in nums]


def value_and_grad(f, argnums=0):
    """f's value and its gradient w.r.t. argument(s) `argnums`; f must return one number."""
    def value_and_grad_f(*args, **kwargs):
        f_selected, chosen = _select(f, args, argnums, kwargs)
        ans, vjp_fn = vjp(f_selected, *chosen)
        if getattr(ans, "size", 1) != 1 or isinstance(ans, (tuple, list, dict)):
            raise ValueError(f"grad needs a function returning one number; "
                             f"{getattr(f, '__name__', 'f')} returned shape {getattr(ans, 'shape', type(ans))}")
        raw = ans
        while type(raw) is Box:
            raw = raw._value
        grads = vjp_fn(namespace(raw).ones_like(raw) if hasattr(raw, "shape") else 1.0)
        return ans, grads[0] if isinstance(argnums, int) else grads
    return value_and_grad_f


def grad(f, argnums=0):
    """The gradient of f (returning one number) w.r.t. argument(s) `argnums`."""
    vg = value_and_grad(f, argnums)

    def grad_f(*args, **kwargs):
        return vg(*args, **kwargs)[1]
    grad_f.__name__ = f"grad_{getattr(f, '__name__', 'f')}"
    return grad_f
