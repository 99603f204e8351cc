"""A user's own specs through mc.step / mc.scan: the protocols of docs/internals.md.

- A bias and a retention gate written only with the protocol's required methods (no VJPs: those are
  derived by autodiff) scan with chunk 1, 4 and 16, linear and mlp memory, equal to the reference
  anchored loop, forward and gradients (autodiff through the reference, and finite differences).
- A gate or bias that delegates to a built-in under another name equals the built-in exactly, and
  a bias *named* like a built-in one is run through its own psi.
- A spec that misses a method the call needs raises MissingMethodError naming spec and method.
- check_finite=False looks at no value.
"""
from typing import Any, NamedTuple

import numpy as np
import pytest

import mirascore as mc
import mirascore.autodiff as ad
import mirascore.autodiff.numpy as anp
import mirascore.ref as ref
import mirascore.testing as mt
from mirascore.protocols import MissingMethodError

RTOL, ATOL = 1e-9, 1e-12
LINEAR, MLP = mc.memory.linear(3, 2), mc.memory.mlp(3, expansion=2)
CHUNKS = (1, 4, 16)


class Cauchy(NamedTuple):
    """ℓ = (c²/2) log(1 + ‖r‖²/c²), ψ = r / (1 + ‖r‖²/c²): bounded influence of outliers."""
    c: float = 1.0

    def loss(self, y, v, delta=None):
        r = y - v
        return 0.5 * self.c ** 2 * anp.log1p(anp.sum(r * r, axis=-1) / self.c ** 2)

    def psi(self, y, v, delta=None):
        r = y - v
        return r / (1.0 + anp.sum(r * r, axis=-1, keepdims=True) / self.c ** 2)


class SoftNorm(NamedTuple):
    """Stores A; exposes W = ν(A)·A with ν(A) = (1 + ‖A‖²/ρ²)^(−1/2) per matrix (a norm bounded
    by ρ); gradient at α²·W; at each chunk's end the smooth shrink A − γ·tanh(A/γ); in-chunk reads
    freeze the anchor's ν. Only the protocol's required methods: every VJP is left to autodiff."""
    rho: float = 2.0
    gamma: float = 0.05

    def read_scale(self, s_anchor):
        return (1.0 + anp.sum(s_anchor * s_anchor, axis=(-2, -1), keepdims=True) / self.rho ** 2) ** -0.5

    def expose(self, s):
        return s * self.read_scale(s)

    def gradient_scale(self, alpha):
        return alpha * alpha

    def canonical(self, s):
        return s

    def prox(self, s):
        return s - self.gamma * anp.tanh(s / self.gamma)


def rule_inputs(memory, momentum, rng, T=19, batch=(2,)):
    params = tuple(rng.uniform(-1.0, 1.0, batch + s) for s in memory.param_shapes())
    unit = (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))
    K, Q = (unit(rng.standard_normal(batch + (T, memory.d_in))) for _ in range(2))
    V = rng.uniform(-1.0, 1.0, batch + (T, memory.d_out))
    gates = dict(lr=rng.uniform(0.05, 0.4, batch + (T,)), alpha=rng.uniform(0.5, 0.95, batch + (T,)))
    if momentum:
        gates["beta"] = rng.uniform(0.1, 0.8, batch + (T,))
    return params, K, V, Q, gates


def scanner(memory, bias, retention, algorithm, chunk, backend="auto"):
    """(params, K, V, Q, gates) -> (Y, exposed weights, momentum) through mc.scan."""
    def f(params, K, V, Q, gates):
        state = mc.init(memory, params, retention=retention, algorithm=algorithm)
        Y, out = mc.scan(state, K, V, Q, bias=bias, chunk=chunk, backend=backend, **gates)
        return Y, mc.weights(out), out.momentum
    return f


def judge(memory, bias, retention, algorithm, chunk):
    def f(params, K, V, Q, gates):
        state = mc.init(memory, params, retention=retention, algorithm=algorithm)
        Y, out = ref.scan_chunked(state, K, V, Q, bias=bias, chunk=chunk, **gates)
        return Y, mc.weights(out), out.momentum
    return f


def leaves(tree):
    return [x for x in ad.core.tree_leaves(tree) if x is not None]


def assert_trees_close(what, got, want, rtol=RTOL, atol=ATOL):
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        mt.assert_close(f"{what} [{i}]", a, b, rtol=rtol, atol=atol)


USER_RULES = [
    pytest.param(Cauchy(0.7), mc.retention.l2(), mc.algorithm.gd(), id="cauchy-l2-gd"),
    pytest.param(mc.bias.l2(), SoftNorm(), mc.algorithm.gd(), id="l2-softnorm-gd"),
    pytest.param(Cauchy(0.7), SoftNorm(), mc.algorithm.momentum(), id="cauchy-softnorm-momentum"),
]


