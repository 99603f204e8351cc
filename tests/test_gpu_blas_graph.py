"""mirascore.gpu.blas (capture-safe cuBLAS GEMM) and mirascore.gpu.graph (CUDA graph replay),
on the GPU only: matmul equals cupy.matmul for every operand layout the chunk code produces, and
a replayed graph equals the eager function for fresh inputs."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.gpu

LAYOUTS = ("contiguous", "transposed", "strided", "broadcast", "reversed")


def _operand(cupy, rng, batch, rows, cols, layout, dtype):
    """A (batch..., rows, cols) array in the given memory layout."""
    if layout == "transposed":
        return cupy.asarray(rng.standard_normal(batch + (cols, rows)), dtype=dtype).swapaxes(-1, -2)
    if layout == "strided":      # a column slice: rows further apart than the row length
        return cupy.asarray(rng.standard_normal(batch + (rows, cols + 3)), dtype=dtype)[..., :cols]
    if layout == "broadcast":    # one matrix shared by the whole batch
        return cupy.broadcast_to(cupy.asarray(rng.standard_normal((rows, cols)), dtype=dtype),
                                 batch + (rows, cols))
    if layout == "reversed":     # negative strides: must be copied, never misread
        return cupy.asarray(rng.standard_normal(batch + (rows, cols)), dtype=dtype)[..., ::-1, :]
    return cupy.asarray(rng.standard_normal(batch + (rows, cols)), dtype=dtype)


@given(batch=st.lists(st.integers(1, 3), max_size=3).map(tuple),
       m=st.integers(1, 9), k=st.integers(0, 9), n=st.integers(1, 9),
       la=st.sampled_from(LAYOUTS), lb=st.sampled_from(LAYOUTS),
       a_batched=st.booleans(), dtype=st.sampled_from(["float32", "float64"]),
       seed=st.integers(0, 2 ** 16))
def test_matmul_equals_cupy(batch, m, k, n, la, lb, a_batched, dtype, seed):
    import cupy
    from mirascore.gpu import blas
    rng = np.random.default_rng(seed)
    a = _operand(cupy, rng, batch if a_batched else (), m, k, la, dtype)
    b = _operand(cupy, rng, batch, k, n, lb, dtype)
    got = blas.matmul(a, b)
    want = cupy.matmul(a, b)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = 1e-5 if dtype == "float32" else 1e-12
    cupy.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_matmul_rejects_bad_input():
    import cupy
    from mirascore.gpu import blas
    with pytest.raises(ValueError, match="inner sizes"):
        blas.matmul(cupy.ones((2, 3)), cupy.ones((4, 2)))
    with pytest.raises(ValueError, match="float32 or two float64"):
        blas.matmul(cupy.ones((2, 3), "float32"), cupy.ones((3, 2), "float64"))
    with pytest.raises(ValueError, match="ndim"):
        blas.matmul(cupy.ones(3), cupy.ones((3, 2)))


def test_tf32_switch_changes_float32_products_only_within_tf32_error():
    import cupy
    from mirascore.gpu import blas
    rng = np.random.default_rng(0)
    a = cupy.asarray(rng.standard_normal((4, 64, 256)), dtype=cupy.float32)
    b = cupy.asarray(rng.standard_normal((4, 256, 64)), dtype=cupy.float32)
    exact = cupy.matmul(a.astype(cupy.float64), b.astype(cupy.float64))
    from mirascore.gpu import settings
    blas.matmul(a, b)                                  # a handle exists before the switch
    with settings.using(tf32=True):
        fast = blas.matmul(a, b)
    previous = blas.set_tf32(True)                     # the same switch, kept for callers
    try:
        assert blas.matmul(a, b).dtype == a.dtype and previous is False
    finally:
        blas.set_tf32(previous)
    err = float(cupy.linalg.norm(fast - exact) / cupy.linalg.norm(exact))
    assert err < 1e-2
    assert float(cupy.linalg.norm(blas.matmul(a, b) - exact) / cupy.linalg.norm(exact)) < 1e-6


def test_graph_replay_equals_eager_for_fresh_inputs():
    """First call eager, second captured, later ones replayed: each equals the eager function on
    its own inputs, outputs are fresh arrays (a replay does not overwrite earlier results), and
    None leaves and nested tuples pass through."""
    import cupy
    from mirascore.gpu import blas, graph

    def fn(x, pair):
        w, none = pair
        assert none is None
        h = blas.matmul(x, w)
        return cupy.tanh(h).sum(axis=-1), (h * 2, None)

    rng = np.random.default_rng(1)
    graph.clear()
    w = cupy.asarray(rng.standard_normal((3, 5, 4)))
    results = []
    for _ in range(4):
        x = cupy.asarray(rng.standard_normal((3, 6, 5)))
        out = graph.call(fn, (x, (w, None)), key="test")
        results.append((x, out))
    assert graph.memory_bytes() > 0
    for x, (s, (h2, none)) in results:
        assert none is None
        cupy.testing.assert_allclose(h2, 2 * cupy.matmul(x, w), rtol=1e-12)
        cupy.testing.assert_allclose(s, cupy.tanh(cupy.matmul(x, w)).sum(axis=-1), rtol=1e-12)
    graph.clear()
    assert graph.memory_bytes() == 0


def test_graph_keeps_at_most_max_graphs():
    import cupy
    from mirascore.gpu import graph, settings
    graph.clear()
    most = settings.current().max_graphs
    for n in range(most + 3):
        x = cupy.ones(n + 1)
        for _ in range(2):
            graph.call(lambda v: v * 3, (x,), key="size")
    assert len(settings.RESOURCES.graphs) == most
    with settings.using(max_graphs=2):
        assert len(settings.RESOURCES.graphs) == 2              # trimmed at once
    graph.clear()


def test_graph_replay_can_be_turned_off_and_unhashable_keys_run_eagerly():
    import cupy
    from mirascore.gpu import graph, settings
    graph.clear()
    x = cupy.ones(3)
    with settings.using(cuda_graphs=False):
        for _ in range(3):
            graph.call(lambda v: v * 3, (x,), key="off")
    for _ in range(3):
        cupy.testing.assert_allclose(graph.call(lambda v: v * 3, (x,), key=("unhashable", [1])), 3 * x)
    assert len(settings.RESOURCES.graphs) == 0


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_scan_with_many_chunks_is_captured_and_replayed():
    """mc.scan forward + backward of an mlp rule over 40 chunks, three times on the GPU: the
    capture must succeed (a failed one warns, an error here) and every call equals numpy."""
    import cupy
    import mirascore as mc
    import mirascore.autodiff as ad
    from mirascore.gpu import graph
    rule = mc.presets.titans(4)
    rng = np.random.default_rng(3)
    B, T = 2, 80
    params = rule.memory.init(0, batch_shape=(B,), dtype=np.float64)
    graph.clear()
    for call in range(3):
        K, V, Q = (rng.standard_normal((B, T, 4)) for _ in range(3))
        K, Q = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (K, Q))
        gates = dict(lr=np.full((B, T), 0.1), alpha=np.full((B, T), 0.95), beta=np.full((B, T), 0.9))
        dY = rng.standard_normal((B, T, 4))

        def run(xp):
            on = xp.asarray

            def f(P, K, V, Q):
                state = mc.init(rule.memory, P, retention=rule.retention, algorithm=rule.algorithm)
                return mc.scan(state, K, V, Q, bias=rule.bias, chunk=2,
                               **{k: on(v) for k, v in gates.items()})[0]
            Y, pull = ad.vjp(f, tuple(map(on, params)), on(K), on(V), on(Q))
            return Y, pull(on(dY))
        (Yg, gg), (Yn, gn) = run(cupy), run(np)
        for a, b in zip((Yg,) + gg[0] + gg[1:], (Yn,) + gn[0] + gn[1:]):   # Y, params, K, V, Q
            # float64 round-off differs between cuBLAS and numpy: relative to each array's scale
            cupy.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10 * float(np.abs(b).max()))
    assert graph.memory_bytes() > 0
    graph.clear()


def test_scan_inside_the_callers_own_capture():
    """A caller that records its own CUDA graph around the scan (after a warm-up on its stream)
    gets the scan's kernels recorded into that graph, not a nested capture."""
    import cupy
    import mirascore as mc
    from mirascore.chunk.anchored import anchored_scan_fwd
    rule = mc.presets.ttt_mlp(4)
    rng = np.random.default_rng(5)
    K, V, Q = (rng.standard_normal((2, 12, 4)) for _ in range(3))
    lr, alpha = np.full((2, 12), 0.1), np.full((2, 12), 0.9)
    params = rule.memory.init(0, batch_shape=(2,), dtype=np.float64)

    def inputs(xp):             # made outside the capture: no host copies or checks inside it
        state = mc.init(rule.memory, tuple(map(xp.asarray, params)), retention=rule.retention,
                        algorithm=rule.algorithm)
        return state, *map(xp.asarray, (K, V, Q, lr, alpha))

    def run(state, K, V, Q, lr, alpha):
        return anchored_scan_fwd(state, K, V, Q, bias=rule.bias, lr=lr, alpha=alpha, chunk=5)[0]
    on_gpu = inputs(cupy)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        run(*on_gpu)                                # warm-up: kernels compiled, cuBLAS handle made
        stream.begin_capture()
        Y = run(*on_gpu)
        captured = stream.end_capture()
        captured.launch()
        stream.synchronize()
    cupy.testing.assert_allclose(Y, run(*inputs(np)), rtol=1e-9, atol=1e-12)


