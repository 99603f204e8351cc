"""Chunked (parallel-in-time) forms of the scan. They take arrays and specs, call the specs only
through their protocol methods (mirascore.protocols), and know nothing of step/scan.

`delta_rule` is the exact chunked WY/UT form for every rule whose update is linear in the state
(docs/contract.md §4: linear attention, RetNet, Mamba2, DeltaNet, Gated DeltaNet, Longhorn, TTT-linear):

    W_t = α_t W_{t−1} (I − b_t k_t k_tᵀ) + c_t v_t k_tᵀ,   y_t = W_t q_t

`anchored` is the anchored form of docs/contract.md §4 for all other rules: `coefficients` holds its decay
algebra and `reads` the three ways it reads a memory's parameters. Derivations:
docs/derivations/chunked-delta.md, scan-backward-delta.md, chunked.md, scan-backward.md.
"""
from .delta_rule import DeltaRuleSaved, delta_rule_bwd, delta_rule_fwd, delta_rule_scan

__all__ = ["delta_rule_scan", "delta_rule_fwd", "delta_rule_bwd", "DeltaRuleSaved"]
