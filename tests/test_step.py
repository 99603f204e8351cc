"""step / scan / weights / recall: against independent loops, the reference, and their contracts.

- step equals the per-token recurrence of docs/contract.md §3 (tests/strategies.py's own numpy loop) for
  every memory × bias and every memory × retention × algorithm; scan(chunk=1) for rules drawn from
  the whole product;
- exact rules: scan(chunk=b) equals the per-token loop for every b, T not a multiple of b;
- anchored rules: scan(chunk=1) == ref.scan, scan(chunk=b) == ref.scan_chunked == the anchored
  loop of tests/strategies.py; chaining at a chunk boundary equals one call;
- batching, dtypes, array types, purity.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirascore as mc
import mirascore.testing as mt
from mirascore._xp import to_numpy
import strategies as S

# Two float64 evaluations of the same recurrence in a different order. The MLP's layer norm
# amplifies rounding by up to 1/sqrt(var(u) + 1e-5) ≈ 316 per token where var(u) is small, so 1e-9;
# a wrong derivation is off by far more (≥ 1e-4 in every deliberate mutation tried).
RTOL, ATOL = 1e-9, 1e-11


def assert_state(name, got_state, params, momentum, retention):
    """A MemoryState against stored params (compared through expose) and momentum."""
    for i, (g, w) in enumerate(zip(mc.weights(got_state), params)):
        mt.assert_close(f"{name}: weights[{i}]", g, S.expose(retention, w), rtol=RTOL, atol=ATOL)
    if momentum is None:
        assert got_state.momentum is None, f"{name}: momentum should be None"
    else:
        for i, (g, w) in enumerate(zip(got_state.momentum, momentum)):
            mt.assert_close(f"{name}: momentum[{i}]", g, w, rtol=RTOL, atol=ATOL)


def assert_same_state(name, a, b, rtol=RTOL, atol=ATOL):
    for i, (x, y) in enumerate(zip(mc.weights(a), mc.weights(b))):
        mt.assert_close(f"{name}: weights[{i}]", x, y, rtol=rtol, atol=atol)
    assert (a.momentum is None) == (b.momentum is None), name
    for i, (x, y) in enumerate(zip(a.momentum or (), b.momentum or ())):
        mt.assert_close(f"{name}: momentum[{i}]", x, y, rtol=rtol, atol=atol)


def run_scan(case, **kw):
    return mc.scan(case.state(), case.K, case.V, case.Q, bias=case.bias, **case.gates, **kw)


def oracle_scan(case):
    return S.scan(case.memory, case.bias, case.retention, case.algorithm, case.params,
                  case.K, case.V, case.Q, **case.gates)


# ---------------------------------------------------------------------------- one token


@pytest.mark.parametrize("rule", [(m, b, mc.retention.l2(), mc.algorithm.gd())
                                  for m in S.memories() for b in S.biases() + S.GATED_HUBERS]
                         + [(m, mc.bias.l2(), r, a) for m in S.memories() for r in S.retentions()
                            for a in (mc.algorithm.gd(), mc.algorithm.momentum())]
                         + [(mc.memory.linear(3, 2), mc.bias.l2(), mc.retention.none(), mc.algorithm.implicit())],
                         ids=lambda r: "-".join(S.ids(x) for x in r))
@given(data=st.data())
def test_step_follows_the_per_token_recurrence(rule, data):
    case = data.draw(S.cases(rule, T=2))
    state = case.state()
    params, mom = case.params, (tuple(np.zeros_like(p) for p in case.params)
                                if case.algorithm.name == "momentum" else None)
    for t in range(2):
        k, v, g = case.at(t)
        state = mc.step(state, k, v, bias=case.bias, **g)
        params, mom = S.step(case.memory, case.bias, case.retention, case.algorithm, params, mom, k, v, **g)
        assert_state(f"step {t}", state, params, mom, case.retention)
        mt.assert_close("recall", mc.recall(state, case.Q[..., t, :]),
                        S.apply(case.memory, tuple(S.expose(case.retention, p) for p in params),
                                case.Q[..., t, :]), rtol=RTOL, atol=ATOL)


@given(case=S.cases(S.rules()))
def test_scan_chunk1_follows_the_per_token_recurrence(case):
    Y, state = run_scan(case, chunk=1)
    Yo, params, mom = oracle_scan(case)
    mt.assert_close("Y", Y, Yo, rtol=RTOL, atol=ATOL)
    assert_state("final state", state, params, mom, case.retention)


@given(case=S.cases(S.rules(), T=st.integers(1, 5)))
def test_scan_equals_a_loop_of_steps_and_recalls(case):
    """scan reads y_t = M(W_t, q_t) after token t's update (chunk=1)."""
    Y, final = run_scan(case, chunk=1)
    state = case.state()
    for t in range(case.K.shape[-2]):
        k, v, g = case.at(t)
        state = mc.step(state, k, v, bias=case.bias, **g)
        mt.assert_close(f"y[{t}]", Y[..., t, :], mc.recall(state, case.Q[..., t, :]), rtol=RTOL, atol=ATOL)
    assert_same_state("final", final, state)


