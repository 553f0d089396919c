"""Model FLOPs of a DiT per image, dense and under TREAD routes (block FLOPs from :mod:`tread_scale.routing.flops`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tread_scale.routing.flops import block_flops, tokens_per_block
from tread_scale.routing.routes import resolve_routes

if TYPE_CHECKING:
    from tread_scale.models.dit import DiT


@dataclass
class Flops:
    """Forward FLOPs per image."""

    blocks_dense: float
    blocks_routed: float
    other: float  # patch embedding, timestep/label embedding, final layer

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


def model_flops(net: DiT, routes) -> Flops:
    """Forward FLOPs per image, dense and with ``routes``."""
    n, d, depth = net.num_tokens, net.hidden_size, net.depth
    tokens = tokens_per_block(resolve_routes(routes, depth), depth, n)
    p, c = net.patch_size, net.in_channels
    other = 2 * n * c * p * p * d  # patch embedding
    other += 2 * (256 * d + d * d)  # timestep MLP
    other += 2 * d * 2 * d + 2 * n * d * p * p * net.out_channels  # final adaLN and projection
    dense = depth * block_flops(n, d, net.mlp_ratio)
    routed = sum(block_flops(k, d, net.mlp_ratio) for k in tokens)
    return Flops(dense, routed, other)
