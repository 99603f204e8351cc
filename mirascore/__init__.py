"""mirascore: Miras sequence-model memories as pure numpy/CuPy functions (docs/contract.md).

    import mirascore as mc
    rule  = mc.presets.gated_deltanet(64)
    state = mc.init(rule.memory, params, retention=rule.retention, algorithm=rule.algorithm)
    Y, state = mc.scan(state, K, V, Q, bias=rule.bias, lr=eta, alpha=a)

Submodules: memory, bias, retention, algorithm, presets; ref (float64 reference loops) and
testing (property checks) load on first use. Importing mirascore imports neither CuPy nor numba.
"""
import importlib

from . import algorithm, bias, memory, presets, retention
from .state import MemoryState, Rule, init, recall, weights
from .updates import scan, step

__all__ = ["memory", "bias", "retention", "algorithm", "presets", "ref", "testing",
           "init", "step", "scan", "weights", "recall", "MemoryState", "Rule"]

_LAZY = ("ref", "testing")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
