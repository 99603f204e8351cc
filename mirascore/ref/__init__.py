"""Slow, obviously correct float64 loops: the semantics every fast path is tested against
(docs/contract.md).

    Y, state = mirascore.ref.scan(state, K, V, Q, bias=..., lr=..., alpha=...)        # per token (contract §3)
    Y, state = mirascore.ref.scan_chunked(state, K, V, Q, bias=..., lr=..., chunk=b)  # anchored (contract §4)
"""
from .loops import scan, scan_chunked

__all__ = ["scan", "scan_chunked"]
