"""GEMM precisions (mirascore.gpu.settings `precision`, `mc.scan(precision=)`; docs/contract.md §5).

GPU: `blas.matmul` in each precision against float64 numpy, elementwise and rigorously: bf16 and
fp16 must equal the float64 product of the operands rounded to nearest even on the host, up to
fp32 accumulation; tf32 the exact product up to one 10-bit ulp per operand; fp32 up to fp32
accumulation; every operand layout, inside CUDA graphs (ours and a caller's), outputs poisoned
with NaN. `mc.scan` forward and backward, Gated DeltaNet in bf16, fp16 and tf32, Moneta, Yaad,
Memora and Titans in bf16 and fp16 (which the anchored form runs in fp32), odd sizes and partial
chunks, against float64: relative error ≤ 1e-2 for Y, the final state and every gradient.
CPU: validation of the setting and of the keyword; numpy ignores the precision.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirascore as mc
import mirascore.autodiff as ad
import mirascore.testing as mt
from mirascore._xp import to_numpy
from mirascore.gpu import settings

from test_gpu_blas_graph import LAYOUTS, _operand

LOW = ("tf32", "bf16", "fp16")
BOUND = 1e-2                      # docs/contract.md §5: relative error against float64


# ---------------------------------------------------------------- host emulation of the roundings

def round_to(x, precision):
    """float32 values of x after the operand rounding of `precision` (bf16, fp16: to nearest even,
    as mirascore.gpu.blas casts; fp32: none). float64 result."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if precision == "fp16":
        return x.astype(np.float16).astype(np.float64)
    if precision == "bf16":
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.astype(np.uint32).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


def check_product(got, a, b, precision):
    """Elementwise: |got − Ã B̃| ≤ ((k+2)·2⁻²³ + 2ρ + ρ²)·(|Ã| |B̃|), Ã, B̃ the operands as rounded
    (bf16, fp16: emulated exactly here, ρ = 0; tf32: the hardware's conversion, one 10-bit ulp,
    ρ = 2⁻¹⁰, covering truncation as well as rounding). (k+2)·2⁻²³ bounds fp32 accumulation
    of k products, each addition off by at most one ulp (tensor cores truncate)."""
    a, b = to_numpy(a), to_numpy(b)
    k = a.shape[-1]
    emulated = precision in ("bf16", "fp16")
    A, B = (round_to(x, precision) if emulated else x.astype(np.float64) for x in (a, b))
    rho = 2.0 ** -10 if precision == "tf32" else 0.0
    bound = ((k + 2) * 2.0 ** -23 + 2 * rho + rho ** 2) * np.matmul(np.abs(A), np.abs(B))
    err = np.abs(to_numpy(got).astype(np.float64) - np.matmul(A, B))
    assert np.all(np.isfinite(to_numpy(got))), f"{precision}: non-finite entries"
    worst = np.max(err - bound) if err.size else 0.0
    assert np.all(err <= bound), f"{precision}: an entry exceeds its bound by {worst:.3e}"