@pytest.mark.parametrize("memory", [LINEAR, MLP], ids=["linear", "mlp"])
@pytest.mark.parametrize("bias, retention, algorithm", USER_RULES)
def test_user_specs_scan_like_the_reference(memory, bias, retention, algorithm):
    rng = np.random.default_rng(0)
    args = rule_inputs(memory, algorithm.uses_momentum, rng)
    for chunk in CHUNKS:
        out, pull = ad.vjp(scanner(memory, bias, retention, algorithm, chunk), *args)
        want, pull_want = ad.vjp(judge(memory, bias, retention, algorithm, chunk), *args)
        assert_trees_close(f"outputs, chunk={chunk}", out, want)
        cot = tuple(None if x is None else tuple(rng.standard_normal(np.shape(a)) for a in x)
                    if isinstance(x, tuple) else rng.standard_normal(np.shape(x)) for x in out)
        assert_trees_close(f"gradients, chunk={chunk}", pull(cot), pull_want(cot))


@pytest.mark.parametrize("memory", [LINEAR, MLP], ids=["linear", "mlp"])
@pytest.mark.parametrize("bias, retention, algorithm", USER_RULES[2:])
def test_user_specs_gradients_by_finite_differences(memory, bias, retention, algorithm):
    rng = np.random.default_rng(1)
    params, K, V, Q, gates = rule_inputs(memory, algorithm.uses_momentum, rng, T=9)
    for chunk in CHUNKS:
        ad.check_grads(scanner(memory, bias, retention, algorithm, chunk), params, K, V, Q, gates,
                       order=1)


def test_user_specs_chunk_1_is_the_step_loop():
    rng = np.random.default_rng(2)
    bias, retention, algorithm = Cauchy(0.7), SoftNorm(), mc.algorithm.momentum()
    params, K, V, Q, gates = rule_inputs(MLP, True, rng)
    Y, W, S = scanner(MLP, bias, retention, algorithm, 1)(params, K, V, Q, gates)
    state, ys = mc.init(MLP, params, retention=retention, algorithm=algorithm), []
    for t in range(K.shape[-2]):
        state = mc.step(state, K[..., t, :], V[..., t, :], bias=bias,
                        **{n: g[..., t] for n, g in gates.items()})
        ys.append(mc.recall(state, Q[..., t, :]))
    assert_trees_close("chunk=1 vs step", (Y, W, S), (np.stack(ys, axis=-2), mc.weights(state),
                                                       state.momentum))


def test_user_specs_pass_the_kit():
    rng = np.random.default_rng(3)
    y, v = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    mt.check_bias(Cauchy(0.7), y, v)
    mt.check_vjps(mc.bias.huber(None, "norm"), y, v, delta=rng.uniform(0.5, 2.0, 4))
    for gate in (SoftNorm(), mc.retention.lq(4.0), mc.retention.kl(2.0), mc.retention.sigmoid(),
                 mc.retention.l2()):
        mt.check_vjps(gate, rng.uniform(-1.0, 1.0, (2, 3, 4)))
    for bias in (mc.bias.lp(3.0), mc.bias.lp(1.5, smooth=4.0), mc.bias.robust(0.5), mc.bias.dot()):
        mt.check_vjps(bias, y, v)


def test_a_wrong_hand_vjp_is_caught_by_the_kit():
    class Doubled(NamedTuple):
        def psi(self, y, v, delta=None):
            return y - v

        def psi_vjp(self, y, v, delta, dpsi):
            return 2 * dpsi, -dpsi, None
    with pytest.raises(AssertionError, match="psi_vjp's dy"):
        mt.check_vjps(Doubled(), np.ones(3), np.zeros(3))


# ---------------------------------------------------------------- delegation: exactly the built-ins

class Alias(NamedTuple):
    """Another name for a spec: every attribute (methods, VJPs, capabilities) is the inner one's."""
    inner: Any
    name: str = "alias"

    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)


class RequiredOnly(NamedTuple):
    """A gate delegating only the protocol's required methods: update and every VJP derived."""
    inner: Any
    name: str = "required_only"

    def expose(self, s):
        return self.inner.expose(s)

    def gradient_scale(self, alpha):
        return self.inner.gradient_scale(alpha)

    def canonical(self, s):
        return self.inner.canonical(s)

    def prox(self, s):
        return self.inner.prox(s)

    def read_scale(self, s_anchor):
        return self.inner.read_scale(s_anchor)

    @property
    def uses_alpha(self):
        return getattr(self.inner, "uses_alpha", True)


GATES = [mc.retention.none(), mc.retention.l2(), mc.retention.l2(grad_at="retained"),
         mc.retention.lq(4.0), mc.retention.kl(2.0), mc.retention.elastic_net(0.05),
         mc.retention.sigmoid()]


