"""Model FLOPs per image of a DiT or MMDiT, dense and under TREAD routes.

Block FLOPs come from :mod:`tread_scale.routing.flops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tread_scale.models.mmdit import MMDiT
from tread_scale.routing.flops import block_flops, tokens_per_block
from tread_scale.routing.routes import resolve_routes

if TYPE_CHECKING:
    from tread_scale.models.dit import DiT


@dataclass
class Flops:
    """Forward FLOPs per image."""

    blocks_dense: float
    blocks_routed: float
    other: float  # patch embedding, timestep/label (or text) embeddings, final layer

    @property
    def dense(self) -> float:
        return self.blocks_dense + self.other

    @property
    def routed(self) -> float:
        return self.blocks_routed + self.other

    @property
    def train_dense(self) -> float:
        return 3 * self.dense

    @property
    def train_routed(self) -> float:
        return 3 * self.routed


def model_flops(net: DiT | MMDiT, routes, latent_hw: int | tuple[int, int] | None = None) -> Flops:
    """Forward FLOPs per image, dense and with ``routes`` (an MMDiT is counted by :func:`mmdit_flops`).

    Args:
        net: The DiT or MMDiT.
        routes: TREAD routes.
        latent_hw: Latent ``(H, W)`` (or side) of the images; defaults to the configured ``net.input_size``.
    """
    if isinstance(net, MMDiT):
        return mmdit_flops(net, routes, latent_hw=latent_hw)
    n, d, depth = net.tokens_for(latent_hw), net.hidden_size, net.depth
    tokens = tokens_per_block(resolve_routes(routes, depth), depth, n)
    p, c = net.patch_size, net.in_channels
    other = 2 * n * c * p * p * d  # patch embedding
    other += 2 * (256 * d + d * d)  # timestep MLP
    other += 2 * d * 2 * d + 2 * n * d * p * p * net.out_channels  # final adaLN and projection
    dense = depth * block_flops(n, d, net.mlp_ratio)
    routed = sum(block_flops(k, d, net.mlp_ratio) for k in tokens)
    return Flops(dense, routed, other)


def mmdit_flops(net: MMDiT, routes, text_len: int | None = None,
                latent_hw: int | tuple[int, int] | None = None) -> Flops:
    """Forward FLOPs per image of an MMDiT, dense and with ``routes`` (image tokens routed, text never).

    Args:
        net: The MMDiT.
        routes: TREAD routes.
        text_len: Padded text tokens per sample; defaults to ``net.text_len``.
        latent_hw: Latent ``(H, W)`` (or side) of the images; defaults to the configured ``net.input_size``.
    """
    lt = net.text_len if text_len is None else text_len
    n, d, p = net.tokens_for(latent_hw), net.hidden_size, net.patch_size
    other = 2 * n * net.in_channels * p * p * d  # patch embedding
    other += 2 * lt * net.text_dim * d  # text token projection
    other += 2 * (256 * d + d * d) + 2 * (net.pooled_dim * d + d * d)  # timestep and pooled-text MLPs
    other += 2 * d * 2 * d + 2 * n * d * p * p * net.out_channels  # final adaLN and projection
    tokens = tokens_per_block(resolve_routes(routes, net.depth), net.depth, n)
    dense = sum(net.block_flops(n, i, text_len=lt) for i in range(net.depth))
    routed = sum(net.block_flops(k, i, text_len=lt) for i, k in enumerate(tokens))
    return Flops(dense, routed, other)
