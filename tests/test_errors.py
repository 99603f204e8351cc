"""Bad input raises ValueError naming the argument and the sizes or values involved (docs/contract.md §2)."""
import re

import numpy as np
import pytest

import mirascore as mc

NAN, INF = float("nan"), float("inf")
rng = np.random.default_rng(0)
LIN = mc.memory.linear(3, 2)
W = rng.standard_normal((2, 3))
k, v, q = rng.standard_normal(3), rng.standard_normal(2), rng.standard_normal(3)
K, V, Q = rng.standard_normal((5, 3)), rng.standard_normal((5, 2)), rng.standard_normal((5, 3))


def state(retention=mc.retention.l2(), algorithm=mc.algorithm.gd(), memory=LIN, params=(W,)):
    return mc.init(memory, params, retention=retention, algorithm=algorithm)


def step(**kw):
    args = dict(bias=mc.bias.l2(), lr=0.1)
    s = kw.pop("state", None) or state()
    kk, vv = kw.pop("k", k), kw.pop("v", v)
    args.update(kw)
    return mc.step(s, kk, vv, **args)


def scan(**kw):
    args = dict(bias=mc.bias.l2(), lr=0.1)
    s = kw.pop("state", None) or state()
    KK, VV, QQ = kw.pop("K", K), kw.pop("V", V), kw.pop("Q", Q)
    args.update(kw)
    return mc.scan(s, KK, VV, QQ, **args)


def with_nan(x, where=0):
    x = np.array(x, dtype=float)
    x.flat[where] = NAN
    return x