def rel_rms(got, want):
    got, want = to_numpy(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    return float(np.sqrt(np.mean((got - want) ** 2)) / max(np.sqrt(np.mean(want ** 2)), 1e-300))


# ---------------------------------------------------------------- CPU: the setting and the keyword

def test_precision_setting_and_its_tf32_alias():
    before = settings.current()
    try:
        assert before.precision == "fp32" and before.tf32 is False
        with settings.using(precision="bf16") as inside:
            assert inside.precision == "bf16" and not inside.tf32
            with settings.using(tf32=True):
                assert settings.current().precision == "tf32" and settings.current().tf32
            assert settings.current().precision == "bf16"
        previous = settings.configure(tf32=True)
        assert previous.tf32 is False and settings.current().precision == "tf32"
        settings.configure(tf32=False)
        assert settings.current().precision == "fp32"
    finally:
        settings.configure(**before._asdict())
    assert settings.current() == before


@pytest.mark.parametrize("change, match", [
    (dict(precision="bf8"), r"precision must be one of 'fp32', 'tf32', 'bf16', 'fp16'; got 'bf8'"),
    (dict(precision=None), r"precision must be one of .*; got None"),
    (dict(precision="bf16", tf32=True), r"precision= or its alias tf32=, not both"),
    (dict(tf32=1), r"tf32 must be True or False, got 1"),
])
def test_bad_precision_settings_name_the_value(change, match):
    before = settings.current()
    with pytest.raises(ValueError, match=match):
        settings.configure(**change)
    assert settings.current() == before


def _small_problem(rule, batch=(2,), T=9, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    d = rule.memory.d_in
    K, V, Q = (rng.standard_normal(batch + (T, d)).astype(dtype) for _ in range(3))
    gates = dict(lr=np.full(batch + (T,), 0.1, dtype), alpha=np.full(batch + (T,), 0.9, dtype))
    if getattr(rule.bias, "needs_delta", False):
        gates["delta"] = np.full(batch + (T,), 1.0, dtype)
    if rule.algorithm.uses_momentum:
        gates["beta"] = np.full(batch + (T,), 0.9, dtype)
    params = rule.memory.init(seed, batch_shape=batch, dtype=dtype)
    return params, K, V, Q, gates


@pytest.mark.parametrize("rule", [mc.presets.gated_deltanet(4), mc.presets.titans(4)], ids=["exact", "anchored"])
def test_scan_precision_is_validated_and_numpy_ignores_it(rule):
    params, K, V, Q, gates = _small_problem(rule)
    state = mc.init(rule.memory, params, retention=rule.retention, algorithm=rule.algorithm)

    def run(precision):
        def f(K):
            return mc.scan(state, K, V, Q, bias=rule.bias, chunk=4, precision=precision, **gates)[0]
        Y, pull = ad.vjp(f, K)
        return Y, pull(np.ones_like(Y))[0]
    Y, dK = run(None)
    for precision in ("fp32",) + LOW:
        Yp, dKp = run(precision)                    # numpy multiplies at the arrays' dtype
        assert np.array_equal(Yp, Y) and np.array_equal(dKp, dK), precision
    with pytest.raises(ValueError, match=r"precision must be one of 'fp32', 'tf32', 'bf16', 'fp16'; got 'BF16'"):
        mc.scan(state, K, V, Q, bias=rule.bias, chunk=4, precision="BF16", **gates)


def test_anchored_precision_keeps_fp32_products():
    from mirascore.chunk.anchored import anchored_precision
    assert [anchored_precision(p) for p in ("fp32", "tf32", "bf16", "fp16")] == ["fp32"] * 4


# ---------------------------------------------------------------- GPU: blas.matmul

@pytest.fixture
def poisoned(monkeypatch):
    """Every product and every cast operand mirascore.gpu.blas allocates starts as NaN."""
    import cupy
    from mirascore.gpu import blas, delta_rule_kernels
    nan_bits = {np.dtype(np.uint16): 0x7FC0}        # bfloat16 NaN, stored as uint16

    def nan_empty(shape, dtype):
        return cupy.full(shape, np.nan, dtype=dtype)

    def nan_empty_like(x, dtype):
        y = cupy.empty_like(x, dtype=dtype)
        y.fill(nan_bits.get(np.dtype(dtype), np.nan))
        return y
    monkeypatch.setattr(blas, "_empty", nan_empty)
    monkeypatch.setattr(blas, "_empty_like", nan_empty_like)
    monkeypatch.setattr(delta_rule_kernels, "_empty", nan_empty)


@pytest.mark.gpu
@given(batch=st.lists(st.integers(1, 3), max_size=3).map(tuple),
       m=st.integers(1, 9), k=st.integers(0, 40), n=st.integers(1, 9),
       la=st.sampled_from(LAYOUTS), lb=st.sampled_from(LAYOUTS), a_batched=st.booleans(),
       precision=st.sampled_from(settings.PRECISIONS), seed=st.integers(0, 2 ** 16))
def test_matmul_rounds_the_operands_and_accumulates_in_fp32(batch, m, k, n, la, lb, a_batched,
                                                             precision, seed):
    import cupy
    from mirascore.gpu import blas
    rng = np.random.default_rng(seed)
    a = _operand(cupy, rng, batch if a_batched else (), m, k, la, "float32")
    b = _operand(cupy, rng, batch, k, n, lb, "float32")
    got = blas.matmul(a, b, precision=precision)
    assert got.dtype == np.float32 and got.shape == np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (m, n)
    check_product(got, a, b, precision)
    with settings.using(precision=precision):       # the setting, as the chunk code meets it
        check_product(blas.matmul(a, b), a, b, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision, low, high", [
    ("fp32", 0.0, 2.0 ** -18), ("tf32", 2.0 ** -16, 2.0 ** -9), ("fp16", 2.0 ** -16, 2.0 ** -9),
    ("bf16", 2.0 ** -12, 2.0 ** -7)])
def test_each_precision_errs_as_its_format(poisoned, precision, low, high):
    """Relative RMS error against float64 of a (4, 64, 256)·(256, 64) product lies in the band of
    its format (bf16: 8 significant bits, fp16 and tf32: 11, fp32: 24), so that no precision
    silently runs as another; float64 products ignore the precision."""
    import cupy
    from mirascore.gpu import blas
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 64, 256)), rng.standard_normal((256, 64))
    exact = a @ b
    got = blas.matmul(cupy.asarray(a, np.float32), cupy.asarray(b, np.float32), precision=precision)
    assert low <= rel_rms(got, exact) <= high, f"{precision}: {rel_rms(got, exact):.2e}"
    double = blas.matmul(cupy.asarray(a), cupy.asarray(b), precision=precision)
    assert double.dtype == np.float64 and rel_rms(double, exact) < 1e-14


