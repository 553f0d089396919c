"""TREAD token routing (spec §3): plain PyTorch, usable from any trainer and any :class:`Routable` model."""

from tread_scale.routing.flops import (
    block_flops, mmdit_block_flops, routed_block_flops, routed_block_fraction, routed_flops_fraction,
)
from tread_scale.routing.protocol import Routable
from tread_scale.routing.router import TokenRouter
from tread_scale.routing.routes import ResolvedRoute, Route, resolve_routes
from tread_scale.routing.tokens import gather_tokens, num_kept, scatter_tokens

__all__ = [
    "TokenRouter", "Route", "ResolvedRoute", "resolve_routes", "gather_tokens", "scatter_tokens",
    "num_kept", "block_flops", "mmdit_block_flops", "routed_block_flops", "routed_block_fraction",
    "routed_flops_fraction", "Routable",
]
