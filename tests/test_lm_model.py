"""The language models: gradients, decoding, causality, configs (docs/training.md).

Every model is checked in float64 at tiny sizes: the whole-model gradient by finite differences,
decode_step against forward (exact at the configured chunk size), causality and prefix
consistency (logits at t depend neither on later tokens nor on the sequence's length).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mirascore.autodiff as ad
from mirascore._xp import namespace
from mirascore.lm import config, model

MODELS = ["transformer", "gated_deltanet", "moneta", "yaad", "memora", "titans"]
VOCAB = 13


def tiny(name, **changes):
    """A float64-checkable model: width 12, 2 blocks, 2 heads, chunk 3 (which divides few T)."""
    fields = {"model": name, "vocab": VOCAB, "width": 12, "depth": 2, "heads": 2, "chunk": 3,
              "gate_rank": 4, "attention_block": 4}
    fields.update(changes)
    return config.from_dict({"model": fields})


def tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


def to_xp(params, xp):
    return {n: xp.asarray(a) for n, a in params.items()}


# Yaad's bias switches between ℓ2 and ℓ1 gradients at ‖r‖ = δ, a jump of ψ: a finite difference
# whose two points straddle a switch measures the jump, not the gradient. These seeds straddle none
# (checked: shrinking eps makes the gap grow like 1/eps where one does, a bug would not).
GRAD_SEED = {"yaad": 1}
# Moneta's exposed memory W = A/‖A‖₄² is strongly curved where the accumulator's norm is small:
# the central difference's O(eps²·f‴) error is 7e-5 at eps = 1e-6 and 7e-7 at 1e-7 (measured: it
# falls 100× per decade of eps, as a truncation error must, while the gradient stays), so Moneta
# is checked with eps = 1e-7.
GRAD_EPS = {"moneta": 1e-7}


@pytest.mark.parametrize("name", MODELS)
def test_whole_model_gradient(name):
    """Every parameter's gradient of the mean loss, chunk 3 not dividing T = 7."""
    cfg = tiny(name)
    seed = GRAD_SEED.get(name, 1)
    params = model.init(cfg, seed=seed, dtype=np.float64)
    toks = tokens((2, 8), seed)
    ad.check_grads(lambda p: model.loss(p, toks, cfg), params, order=1, eps=GRAD_EPS.get(name, 1e-6))


@pytest.mark.parametrize("name", MODELS)
def test_gradient_per_parameter(name):
    """Each parameter on its own (a dot test over all of them at once could hide a small one)."""
    cfg = tiny(name, depth=1)
    seed = GRAD_SEED.get(name, 2)
    params = model.init(cfg, seed=seed, dtype=np.float64)
    toks = tokens((2, 6), seed)
    grads = ad.grad(model.loss)(params, toks, cfg)
    assert set(grads) == set(params)
    rng = np.random.default_rng(3)
    for key, value in params.items():
        u = rng.standard_normal(value.shape)
        eps = GRAD_EPS.get(name, 1e-6)
        plus, minus = dict(params), dict(params)
        plus[key], minus[key] = value + eps * u, value - eps * u
        numeric = (model.loss(plus, toks, cfg) - model.loss(minus, toks, cfg)) / (2 * eps)
        analytic = float(np.sum(grads[key] * u))
        assert abs(numeric - analytic) <= 1e-5 * (1 + abs(numeric)), (key, numeric, analytic)


def decode_all(params, toks, cfg):
    cache = model.init_cache(params, cfg, batch=toks.shape[0], max_len=toks.shape[1])
    out = []
    for t in range(toks.shape[1]):
        logits, cache = model.decode_step(params, cache, toks[:, t], cfg)
        out.append(logits)
    return namespace(toks).stack(out, axis=1)


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=4)
@given(T=st.integers(1, 11), chunk=st.sampled_from([1, 2, 4]))
def test_decode_equals_forward(name, T, chunk):
    cfg = tiny(name, chunk=chunk)
    params = model.init(cfg, seed=4, dtype=np.float64)
    toks = tokens((2, T), T)
    full = model.forward(params, toks, cfg)
    stepped = decode_all(params, toks, cfg)
    assert np.abs(stepped - full).max() <= 1e-9 * np.abs(full).max()


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=4)
@given(T=st.integers(1, 11), more=st.integers(1, 5), chunk=st.sampled_from([1, 2, 4]))
def test_prefill_equals_forward_and_decoding_continues(name, T, more, chunk):
    """prefill's logits are forward's; decoding on from its cache gives forward's logits after it,
    whether the prompt ends inside a chunk or on its boundary."""
    cfg = tiny(name, chunk=chunk)
    params = model.init(cfg, seed=5, dtype=np.float64)
    toks = tokens((2, T + more), T)
    full = model.forward(params, toks, cfg)
    logits, cache = model.prefill(params, toks[:, :T], cfg, max_len=T + more)
    assert cache.position == T
    steps = [logits]
    for t in range(T, T + more):
        step_logits, cache = model.decode_step(params, cache, toks[:, t], cfg)
        steps.append(step_logits[:, None])
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-9 * np.abs(full).max()


def test_prefill_errors():
    cfg = tiny("transformer")
    params = model.init(cfg, seed=0, dtype=np.float64)
    with pytest.raises(ValueError, match="max_len = 4"):
        model.prefill(params, tokens((1, 5)), cfg, max_len=4)
    with pytest.raises(ValueError, match="shape"):
        model.prefill(params, tokens((5,)), cfg)


