"""Per-token gates inside the spec methods, and small elementwise helpers the specs share.

Gates (lr, alpha, beta, delta) come as Python numbers or arrays shaped like the batch dims (...);
`expand` makes them broadcast against arrays with more trailing axes.
"""
import numbers

import mirascore.autodiff.numpy as anp


def expand(g, n):
    """A gate shaped like the batch dims (...) (or a Python number) made to broadcast against
    arrays with n more trailing axes, (...) -> (..., 1 × n)."""
    if isinstance(g, numbers.Number):
        return g
    for _ in range(n):
        g = anp.expand_dims(g, -1)
    return g


def _integer(e):
    """e as a small non-negative int when it is one (powers by repeated products), else None."""
    return int(e) if float(e).is_integer() and 0 <= e <= 8 else None


def _product_power(x, n):
    """x^n for an int n ≥ 1 by repeated squaring (a few multiplications, no pow)."""
    out, square = None, x
    while n:
        if n & 1:
            out = square if out is None else out * square
        n >>= 1
        if n:
            square = square * square
    return out


def abs_power(x, e):
    """|x|^e elementwise; integer e by multiplications, which numpy runs several times faster
    than a float power (Moneta's q = 4, p = 3)."""
    n = _integer(e)
    if n is None:
        return anp.abs(x) ** e
    if n == 0:
        return anp.abs(x) ** 0.0
    if n == 1:
        return anp.abs(x)
    if n % 2 == 0:
        return _product_power(x, n)
    return _product_power(x, n - 1) * anp.abs(x)


def signed_power(x, e):
    """sign(x)|x|^e elementwise (0 at 0 for e ≥ 0): x^e for odd integer e."""
    n = _integer(e)
    if n is None or n == 0:
        return anp.sign(x) * abs_power(x, e)
    return _product_power(x, n) if n % 2 == 1 else _product_power(x, n - 1) * anp.abs(x)
