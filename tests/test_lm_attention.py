"""The attention core of the Transformer++ mixer (mirascore.lm.attention) against a naive form.

    naive_attention(q, k, v) = softmax(q kᵀ/√d + causal mask) v      (autodiff ops, a T×T matrix)

Forward and all three gradients of the blockwise primitive equal the naive form (and its autodiff
gradients) for random batch axes, T and block sizes (T not a multiple of the block, T < block,
T = 1, block = 1, T = 0); finite differences (ad.check_grads) on small shapes. RoPE: finite
differences to second order, the relative-position property, decoding one position at a time.
attend_cached equals the full forward's rows. Errors name the argument. On a GPU the same
comparisons on CuPy arrays, float32 and float64.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirascore.autodiff as ad
import mirascore.autodiff.numpy as anp
import mirascore.lm.attention as attention_mod
from mirascore._xp import namespace
from mirascore.lm.attention import attend_cached, causal_attention, rope


# ---------------------------------------------------------------- the judge

def naive_attention(q, k, v):
    """softmax(q kᵀ/√d + causal mask) v with autodiff ops, materialising the T×T scores."""
    T, d = q.shape[-2], q.shape[-1]
    xp = namespace(anp.stop_gradient(q))
    scores = anp.matmul(q, anp.swapaxes(k, -1, -2)) / math.sqrt(d)
    scores = anp.where(xp.tri(T, dtype=bool), scores, -np.inf)
    return anp.matmul(anp.softmax(scores, axis=-1), v)


def to_host(x):
    return x.get() if type(x).__module__.startswith("cupy") else np.asarray(x)


def assert_close(name, got, want, rtol=1e-10):
    """|got − want| ≤ rtol·max(1, max|want|) everywhere, shapes equal, got finite."""
    got, want = to_host(got), to_host(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite entries"
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=name)


# ---------------------------------------------------------------- inputs

@st.composite
def problems(draw, max_T=40):
    """(q, k, v, block): random leading axes, T ≥ 1, d and d_v ≥ 1, block from 1 to past T."""
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    T = draw(st.integers(1, max_T))
    d = draw(st.integers(1, 6))
    d_v = draw(st.one_of(st.just(d), st.integers(1, 6)))
    block = draw(st.one_of(st.sampled_from([1, 2, 3, 8, 16, 64]), st.integers(1, T + 3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.3, 1.0, 4.0]))        # 4: peaked softmax rows
    q = scale * rng.standard_normal(batch + (T, d))
    k = scale * rng.standard_normal(batch + (T, d))
    v = rng.standard_normal(batch + (T, d_v))
    return q, k, v, block, rng


# ---------------------------------------------------------------- forward

@given(problems())
def test_forward_matches_naive(p):
    q, k, v, block, _ = p
    assert_close("out", causal_attention(q, k, v, block=block), naive_attention(q, k, v))


@pytest.mark.parametrize("T,block", [(1, 64), (1, 1), (7, 1), (5, 8), (16, 16), (17, 16),
                                     (33, 16), (64, 64), (100, 64), (129, 32)])
def test_forward_awkward_lengths(T, block):
    rng = np.random.default_rng(T * 1000 + block)
    q, k, v = (rng.standard_normal((2, 3, T, 4)) for _ in range(3))
    assert_close(f"out T={T} block={block}", causal_attention(q, k, v, block), naive_attention(q, k, v))


def test_forward_logsumexp_is_the_rows():
    """The saved L is log Σ_j exp(S_ij) over the causal row: what the backward relies on."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 21, 3)) for _ in range(3))
    _, lse = attention_mod.attention_forward(q, k, v, block=4)
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(3)
    scores = np.where(np.tri(21, dtype=bool), scores, -np.inf)
    want = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
    assert_close("lse", lse, want)


