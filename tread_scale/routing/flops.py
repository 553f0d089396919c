"""Analytic FLOP accounting of DiT and MMDiT blocks with and without routing (spec §3.5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tread_scale.routing.routes import ResolvedRoute, Route, resolve_routes
from tread_scale.routing.tokens import num_kept

if TYPE_CHECKING:
    from tread_scale.routing.protocol import Routable


def block_flops(num_tokens: int, hidden: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one DiT block on one sample.

    Linear layers cost ``2·N·D·(3D + D + 2·ratio·D) = (8 + 4·ratio)·N·D²`` (24·N·D² at ratio 4),
    attention ``4·N²·D`` (scores and weighted sum) and the adaLN modulation ``12·D²``.
    """
    n, d = num_tokens, hidden
    return (8 + 4 * mlp_ratio) * n * d * d + 4 * n * n * d + 12 * d * d


def mmdit_block_flops(text_tokens: int, image_tokens: int, hidden: int, mlp_ratio: float = 4.0, *,
                      text_output: bool = True) -> float:
    """Forward FLOPs of one MMDiT (joint-attention) block on one sample.

    Each modality has its own linear layers, so they cost ``(8 + 4·ratio)·T·D²`` for its T tokens and
    ``12·D²`` for its adaLN modulation, as in a DiT block. Joint attention over the ``S = L + K`` text and
    image tokens costs ``4·S²·D``; padded text tokens are computed (and masked), so L is the padded length.
    Without a text output (the last block), the text stream only supplies keys and values
    (``4·L·D²``, modulation ``4·D²``) and only the K image tokens query: attention ``4·K·S·D``.

    Args:
        text_tokens: L, text tokens (never routed).
        image_tokens: K, image tokens that go through the block.
        hidden: Width D.
        mlp_ratio: MLP width multiple.
        text_output: Whether the block updates the text tokens.
    """
    lt, k, d = text_tokens, image_tokens, hidden
    linear = (8 + 4 * mlp_ratio) * k * d * d + 12 * d * d
    if text_output:
        linear += (8 + 4 * mlp_ratio) * lt * d * d + 12 * d * d
        attention = 4 * (lt + k) ** 2 * d
    else:
        linear += 4 * lt * d * d + 4 * d * d
        attention = 4 * k * (lt + k) * d
    return linear + attention


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


def routed_block_flops(net: Routable, routes: Sequence[Route | ResolvedRoute | Mapping],
                       num_tokens: int | None = None) -> tuple[float, float]:
    """Block FLOPs of one sample, dense and with ``routes``, of any :class:`~tread_scale.routing.protocol.Routable`.

    Args:
        net: The model (only its protocol members are used).
        routes: Routes, resolved against ``net.depth`` here.
        num_tokens: Routable tokens per sample; defaults to ``net.routable_tokens`` (the configured size). For
            a latent of another size (an aspect-ratio bucket), pass that grid's count, e.g.
            ``net.tokens_for((h, w))`` of a DiT or MMDiT.

    Returns:
        ``(dense, routed)`` forward FLOPs summed over the blocks.
    """
    depth, n = net.depth, net.routable_tokens if num_tokens is None else num_tokens
    tokens = tokens_per_block(resolve_routes(routes, depth), depth, n)
    dense = sum(net.block_flops(n, i) for i in range(depth))
    routed = sum(net.block_flops(k, i) for i, k in enumerate(tokens))
    return dense, routed


def routed_flops_fraction(net: Routable, routes: Sequence[Route | ResolvedRoute | Mapping],
                          num_tokens: int | None = None) -> float:
    """Block FLOPs with ``routes`` as a fraction of the dense blocks' FLOPs, for any Routable model
    (``num_tokens``: routable tokens per sample, as in :func:`routed_block_flops`)."""
    dense, routed = routed_block_flops(net, routes, num_tokens)
    return routed / dense