CASES = {
    # hyperparameters of the factories
    "lp p < 1": (lambda: mc.bias.lp(0.5), r"\bp\b.*0\.5"),
    "lp p nan": (lambda: mc.bias.lp(NAN), r"\bp\b"),
    "lp smooth slope <= 0": (lambda: mc.bias.lp(1.5, smooth=0.0), r"slope"),
    "lp smooth eps <= 0": (lambda: mc.bias.lp(1.5, smooth=(3.0, -1e-6)), r"eps"),
    "lq q = 1": (lambda: mc.retention.lq(1.0), r"\bq\b.*1"),
    "lq q < 1": (lambda: mc.retention.lq(0.5), r"\bq\b.*0\.5"),
    "huber delta = 0": (lambda: mc.bias.huber(0.0), r"delta.*0"),
    "huber delta < 0": (lambda: mc.bias.huber(-1.0), r"delta.*-1"),
    "huber delta inf": (lambda: mc.bias.huber(INF), r"delta"),
    "huber kind": (lambda: mc.bias.huber(1.0, kind="l3"), r"kind.*l3"),
    "robust radius < 0": (lambda: mc.bias.robust(-0.1), r"radius.*-0\.1"),
    "elastic_net gamma < 0": (lambda: mc.retention.elastic_net(-0.1), r"gamma.*-0\.1"),
    "kl scale = 0": (lambda: mc.retention.kl(0.0), r"scale.*0"),
    "kl scale < 0": (lambda: mc.retention.kl(-2.0), r"scale.*-2"),
    "l2 grad_at": (lambda: mc.retention.l2(grad_at="anchor"), r"grad_at.*anchor"),
    "linear d_in = 0": (lambda: mc.memory.linear(0, 2), r"d_in.*0"),
    "mlp expansion = 0": (lambda: mc.memory.mlp(2, expansion=0), r"expansion.*0"),
    # mismatched shapes
    "params shape": (lambda: state(params=(np.zeros((3, 2)),)), r"params\[0\].*\(3, 2\)"),
    "params count": (lambda: state(memory=mc.memory.mlp(2), params=(np.zeros((2, 8)),)), r"params.*1"),
    "k last axis": (lambda: step(k=np.zeros(4)), r"\bk\b.*\(4,\).*d_in.*3"),
    "v last axis": (lambda: step(v=np.zeros(3)), r"\bv\b.*\(3,\).*d_out.*2"),
    "batch dims": (lambda: step(state=state(params=(np.zeros((2, 2, 3)),)), k=np.zeros((3, 3)),
                                v=np.zeros((3, 2))), r"\(2, 2, 3\)|\(3, 3\)"),
    "scan V time": (lambda: scan(V=np.zeros((4, 2))), r"\bV\b.*\(4, 2\)"),
    "scan Q last axis": (lambda: scan(Q=np.zeros((5, 2))), r"\bQ\b.*\(5, 2\)"),
    "scan K without time": (lambda: scan(K=np.zeros(3)), r"\bK\b.*\(3,\)"),
    "gate shape": (lambda: scan(lr=np.full(4, 0.1)), r"\blr\b.*\(4,\)"),
    "recall q last axis": (lambda: mc.recall(state(), np.zeros(2)), r"\bq\b.*\(2,\)"),
    # gates out of range
    "lr < 0": (lambda: step(lr=-0.1), r"\blr\b.*-0\.1"),
    "lr < 0 in a series": (lambda: scan(lr=np.array([0.1, 0.2, -0.5, 0.1, 0.1])), r"\blr\b.*-0\.5"),
    "alpha = 0": (lambda: step(alpha=0.0), r"\balpha\b.*0"),
    "alpha > 1": (lambda: step(alpha=1.5), r"\balpha\b.*1\.5"),
    "alpha < 0": (lambda: scan(alpha=np.array([0.9, -0.1, 0.9, 0.9, 0.9])), r"\balpha\b.*-0\.1"),
    "beta = 1": (lambda: step(state=state(algorithm=mc.algorithm.momentum()), beta=1.0), r"\bbeta\b.*1"),
    "beta < 0": (lambda: step(state=state(algorithm=mc.algorithm.momentum()), beta=-0.2), r"\bbeta\b.*-0\.2"),
    "delta gate = 0": (lambda: step(bias=mc.bias.huber(), delta=0.0), r"\bdelta\b.*0"),
    "delta gate < 0": (lambda: scan(bias=mc.bias.huber(kind="norm"), delta=-np.ones(5)), r"\bdelta\b.*-1"),
    # non-finite inputs and gates
    "k nan": (lambda: step(k=with_nan(k)), r"\bk\b.*(NaN|non-finite)"),
    "v inf": (lambda: step(v=np.array([1.0, INF])), r"\bv\b.*(inf|non-finite)"),
    "K nan": (lambda: scan(K=with_nan(K, 7)), r"\bK\b"),
    "V nan": (lambda: scan(V=with_nan(V, 3)), r"\bV\b"),
    "Q inf": (lambda: scan(Q=np.where(Q > 1, INF, Q)), r"\bQ\b"),
    "params nan": (lambda: state(params=(with_nan(W),)), r"params\[0\]"),
    "q nan": (lambda: mc.recall(state(), with_nan(q)), r"\bq\b"),
    "lr nan": (lambda: step(lr=NAN), r"\blr\b"),
    "lr inf": (lambda: scan(lr=np.array([0.1, INF, 0.1, 0.1, 0.1])), r"\blr\b"),
    "alpha nan": (lambda: step(alpha=NAN), r"\balpha\b"),
    "beta nan": (lambda: step(state=state(algorithm=mc.algorithm.momentum()), beta=NAN), r"\bbeta\b"),
    "delta inf": (lambda: step(bias=mc.bias.huber(), delta=INF), r"\bdelta\b"),
    # specs that do not match or do not fit
    "retention differs": (lambda: step(retention=mc.retention.none()), r"retention.*none"),
    "retention hyperparameter differs": (lambda: scan(state=state(retention=mc.retention.kl(1.0)),
                                                      retention=mc.retention.kl(2.0)), r"retention.*kl"),
    "algorithm differs": (lambda: step(algorithm=mc.algorithm.momentum(), beta=0.5), r"algorithm.*momentum"),
    "implicit with dot bias": (lambda: step(state=state(retention=mc.retention.none(),
                                                        algorithm=mc.algorithm.implicit()),
                                            bias=mc.bias.dot()), r"implicit.*bias.*dot"),
    "implicit with mlp memory": (lambda: state(memory=mc.memory.mlp(2), params=mc.memory.mlp(2).init(0),
                                               retention=mc.retention.none(), algorithm=mc.algorithm.implicit()),
                                 r"implicit.*memory.*mlp"),
    "implicit with l2 retention": (lambda: state(retention=mc.retention.l2(), algorithm=mc.algorithm.implicit()),
                                   r"implicit.*retention.*l2"),
    "alpha != 1 with none()": (lambda: step(state=state(retention=mc.retention.none()), alpha=0.9),
                               r"\balpha\b.*none"),
    "alpha != 1 with none() in scan": (lambda: scan(state=state(retention=mc.retention.none()),
                                                    alpha=np.array([1, 1, 0.5, 1, 1.0])), r"\balpha\b.*none"),
    "huber delta twice": (lambda: step(bias=mc.bias.huber(0.5), delta=0.3), r"\bdelta\b.*twice|\bdelta\b.*0\.5"),
    "huber delta missing": (lambda: step(bias=mc.bias.huber()), r"\bdelta\b"),
    "huber delta missing in scan": (lambda: scan(bias=mc.bias.huber(kind="mixture")), r"\bdelta\b"),
    "delta for a bias without one": (lambda: step(bias=mc.bias.l2(), delta=0.3), r"\bdelta\b"),
    "beta missing for momentum": (lambda: step(state=state(algorithm=mc.algorithm.momentum())), r"\bbeta\b"),
    "beta for gd": (lambda: step(beta=0.5), r"\bbeta\b"),
    "chunk = 0": (lambda: scan(chunk=0), r"\bchunk\b.*0"),
    "backend": (lambda: scan(backend="cuda"), r"\bbackend\b.*cuda"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_value_error_naming_it(case):
    call, match = CASES[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_good_inputs_pass():
    """The baseline every case above perturbs is valid (so each case fails for its own reason)."""
    step()
    step(alpha=1.0)
    step(state=state(algorithm=mc.algorithm.momentum()), beta=0.0)
    step(bias=mc.bias.huber(), delta=0.3)
    step(state=state(retention=mc.retention.none(), algorithm=mc.algorithm.implicit()))
    scan()
    scan(alpha=np.array([0.9, 1.0, 0.5, 1.0, 1.0]), lr=np.zeros(5))
    scan(state=state(retention=mc.retention.none()), alpha=1.0)
    mc.recall(state(), q)
    for factory in (lambda: mc.bias.lp(1.0), lambda: mc.retention.lq(1.01), lambda: mc.bias.robust(0.0),
                    lambda: mc.retention.elastic_net(0.0), lambda: mc.bias.huber(1e-9)):
        factory()


def test_messages_name_the_values():
    """One message in full: the argument, the allowed range and the offending value."""
    with pytest.raises(ValueError) as info:
        step(alpha=np.array(1.25))
    message = str(info.value)
    assert "alpha" in message and "1.25" in message and re.search(r"\(0, 1\]", message), message