def test_forward_is_causal_and_the_judge_can_fail():
    """Changing the last key and value changes only the last row; the comparison notices it."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 12, 4)) for _ in range(3))
    out = causal_attention(q, k, v, block=5)
    k2, v2 = k.copy(), v.copy()
    k2[:, -1] += 1.0
    v2[:, -1] -= 1.0
    out2 = causal_attention(q, k2, v2, block=5)
    np.testing.assert_array_equal(out2[:, :-1], out[:, :-1])
    with pytest.raises(AssertionError):
        assert_close("out", out2, naive_attention(q, k, v))


def test_large_scores_stay_finite():
    """Scores of ±1e4 overflow a plain exp; the online softmax rescales them away."""
    rng = np.random.default_rng(2)
    q, k = (100.0 * rng.standard_normal((3, 50, 4)) for _ in range(2))
    v = rng.standard_normal((3, 50, 4))
    assert_close("out", causal_attention(q, k, v, block=8), naive_attention(q, k, v))


def test_empty_sequence():
    q = np.zeros((2, 3, 0, 4))
    out = causal_attention(q, q, q)
    assert out.shape == (2, 3, 0, 4)
    grads = ad.grad(lambda *a: anp.sum(causal_attention(*a)), argnums=(0, 1, 2))(q, q, q)
    assert [g.shape for g in grads] == [q.shape] * 3


def test_dtypes_and_leading_axes():
    """float32 in, float32 out and gradients; no leading axes at all."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((10, 4)) for _ in range(3))
    assert_close("out (T, d)", causal_attention(q, k, v, block=3), naive_attention(q, k, v))
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    out, pull = ad.vjp(lambda *a: causal_attention(*a, block=3), q32, k32, v32)
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in pull(np.ones_like(out)))
    assert_close("out float32", out, naive_attention(q, k, v), rtol=1e-5)


# ---------------------------------------------------------------- backward

@given(problems(max_T=30))
def test_gradients_match_autodiff_through_naive(p):
    q, k, v, block, rng = p
    d_out = rng.standard_normal(v.shape)
    got = ad.vjp(lambda *a: causal_attention(*a, block=block), q, k, v)[1](d_out)
    want = ad.vjp(naive_attention, q, k, v)[1](d_out)
    for name, g, w in zip("qkv", got, want):
        assert_close(f"d{name}", g, w)


@pytest.mark.parametrize("argnums", [(0,), (1,), (2,), (0, 2), (1, 2)])
def test_partial_gradients(argnums):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 9, 3)) for _ in range(3))
    d_out = rng.standard_normal(v.shape)

    def loss(f):
        return lambda *a: anp.sum(f(*a) * d_out)
    got = ad.grad(loss(lambda *a: causal_attention(*a, block=4)), argnums=argnums)(q, k, v)
    want = ad.grad(loss(naive_attention), argnums=argnums)(q, k, v)
    for g, w in zip(got, want):
        assert_close("gradient", g, w)


@pytest.mark.parametrize("T,block,d_v", [(1, 64, 3), (6, 1, 3), (11, 4, 2), (20, 8, 5)])
def test_check_grads_finite_differences(T, block, d_v):
    rng = np.random.default_rng(T)
    q, k = (rng.standard_normal((2, T, 3)) for _ in range(2))
    v = rng.standard_normal((2, T, d_v))
    ad.check_grads(lambda *a: causal_attention(*a, block=block), q, k, v, order=1)


def test_check_grads_can_fail(monkeypatch):
    """A wrong backward is caught: scale dk and check_grads must name argument 1."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((9, 3)) for _ in range(3))
    good = attention_mod.attention_backward

    def bad(*args):
        dq, dk, dv = good(*args)
        return dq, 1.01 * dk, dv
    monkeypatch.setattr(attention_mod, "attention_backward", bad)
    with pytest.raises(AssertionError, match="argument 1"):
        ad.check_grads(lambda *a: causal_attention(*a, block=4), q, k, v, order=1)


def test_grad_of_grad_is_refused():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((5, 2)) for _ in range(3))
    with pytest.raises(NotImplementedError, match="causal_attention_bwd"):
        ad.check_grads(lambda *a: causal_attention(*a, block=2), q, k, v, order=2)


# ---------------------------------------------------------------- rope

def test_rope_formula():
    """The half-split rotation with θ_ti = p_t·base^(−2i/d), written out for d = 4."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 4))
    positions = np.array([0, 5, 2])
    got = rope(x, positions, base=100.0)
    theta = positions[:, None] * np.array([1.0, 100.0 ** -0.5])
    x1, x2 = x[..., :2], x[..., 2:]
    want = np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta),
                           x2 * np.cos(theta) + x1 * np.sin(theta)], axis=-1)
    assert_close("rope", got, want)
    np.testing.assert_array_equal(rope(x, np.zeros(3, dtype=int)), x)


