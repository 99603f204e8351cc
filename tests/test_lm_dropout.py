"""Dropout (config key `dropout`): the mask, the forward pass with and without it, its gradient,
evaluation without it, bit-exact resume with it, data-parallel ranks and the config's checks."""
import threading

import numpy as np
import pytest

import mirascore.autodiff as ad
from mirascore.lm import config, distributed, evaluate, layers, model, mqar, rundir, tasks, train
from mirascore.lm.layers import embed, rms_norm

from test_lm_model import GRAD_EPS, VOCAB, tiny, tokens     # the float64-checkable models


def forward_before_dropout(params, toks, cfg):
    """model.forward as it was before dropout existed."""
    from mirascore.lm import mixers
    mixer = mixers.mixer(cfg)
    x = embed(params["embed.weight"], toks)
    for i in range(cfg.depth):
        block = model._block(params, i)
        h = rms_norm(x, block["mixer_norm.gain"], cfg.norm_eps)
        x = x + mixer.forward(model._sub(block, "mixer."), h, cfg)
        x = x + model._ffn(block, x, cfg)
    return model._logits(params, x, cfg)


# ---------------------------------------------------------------- the mask

@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_drops_the_rate_and_scales_the_rest(rate, dtype):
    n = 200_000
    mask = layers.dropout_mask(layers.dropout_rng(np, (7, 1)), (n // 100, 100), rate, dtype)
    assert mask.dtype == dtype and mask.shape == (n // 100, 100)
    zeros = np.mean(mask == 0)
    assert abs(zeros - rate) <= 5 * np.sqrt(rate * (1 - rate) / n)          # 5 standard errors
    kept = mask[mask != 0]
    assert np.all(kept == dtype(1.0 / (1.0 - rate)))
    assert abs(mask.mean() - 1.0) <= 5 * np.sqrt(rate / (1 - rate) / n)     # E[mask] = 1


def test_mask_is_a_function_of_the_seed():
    def draw(seed, dtype=np.float64):
        return layers.dropout_mask(layers.dropout_rng(np, seed), (50, 40), 0.3, dtype)
    assert np.array_equal(draw((1, 2, 3)), draw((1, 2, 3)))
    assert not np.array_equal(draw((1, 2, 3)), draw((1, 2, 4)))
    assert np.array_equal(draw(5), draw((5,)))
    assert np.array_equal(draw((1, 2)) != 0, draw((1, 2), np.float32) != 0)     # dtype-independent


def test_dropout_is_the_identity_without_a_generator_or_rate():
    x = np.arange(6.0).reshape(2, 3)
    assert layers.dropout(x, 0.5, None) is x
    assert layers.dropout(x, 0.0, layers.dropout_rng(np, 0)) is x


@pytest.mark.parametrize("seed", [-1, (1, -2), (), 1.5, (True,), "x"])
def test_bad_dropout_seeds_are_refused(seed):
    with pytest.raises(ValueError, match="dropout_seed"):
        layers.dropout_rng(np, seed)


# ---------------------------------------------------------------- the model

@pytest.mark.parametrize("name", ["transformer", "moneta"])
def test_no_dropout_is_the_old_forward_bit_for_bit(name):
    cfg = tiny(name)
    params = model.init(cfg, seed=1)
    toks = tokens((2, 7), 1)
    old = forward_before_dropout(params, toks, cfg)
    assert np.array_equal(model.forward(params, toks, cfg), old)
    assert np.array_equal(model.forward(params, toks, cfg, dropout_seed=(0, 1)), old)   # rate 0: seed ignored
    dropping = tiny(name, dropout=0.5)
    assert np.array_equal(model.forward(params, toks, dropping), old)                # no seed: no dropout


@pytest.mark.parametrize("name", ["transformer", "gated_deltanet", "moneta"])
def test_dropout_forward_is_deterministic_and_differs(name):
    cfg = tiny(name, dropout=0.3)
    params = model.init(cfg, seed=2)
    toks = tokens((2, 7), 2)
    a = model.forward(params, toks, cfg, dropout_seed=(0, 5))
    assert np.array_equal(a, model.forward(params, toks, cfg, dropout_seed=(0, 5)))
    assert not np.allclose(a, model.forward(params, toks, cfg))
    assert not np.allclose(a, model.forward(params, toks, cfg, dropout_seed=(0, 6)))


def test_dropout_acts_where_nanogpt_puts_it():
    """Embedding, mixer and SwiGLU outputs, in that order, from one generator per pass."""
    cfg = tiny("transformer", dropout=0.4, depth=1)
    params = model.init(cfg, seed=3, dtype=np.float64)
    toks = tokens((2, 5), 3)
    from mirascore.lm import mixers
    B, T, C = 2, 5, cfg.width
    rng = layers.dropout_rng(np, (9,))
    masks = [layers.dropout_mask(rng, (B, T, C), 0.4, np.float64) for _ in range(3)]
    block = model._block(params, 0)
    x = params["embed.weight"][toks] * masks[0]
    x = x + mixers.mixer(cfg).forward(model._sub(block, "mixer."),
                                      rms_norm(x, block["mixer_norm.gain"], cfg.norm_eps), cfg) * masks[1]
    x = x + model._ffn(block, x, cfg) * masks[2]
    expected = model._logits(params, x, cfg)
    np.testing.assert_allclose(model.forward(params, toks, cfg, dropout_seed=9), expected,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["transformer", "moneta"])
def test_whole_model_gradient_with_dropout(name):
    cfg = tiny(name, dropout=0.3)
    params = model.init(cfg, seed=1, dtype=np.float64)
    toks = tokens((2, 8), 1)
    seed = (0, 3, 1)
    ad.check_grads(lambda p: model.loss(p, toks, cfg, dropout_seed=seed), params, order=1,
                   eps=GRAD_EPS.get(name, 1e-6))
    with_dropout = ad.grad(model.loss)(params, toks, cfg, dropout_seed=seed)
    without = ad.grad(model.loss)(params, toks, cfg)
    assert not np.allclose(with_dropout["embed.weight"], without["embed.weight"])


def test_mqar_loss_takes_the_seed():
    cfg = config.from_dict({"model": {"model": "gated_deltanet", "vocab": 16, "width": 12, "depth": 1,
                                      "heads": 2, "chunk": 4, "gate_rank": 4, "dropout": 0.3},
                            "train": {"task": "mqar", "context": 16, "mqar_pairs": 2, "batch": 2}})
    params = model.init(cfg, seed=4, dtype=np.float64)
    batch = mqar.generate_for(cfg, 2, mqar.TRAIN)
    assert tasks.loss_fn(cfg) is mqar.loss
    plain = mqar.loss(params, batch, cfg)
    dropped = mqar.loss(params, batch, cfg, dropout_seed=(1,))
    assert dropped != plain and dropped == mqar.loss(params, batch, cfg, dropout_seed=(1,))
    assert plain == mqar.loss(params, batch, config.replace(cfg, dropout=0.0))
    loss, grads = ad.value_and_grad(mqar.loss)(params, batch, cfg, dropout_seed=(1,))
    assert loss == dropped and set(grads) == set(params)


def test_evaluation_and_decoding_ignore_dropout():
    cfg = tiny("moneta", dropout=0.5)
    plain = config.replace(cfg, dropout=0.0)
    params = model.init(cfg, seed=5)
    batches = [tokens((4, 9), 5), tokens((4, 9), 6)]
    assert evaluate.mean_loss(params, cfg, batches) == evaluate.mean_loss(params, plain, batches)
    assert tasks.validation_metrics(params, cfg, batches) == tasks.validation_metrics(params, plain, batches)
    toks = tokens((1, 4), 7)
    cache = model.init_cache(params, cfg, batch=1)
    for t in range(4):
        logits, cache = model.decode_step(params, cache, toks[:, t], cfg)
    np.testing.assert_allclose(logits, model.forward(params, toks, plain)[:, -1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- training

def tiny_run(model_name="moneta", **train_keys):
    table = {"steps": 6, "batch": 4, "context": 16, "warmup": 2, "log_every": 1, "eval_every": 0,
             "eval_batches": 1, "checkpoint_every": 0, "lr": 3e-3}
    table.update(train_keys)
    return config.from_dict({"model": {"model": model_name, "width": 16, "depth": 1, "heads": 2, "chunk": 8,
                                       "dropout": 0.1}, "train": table})


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in train.TIMING_FIELDS} for row in rows]


def test_dropout_seeds_of_the_trainer():
    cfg = tiny_run()
    seeds = {train.dropout_seed(cfg, s, m, r) for s in range(3) for m in range(2) for r in range(2)}
    assert len(seeds) == 12                                    # every step, micro-batch and rank its own
    assert train.dropout_seed(cfg, 4, 1, 0) == train.dropout_seed(cfg, 4, 1, 0)
    assert train.dropout_seed(config.replace(cfg, dropout=0.0), 4, 1, 0) is None
    assert train.dropout_seed(config.replace(cfg, seed=1), 4, 1, 0) != train.dropout_seed(cfg, 4, 1, 0)


def test_resume_with_dropout_is_bit_exact(tmp_path):
    cfg = tiny_run("transformer", steps=5, accumulate=2, log_every=2, eval_every=2, checkpoint_every=3)
    whole = train.run(cfg, tmp_path / "whole")
    train.run(cfg, tmp_path / "parts", stop_at=3)
    rest = train.run(cfg, tmp_path / "parts", resume=True)
    for name in whole.params:
        assert np.array_equal(whole.params[name], rest.params[name]), name
        assert np.array_equal(whole.opt.m[name], rest.opt.m[name]), name
    assert without_timing(rundir.read_metrics(tmp_path / "whole")) == without_timing(rundir.read_metrics(tmp_path / "parts"))
    plain = train.run(config.replace(cfg, dropout=0.0), tmp_path / "plain")
    assert [r["loss"] for r in plain.metrics] != [r["loss"] for r in whole.metrics]   # dropout did act


def test_data_parallel_ranks_draw_their_own_masks_and_stay_equal(tmp_path):
    cfg = tiny_run(steps=3, batch=4, dtype="float64")
    results, errors = [None] * 2, []

    def rank_main(comm):
        try:
            results[comm.rank] = train.run(cfg, tmp_path, comm=comm)
        except BaseException as e:
            errors.append(e)
            comm.abort()

    threads = [threading.Thread(target=rank_main, args=(c,)) for c in distributed.thread_ranks(2, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in results[0].params:             # the same reduced gradient: the replicas stay equal
        assert np.array_equal(results[0].params[name], results[1].params[name]), name
    assert train.dropout_seed(cfg, 0, 0, 0) != train.dropout_seed(cfg, 0, 0, 1)
    assert all(np.isfinite(r["loss"]) for r in results[0].metrics)


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("value", [1, 1.0, -0.1, "x", True, float("nan")])
def test_bad_dropout_is_a_value_error_naming_the_key(value):
    with pytest.raises(ValueError, match="'dropout'"):
        config.from_dict({"model": {"model": "transformer", "dropout": value}})


def test_dropout_config_round_trip():
    cfg = tiny("transformer", dropout=0.2)
    assert cfg.dropout == 0.2 and "dropout = 0.2" in cfg.to_toml()
    assert config.from_dict({"model": {"model": "transformer", "dropout": 0.0}}).dropout == 0.0
    assert config.with_overrides(tiny("transformer"), ["dropout=0.25"]).dropout == 0.25
    with pytest.raises(ValueError, match="in \\[train\\]; it belongs in \\[model\\]"):
        config.from_dict({"train": {"dropout": 0.1}})
    assert "dropout = 0.0" in tiny("transformer").to_toml()       # every key is written


def test_dropout_config_survives_the_run_directory(tmp_path):
    cfg = tiny_run(steps=1, warmup=0)
    train.run(cfg, tmp_path)
    assert config.load_config(tmp_path / "config.toml") == cfg


@pytest.mark.gpu
def test_gpu_masks_are_drawn_on_the_device():
    """CuPy's generator: the mask is a CuPy array with the rate and scale of the CPU's, a function of
    the seed; a dropout training step runs and repeats bit for bit."""
    import cupy
    rng = layers.dropout_rng(cupy, (7, 1))
    assert type(rng).__module__.startswith("cupy")
    mask = layers.dropout_mask(rng, (2000, 100), 0.3, np.float32)
    assert isinstance(mask, cupy.ndarray) and mask.dtype == np.float32
    assert abs(float((mask == 0).mean()) - 0.3) <= 5 * np.sqrt(0.3 * 0.7 / mask.size)
    assert bool(cupy.all((mask == 0) | (mask == np.float32(1 / 0.7))))
    again = layers.dropout_mask(layers.dropout_rng(cupy, (7, 1)), (2000, 100), 0.3, np.float32)
    assert bool(cupy.array_equal(mask, again))
    cfg = tiny("moneta", dropout=0.3, chunk=4)
    params = {n: cupy.asarray(a) for n, a in model.init(cfg, seed=8).items()}
    toks = cupy.asarray(tokens((2, 9), 8))
    loss, grads = ad.value_and_grad(model.loss)(params, toks, cfg, dropout_seed=(0, 1))
    loss2, grads2 = ad.value_and_grad(model.loss)(params, toks, cfg, dropout_seed=(0, 1))
    assert float(loss) == float(loss2) and float(loss) != float(model.loss(params, toks, cfg))
    assert all(isinstance(g, cupy.ndarray) and bool(cupy.array_equal(g, grads2[n])) for n, g in grads.items())