# ---------------------------------------------------------------------------- chunked forms


def lengths(b):
    """Sequence lengths that are not multiples of b (one partial chunk at least when b > 1)."""
    return st.integers(1, 7) if b == 1 else st.integers(1, 2 * b + 3).filter(lambda T: T % b)


@pytest.mark.parametrize("b", [1, 3, 16])
@pytest.mark.parametrize("rule", S.exact_rules(), ids=lambda r: "-".join(S.ids(x) for x in r))
@given(data=st.data())
def test_exact_rules_chunked_equal_the_per_token_loop(rule, b, data):
    case = data.draw(S.cases(rule, T=lengths(b)))
    Y, state = run_scan(case, chunk=b)
    Yo, params, mom = oracle_scan(case)
    mt.assert_close(f"Y (chunk={b})", Y, Yo, rtol=RTOL, atol=ATOL)
    assert_state(f"final state (chunk={b})", state, params, mom, case.retention)


ANCHORED = S.anchored_rules()


@pytest.mark.parametrize("rule", ANCHORED, ids=lambda r: "-".join(S.ids(x) for x in r))
@given(data=st.data())
def test_anchored_rules_equal_the_reference(rule, data):
    """scan(chunk=b) == ref.scan_chunked(chunk=b) == the anchored loop written from docs/contract.md §4 and
    docs/internals.md; with b = 1 also == ref.scan (the per-token recurrence)."""
    b = data.draw(st.sampled_from([1, 2, 3, 5]), label="chunk")
    case = data.draw(S.cases(rule, T=lengths(b)))
    Y, state = run_scan(case, chunk=b)
    Yr, ref_state = mc.ref.scan_chunked(case.state(), case.K, case.V, case.Q, bias=case.bias,
                                        chunk=b, **case.gates)
    mt.assert_close(f"Y vs ref.scan_chunked (chunk={b})", Y, Yr, rtol=RTOL, atol=ATOL)
    assert_same_state(f"state vs ref.scan_chunked (chunk={b})", state, ref_state)
    Yo, params, mom = S.scan_anchored(case.memory, case.bias, case.retention, case.algorithm,
                                      case.params, case.K, case.V, case.Q, chunk=b, **case.gates)
    mt.assert_close(f"ref.scan_chunked Y vs anchored loop (chunk={b})", Yr, Yo, rtol=RTOL, atol=ATOL)
    assert_state(f"ref.scan_chunked state vs anchored loop (chunk={b})", ref_state, params, mom,
                 case.retention)
    if b == 1:
        Yr, ref_state = mc.ref.scan(case.state(), case.K, case.V, case.Q, bias=case.bias, **case.gates)
        mt.assert_close("Y vs ref.scan", Y, Yr, rtol=RTOL, atol=ATOL)
        assert_same_state("state vs ref.scan", state, ref_state)


