"""AdamW, the learning-rate schedule and global-norm clipping (mirascore.lm.optim)."""
import math

import numpy as np
import pytest

from mirascore.lm import config
from mirascore.lm.optim import (AdamState, adamw_init, adamw_update, clip_by_global_norm, global_norm,
                                learning_rate)

CFG = config.from_dict({"train": {"steps": 100, "warmup": 10, "lr": 1e-3, "min_lr_ratio": 0.1,
                                  "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "adam_eps": 1e-8}})


def test_warmup_is_linear_from_lr_over_warmup():
    assert [learning_rate(s, CFG) for s in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert learning_rate(9, CFG) == pytest.approx(1e-3)


def test_cosine_runs_from_lr_to_the_floor_at_the_last_step():
    assert learning_rate(10, CFG) == pytest.approx(1e-3)
    assert learning_rate(99, CFG) == pytest.approx(1e-4)
    middle = 10 + (99 - 10) / 2
    assert learning_rate(middle, CFG) == pytest.approx(0.5 * (1e-3 + 1e-4))
    lrs = [learning_rate(s, CFG) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_without_warmup_or_with_one_step():
    no_warmup = config.replace(CFG, warmup=0)
    assert learning_rate(0, no_warmup) == pytest.approx(1e-3)
    one = config.replace(CFG, steps=1, warmup=0)
    assert learning_rate(0, one) == pytest.approx(1e-4)   # the last step ends at the floor


def _reference_adamw(p, g, m, v, t, lr, decay):
    """The textbook AdamW step on float64 scalars/arrays (PyTorch's torch.optim.AdamW order)."""
    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.1
    if decay:
        p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def test_adamw_matches_the_textbook_update_and_decays_only_where_asked():
    rng = np.random.default_rng(0)
    params = {"w.weight": rng.standard_normal((3, 4)), "n.gain": rng.standard_normal(4)}
    state = adamw_init(params)
    ref = {n: (p, np.zeros_like(p), np.zeros_like(p)) for n, p in params.items()}
    for t in range(1, 4):
        grads = {n: rng.standard_normal(p.shape) for n, p in params.items()}
        params, state = adamw_update(params, grads, state, 1e-2, CFG, lambda n: n.endswith(".weight"))
        ref = {n: _reference_adamw(*ref[n][:1], grads[n], *ref[n][1:], t, 1e-2, n.endswith(".weight"))
               for n in ref}
    assert state.step == 3
    for n in params:
        np.testing.assert_allclose(params[n], ref[n][0], rtol=1e-12)
        np.testing.assert_allclose(state.m[n], ref[n][1], rtol=1e-12)
        np.testing.assert_allclose(state.v[n], ref[n][2], rtol=1e-12)


def test_adamw_keeps_float32():
    params = {"w.weight": np.ones((2, 2), np.float32)}
    params, state = adamw_update(params, {"w.weight": np.ones((2, 2), np.float32)}, adamw_init(params),
                                 1e-3, CFG, lambda n: True)
    assert params["w.weight"].dtype == np.float32 and state.v["w.weight"].dtype == np.float32


def test_no_weight_decay_when_zero():
    cfg = config.replace(CFG, weight_decay=0.0)
    params = {"w.weight": np.ones(3)}
    out, _ = adamw_update(params, {"w.weight": np.zeros(3)}, adamw_init(params), 0.1, cfg, lambda n: True)
    np.testing.assert_array_equal(out["w.weight"], params["w.weight"])


def test_global_norm_and_clipping():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert float(global_norm(grads)) == pytest.approx(5.0)
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)
    same, _ = clip_by_global_norm(grads, 10.0)
    np.testing.assert_array_equal(same["a"], grads["a"])
    off, norm = clip_by_global_norm(grads, 0.0)
    assert off is grads and float(norm) == pytest.approx(5.0)


def test_global_norm_does_not_depend_on_the_dict_order():
    rng = np.random.default_rng(1)
    grads = {f"g{i}": rng.standard_normal(100).astype(np.float32) for i in range(20)}
    backwards = dict(reversed(list(grads.items())))
    assert global_norm(grads).tobytes() == global_norm(backwards).tobytes()


def test_adam_state_is_a_named_tuple():
    state = adamw_init({"x": np.zeros(2)})
    assert isinstance(state, AdamState) and state.step == 0 and set(state.m) == set(state.v) == {"x"}
    assert math.isclose(float(state.m["x"].sum()), 0.0)


@pytest.mark.gpu
def test_adamw_on_the_gpu_equals_numpy():
    import cupy
    rng = np.random.default_rng(2)
    params = {"w.weight": rng.standard_normal((8, 8)).astype(np.float32)}
    grads = {"w.weight": rng.standard_normal((8, 8)).astype(np.float32)}
    gpu_params = {n: cupy.asarray(a) for n, a in params.items()}
    gpu_grads, norm = clip_by_global_norm({n: cupy.asarray(a) for n, a in grads.items()}, 1.0)
    assert isinstance(norm, cupy.ndarray)
    gpu, state = adamw_update(gpu_params, gpu_grads, adamw_init(gpu_params), 1e-2, CFG, lambda n: True)
    assert isinstance(gpu["w.weight"], cupy.ndarray) and isinstance(state.m["w.weight"], cupy.ndarray)
    cpu_clipped, _ = clip_by_global_norm(grads, 1.0)
    cpu, _ = adamw_update(params, cpu_clipped, adamw_init(params), 1e-2, CFG, lambda n: True)
    np.testing.assert_allclose(gpu["w.weight"].get(), cpu["w.weight"], rtol=1e-5, atol=1e-7)
