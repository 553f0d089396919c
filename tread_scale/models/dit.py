"""Diffusion Transformer (DiT) with adaLN conditioning and optional TREAD token routing.

A plain ``torch.nn.Module``: no trainer imports. Routing is attached from outside
(:meth:`DiT.attach_router`; the DiT is a :class:`~tread_scale.routing.protocol.Routable`); without a router
the network is the dense DiT of Peebles & Xie.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tread_scale.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d
from tread_scale.models.patched import InitMode, PatchTokenNet
from tread_scale.routing.flops import block_flops as dit_block_flops
from tread_scale.routing.tokens import gather_tokens, scatter_tokens

log = logging.getLogger(__name__)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x·(1+scale) + shift`` with per-sample shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash kernels on GPU).

    Args:
        dim: Token width.
        num_heads: Heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``D → ratio·D → D`` with tanh-approximate GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN(-Zero) modulation and gated residuals.

    Args:
        dim: Token width D.
        num_heads: Attention heads.
        mlp_ratio: MLP width multiple.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map of each token to its ``p·p·C`` patch values."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(PatchTokenNet):
    """Class-conditional Diffusion Transformer over latents of any channel count and resolution.

    The network maps a noisy latent ``x`` (B, C, H, W), a per-sample noise level ``t`` (B,) and labels
    ``y`` (B,) to a prediction of the same shape as ``x``. Label ``num_classes`` is the null label.

    The model is configured for ``input_size`` (its stored position table, ``num_tokens`` and FLOP accounting
    refer to it) but runs on any ``H × W`` that the patch divides (aspect-ratio buckets, multi-resolution
    training): the fixed sin-cos table of another grid is computed on the fly, exactly as
    :func:`~tread_scale.models.embeddings.sincos_2d` gives it.

    Args:
        hidden_size: Token width D.
        depth: Number of blocks.
        num_heads: Attention heads.
        num_classes: Real classes (the embedding table has one more row, the null label).
        **patch_args: ``input_size``, ``patch_size``, ``in_channels``, ``mlp_ratio``, ``out_channels``,
            ``init`` and ``timestep_scale``, as :class:`~tread_scale.models.patched.PatchTokenNet` takes them.
            ``init='xavier_all'`` is the TREAD reference, where a later xavier pass overwrites the DiT
            paper's zero init (spec §2).

    Raises:
        ValueError: If the patch does not divide the latent or the width does not fit the heads.
    """

    def __init__(self, *, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, num_classes: int = 1000,
                 **patch_args: Any) -> None:
        super().__init__(hidden_size=hidden_size, num_heads=num_heads, **patch_args)
        self.num_classes = num_classes
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, *self.grid).unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, self.mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels)
        self.initialize_weights(self.init_mode)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def fixed_sincos(self) -> bool:
        """The DiT's ``pos_embed`` is always the fixed sin-cos table of the configured grid."""
        return True

    @property
    def routable_tokens(self) -> int:
        """Tokens TREAD may route at the configured size: all N image tokens
        (:class:`~tread_scale.routing.protocol.Routable`; another grid's count is :meth:`tokens_for`)."""
        return self.num_tokens

    def block_flops(self, tokens: int, index: int = 0) -> float:
        """Forward FLOPs of one block on one sample with ``tokens`` tokens (all blocks are alike)."""
        return dit_block_flops(tokens, self.hidden_size, self.mlp_ratio)

    def initialize_weights(self, init: InitMode) -> None:
        """Re-initialise every weight per ``init`` (see the class docstring)."""
        normal = [self.y_embedder.embedding_table.weight, self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight]
        zeroed = [b.adaLN_modulation[-1] for b in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        self._reset_weights(init, normal, zeroed)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """FSDP wrap units: each block, each embedder and the final layer (read by Composer's FSDP2 policy)."""
        return isinstance(module, (DiTBlock, PatchEmbed, TimestepEmbedder, LabelEmbedder, FinalLayer))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        *,
        force_routing: bool = False,
        rate_override: float | None = None,
        routing_seed: int | list[int] | None = None,
    ) -> torch.Tensor:
        """Predict from a noisy latent.

        Args:
            x: ``(B, C, H, W)`` network input; H and W are any multiples of the patch size.
            t: ``(B,)`` or scalar noise-level input of the timestep embedder.
            y: ``(B,)`` int labels; ``num_classes`` is the null label.
            force_routing: TREAD routing in eval mode (see :meth:`route_schedule` for the routing options).
            rate_override: Rate of every route (inference only).
            routing_seed: Seed (or per-sample seeds) of the routed subsets.

        Returns:
            The ``(B, out_channels, H, W)`` prediction.

        Raises:
            ValueError: Naming the expected shape, if the channels are wrong or the patch does not divide H, W.
        """
        grid = self.check_latents(x)
        b = x.shape[0]
        if t.ndim == 0:
            t = t.expand(b)
        tokens = self.x_embedder(x) + self.sincos_positions(grid)
        c = self.t_embedder(t) + self.y_embedder(y)
        schedule = self.route_schedule(b, grid[0] * grid[1], tokens.device, force_routing=force_routing,
                                       rate_override=rate_override, routing_seed=routing_seed)
        tokens = self.run_blocks(
            tokens, schedule,
            run=lambda block, tok: self.call_block(block, tok, c),
            enter=lambda tok, ids: (gather_tokens(tok, ids), tok),
            leave=scatter_tokens,
        )
        return self.unpatchify(self.final_layer(tokens, c), grid)