@pytest.mark.gpu
def test_matmul_rejects_a_bad_precision():
    import cupy
    from mirascore.gpu import blas
    with pytest.raises(ValueError, match="precision must be one of .*; got 'int8'"):
        blas.matmul(cupy.ones((2, 3), np.float32), cupy.ones((3, 2), np.float32), precision="int8")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", LOW)
def test_low_precision_products_inside_cuda_graphs(poisoned, precision):
    """mirascore.gpu.graph: eager, captured and replayed calls each give this precision's product
    of their own inputs, and a graph recorded at fp32 is not replayed at another precision (the
    precision is part of the signature). A caller's own capture records the casts and the GEMM."""
    import cupy
    from mirascore.gpu import blas, graph

    def fn(x, w):
        return blas.matmul(x, w.swapaxes(-1, -2)) * 2.0       # a transposed operand, then more work

    rng = np.random.default_rng(3)
    w = cupy.asarray(rng.standard_normal((3, 7, 33)), np.float32)
    graph.clear()
    for setting in ("fp32", precision):
        with settings.using(precision=setting):
            for _ in range(3):                                # eager, captured, replayed
                x = cupy.asarray(rng.standard_normal((3, 10, 33)), np.float32)
                out = graph.call(fn, (x, w), key="precision test")
                check_product(out / 2.0, x, w.swapaxes(-1, -2), setting)
    graph.clear()

    x = cupy.asarray(rng.standard_normal((2, 3, 10, 33)), np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        blas.matmul(x, w.swapaxes(-1, -2), precision=precision)    # warm-up: kernels, handle
        stream.begin_capture()
        out = blas.matmul(x, w.swapaxes(-1, -2), precision=precision)
        captured = stream.end_capture()
        captured.launch()
        stream.synchronize()
    check_product(out, x, w.swapaxes(-1, -2), precision)


# ---------------------------------------------------------------- GPU: mc.scan

def scan_problem(rule, batch, T, seed):
    """Host float64 inputs as the benchmarks make them (mirascore.testing.scan_inputs), and their seed."""
    return dict(mt.scan_inputs(rule, batch, T, seed), seed=seed)


def scan_results(xp, rule, prob, dtype, chunk, precision=None, backend="auto"):
    """{name: float64 numpy array}: Y, the final state's arrays and the gradients of all of them
    (random cotangents) w.r.t. the initial params, K, V, Q and every gate."""
    def on(x):
        return xp.asarray(x, dtype=dtype)

    def f(P, K, V, Q, gates):
        state = mc.init(rule.memory, P, retention=rule.retention, algorithm=rule.algorithm)
        Y, out = mc.scan(state, K, V, Q, bias=rule.bias, chunk=chunk, backend=backend,
                         precision=precision, **gates)
        return (Y,) + tuple(out.params) + tuple(out.momentum or ())
    args = (tuple(map(on, prob["params"])), on(prob["K"]), on(prob["V"]), on(prob["Q"]),
            {n: on(g) for n, g in prob["gates"].items()})
    outs, pull = ad.vjp(f, *args)
    rng = np.random.default_rng(prob["seed"] + 1)
    dP, dK, dV, dQ, dgates = pull(tuple(on(rng.standard_normal(o.shape)) for o in outs))
    named = {"Y": outs[0], **{f"final{i}": o for i, o in enumerate(outs[1:])},
             **{f"dP{i}": g for i, g in enumerate(dP)}, "dK": dK, "dV": dV, "dQ": dQ,
             **{f"d{n}": g for n, g in dgates.items()}}
    return {n: to_numpy(x).astype(np.float64) for n, x in named.items()}


def judge(rule, prob, chunk, small):
    """float64 results: `ref` (the per-token loops; the anchored loop for the anchored form)
    where small, else the float64 numpy chunked scan, itself judged against `ref` in
    test_chunk_delta.py and test_chunk_anchored.py."""
    return scan_results(np, rule, prob, np.float64, chunk, backend="ref" if small else "auto")


# (batch, T, d_k, d_v, chunk): partial last chunks, odd sizes; the last one is beyond the RawKernels
# (chunk > 64), so its chunk-to-chunk state loop runs as batched products in the given precision
DELTA_SHAPES = [((2,), 37, 8, 8, 8), ((2, 3), 77, 5, 4, 16), ((1,), 41, 64, 128, 64),
                ((), 130, 128, 96, 64), ((1,), 100, 16, 8, 96)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", DELTA_SHAPES, ids=lambda s: "B{}-T{}-dk{}-dv{}-C{}".format(*s))
def test_gated_deltanet_in_low_precision(poisoned, shape):
    """Every output and gradient within 1e-2 of float64 in bf16, fp16 and tf32 (the worst of them
    on the host emulation of these roundings: bf16 4.0–5.7e-3, fp16 and tf32 5.0–6.7e-4), and
    for bf16 and fp16 visibly off the fp32 result (Y and dK ≥ 1e-5: the casts reached the
    products). TF32 is a permission, not an order: cuBLAS runs small, unaligned products
    (d = 5, 8) with fp32 kernels, bit for bit the fp32 result (measured on the H200); the
    forward's fused per-chunk kernels round to TF32 at every size (test_chunk_delta.py checks
    them piece by piece), the TF32 cuBLAS kernels are checked in test_gpu_blas_graph.py."""
    import cupy
    batch, T, d_k, d_v, chunk = shape
    rule = mc.presets.gated_deltanet(d_k, d_v)
    prob = scan_problem(rule, batch, T, seed=T)
    want = judge(rule, prob, chunk, small=T <= 80 and d_k * d_v <= 64)
    fp32 = scan_results(cupy, rule, prob, np.float32, chunk, precision="fp32")
    for name in want:
        assert rel_rms(fp32[name], want[name]) < 1e-4, f"fp32 {name}"
    for precision in LOW:
        got = scan_results(cupy, rule, prob, np.float32, chunk, precision=precision)
        errors = {name: rel_rms(got[name], want[name]) for name in want}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= BOUND, f"{precision}: {worst} relative error {errors[worst]:.2e}"
        if precision != "tf32":
            assert min(rel_rms(got[n], fp32[n]) for n in ("Y", "dK")) >= 1e-5, f"{precision} not applied"


@pytest.mark.gpu
def test_precision_none_is_the_setting_at_the_call_and_holds_for_the_backward(poisoned):
    """precision=None takes the setting in force when mc.scan is called; the backward, called
    after the setting has changed back, still runs at it."""
    import cupy
    rule = mc.presets.gated_deltanet(8)
    prob = scan_problem(rule, (2,), 37, seed=5)
    on = cupy.asarray
    state = mc.init(rule.memory, tuple(on(p, np.float32) for p in prob["params"]),
                    retention=rule.retention, algorithm=rule.algorithm)
    K, V, Q = (on(prob[n], np.float32) for n in ("K", "V", "Q"))
    gates = {n: on(g, np.float32) for n, g in prob["gates"].items()}

    def f(K, precision=None):
        return mc.scan(state, K, V, Q, bias=rule.bias, chunk=8, precision=precision, **gates)[0]
    dY = cupy.ones((2, 37, 8), np.float32)
    Y_bf16, pull = ad.vjp(lambda K: f(K, "bf16"), K)
    dK_bf16 = pull(dY)[0]
    with settings.using(precision="bf16"):
        Y, pull = ad.vjp(f, K)
    assert settings.current().precision == "fp32"
    dK = pull(dY)[0]                                  # outside the block
    cupy.testing.assert_allclose(Y, Y_bf16, rtol=1e-6, atol=1e-7)
    cupy.testing.assert_allclose(dK, dK_bf16, rtol=1e-6, atol=1e-7)
    Y32, pull = ad.vjp(f, K)
    assert rel_rms(pull(dY)[0], to_numpy(dK)) > 1e-5 and rel_rms(Y32, to_numpy(Y)) > 1e-5


ANCHORED = [("moneta", (2,), 23, 5, 8), ("yaad", (2,), 23, 5, 8), ("memora", (1, 2), 19, 4, 8),
            ("titans", (2,), 23, 5, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ANCHORED, ids=lambda c: c[0])
def test_anchored_rules_keep_fp32_products_in_bf16_and_fp16(poisoned, case):
    """mc.scan runs the anchored form's products in fp32 when asked for bf16 or fp16
    (`anchored_precision`): within 1e-2 of float64 `ref`, and the fp32 call's results up to fp32
    round-off (≤ 1e-4 relative; these rules' fp32 errors against float64 are ≤ 3e-5 here, while
    16-bit products would move every result by 5e-4 to 1e-1, measured on the host emulation)."""
    import cupy
    name, batch, T, d, chunk = case
    rule = getattr(mc.presets, name)(d)
    prob = scan_problem(rule, batch, T, seed=T)
    want = judge(rule, prob, chunk, small=True)
    fp32 = scan_results(cupy, rule, prob, np.float32, chunk, precision="fp32")
    for precision in ("bf16", "fp16"):
        got = scan_results(cupy, rule, prob, np.float32, chunk, precision=precision)
        for key in want:
            assert rel_rms(got[key], want[key]) <= BOUND, f"{precision} {key}"
            assert rel_rms(got[key], fp32[key]) <= 1e-4, f"{precision} {key}: not the fp32 products"