def test_a_whole_scan_with_check_finite_false_is_captured_by_the_caller():
    """check_finite=False: validation looks at no value and nothing is copied from the host, so a
    caller can record mc.init + mc.scan (forward and backward) of both chunk families as one CUDA
    graph (any synchronisation or host copy inside would make the capture fail)."""
    import cupy
    import mirascore as mc
    import mirascore.autodiff as ad
    rng = np.random.default_rng(7)
    B, T, d = 2, 12, 4
    for rule in (mc.presets.yaad(d), mc.presets.gated_deltanet(d)):
        host = dict(K=rng.standard_normal((B, T, d)), V=rng.standard_normal((B, T, d)),
                    Q=rng.standard_normal((B, T, d)), lr=np.full((B, T), 0.1),
                    alpha=np.full((B, T), 0.9), dY=rng.standard_normal((B, T, d)))
        if rule.bias.needs_delta:
            host["delta"] = np.full((B, T), 1.0)
        params = rule.memory.init(0, batch_shape=(B,), dtype=np.float64)

        def run(xp, arrays, P):
            def f(P, K):
                state = mc.init(rule.memory, P, retention=rule.retention, algorithm=rule.algorithm,
                                check_finite=False)
                gates = {n: arrays[n] for n in ("lr", "alpha", "delta") if n in arrays}
                return mc.scan(state, K, arrays["V"], arrays["Q"], bias=rule.bias, chunk=5,
                               check_finite=False, **gates)[0]
            Y, pull = ad.vjp(f, P, arrays["K"])
            return Y, pull(arrays["dY"])
        dev = {n: cupy.asarray(x) for n, x in host.items()}
        P = tuple(map(cupy.asarray, params))
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            run(cupy, dev, P)                          # warm-up: kernels compiled, handles made
            stream.begin_capture()
            Y, (dP, dK) = run(cupy, dev, P)
            captured = stream.end_capture()
            captured.launch()
            stream.synchronize()
        Yn, (dPn, dKn) = run(np, host, params)
        for a, b in zip((Y, dK, *dP), (Yn, dKn, *dPn)):
            cupy.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10 * float(np.abs(b).max()))