def test_anchored_differs_from_per_token_beyond_chunk1():
    """The anchored form is an approximation: with b > 1 a nonlinear rule's result changes."""
    rule = (mc.memory.mlp(3, expansion=2), mc.bias.l2(), mc.retention.l2(), mc.algorithm.gd())
    rng = np.random.default_rng(0)
    case = S.Case(*rule, rule[0].init(rng, (), np.float64), *(rng.standard_normal((6, 3)) for _ in range(3)),
                  {"lr": 0.5, "alpha": 0.9})
    Y1, _ = run_scan(case, chunk=1)
    Y3, _ = run_scan(case, chunk=3)
    assert np.max(np.abs(Y1 - Y3)) > 1e-6


@pytest.mark.parametrize("b", [1, 3])
@given(data=st.data())
def test_chaining_at_a_chunk_boundary_equals_one_call(b, data):
    rule = data.draw(S.rules())
    case = data.draw(S.cases(rule, T=st.integers(b + 1, 3 * b + 2)))
    T = case.K.shape[-2]
    split = data.draw(st.integers(1, (T - 1) // b)) * b
    Y, final = run_scan(case, chunk=b)
    first = {n: g if np.ndim(g) == 0 else g[..., :split] for n, g in case.gates.items()}
    second = {n: g if np.ndim(g) == 0 else g[..., split:] for n, g in case.gates.items()}
    Y1, mid = mc.scan(case.state(), case.K[..., :split, :], case.V[..., :split, :], case.Q[..., :split, :],
                      bias=case.bias, chunk=b, **first)
    Y2, end = mc.scan(mid, case.K[..., split:, :], case.V[..., split:, :], case.Q[..., split:, :],
                      bias=case.bias, chunk=b, **second)
    mt.assert_close(f"Y chained at {split} (chunk={b})", np.concatenate([Y1, Y2], axis=-2), Y,
                    rtol=RTOL, atol=ATOL)
    assert_same_state(f"state chained at {split} (chunk={b})", end, final, rtol=RTOL, atol=ATOL)


@given(case=S.cases(S.rules(), T=st.integers(1, 6)))
def test_ref_backend_equals_the_fast_path(case):
    for b in (1, 4):
        Y, state = run_scan(case, chunk=b)
        Yr, ref_state = run_scan(case, chunk=b, backend="ref")
        mt.assert_close(f"backend='ref' Y (chunk={b})", Yr, Y, rtol=RTOL, atol=ATOL)
        assert_same_state(f"backend='ref' state (chunk={b})", ref_state, state)


# ---------------------------------------------------------------------------- batching, dtypes, purity


@given(data=st.data())
def test_batched_step_equals_a_loop_over_the_batch(data):
    rule = data.draw(S.rules())
    case = data.draw(S.cases(rule, T=1, batch=st.sampled_from([(2,), (1, 3), (2, 2)]), scalar_gates=st.just(False)))
    k, v, g = case.at(0)
    batched = mc.step(case.state(), k, v, bias=case.bias, **g)
    for i in np.ndindex(*k.shape[:-1]):
        one = mc.init(case.memory, tuple(p[i] for p in case.params), retention=case.retention,
                      algorithm=case.algorithm)
        one = mc.step(one, k[i], v[i], bias=case.bias, **{n: x[i] for n, x in g.items()})
        for j, (a, b) in enumerate(zip(mc.weights(batched), mc.weights(one))):
            mt.assert_close(f"batch element {i}: weights[{j}]", a[i], b, rtol=RTOL, atol=ATOL)


def test_shared_params_serve_a_batch_of_tokens():
    """params without batch dims broadcast against a batch of tokens: each row its own update."""
    memory = mc.memory.linear(3, 2)
    rng = np.random.default_rng(0)
    (W,) = memory.init(rng, (), np.float64)
    k, v = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    out = mc.step(mc.init(memory, (W,)), k, v, bias=mc.bias.l2(), lr=0.1)
    assert out.params[0].shape == (4, 2, 3)
    for i in range(4):
        np.testing.assert_allclose(out.params[0][i], W - 0.1 * np.outer(W @ k[i] - v[i], k[i]), rtol=1e-14)


RULES_FOR_DTYPES = [
    (mc.memory.linear(3, 2), mc.bias.l2(), mc.retention.l2(grad_at="retained"), mc.algorithm.gd()),
    (mc.memory.linear(3, 2), mc.bias.dot(), mc.retention.l2(), mc.algorithm.gd()),
    (mc.memory.mlp(3, expansion=2), mc.bias.lp(3.0), mc.retention.lq(4.0), mc.algorithm.gd()),
    (mc.memory.mlp(3, expansion=2), mc.bias.huber(kind="mixture"), mc.retention.l2(), mc.algorithm.gd()),
    (mc.memory.mlp(3, expansion=2), mc.bias.l2(), mc.retention.kl(), mc.algorithm.gd()),
    (mc.memory.mlp(3, expansion=2), mc.bias.l2(), mc.retention.l2(), mc.algorithm.momentum()),
    (mc.memory.linear(3, 2), mc.bias.l2(), mc.retention.none(), mc.algorithm.implicit()),
]


def fixed_case(rule, rng, batch=(2,), T=5):
    memory, bias, retention, algorithm = rule
    params = memory.init(rng, batch, np.float64)
    if retention.name == "lq":
        params = tuple(np.where(np.abs(p) < 0.3, 0.3, p) for p in params)
    K, V, Q = (rng.standard_normal(batch + (T, d)) for d in (memory.d_in, memory.d_out, memory.d_in))
    K, Q = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (K, Q))
    gates = {"lr": rng.uniform(0, 0.2, batch + (T,))}
    if retention.name != "none":
        gates["alpha"] = rng.uniform(0.5, 1, batch + (T,))
    if bias.needs_delta:
        gates["delta"] = rng.uniform(0.1, 2, batch + (T,))
    if algorithm.name == "momentum":
        gates["beta"] = rng.uniform(0, 0.9, batch + (T,))
    return S.Case(memory, bias, retention, algorithm, params, K, V, Q, gates)


def on(xp, dtype, case):
    conv = lambda x: xp.asarray(x, dtype=dtype)
    return S.Case(*case[:4], tuple(conv(p) for p in case.params), conv(case.K), conv(case.V), conv(case.Q),
                  {n: conv(g) for n, g in case.gates.items()})


@pytest.mark.parametrize("rule", RULES_FOR_DTYPES, ids=lambda r: "-".join(S.ids(x) for x in r))
def test_results_keep_the_input_dtype_and_array_type(xp, rule):
    """float64 in, float64 out; float32 in, float32 out; numpy or CuPy as given; values agree."""
    base = fixed_case(rule, np.random.default_rng(0))
    Y64, st64 = run_scan(base, chunk=2)
    for dtype, rtol in ((xp.float64, 1e-10), (xp.float32, 2e-3)):
        case = on(xp, dtype, base)
        for b in (1, 2):
            Y, state = run_scan(case, chunk=b)
            outs = [Y, *state.params, *mc.weights(state), *(state.momentum or ())]
            assert all(type(o) is type(case.K) and o.dtype == dtype for o in outs), \
                [(type(o).__name__, o.dtype) for o in outs]
        mt.assert_close(f"Y on {xp.__name__} {np.dtype(dtype)}", Y, Y64, rtol=rtol, atol=rtol)
        k, v, g = case.at(0)
        one = mc.step(case.state(), k, v, bias=case.bias, **g)
        y = mc.recall(one, case.Q[..., 0, :])
        assert all(type(o) is type(k) and o.dtype == dtype for o in (*one.params, y))


def test_float64_gates_do_not_promote_float32_data():
    """The compute dtype is that of the params and inputs; gates follow it."""
    case = on(np, np.float32, fixed_case(RULES_FOR_DTYPES[0], np.random.default_rng(1)))
    gates = {n: g.astype(np.float64) for n, g in case.gates.items()}
    Y, state = mc.scan(case.state(), case.K, case.V, case.Q, bias=case.bias, **gates)
    assert Y.dtype == np.float32 and state.params[0].dtype == np.float32


@pytest.mark.parametrize("rule", RULES_FOR_DTYPES, ids=lambda r: "-".join(S.ids(x) for x in r))
def test_step_and_scan_are_pure(rule):
    case = fixed_case(rule, np.random.default_rng(2))
    copies = [x.copy() for x in (*case.params, case.K, case.V, case.Q, *case.gates.values())]
    state = case.state()
    k, v, g = case.at(0)
    after = mc.step(state, k, v, bias=case.bias, **g)
    run_scan(case, chunk=2)
    for a, b in zip(copies, (*case.params, case.K, case.V, case.Q, *case.gates.values())):
        np.testing.assert_array_equal(a, b)
    assert after is not state


@pytest.mark.parametrize("rule", RULES_FOR_DTYPES, ids=lambda r: "-".join(S.ids(x) for x in r))
def test_time_broadcast_gates(rule):
    """Gates constant in time may come as (..., 1) arrays, gates constant everywhere as numbers."""
    case = fixed_case(rule, np.random.default_rng(3))
    per_batch = {n: np.broadcast_to(g[..., :1], g.shape) for n, g in case.gates.items()}
    everywhere = {n: np.full(g.shape, g.flat[0]) for n, g in case.gates.items()}
    for full, short, what in ((per_batch, {n: g[..., :1] for n, g in case.gates.items()}, "(..., 1)"),
                              (everywhere, {n: float(g.flat[0]) for n, g in case.gates.items()}, "number")):
        Y, state = mc.scan(case.state(), case.K, case.V, case.Q, bias=case.bias, chunk=2, **full)
        Y2, state2 = mc.scan(case.state(), case.K, case.V, case.Q, bias=case.bias, chunk=2, **short)
        mt.assert_close(f"Y with {what} gates", Y2, Y, rtol=1e-15, atol=0)
        assert_same_state(f"state with {what} gates", state2, state, rtol=1e-15, atol=0)


@pytest.mark.parametrize("rule", [pytest.param(RULES_FOR_DTYPES[0], id="exact"),
                                  pytest.param(RULES_FOR_DTYPES[2], id="anchored")])
def test_empty_sequence_leaves_the_state_unchanged(rule):
    case = fixed_case(rule, np.random.default_rng(4), T=0)
    Yr, ref_state = run_scan(case, backend="ref")
    assert Yr.shape == (2, 0, case.memory.d_out)
    assert_same_state("T = 0 (ref)", ref_state, case.state(), rtol=0, atol=0)
    Y, state = run_scan(case)
    assert Y.shape == (2, 0, case.memory.d_out)
    assert_same_state("T = 0", state, case.state(), rtol=0, atol=0)


@pytest.mark.parametrize("rule", RULES_FOR_DTYPES, ids=lambda r: "-".join(S.ids(x) for x in r))
def test_numpy_and_xp_agree(xp, rule):
    base = fixed_case(rule, np.random.default_rng(5))
    Y, state = run_scan(base, chunk=2)
    Yx, statex = run_scan(on(xp, xp.float64, base), chunk=2)
    mt.assert_close(f"Y on {xp.__name__}", to_numpy(Yx), Y, rtol=RTOL, atol=ATOL)
    for a, b in zip(mc.weights(statex), mc.weights(state)):
        mt.assert_close(f"weights on {xp.__name__}", to_numpy(a), b, rtol=RTOL, atol=ATOL)
