"""Per-operation overhead of mirascore.autodiff on tiny arrays, against plain numpy.

A chain of `--ops` primitive calls (elementwise and binary, one differentiated input besides x)
ends in a sum; on arrays of a few elements the arithmetic is negligible, so the time per
operation is the cost of the machinery: the primitive wrapper, the box and node, the VJP
closure, the topological sort and the backward accumulation. Three rows, all over the same chain:

    numpy forward      the raw functions of the same primitives, called directly (the baseline)
    autodiff forward   ad.vjp: the forward pass while recording the graph
    grad (fwd + bwd)   ad.grad: record, then propagate back to both inputs

Each row is the median over `--repeats` timings of `--number` calls (and the best of them, which
a busy machine inflates less); the ratio is of medians, to the baseline.

    python benchmarks/autodiff_overhead.py [--ops 200] [--size 8] [--repeats 15] [--max-us 20]
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # run from a checkout, uninstalled
import mirascore.autodiff as ad                                    # noqa: E402
import mirascore.autodiff.numpy as anp                             # noqa: E402
from _machine import cpu_model                                    # noqa: E402

# one primitive call per step; the cycle keeps values bounded over any length
STEPS = [
    ("tanh", lambda x, y, c: anp.tanh(x)),
    ("multiply (constant)", lambda x, y, c: anp.multiply(x, c)),
    ("add", lambda x, y, c: anp.add(x, y)),
    ("sigmoid", lambda x, y, c: anp.sigmoid(x)),
    ("multiply", lambda x, y, c: anp.multiply(x, y)),
    ("subtract (constant)", lambda x, y, c: anp.subtract(x, c)),
    ("square", lambda x, y, c: anp.square(x)),
    ("log1p", lambda x, y, c: anp.log1p(x)),
]


def chain(n_ops, ops):
    """f(x, y) applying n_ops steps (ops = the anp namespace or its raw twins), then a sum."""
    steps = [STEPS[i % len(STEPS)][1] for i in range(n_ops)]

    def f(x, y, c):
        for step in steps:
            x = step(x, y, c)
        return ops.sum(x)
    return f


class Raw:
    """The raw (undifferentiable) function under each primitive: the numpy baseline."""
    def __getattr__(self, name):
        return getattr(anp, name).__wrapped__


def timed(fn, number, repeats):
    """(median, best) seconds per call over `repeats` timings of `number` calls, after a warm-up.
    The median is the figure; the best shows how much a busy machine added to it."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times), min(times)


def machine():
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}; {cores} cores available (nproc); {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; numpy {np.__version__}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=200, help="primitive calls in the chain (the sum adds one)")
    p.add_argument("--size", type=int, default=8, help="elements per array")
    p.add_argument("--repeats", type=int, default=15, help="timings; the median is reported")
    p.add_argument("--number", type=int, default=20, help="calls per timing")
    p.add_argument("--max-us", type=float, default=None,
                   help="exit with status 1 if grad costs more than this many µs per operation")
    a = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x, y, c = (rng.uniform(-1, 1, a.size) for _ in range(3))
    raw = chain(a.ops, Raw())
    f = chain(a.ops, anp)
    g = ad.grad(f, argnums=(0, 1))

    # the same chain, the same numbers: the autodiff value equals the raw one
    assert np.allclose(ad.value_and_grad(f)(x, y, c)[0], raw(x, y, c))

    n = a.ops + 1                                                   # the chain and the final sum
    rows = [
        ("numpy forward (baseline)", timed(lambda: raw(x, y, c), a.number, a.repeats)),
        ("autodiff forward (ad.vjp)", timed(lambda: ad.vjp(f, x, y, c), a.number, a.repeats)),
        ("grad, forward + backward", timed(lambda: g(x, y, c), a.number, a.repeats)),
    ]
    base = rows[0][1][0]
    print(f"autodiff overhead: a chain of {n} operations ({a.ops} + sum) on float64 arrays of "
          f"{a.size} elements; median of {a.repeats} x {a.number} calls")
    print(f"machine: {machine()}")
    print(f"ops cycled: {', '.join(name for name, _ in STEPS)}")
    print()
    print(f"| {'what':<28} | {'ms / call':>9} | {'µs / op':>8} | {'best µs / op':>12} | {'x numpy':>7} |")
    print(f"|{'-' * 30}|{'-' * 10}:|{'-' * 9}:|{'-' * 13}:|{'-' * 8}:|")
    for name, (t, best) in rows:
        print(f"| {name:<28} | {t * 1e3:9.3f} | {t / n * 1e6:8.2f} | {best / n * 1e6:12.2f} | {t / base:7.1f} |")
    per_op = rows[2][1][0] / n * 1e6
    overhead = (rows[2][1][0] - base) / n * 1e6
    print()
    print(f"grad: {per_op:.2f} µs per operation, forward + backward "
          f"({overhead:.2f} µs above plain numpy's forward)")
    if a.max_us is not None:
        ok = per_op <= a.max_us
        print(f"target <= {a.max_us:g} µs/op: {'met' if ok else 'NOT MET'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
