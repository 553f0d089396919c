"""Build plain-torch objects (DiT or MMDiT, router, objective) from config sections."""

from __future__ import annotations

from collections.abc import Sequence

from tread_scale.config import ModelConfig, ObjectiveConfig
from tread_scale.diffusion.edm import EDM
from tread_scale.diffusion.rectified_flow import RectifiedFlow
from tread_scale.errors import ConfigError
from tread_scale.models.dit import DiT
from tread_scale.models.mmdit import MMDiT
from tread_scale.routing.router import TokenRouter
from tread_scale.routing.routes import Route


# MMDiT text widths when neither the config nor a dataset gives them (dry-run): T5-XXL tokens, CLIP-L+G pooled.
DEFAULT_TEXT_DIM, DEFAULT_POOLED_DIM, DEFAULT_TEXT_LEN = 4096, 2048, 256


def build_net(cfg: ModelConfig, routes: Sequence[Route] = (), routing_seed: int = 0, rank: int = 0
              ) -> DiT | MMDiT:
    """The network of ``cfg``'s family (DiT or MMDiT); with ``routes``, a router is attached (as the TREAD
    Algorithm would at INIT)."""
    if cfg.model_family() == "dit":
        return build_dit(cfg, routes, routing_seed, rank)
    size, patch = cfg.size()
    net = MMDiT(input_size=cfg.input_size, patch_size=patch, in_channels=cfg.in_channels,
                hidden_size=size.hidden_size, depth=size.depth, num_heads=size.num_heads, mlp_ratio=size.mlp_ratio,
                text_dim=cfg.text_dim or DEFAULT_TEXT_DIM, pooled_dim=cfg.pooled_dim or DEFAULT_POOLED_DIM,
                text_len=cfg.text_len or DEFAULT_TEXT_LEN, pos_embed=cfg.pos_embed or "rope", qk_norm=cfg.qk_norm,
                init=cfg.init, timestep_scale=timestep_scale(cfg), text_mask=cfg.text_mask,
                pos_embed_max_size=cfg.pos_embed_max_size)
    if routes:
        net.attach_router(TokenRouter(routes, seed=routing_seed, rank=rank))
    return net


def build_dit(cfg: ModelConfig, routes: Sequence[Route] = (), routing_seed: int = 0, rank: int = 0) -> DiT:
    """A DiT per ``cfg``; with ``routes``, a router is attached (as the TREAD Algorithm would at INIT).

    Raises:
        ConfigError: If ``cfg`` names a model of another family (use :func:`build_net`).
    """
    if cfg.model_family() != "dit":
        raise ConfigError(f"model.name={cfg.name} is not a DiT; build it with build_net")
    size, patch = cfg.size()
    net = DiT(input_size=cfg.input_size, patch_size=patch, in_channels=cfg.in_channels, hidden_size=size.hidden_size,
              depth=size.depth, num_heads=size.num_heads, mlp_ratio=size.mlp_ratio, num_classes=cfg.num_classes,
              init=cfg.init, timestep_scale=timestep_scale(cfg))
    if routes:
        net.attach_router(TokenRouter(routes, seed=routing_seed, rank=rank))
    return net


def timestep_scale(cfg: ModelConfig) -> float:
    """The model's timestep multiplier: as configured (validation resolves null by objective), else 1."""
    return 1.0 if cfg.timestep_scale is None else float(cfg.timestep_scale)


def build_objective(cfg: ObjectiveConfig) -> EDM | RectifiedFlow:
    """The training objective per ``cfg.kind``."""
    if cfg.kind == "edm":
        return EDM(P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_data=cfg.sigma_data, label_dropout=cfg.label_dropout)
    return RectifiedFlow(t_sampling=cfg.t_sampling, label_dropout=cfg.label_dropout, shift=cfg.shift)
