"""Project-only strategies, the catalogue of rules under test, and independent float64 oracles.

The oracles are written from docs/contract.md §3–4, docs/internals.md (in-chunk reads) and the paper (§5.1 for
the MLP gradient) in plain numpy/scipy: they share no code with mirascore, so a test that compares
mirascore with them judges both the hand derivations and their implementation.
"""
import math

import numpy as np
from hypothesis import strategies as st
from scipy.special import erf, expit, softmax

import mirascore as mc
import mirascore.testing as mt

LN_EPS = 1e-5

# ------------------------------------------------------------------------------------------------
# catalogue


def biases():
    """Every bias kind with static hyperparameters (δ as a gate is covered separately)."""
    return [mc.bias.l2(), mc.bias.dot(), mc.bias.lp(1.0), mc.bias.lp(1.5), mc.bias.lp(3.0),
            mc.bias.lp(4.0), mc.bias.huber(0.7, "coord"), mc.bias.huber(0.7, "norm"),
            mc.bias.huber(0.7, "mixture"), mc.bias.robust(0.5)]


def retentions():
    return [mc.retention.none(), mc.retention.l2(), mc.retention.l2(grad_at="retained"),
            mc.retention.lq(4.0), mc.retention.lq(3.0), mc.retention.kl(), mc.retention.kl(2.0),
            mc.retention.elastic_net(0.05), mc.retention.sigmoid()]


def memories():
    """Small memories. Not mlp(2): LN of a 2-vector is ±(1, −1) whatever its input, so that MLP's
    gradient is zero up to LN's eps and rounding, and would test nothing."""
    return [mc.memory.linear(3, 2), mc.memory.mlp(3, expansion=2)]


def is_exact(memory, bias, retention, algorithm):
    """docs/contract.md §4: the rules whose chunked form equals the per-token loop for every chunk size."""
    return (memory.name == "linear" and bias.name in ("dot", "l2")
            and algorithm.name in ("gd", "implicit")
            and retention.name in ("none", "l2"))


def ids(spec):
    """A short test id for a spec NamedTuple: its name and hyperparameters."""
    rest = [str(x) for x in spec[1:] if x is not None]
    return spec.name + ("(" + ",".join(rest) + ")" if rest else "")


# ------------------------------------------------------------------------------------------------
# strategies


def stored_state(retention, memory, batch_shape=(), scale=1.0):
    """Stored quantities valid for `retention` (lq's accumulator kept away from 0).

    MLP parameters get a fixed random offset: hypothesis likes equal entries, and a state whose
    rows are all equal is an unstable equilibrium of the MLP recurrence (LN of a constant vector is
    rounding noise amplified by 1/sqrt(1e-5)), where two correct float64 loops part after a few
    tokens; Yaad's switch ‖r‖ ≤ δ then also sits exactly on its threshold.
    """
    params = mt.memory_params(memory, batch_shape, scale=scale)
    if memory.name == "mlp":
        params = params.map(lambda P: tuple(
            p + b for p, b in zip(P, memory.init(12345, np.shape(P[0])[:-2], np.float64))))
    if retention.name == "lq":       # W = A/‖A‖_q^(q−2) blows up as A → 0
        return params.map(lambda P: tuple(np.where(np.abs(p) < 0.3, 0.3, p) for p in P))
    return params


@st.composite
def sequences(draw, d_in, d_out, *, batch_shape=(), T=st.integers(1, 9), normalize=True):
    """(K, V, Q) with time second to last: (..., T, d_in), (..., T, d_out), (..., T, d_in)."""
    T = draw(T) if not isinstance(T, int) else T
    K = draw(mt.tokens(d_in, batch_shape, T, normalize=normalize))
    V = draw(mt.tokens(d_out, batch_shape, T))
    Q = draw(mt.tokens(d_in, batch_shape, T, normalize=normalize))
    return K, V, Q


# ------------------------------------------------------------------------------------------------
# oracles: memories


def matvec(W, x):
    return np.einsum("...mn,...n->...m", W, x)


def outer(a, b):
    return a[..., :, None] * b[..., None, :]