@pytest.mark.parametrize("shape", [(5, 2), (2, 3, 7, 6)])
def test_rope_check_grads(shape):
    rng = np.random.default_rng(8)
    x = rng.standard_normal(shape)
    positions = rng.integers(0, 50, shape[-2])
    ad.check_grads(lambda x: rope(x, positions), x, order=2)
    ad.check_grads(lambda x: anp.sum(rope(x, positions) ** 3), x, order=2)


@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(0, 300), st.integers(0, 300),
       st.integers(-40, 40))
def test_rope_relative_position(seed, half_d, i, j, shift):
    """⟨rope(q, i), rope(k, j)⟩ depends only on i − j."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((1, 2 * half_d)) for _ in range(2))

    def score(i, j):
        return float(np.sum(rope(q, [i]) * rope(k, [j])))
    i2, j2 = i + abs(shift), j + abs(shift)
    assert abs(score(i, j) - score(i2, j2)) <= 1e-10 * (1 + np.linalg.norm(q) * np.linalg.norm(k))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rope_decoding_one_position_is_identical(dtype):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 37, 8)).astype(dtype)
    full = rope(x, np.arange(37))
    for t in range(37):
        np.testing.assert_array_equal(rope(x[..., t:t + 1, :], [t]), full[..., t:t + 1, :])
    assert full.dtype == dtype


def test_rope_is_a_rotation():
    """Norms of each (x1_i, x2_i) pair are kept, and the VJP undoes the rotation."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((4, 6))
    positions = np.arange(100, 104)
    y = rope(x, positions)
    assert_close("pair norms", y[:, :3] ** 2 + y[:, 3:] ** 2, x[:, :3] ** 2 + x[:, 3:] ** 2)
    assert_close("inverse", ad.vjp(lambda x: rope(x, positions), x)[1](y)[0], x)


# ---------------------------------------------------------------- decoding

@given(problems(max_T=24))
def test_attend_cached_equals_full_rows(p):
    q, k, v, _, rng = p
    T = q.shape[-2]
    T_max = T + int(rng.integers(0, 4))
    pad = [(0, 0)] * (q.ndim - 2) + [(0, T_max - T), (0, 0)]
    k_cache = np.pad(k, pad, constant_values=np.nan)        # the unused tail must not be read
    v_cache = np.pad(v, pad, constant_values=np.nan)
    full = causal_attention(q, k, v)
    for length in range(1, T + 1):
        got = attend_cached(q[..., length - 1, :], k_cache, v_cache, length)
        assert_close(f"row {length - 1}", got, full[..., length - 1, :])


def test_decoding_with_rope_matches_the_full_forward():
    """rope per position + attend_cached token by token = rope on the sequence + causal_attention."""
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 3, 19, 8)) for _ in range(3))
    positions = np.arange(19)
    full = causal_attention(rope(q, positions), rope(k, positions), v, block=4)
    k_cache = np.zeros_like(k)
    for t in range(19):
        k_cache[..., t, :] = rope(k[..., t:t + 1, :], [t])[..., 0, :]
        q_t = rope(q[..., t:t + 1, :], [t])[..., 0, :]
        assert_close(f"token {t}", attend_cached(q_t, k_cache, v, t + 1), full[..., t, :])


# ---------------------------------------------------------------- errors

