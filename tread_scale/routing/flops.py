"""Analytic FLOP accounting of DiT blocks with and without routing (spec §3.5)."""

from __future__ import annotations

from collections.abc import Sequence

from tread_scale.routing.routes import ResolvedRoute
from tread_scale.routing.tokens import num_kept


def block_flops(num_tokens: int, hidden: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one DiT block on one sample.

    Linear layers cost ``2·N·D·(3D + D + 2·ratio·D) = (8 + 4·ratio)·N·D²`` (24·N·D² at ratio 4),
    attention ``4·N²·D`` (scores and weighted sum) and the adaLN modulation ``12·D²``.
    """
    n, d = num_tokens, hidden
    return (8 + 4 * mlp_ratio) * n * d * d + 4 * n * n * d + 12 * d * d


def tokens_per_block(routes: Sequence[ResolvedRoute], depth: int, num_tokens: int) -> list[int]:
    """Tokens each block processes under the (resolved) routes."""
    tokens = [num_tokens] * depth
    for r in routes:
        for i in range(r.start, r.end + 1):
            tokens[i] = num_kept(num_tokens, r.rate)
    return tokens


def routed_block_fraction(
    routes: Sequence[ResolvedRoute], depth: int, num_tokens: int, hidden: int, mlp_ratio: float = 4.0
) -> float:
    """Block FLOPs with the routes, as a fraction of the dense blocks' FLOPs."""
    dense = block_flops(num_tokens, hidden, mlp_ratio)
    tokens = tokens_per_block(routes, depth, num_tokens)
    return sum(block_flops(n, hidden, mlp_ratio) for n in tokens) / (depth * dense)
