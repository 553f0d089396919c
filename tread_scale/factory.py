"""Build plain-torch objects (DiT, router, objective) from config sections."""

from __future__ import annotations

from collections.abc import Sequence

from tread_scale.config import ModelConfig, ObjectiveConfig
from tread_scale.diffusion.edm import EDM
from tread_scale.diffusion.rectified_flow import RectifiedFlow
from tread_scale.models.dit import DiT
from tread_scale.routing.router import TokenRouter
from tread_scale.routing.routes import Route


def build_dit(cfg: ModelConfig, routes: Sequence[Route] = (), routing_seed: int = 0, rank: int = 0) -> DiT:
    """A DiT per ``cfg``; with ``routes``, a router is attached (as the TREAD Algorithm would at INIT)."""
    size, patch = cfg.size()
    net = DiT(input_size=cfg.input_size, patch_size=patch, in_channels=cfg.in_channels, hidden_size=size.hidden_size,
              depth=size.depth, num_heads=size.num_heads, mlp_ratio=size.mlp_ratio, num_classes=cfg.num_classes,
              init=cfg.init)
    if routes:
        net.attach_router(TokenRouter(routes, seed=routing_seed, rank=rank))
    return net


def build_objective(cfg: ObjectiveConfig) -> EDM | RectifiedFlow:
    """The training objective per ``cfg.kind``."""
    if cfg.kind == "edm":
        return EDM(P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_data=cfg.sigma_data, label_dropout=cfg.label_dropout)
    return RectifiedFlow(t_sampling=cfg.t_sampling, label_dropout=cfg.label_dropout)