def _gates_for(retention, gates):
    return gates if getattr(retention, "uses_alpha", True) else {"lr": gates["lr"]}


@pytest.mark.parametrize("retention", GATES, ids=lambda r: repr(r))
@pytest.mark.parametrize("memory", [LINEAR, MLP], ids=["linear", "mlp"])
def test_a_gate_under_another_name_is_the_built_in(retention, memory):
    rng = np.random.default_rng(4)
    params, K, V, Q, gates = rule_inputs(memory, False, rng)
    gates = _gates_for(retention, gates)
    bias, gd = mc.bias.huber(0.7, "norm"), mc.algorithm.gd()
    for chunk in (1, 4):
        want, pull_want = ad.vjp(scanner(memory, bias, retention, gd, chunk), params, K, V, Q, gates)
        cot = (rng.standard_normal(want[0].shape), tuple(rng.standard_normal(w.shape) for w in want[1]),
               None)
        grads_want = pull_want(cot)
        got, pull = ad.vjp(scanner(memory, bias, Alias(retention), gd, chunk), params, K, V, Q, gates)
        for a, b in zip(leaves((got, pull(cot))), leaves((want, grads_want))):
            np.testing.assert_array_equal(a, b)           # the same methods: the same numbers
        got, pull = ad.vjp(scanner(memory, bias, RequiredOnly(retention), gd, chunk),
                           params, K, V, Q, gates)
        assert_trees_close(f"required methods only, chunk={chunk}", (got, pull(cot)),
                           (want, grads_want), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("bias", [mc.bias.l2(), mc.bias.dot(), mc.bias.lp(3.0), mc.bias.huber(None, "mixture"),
                                  mc.bias.robust(0.5)], ids=lambda b: repr(b))
def test_a_bias_under_another_name_is_the_built_in(bias):
    rng = np.random.default_rng(5)
    params, K, V, Q, gates = rule_inputs(MLP, False, rng)
    if bias.needs_delta:
        gates["delta"] = rng.uniform(0.5, 2.0, gates["lr"].shape)
    for retention in (mc.retention.l2(), mc.retention.kl()):
        f = scanner(MLP, bias, retention, mc.algorithm.gd(), 4)
        g = scanner(MLP, Alias(bias), retention, mc.algorithm.gd(), 4)
        for a, b in zip(leaves(f(params, K, V, Q, gates)), leaves(g(params, K, V, Q, gates))):
            np.testing.assert_array_equal(a, b)


class NamedL2(NamedTuple):
    """A user's bias that happens to be named "l2": ψ = 2r, not the built-in's r."""
    name: str = "l2"

    def psi(self, y, v, delta=None):
        return 2.0 * (y - v)


@pytest.mark.parametrize("name", ["l2", "dot"])
def test_a_bias_named_like_a_built_in_runs_its_own_psi(name):
    rng = np.random.default_rng(6)
    params, K, V, Q, gates = rule_inputs(LINEAR, False, rng)
    bias = NamedL2(name)
    for chunk in (1, 4):
        got = scanner(LINEAR, bias, mc.retention.l2(), mc.algorithm.gd(), chunk)(params, K, V, Q, gates)
        want = judge(LINEAR, bias, mc.retention.l2(), mc.algorithm.gd(), chunk)(params, K, V, Q, gates)
        assert_trees_close(f"chunk={chunk}", got, want)


def test_a_bias_with_only_a_loss_gets_psi_by_autodiff():
    class LossOnly(NamedTuple):
        def loss(self, y, v, delta=None):
            return Cauchy(0.7).loss(y, v)
    rng = np.random.default_rng(7)
    params, K, V, Q, gates = rule_inputs(MLP, False, rng, T=7)
    for chunk in (1, 4):
        got = scanner(MLP, LossOnly(), mc.retention.l2(), mc.algorithm.gd(), chunk)(params, K, V, Q, gates)
        want = scanner(MLP, Cauchy(0.7), mc.retention.l2(), mc.algorithm.gd(), chunk)(params, K, V, Q, gates)
        assert_trees_close(f"chunk={chunk}", got, want)


# ---------------------------------------------------------------- missing methods: named errors

class NoProx(NamedTuple):
    def expose(self, s):
        return s

    def gradient_scale(self, alpha):
        return None

    def canonical(self, s):
        return s

    def read_scale(self, s_anchor):
        return 1.0


class Neither(NamedTuple):
    """A bias with neither psi nor loss."""
    scale: float = 1.0


class ApplyOnly(NamedTuple):
    """A memory for the per-token step only: W k without the rows protocol."""
    d_in: int = 3
    d_out: int = 2

    def param_shapes(self):
        return ((self.d_out, self.d_in),)

    def apply(self, params, k):
        return anp.einsum("...mn,...n->...m", params[0], k)


def test_missing_methods_name_the_spec_and_the_method():
    rng = np.random.default_rng(8)
    params, K, V, Q, gates = rule_inputs(LINEAR, False, rng, T=5)
    state = mc.init(LINEAR, params, retention=NoProx())
    with pytest.raises(MissingMethodError, match=r"retention NoProx\(\) has no prox, which mc.scan"):
        mc.scan(state, K, V, Q, bias=mc.bias.l2(), chunk=4, **gates)
    with pytest.raises(MissingMethodError, match=r"retention NoProx\(\) has no update \(nor canonical and "
                                                  r"prox.*mc.step"):
        mc.step(state, K[..., 0, :], V[..., 0, :], bias=mc.bias.l2(), lr=0.1, alpha=0.9)
    plain = mc.init(LINEAR, params, retention=mc.retention.l2())
    with pytest.raises(MissingMethodError, match=r"bias Neither\(scale=1.0\) has no psi \(nor loss"):
        mc.scan(plain, K, V, Q, bias=Neither(), chunk=4, **gates)
    with pytest.raises(MissingMethodError, match=r"memory ApplyOnly.* has no forward"):
        mc.scan(mc.init(ApplyOnly(), params, retention=mc.retention.l2()), K, V, Q, bias=Cauchy(),
                chunk=4, **gates)


def test_a_memory_with_apply_only_steps_with_autodiff_gradients():
    rng = np.random.default_rng(9)
    params, K, V, Q, gates = rule_inputs(LINEAR, False, rng, T=1)
    k, v, g = K[..., 0, :], V[..., 0, :], {n: x[..., 0] for n, x in gates.items()}
    got = mc.step(mc.init(ApplyOnly(), params, retention=mc.retention.l2()), k, v, bias=Cauchy(), **g)
    want = mc.step(mc.init(LINEAR, params, retention=mc.retention.l2()), k, v, bias=Cauchy(), **g)
    assert_trees_close("params", got.params, want.params, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------- check_finite

def test_check_finite_false_looks_at_no_value():
    rng = np.random.default_rng(10)
    params, K, V, Q, gates = rule_inputs(MLP, False, rng, T=5)
    K = K.copy()
    K[0, 1, 0] = np.nan
    state = mc.init(MLP, params, retention=mc.retention.l2())
    with pytest.raises(ValueError, match=r"\bK\b"):
        mc.scan(state, K, V, Q, bias=mc.bias.l2(), **gates)
    bad_lr = dict(gates, lr=-gates["lr"])
    with pytest.raises(ValueError, match=r"\blr\b"):
        mc.scan(state, np.nan_to_num(K), V, Q, bias=mc.bias.l2(), **bad_lr)
    Y, _ = mc.scan(state, K, V, Q, bias=mc.bias.l2(), check_finite=False, **gates)
    assert np.isnan(Y[0]).any() and np.isfinite(Y[1]).all()     # garbage in, garbage out: no error
    mc.scan(state, np.nan_to_num(K), V, Q, bias=mc.bias.l2(), check_finite=False, **bad_lr)
    with pytest.raises(ValueError, match="check_finite"):
        mc.scan(state, K, V, Q, bias=mc.bias.l2(), check_finite="no", **gates)
    with pytest.raises(ValueError, match=r"\bK\b.*\(2, 5, 4\)"):           # shapes: always checked
        mc.scan(state, np.zeros((2, 5, 4)), V, Q, bias=mc.bias.l2(), check_finite=False, **gates)


# ---------------------------------------------------------------- on the GPU

@pytest.mark.gpu
@pytest.mark.parametrize("memory", [LINEAR, MLP], ids=["linear", "mlp"])
def test_user_specs_on_cupy_equal_numpy(memory):
    """The same user specs on CuPy arrays: derived VJPs by autodiff on the device, inside the
    replayed CUDA graphs (three calls: eager, captured, replayed), equal to numpy."""
    import cupy
    bias, retention, algorithm = Cauchy(0.7), SoftNorm(), mc.algorithm.momentum()
    rng = np.random.default_rng(11)
    for call in range(3):
        args = rule_inputs(memory, True, rng)
        on = (lambda tree: ad.core.tree_map(lambda x: None if x is None else cupy.asarray(x), tree))
        f = scanner(memory, bias, retention, algorithm, 4)
        out, pull = ad.vjp(f, *args)
        cot = ad.core.tree_map(lambda x: None if x is None else rng.standard_normal(np.shape(x)), out)
        out_d, pull_d = ad.vjp(f, *on(args))
        for a, b in zip(leaves((out_d, pull_d(on(cot)))), leaves((out, pull(cot)))):
            assert type(a) is cupy.ndarray
            mt.assert_close("on cupy", a, b, rtol=RTOL, atol=ATOL)