@pytest.mark.parametrize("name", MODELS)
def test_causal_and_prefix_consistent(name):
    """Changing tokens after t leaves logits ≤ t unchanged; so does cutting the sequence at t."""
    cfg = tiny(name)
    params = model.init(cfg, seed=5, dtype=np.float64)
    toks = tokens((2, 10), 5)
    full = model.forward(params, toks, cfg)
    for t in (0, 4, 7):
        changed = toks.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % VOCAB
        assert np.array_equal(model.forward(params, changed, cfg)[:, :t + 1], full[:, :t + 1])
        prefix = model.forward(params, toks[:, :t + 1], cfg)
        assert np.abs(prefix - full[:, :t + 1]).max() <= 1e-12 * np.abs(full).max()
        if t + 1 < toks.shape[1]:   # and the future does matter
            assert not np.allclose(model.forward(params, changed, cfg)[:, t + 1:], full[:, t + 1:])


@pytest.mark.parametrize("name", MODELS)
def test_loss_is_mean_cross_entropy(name):
    cfg = tiny(name)
    params = model.init(cfg, seed=6, dtype=np.float64)
    toks = tokens((3, 9), 6)
    logits = model.forward(params, toks[:, :-1], cfg)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, toks[:, 1:, None], -1).mean()
    assert np.isclose(model.loss(params, toks, cfg), expected, rtol=1e-12)


def test_init_is_deterministic_and_dtype_independent():
    cfg = tiny("moneta")
    a, b = model.init(cfg, seed=7), model.init(cfg, seed=7)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    wide = model.init(cfg, seed=7, dtype=np.float64)
    assert all(a[n].dtype == np.float32 and np.array_equal(a[n], wide[n].astype(np.float32)) for n in a)
    assert set(model.init(cfg, seed=8)) == set(a) and not np.array_equal(model.init(cfg, seed=8)["embed.weight"],
                                                                       a["embed.weight"])


@pytest.mark.parametrize("name", MODELS)
def test_param_count_and_decay(name):
    cfg = tiny(name)
    params = model.init(cfg)
    assert model.param_count(cfg) == sum(a.size for a in params.values())
    decayed = {n for n in params if model.decays(n)}
    assert "embed.weight" in decayed and "blocks.0.ffn.up.weight" in decayed
    assert not any(n.endswith((".gain", ".bias", ".kernel")) or ".memory." in n for n in decayed)
    assert all(params[n].ndim == 2 for n in decayed)
    assert model.flops_per_token(cfg) > 6 * sum(params[n].size for n in decayed)


def test_untied_head():
    cfg = tiny("gated_deltanet", tie_embeddings=False)
    params = model.init(cfg)
    assert params["head.weight"].shape == (cfg.width, VOCAB)
    assert model.forward(params, tokens((1, 4)), cfg).shape == (1, 4, VOCAB)


def test_bad_tokens():
    cfg = tiny("transformer")
    params = model.init(cfg)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 13\)"):
        model.forward(params, np.array([[0, 13]]), cfg)
    with pytest.raises(ValueError, match="integer array"):
        model.forward(params, np.zeros((1, 3)), cfg)
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model.forward(params, np.zeros(3, dtype=int), cfg)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.loss(params, np.zeros((2, 1), dtype=int), cfg)


def test_kv_cache_overflow():
    cfg = tiny("transformer")
    params = model.init(cfg)
    cache = model.init_cache(params, cfg, batch=1, max_len=1)
    _, cache = model.decode_step(params, cache, np.array([1]), cfg)
    with pytest.raises(ValueError, match="KV cache holds 1 tokens"):
        model.decode_step(params, cache, np.array([1]), cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_gpu_equals_cpu(name):
    """CuPy arrays through the same code: loss, every gradient and decoding agree with numpy."""
    import cupy
    cfg = tiny(name, chunk=4)
    params = model.init(cfg, seed=9, dtype=np.float64)
    toks = tokens((2, 10), 9)
    loss, grads = ad.value_and_grad(model.loss)(params, toks, cfg)
    gpu_params = to_xp(params, cupy)
    gpu_loss, gpu_grads = ad.value_and_grad(model.loss)(gpu_params, cupy.asarray(toks), cfg)
    assert np.isclose(float(gpu_loss), float(loss), rtol=1e-10)
    for n in grads:
        assert isinstance(gpu_grads[n], cupy.ndarray)
        np.testing.assert_allclose(gpu_grads[n].get(), grads[n], rtol=1e-7, atol=1e-10)
    stepped = decode_all(gpu_params, cupy.asarray(toks), cfg)
    np.testing.assert_allclose(stepped.get(), model.forward(params, toks, cfg), rtol=1e-9, atol=1e-9)
    prefilled, _ = model.prefill(gpu_params, cupy.asarray(toks), cfg)
    np.testing.assert_allclose(prefilled.get(), model.forward(params, toks, cfg), rtol=1e-9, atol=1e-9)


def test_alpha_floor_bounds_the_retention_gate():
    """alpha = floor + (1 − floor)·exp(−softplus(g)) lies in (floor, 1] for any pre-activation."""
    from mirascore.lm import mixers
    g = np.array([-1e3, -20.0, 0.0, 20.0, 1e3])
    for floor in (0.0, 0.5, 0.999):
        alpha = mixers._squash("alpha", g, tiny("moneta", alpha_floor=floor))
        assert np.all(alpha >= floor) and np.all(alpha <= 1.0)
        assert np.all(np.diff(alpha) <= 0)
    with pytest.raises(ValueError, match="alpha_floor"):
        tiny("moneta", alpha_floor=1.0)