def test_errors():
    x = np.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"k must have q's shape.*\(2, 6, 4\).*\(2, 5, 4\)"):
        causal_attention(x, np.zeros((2, 6, 4)), x)
    with pytest.raises(ValueError, match=r"v must have shape.*\(3, 5, 4\)"):
        causal_attention(x, x, np.zeros((3, 5, 4)))
    with pytest.raises(ValueError, match=r"q must have shape \(\.\.\., T, d\); got shape \(4,\)"):
        causal_attention(np.zeros(4), np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="k must be a floating-point array; got dtype int64"):
        causal_attention(x, x.astype(np.int64), x)
    with pytest.raises(ValueError, match="q, k, v must share one dtype.*v.dtype=float32"):
        causal_attention(x, x, x.astype(np.float32))
    with pytest.raises(ValueError, match=r"q must have a head dimension d ≥ 1"):
        causal_attention(np.zeros((5, 0)), np.zeros((5, 0)), np.zeros((5, 0)))
    for block in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=f"block must be a positive integer; got {block!r}"):
            causal_attention(x, x, x, block=block)

    with pytest.raises(ValueError, match=r"d must be even.*d=5"):
        rope(np.zeros((3, 5)), np.arange(3))
    with pytest.raises(ValueError, match=r"positions must be integers of shape \(T,\) = \(3,\); "
                                         r"got shape \(4,\)"):
        rope(np.zeros((3, 4)), np.arange(4))
    with pytest.raises(ValueError, match="positions must be integers.*float64"):
        rope(np.zeros((3, 4)), np.arange(3.0))
    with pytest.raises(ValueError, match="base must be a finite number > 0; got -1.0"):
        rope(np.zeros((3, 4)), np.arange(3), base=-1.0)
    with pytest.raises(ValueError, match=r"x must be a floating-point array.*shape \(4,\)"):
        rope(np.zeros(4), np.arange(1))

    cache = np.zeros((2, 3, 7, 4))
    with pytest.raises(ValueError, match=r"length must be an integer in \[1, T_max\] = \[1, 7\]; got 8"):
        attend_cached(np.zeros((2, 3, 4)), cache, cache, 8)
    with pytest.raises(ValueError, match="length must be an integer.*got 0"):
        attend_cached(np.zeros((2, 3, 4)), cache, cache, 0)
    with pytest.raises(ValueError, match=r"k_cache must have shape.*q.shape=\(2, 4, 4\)"):
        attend_cached(np.zeros((2, 4, 4)), cache, cache, 3)
    with pytest.raises(ValueError, match=r"v_cache must have shape.*v_cache.shape=\(2, 3, 6, 4\)"):
        attend_cached(np.zeros((2, 3, 4)), cache, np.zeros((2, 3, 6, 4)), 3)


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T,block", [(1, 64), (37, 16), (130, 64)])
def test_gpu_matches_cpu_and_naive(dtype, T, block):
    import cupy
    rng = np.random.default_rng(T)
    host = [rng.standard_normal((2, 3, T, 8)) for _ in range(3)]
    d_out = rng.standard_normal((2, 3, T, 8))
    q, k, v = (cupy.asarray(x, dtype=dtype) for x in host)
    rtol = 1e-10 if dtype == np.float64 else 1e-5      # float32: 6e-7 measured on the CPU

    out, pull = ad.vjp(lambda *a: causal_attention(*a, block=block), q, k, v)
    grads = pull(cupy.asarray(d_out, dtype=dtype))
    assert type(out) is cupy.ndarray and out.dtype == dtype
    assert all(type(g) is cupy.ndarray and g.dtype == dtype for g in grads)
    want_out, want_pull = ad.vjp(naive_attention, *host)          # float64 on the host
    assert_close("out", out, want_out, rtol=rtol)
    for name, g, w in zip("qkv", grads, want_pull(d_out)):
        assert_close(f"d{name}", g, w, rtol=rtol)
    assert_close("naive on the GPU", naive_attention(q, k, v), want_out, rtol=rtol)

    positions = np.arange(T)
    q_rot = rope(q, cupy.asarray(positions))
    assert type(q_rot) is cupy.ndarray and q_rot.dtype == dtype
    assert_close("rope", q_rot, rope(host[0], positions), rtol=rtol)
    for t in (0, T - 1):
        np.testing.assert_array_equal(to_host(rope(q[..., t:t + 1, :], [t])), to_host(q_rot[..., t:t + 1, :]))
    assert_close("attend_cached", attend_cached(q[..., T - 1, :], k, v, T), out[..., T - 1, :],
                 rtol=rtol)
    if dtype == np.float64:
        n = min(T, 9)
        head = tuple(x[..., :n, :] for x in (q, k, v))
        ad.check_grads(lambda *a: causal_attention(*a, block=4), *head, order=1)
        ad.check_grads(lambda x: rope(x, np.arange(n)), head[0], order=2)
