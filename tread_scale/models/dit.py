"""Diffusion Transformer (DiT) with adaLN conditioning and optional TREAD token routing.

A plain ``torch.nn.Module``: no trainer imports. Routing is attached from outside
(:meth:`DiT.attach_router`; the DiT is a :class:`~tread_scale.routing.protocol.Routable`); without a router
the network is the dense DiT of Peebles & Xie.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tread_scale.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d
from tread_scale.models.patched import PatchTokenNet
from tread_scale.routing.flops import block_flops as dit_block_flops
from tread_scale.routing.tokens import gather_tokens, scatter_tokens

if TYPE_CHECKING:
    from tread_scale.routing.router import TokenRouter

log = logging.getLogger(__name__)

InitMode = Literal["adaln_zero", "xavier_all"]


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

    Args:
        input_size: Latent side H (= W), or ``(H, W)``.
        patch_size: Patch side p; must divide H and W.
        in_channels: Latent channels C.
        hidden_size: Token width D.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP width multiple.
        num_classes: Real classes (the embedding table has one more row, the null label).
        out_channels: Output channels; defaults to ``in_channels``.
        init: ``adaln_zero`` (DiT paper: zeroed modulation gates and output layer) or ``xavier_all``
            (the TREAD reference, where a later xavier pass overwrites the zero init; spec §2).
        timestep_scale: Multiplier of ``t`` before the timestep sinusoid (1000 for rectified flow).

    Raises:
        ValueError: If the patch does not divide the latent or the width does not fit the heads.
    """

    def __init__(
        self,
        *,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        out_channels: int | None = None,
        init: InitMode = "adaln_zero",
        timestep_scale: float = 1.0,
    ) -> None:
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the latent size {h}x{w}")
        if init not in ("adaln_zero", "xavier_all"):
            raise ValueError(f"init must be 'adaln_zero' or 'xavier_all', got {init!r}")
        self.input_size = (h, w)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.grid = (h // patch_size, w // patch_size)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, scale=timestep_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, *self.grid).unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.router: TokenRouter | None = None
        self.initialize_weights(init)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def routable_tokens(self) -> int:
        """Tokens TREAD may route: all N image tokens (:class:`~tread_scale.routing.protocol.Routable`)."""
        return self.num_tokens

    def block_flops(self, tokens: int, index: int = 0) -> float:
        """Forward FLOPs of one block on one sample with ``tokens`` tokens (all blocks are alike)."""
        return dit_block_flops(tokens, self.hidden_size, self.mlp_ratio)

    def initialize_weights(self, init: InitMode) -> None:
        """Re-initialise every weight per ``init`` (see the class docstring)."""

        def _basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic)
        conv = self.x_embedder.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if init == "adaln_zero":
            zeroed = [b.adaLN_modulation[-1] for b in self.blocks]
            zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
            for lin in zeroed:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

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
            x: ``(B, C, H, W)`` network input.
            t: ``(B,)`` or scalar noise-level input of the timestep embedder.
            y: ``(B,)`` int labels; ``num_classes`` is the null label.
            force_routing: Route even in eval mode (TREAD guidance).
            rate_override: Replace every route's rate (inference only).
            routing_seed: Draw the routed subsets from this seed (or one seed per sample) instead of the
                router's stream.

        Returns:
            ``(B, out_channels, H, W)`` prediction.
        """
        if x.shape[1:] != (self.in_channels, *self.input_size):
            raise ValueError(
                f"DiT expects latents of shape (B, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}),"
                f" got {tuple(x.shape)}"
            )
        b = x.shape[0]
        if t.ndim == 0:
            t = t.expand(b)
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)

        schedule = {}
        if self.router is not None:
            schedule = self.router.schedule(
                b, self.num_tokens, tokens.device,
                training=self.training, force=force_routing, rate_override=rate_override, seed=routing_seed,
            )
        saved, ids, end = None, None, -1
        for i, block in enumerate(self.blocks):
            if i in schedule:
                end, ids = schedule[i]
                saved, tokens = tokens, gather_tokens(tokens, ids)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
            if i == end:
                tokens = scatter_tokens(saved, ids, tokens)
                saved, ids, end = None, None, -1
        return self.unpatchify(self.final_layer(tokens, c))
