"""Boxes, nodes and the primitive wrapper: how a forward pass is recorded.

A differentiated value travels inside a `Box` tagged with the trace it belongs to. Calling a
`primitive` on boxed arguments unboxes the ones of the newest trace, computes the raw result
(recursively, so boxes of older traces are recorded by their own traces) and returns a new box
whose `Node` holds the parents' nodes and the VJP closure for this call. The closure is made at
forward time by the registered maker and keeps only what the backward pass needs.
Nested differentiation works because the VJPs are themselves written with primitives.
"""
import itertools

_trace_ids = itertools.count(1)
_vjp_makers = {}  # wrapped primitive -> maker(argnums, ans, args, kwargs) -> (g -> tuple of grads)


def new_trace():
    return next(_trace_ids)


class Node:
    """One recorded operation: its parents' nodes and the VJP from its output to them."""
    __slots__ = ("vjp", "parents")

    def __init__(self, vjp, parents):
        self.vjp = vjp
        self.parents = parents


class Box:
    """A value being differentiated in trace `_trace`; operators live in autodiff.numpy."""
    __slots__ = ("_value", "_trace", "_node")
    __array_ufunc__ = None        # numpy and CuPy defer `array <op> box` to the box's reflected op
    __array_priority__ = 1000.0

    def __init__(self, value, trace, node):
        self._value = value
        self._trace = trace
        self._node = node

    @property
    def shape(self):
        return getattr(self._value, "shape", ())

    @property
    def ndim(self):
        return getattr(self._value, "ndim", 0)

    @property
    def dtype(self):
        return getattr(self._value, "dtype", type(self._value))

    @property
    def size(self):
        return getattr(self._value, "size", 1)

    def __len__(self):
        return len(self._value)

    def __bool__(self):
        raise TypeError("the truth value of a differentiated array is not defined; "
                        "compare unboxed values (mirascore.autodiff.numpy.stop_gradient)")

    def __repr__(self):
        return f"Box({self._value!r}, trace={self._trace})"


def unbox(x):
    """The raw array inside any number of boxes."""
    while type(x) is Box:
        x = x._value
    return x


def primitive(f_raw):
    """Wrap `f_raw` so that calls on boxed arguments are recorded for differentiation."""
    def f_wrapped(*args, **kwargs):
        top = 0
        for a in args:
            if type(a) is Box and a._trace > top:
                top = a._trace
        if not top:
            return f_raw(*args, **kwargs)
        raw, argnums, parents = list(args), [], []
        for i, a in enumerate(args):
            if type(a) is Box and a._trace == top:
                raw[i] = a._value
                argnums.append(i)
                parents.append(a._node)
        ans = f_wrapped(*raw, **kwargs)
        maker = _vjp_makers.get(f_wrapped)
        if maker is None:
            raise NotImplementedError(
                f"cannot differentiate through {f_wrapped.__name__!r}: it has no VJP "
                f"(define one with mirascore.autodiff.defvjp)")
        vjp = maker(tuple(argnums), ans, tuple(raw), kwargs)
        return Box(ans, top, Node(vjp, tuple(parents)))

    f_wrapped.__name__ = getattr(f_raw, "__name__", "primitive")
    f_wrapped.__qualname__ = getattr(f_raw, "__qualname__", f_wrapped.__name__)
    f_wrapped.__doc__ = getattr(f_raw, "__doc__", None)
    f_wrapped.__wrapped__ = f_raw
    return f_wrapped


def defvjp_argnums(fun, maker):
    """Register one maker for all arguments: maker(argnums, ans, args, kwargs) -> (g -> tuple).

    The returned function gives one gradient per entry of `argnums` (None for no gradient); it is
    the hook for a fused backward that computes several gradients at once.
    """
    _vjp_makers[fun] = maker


def defvjp(fun, *makers):
    """Register one maker per positional argument: maker(ans, *args, **kwargs) -> (g -> grad).

    A maker given as None means that argument gets no gradient (it is treated as a constant).
    """
    def maker_argnums(argnums, ans, args, kwargs):
        vjps = [makers[i](ans, *args, **kwargs) if i < len(makers) and makers[i] is not None
                else None for i in argnums]
        return lambda g: tuple(None if v is None else v(g) for v in vjps)
    _vjp_makers[fun] = maker_argnums


def toposort(end):
    """Nodes reachable from `end`, each after every node that consumes it."""
    child_counts, stack = {}, [end]
    while stack:
        node = stack.pop()
        if node in child_counts:
            child_counts[node] += 1
        else:
            child_counts[node] = 1
            stack.extend(node.parents)
    ready = [end]
    while ready:
        node = ready.pop()
        yield node
        for parent in node.parents:
            if child_counts[parent] == 1:
                ready.append(parent)
            else:
                child_counts[parent] -= 1


def backward(end, g):
    """Propagate cotangent `g` from node `end`; returns {leaf node: gradient}."""
    grads = {end: g}
    leaves = {}
    for node in toposort(end):
        g = grads.pop(node, None)
        if not node.parents:
            if g is not None:
                leaves[node] = g
            continue
        if g is None:
            continue
        for parent, pg in zip(node.parents, node.vjp(g)):
            if pg is None:
                continue
            prev = grads.get(parent)
            grads[parent] = pg if prev is None else prev + pg
    return leaves
