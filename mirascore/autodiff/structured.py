"""Primitives of and to trees: one differentiable operation with several array inputs and outputs.

    @tree_primitive
    def scan(state, tokens, *, chunk):             # arguments: trees of arrays (tuples, NamedTuples,
        ...                                        # lists, dicts; None and Python numbers as leaves)
        return (Y, final_state), saved             # (result tree, residuals kept for the VJP)

    def scan_vjp(result, saved, args, kwargs):
        def vjp(g):                                # g: a tree like result, None where no cotangent arrived
            return (dstate, dtokens)               # one tree per positional argument, shaped like it
        return vjp                                 #   (None for a leaf, or a whole subtree: no gradient)

    defvjp_tree(scan, scan_vjp)
    Y, final_state = scan(state, tokens, chunk=64)  # boxes where differentiated, raw arrays otherwise

Called on raw arrays, the operation is f_raw itself (no tape, no copies). Under differentiation the
leaves of all arguments become the positional arguments of one `primitive`, whose raw result
holds the result's leaves; each floating-point leaf is then taken out as its own differentiable
value, and the cotangents of the leaves a caller used are gathered (field by field) into one
cotangent tree for the VJP. The VJP is first order: differentiating it again raises
NotImplementedError naming the operation.
"""
from typing import Any, Callable, NamedTuple

from .core import is_differentiable, tree_leaves, tree_map
from .tracer import Box, defvjp, defvjp_argnums, primitive, unbox


def _flatten(tree):
    """(leaves, rebuild): rebuild(new_leaves) puts new leaves into tree's structure."""
    leaves = tree_leaves(tree)

    def rebuild(new_leaves):
        it = iter(new_leaves)
        return tree_map(lambda _: next(it), tree)
    return leaves, rebuild


def _aligned_leaves(tree, like):
    """The leaves of `tree` in the order of `like`'s leaves; a None where `like` has a subtree
    stands for None leaves throughout it."""
    if tree is None:
        return [None] * len(tree_leaves(like))
    if isinstance(like, (list, tuple)):
        return [x for t, l in zip(tree, like) for x in _aligned_leaves(t, l)]
    if isinstance(like, dict):
        return [x for k in like for x in _aligned_leaves(tree.get(k), like[k])]
    return [tree]


class _Packed(NamedTuple):
    """The raw result of the flat primitive: the result's leaves, how to rebuild it, residuals."""
    leaves: tuple
    rebuild: Callable
    residuals: Any


class _Cotangents(tuple):
    """The cotangent of a _Packed result, one entry per leaf (None = zero); the tape adds these
    when several leaves of one result are used."""

    def __add__(self, other):
        return _Cotangents(a if b is None else b if a is None else a + b for a, b in zip(self, other))

    __radd__ = __add__


@primitive
def _leaf(packed, i):
    """Leaf i of a packed result, as its own differentiable value."""
    return packed.leaves[i]


defvjp(_leaf, lambda ans, packed, i: lambda g: _Cotangents(
    g if j == i else None for j in range(len(unbox(packed).leaves))), None)


def tree_primitive(f_raw):
    """A differentiable operation from `f_raw(*trees, **static) -> (result tree, residuals)`.

    The keywords are static (specs, sizes): never differentiated. Register the VJP with
    `defvjp_tree`. Returns the result tree alone.
    """
    name = getattr(f_raw, "__name__", "tree_primitive")

    def flat_raw(*leaves, _arguments, **kwargs):
        result, residuals = f_raw(*_arguments(leaves), **kwargs)
        out, rebuild = _flatten(result)
        return _Packed(tuple(out), rebuild, residuals)
    flat_raw.__name__ = name
    flat = primitive(flat_raw)

    def f(*args, **kwargs):
        leaves, arguments = _flatten(args)
        if not any(type(x) is Box for x in leaves):
            return f_raw(*args, **kwargs)[0]
        packed = flat(*leaves, _arguments=arguments, **kwargs)
        raw = unbox(packed)
        return raw.rebuild([_leaf(packed, i) if is_differentiable(x) else x
                            for i, x in enumerate(raw.leaves)])

    f.__name__ = name
    f.__qualname__ = getattr(f_raw, "__qualname__", name)
    f.__doc__ = getattr(f_raw, "__doc__", None)
    f.__wrapped__ = f_raw
    f.flat = flat
    return f


def defvjp_tree(f, maker):
    """Register the VJP of a `tree_primitive`: maker(result, residuals, args, kwargs) -> vjp, with
    vjp(g) -> one gradient tree per positional argument (see the module docstring).

    A gradient for an argument leaf that was a Python float comes back as a Python float.
    """
    name = f.__name__

    def flat_maker(argnums, packed, leaves, kwargs):
        static = {k: v for k, v in kwargs.items() if k != "_arguments"}

        def vjp(g):
            if type(packed) is Box or any(type(x) is Box for x in (*g, *leaves)):
                raise NotImplementedError(
                    f"cannot differentiate the gradient of {name!r}: its VJP is first order")
            g = tuple(g) + (None,) * (len(packed.leaves) - len(g))
            args = kwargs["_arguments"](leaves)
            grads = maker(packed.rebuild(list(packed.leaves)), packed.residuals, args,
                          static)(packed.rebuild(list(g)))
            flat = _aligned_leaves(tuple(grads), args)
            return tuple(_like(flat[i], leaves[i]) for i in argnums)
        return vjp

    defvjp_argnums(f.flat, flat_maker)


def _like(g, x):
    """A gradient in the form of its input: a Python float for a float input."""
    if g is None or not isinstance(x, float):
        return g
    return float(g.sum())
