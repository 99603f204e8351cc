"""Chunked (parallel-in-time) forms of the scan.

`chunk_delta` is the exact chunked WY/UT algorithm for every rule whose update is linear in the
state (DESIGN §4: linear attention, RetNet, Mamba2, DeltaNet, Gated DeltaNet, Longhorn, TTT-linear):

    W_t = α_t W_{t−1} (I − b_t k_t k_tᵀ) + c_t v_t k_tᵀ,   y_t = W_t q_t

See docs/derivations/chunked-delta.md (forward, gate mapping) and scan-backward-delta.md (backward).
"""
from .delta import DeltaSaved, chunk_delta, chunk_delta_bwd, chunk_delta_fwd

__all__ = ["chunk_delta", "chunk_delta_fwd", "chunk_delta_bwd", "DeltaSaved"]