def gelu(z):
    return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def gelu_prime(z):
    return 0.5 * (1.0 + erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _mlp_parts(params, k):
    W1, W2 = params
    z = matvec(W2, k)
    a = gelu(z)
    u = matvec(W1, a)
    c = u - u.mean(-1, keepdims=True)
    s = np.sqrt((c * c).mean(-1, keepdims=True) + LN_EPS)
    return z, a, c / s, s


def apply(memory, params, k):
    """M(W, k): W k, or k + LN(W1 gelu(W2 k))."""
    if memory.name == "linear":
        return matvec(params[0], k)
    return k + _mlp_parts(params, k)[2]


def memory_grad(memory, params, k, psi):
    """∇_W ℓ = J_W(k)ᵀ ψ (paper §5.1 for the MLP, no LN affine)."""
    if memory.name == "linear":
        return (outer(psi, k),)
    W1, _ = params
    z, a, u_hat, s = _mlp_parts(params, k)
    g_u = (psi - psi.mean(-1, keepdims=True) - u_hat * (psi * u_hat).mean(-1, keepdims=True)) / s
    g_z = np.einsum("...m,...mn->...n", g_u, W1) * gelu_prime(z)
    return (outer(g_u, a), outer(g_z, k))


# ------------------------------------------------------------------------------------------------
# oracles: biases


def _gate(g, n):
    """A gate shaped like the batch dims (or a number), broadcast against n more trailing axes."""
    g = np.asarray(g, dtype=np.float64)
    return g.reshape(g.shape + (1,) * n)


def psi(bias, y, v, delta=None):
    """ψ(r) from docs/contract.md §3's table, r = y − v."""
    r = y - v
    name = bias.name
    if name == "dot":
        return np.broadcast_to(-v, r.shape)
    if name == "l2":
        return r
    if name == "lp":
        if bias.slope is not None:
            return np.tanh(bias.slope * r) * (r * r + bias.eps) ** ((bias.p - 1) / 2)
        return np.sign(r) * np.abs(r) ** (bias.p - 1)
    if name == "robust":
        return r + bias.radius * r / np.sqrt((r * r).sum(-1, keepdims=True) + bias.eps)
    d = _gate(bias.delta if delta is None else delta, 1)
    n = np.linalg.norm(r, axis=-1, keepdims=True)
    if bias.kind == "coord":
        return np.clip(r, -d, d)
    if bias.kind == "norm":
        return r * np.minimum(1.0, d / np.where(n > 0, n, 1.0))
    return np.where(n <= d, r, d * np.sign(r))


# ------------------------------------------------------------------------------------------------
# oracles: retention gates (one stored array s: (..., m, n)) and the per-token step


def expose(ret, s):
    if ret.name == "lq":
        norm = (np.abs(s) ** ret.q).sum(axis=(-2, -1), keepdims=True) ** (1 / ret.q)
        return s / np.maximum(norm, ret.eps) ** (ret.q - 2)
    if ret.name == "kl":
        return ret.scale * softmax(s, axis=-1)
    if ret.name == "sigmoid":
        return expit(s)
    return s


def soft_threshold(z, gamma):
    return np.sign(z) * np.maximum(np.abs(z) - gamma, 0.0)


def update(ret, s, U, alpha):
    """One token's update of the stored quantity (docs/contract.md §3 retention table)."""
    if ret.name == "none":
        return s + U
    if ret.name == "kl":
        return _gate(alpha, 2) * np.log(expose(ret, s) / ret.scale) + U
    if ret.name == "sigmoid":
        W = expose(ret, s)
        return _gate(alpha, 2) * np.log(W / (1 - W)) + U
    z = _gate(alpha, 2) * s + U
    return soft_threshold(z, ret.gamma) if ret.name == "elastic_net" else z


def grad_point(ret, W, alpha):
    """Where the gradient is taken: α·W for l2(grad_at="retained"), else W."""
    if ret.name == "l2" and ret.grad_at == "retained":
        return _gate(alpha, 2) * W
    return W


def step(memory, bias, ret, alg, params, mom, k, v, *, lr, alpha=1.0, delta=None, beta=None):
    """One token of docs/contract.md §3; returns (stored params, momentum)."""
    W = tuple(expose(ret, s) for s in params)
    Wg = tuple(grad_point(ret, w, alpha) for w in W)
    G = memory_grad(memory, Wg, k, psi(bias, apply(memory, Wg, k), v, delta))
    lr = np.asarray(lr, dtype=np.float64)
    if alg.name == "implicit":
        lr = lr / (1 + lr * (k * k).sum(-1))
    if alg.name == "momentum":
        mom = tuple(_gate(beta, 2) * S - _gate(lr, 2) * g for S, g in zip(mom, G))
        U = mom
    else:
        U = tuple(-_gate(lr, 2) * g for g in G)
    return tuple(update(ret, s, u, alpha) for s, u in zip(params, U)), mom


def _at(g, t):
    """Gate g at time t: g is None, a number, or an array (..., T)."""
    if g is None or np.ndim(g) == 0:
        return g
    return np.asarray(g)[..., t]


def scan(memory, bias, ret, alg, params, K, V, Q, *, lr, alpha=1.0, delta=None, beta=None):
    """Per-token loop: y_t = M(W_t, q_t) read after token t's update. Returns (Y, params, mom)."""
    mom = tuple(np.zeros_like(p) for p in params) if alg.name == "momentum" else None
    Y = []
    for t in range(K.shape[-2]):
        params, mom = step(memory, bias, ret, alg, params, mom, K[..., t, :], V[..., t, :],
                           lr=_at(lr, t), alpha=_at(alpha, t), delta=_at(delta, t),
                           beta=_at(beta, t))
        W = tuple(expose(ret, s) for s in params)
        Y.append(apply(memory, W, Q[..., t, :]))
    return np.stack(Y, axis=-2), params, mom


def read(ret, s, s_anchor):
    """In-chunk read weights (docs/internals.md): linear in s (lq, linear maps) or constant."""
    if ret.name == "lq":
        norm = (np.abs(s_anchor) ** ret.q).sum(axis=(-2, -1), keepdims=True) ** (1 / ret.q)
        return s / np.maximum(norm, ret.eps) ** (ret.q - 2)
    if ret.name in ("kl", "sigmoid"):
        return expose(ret, s_anchor)          # the chunk-start weights: in-chunk tokens unseen
    return s


def scan_anchored(memory, bias, ret, alg, params, K, V, Q, *, chunk, lr, alpha=1.0, delta=None,
                  beta=None):
    """docs/contract.md §4's anchored chunked form: gradients at the chunk's starting exposed state (at α_t·W̄
    for grad_at="retained"), the stored quantity and momentum follow their linear recurrences
    inside the chunk, elastic net thresholds once at the chunk end; reads per docs/internals.md,
    the chunk's last token reads the returned state. Returns (Y, params, mom)."""
    T = K.shape[-2]
    mom = tuple(np.zeros_like(p) for p in params) if alg.name == "momentum" else None
    Y = []
    for start in range(0, T, chunk):
        anchor = params
        W_bar = tuple(expose(ret, s) for s in anchor)
        lin = anchor
        stop = min(start + chunk, T)
        for t in range(start, stop):
            a, l_t = _at(alpha, t), np.asarray(_at(lr, t), dtype=np.float64)
            Wg = tuple(grad_point(ret, w, a) for w in W_bar)
            G = memory_grad(memory, Wg, K[..., t, :],
                            psi(bias, apply(memory, Wg, K[..., t, :]), V[..., t, :], _at(delta, t)))
            if alg.name == "implicit":
                l_t = l_t / (1 + l_t * (K[..., t, :] ** 2).sum(-1))
            if alg.name == "momentum":
                mom = tuple(_gate(_at(beta, t), 2) * S - _gate(l_t, 2) * g for S, g in zip(mom, G))
                U = mom
            else:
                U = tuple(-_gate(l_t, 2) * g for g in G)
            # kl: L ← α·L + U differs from α·log_softmax(L) + U by row constants only
            lin = tuple(_gate(1.0 if a is None else a, 2) * s + u for s, u in zip(lin, U))
            if t < stop - 1:
                W_read = tuple(read(ret, s, sa) for s, sa in zip(lin, anchor))
                Y.append(apply(memory, W_read, Q[..., t, :]))
        if ret.name == "elastic_net":
            lin = tuple(soft_threshold(s, ret.gamma) for s in lin)
        params = lin
        Y.append(apply(memory, tuple(expose(ret, s) for s in params), Q[..., stop - 1, :]))
    return np.stack(Y, axis=-2), params, mom


# ------------------------------------------------------------------------------------------------
# whole cases: a rule, a start, a sequence and its gates


class Case(tuple):
    """(memory, bias, retention, algorithm, params, K, V, Q, gates) with attribute access."""
    __slots__ = ()
    _fields = ("memory", "bias", "retention", "algorithm", "params", "K", "V", "Q", "gates")

    def __new__(cls, *values):
        return super().__new__(cls, values)

    def __getattr__(self, name):
        return self[self._fields.index(name)]

    def __repr__(self):
        rule = ", ".join(ids(x) for x in self[:4])
        show = lambda x: np.array2string(np.asarray(x), precision=17, separator=", ")
        arrays = "".join(f"\n  {n} = {show(x)}" for n, x in
                         [*((f"params[{i}]", p) for i, p in enumerate(self.params)),
                          ("K", self.K), ("V", self.V), ("Q", self.Q), *self.gates.items()])
        return f"Case({rule}){arrays}"

    def state(self):
        return mc.init(self.memory, self.params, retention=self.retention, algorithm=self.algorithm)

    def at(self, t):
        """(k, v, gates) of token t, gates as numbers or batch-shaped arrays."""
        return (self.K[..., t, :], self.V[..., t, :],
                {n: (g if np.ndim(g) == 0 else g[..., t]) for n, g in self.gates.items()})


GATED_HUBERS = [mc.bias.huber(kind="coord"), mc.bias.huber(kind="norm"), mc.bias.huber(kind="mixture")]
EXACT = [("linear", b, r, a) for b in ("dot", "l2") for r in ("none", "l2", "l2r") for a in ("gd", "implicit")
         if a == "gd" or (b == "l2" and r == "none")]


def exact_rules():
    ret = {"none": mc.retention.none(), "l2": mc.retention.l2(),
           "l2r": mc.retention.l2(grad_at="retained")}
    alg = {"gd": mc.algorithm.gd(), "implicit": mc.algorithm.implicit()}
    bias = {"dot": mc.bias.dot(), "l2": mc.bias.l2()}
    return [(mc.memory.linear(3, 2), bias[b], ret[r], alg[a]) for _, b, r, a in EXACT]


def anchored_rules():
    """Rules whose chunked form is anchored: every bias, retention and algorithm at least once."""
    lin, mlp = mc.memory.linear(3, 2), mc.memory.mlp(3, expansion=2)
    gd, mom = mc.algorithm.gd(), mc.algorithm.momentum()
    R, B = mc.retention, mc.bias
    return ([(mlp, b, R.l2(), gd) for b in biases() + GATED_HUBERS[2:]]
            + [(lin, b, R.l2(grad_at="retained"), gd) for b in (B.lp(1.5), B.huber(0.7, "mixture"), B.robust(0.5))]
            + [(mlp, B.l2(), r, gd) for r in retentions() if r.name not in ("none", "l2")]
            + [(lin, B.l2(), r, gd) for r in (R.lq(4.0), R.kl(2.0), R.elastic_net(0.05), R.sigmoid())]
            + [(mlp, B.l2(), r, mom) for r in (R.none(), R.l2(grad_at="retained"), R.kl(), R.lq(4.0))]
            + [(lin, B.dot(), R.l2(), mom), (lin, B.l2(), R.elastic_net(0.05), mom)])


@st.composite
def rules(draw):
    """Any valid rule of the catalogue."""
    memory = draw(st.sampled_from(memories()))
    bias = draw(st.sampled_from(biases() + GATED_HUBERS))
    retention = draw(st.sampled_from(retentions()))
    algorithms = [mc.algorithm.gd(), mc.algorithm.momentum()]
    if memory.name == "linear" and bias.name == "l2" and retention.name == "none":
        algorithms.append(mc.algorithm.implicit())
    return memory, bias, retention, draw(st.sampled_from(algorithms))


@st.composite
def cases(draw, rule, *, T=st.integers(1, 9), batch=mt.batch_shapes(max_dims=1, max_side=2),
          scalar_gates=st.booleans()):
    """A start, a sequence and gates for `rule` (a tuple or a strategy of tuples).

    Sizes and gates are kept where every rule stays well-conditioned for a few tokens: unit keys,
    values and parameters in [-1, 1] (lq's accumulator away from 0), lr ≤ 0.2.
    """
    memory, bias, retention, algorithm = rule if isinstance(rule, tuple) else draw(rule)
    batch = draw(batch) if not isinstance(batch, tuple) else batch
    T = draw(T) if not isinstance(T, int) else T
    params = draw(stored_state(retention, memory, batch))
    K, V, Q = draw(sequences(memory.d_in, memory.d_out, batch_shape=batch, T=T))
    scalar = draw(scalar_gates)
    shape = None if scalar else batch + (T,)
    gates = {"lr": draw(mt.lrs(shape, max_value=0.2))}
    if retention.name != "none":
        gates["alpha"] = draw(mt.alphas(shape, min_value=0.3))
    if bias.needs_delta:
        gates["delta"] = draw(mt.deltas(shape, min_value=0.05, max_value=2.0))
    if algorithm.name == "momentum":
        gates["beta"] = draw(mt.betas(shape, max_value=0.9))
    return Case(memory, bias, retention, algorithm, params, K, V, Q, gates)
