"""Multimodal Diffusion Transformer (MMDiT, the SD3 design) with optional TREAD routing of image tokens.

Text and image tokens keep separate weights (adaLN modulation, qkv, optional QK-norm, output projection,
MLP) and meet in one joint attention over ``[text; image]`` in every block. The adaLN condition is the
timestep embedding plus an MLP of the pooled text embedding. Padded text tokens are masked out as
attention keys (``text_mask=True``, the default; ``False`` attends to them, as SD3 and Flux do); image tokens are always valid keys, so no query row is ever fully masked, even for an
empty prompt whose text is all padding.

Design choices (documented here because they differ between peers):

* **Positions** (``pos_embed``): ``sincos`` (a fixed 2-D table added once after the patch embedding, as in
  the DiT), ``learned`` (the same, trainable), ``rope`` (2-D rotary embedding of the image queries and
  keys, :mod:`tread_scale.models.rope`) or ``sd3`` (SD3's table for a ``pos_embed_max_size``² grid, stored
  with the weights and centre-cropped to the latent's grid: any size up to the maximum uses the same
  table, as SD3's does; fixed during training, like diffusers' buffer). Text tokens get **no** position signal from this model: the text
  encoder's output is already contextual, and no rotation is the same as Flux's all-zero text position ids.
* **Last block**: as in SD3, its text stream has no output. It only supplies keys and values (a ``kv``
  projection, no query, output projection or MLP; shift/scale modulation only), and only image tokens query.
  This removes weights that could not receive a gradient.
* **QK-norm** (``qk_norm``): RMSNorm with a learned scale over each head's queries and keys, per modality
  (SD3.5, Flux); it keeps attention logits bounded at scale.
* **Null condition**: the unconditional (CFG) condition is stored with the weights as buffers, so training's
  caption dropout and sampling's unconditional branch use the same one. It defaults to a prompt with no
  valid token and a zero pooled vector; :meth:`MMDiT.set_null_condition` replaces it by the encoded empty
  prompt (as SD3 does). ``null_label`` is an alias, so code written for the DiT's null label works.

Routing (:class:`~tread_scale.routing.protocol.Routable`): only image tokens are routable. A route gathers the
kept image tokens and their RoPE table rows (the same ids), runs its blocks with all text tokens and the kept
image tokens in the joint attention, and scatters the image tokens back. With additive position
embeddings, positions are part of the token features and travel with them.

A plain ``torch.nn.Module``: no trainer imports.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tread_scale.models.conditioning import TextCondition
from tread_scale.models.dit import FinalLayer, Mlp, modulate
from tread_scale.models.embeddings import PatchEmbed, TimestepEmbedder, sincos_2d
from tread_scale.models.patched import InitMode, PatchTokenNet
from tread_scale.models.rope import apply_rope, rope_angles, rope_table
from tread_scale.routing.flops import mmdit_block_flops
from tread_scale.routing.tokens import gather_tokens, scatter_tokens

log = logging.getLogger(__name__)

PosEmbed = Literal["sincos", "learned", "rope", "sd3"]


class PooledEmbedder(nn.Module):
    """Pooled text embedding ``(B, P)`` → ``(B, D)`` through ``Linear → SiLU → Linear``."""

    def __init__(self, pooled_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)


class JointStream(nn.Module):
    """One modality's weights in a joint block: modulation, qkv (+QK-norm), output projection and MLP.

    Args:
        dim: Token width D.
        num_heads: Attention heads.
        mlp_ratio: MLP width multiple.
        qk_norm: RMSNorm over each head's queries and keys.
        kv_only: The stream only supplies keys and values (text in the last block): a ``kv`` projection,
            shift/scale modulation, no output projection or MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, kv_only: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kv_only = kv_only
        head_dim = dim // num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if kv_only else 6) * dim, bias=True))
        if kv_only:
            self.kv = nn.Linear(dim, 2 * dim, bias=True)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=True)
            self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
            self.proj = nn.Linear(dim, dim, bias=True)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def pre_attention(
        self, x: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Modulate and project ``(B, T, D)`` tokens to per-head ``(B, H, T, D/H)`` q (None if kv-only), k, v.

        Returns:
            ``(q, k, v, mods)`` with ``mods`` the post-attention modulation (gate, shift, scale, gate).
        """
        b, n, d = x.shape
        if self.kv_only:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            mods: tuple[torch.Tensor, ...] = ()
        else:
            shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            mods = (gate_msa, shift_mlp, scale_mlp, gate_mlp)
        h = modulate(self.norm1(x), shift, scale)
        if self.kv_only:
            k, v = self.kv(h).reshape(b, n, 2, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
            return None, self.k_norm(k), v, mods
        q, k, v = self.qkv(h).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v, mods

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Gated residual of the attention output ``(B, T, D)`` and of the MLP."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    """Joint-attention block with separate text and image weights (SD3's MMDiT block).

    Args:
        dim: Token width D.
        num_heads: Attention heads.
        mlp_ratio: MLP width multiple.
        qk_norm: RMSNorm on queries and keys.
        text_output: Whether the block updates the text tokens (False for the last block).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 text_output: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.img = JointStream(dim, num_heads, mlp_ratio, qk_norm)
        self.txt = JointStream(dim, num_heads, mlp_ratio, qk_norm, kv_only=not text_output)

    @property
    def text_output(self) -> bool:
        return not self.txt.kv_only

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        c: torch.Tensor,
        rope: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block on ``K`` image and ``L`` text tokens.

        Args:
            img: ``(B, K, D)`` image tokens.
            txt: ``(B, L, D)`` text tokens.
            c: ``(B, D)`` adaLN condition.
            rope: ``(B or 1, K, head_dim)`` RoPE table of the image tokens, or None.
            mask: ``(B, 1, 1, L + K)`` bool key mask (True = attend) over ``[text; image]``, or None.

        Returns:
            ``(img, txt)``; ``txt`` is None when the block has no text output.
        """
        b, k_img, d = img.shape
        n_txt = txt.shape[1]
        qi, ki, vi, mods_i = self.img.pre_attention(img, c)
        qt, kt, vt, mods_t = self.txt.pre_attention(txt, c)
        if rope is not None:
            qi, ki = apply_rope(qi, rope), apply_rope(ki, rope)
        k = torch.cat([kt, ki], dim=2)
        v = torch.cat([vt, vi], dim=2)
        q = qi if qt is None else torch.cat([qt, qi], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, q.shape[2], d)
        img = self.img.post_attention(img, out[:, -k_img:], mods_i)
        if qt is None:
            return img, None
        return img, self.txt.post_attention(txt, out[:, :n_txt], mods_t)


def _resize_null_condition(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Before loading a state dict, give the null-condition buffers the stored text length."""
    for name in ("null_emb", "null_mask"):
        stored = state_dict.get(prefix + name)
        if stored is not None and stored.shape != getattr(module, name).shape:
            current = getattr(module, name)
            setattr(module, name, torch.empty(stored.shape, dtype=current.dtype, device=current.device))


class MMDiT(PatchTokenNet):
    """Text-conditioned multimodal Diffusion Transformer over latents of any channel count and resolution.

    Maps a noisy latent ``x`` (B, C, H, W), a noise level ``t`` (B,) and a :class:`TextCondition` to a
    prediction shaped like ``x``. Implements :class:`~tread_scale.routing.protocol.Routable` with the image
    tokens as the routable tokens.

    The model is configured for ``input_size`` but runs on any ``H × W`` that the patch divides (aspect-ratio
    buckets, multi-resolution training): ``sincos`` and ``rope`` positions are computed for the input's grid,
    ``sd3`` crops its table to any grid up to ``pos_embed_max_size`` patches a side, and ``learned`` positions
    exist for the configured grid only.

    Args:
        hidden_size: Token width D.
        depth: Number of joint blocks.
        num_heads: Attention heads.
        text_dim: Width of the per-token text embeddings (4096: T5-XXL).
        pooled_dim: Width of the pooled text embedding (2048: CLIP-L + CLIP-G pooled, concatenated).
        pos_embed: ``sincos``, ``learned``, ``rope`` or ``sd3`` (see the module docstring).
        qk_norm: RMSNorm on each head's queries and keys.
        rope_theta: RoPE frequency base.
        text_len: Padded text length assumed by FLOP accounting (:meth:`block_flops`); the forward pass
            accepts any length.
        text_mask: Mask padded text tokens out of the joint attention (exact for any padding). ``False`` is
            SD3's and Flux's choice: every text token, padding included, is a key; no mask is passed, so SDPA
            may take its flash kernel.
        pos_embed_max_size: Side of SD3's position table (``pos_embed='sd3'``; 192 in SD3 and SD3.5).
        **patch_args: ``input_size``, ``patch_size``, ``in_channels``, ``mlp_ratio``, ``out_channels``,
            ``init`` and ``timestep_scale``, as :class:`~tread_scale.models.patched.PatchTokenNet` takes them.

    Raises:
        ValueError: If the patch does not divide the latent, the width does not fit the heads, RoPE is asked
            for with a head dimension not divisible by 4, or an option is unknown.
    """

    def __init__(
        self,
        *,
        hidden_size: int = 1536,
        depth: int = 24,
        num_heads: int = 24,
        text_dim: int = 4096,
        pooled_dim: int = 2048,
        pos_embed: PosEmbed = "rope",
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        text_len: int = 256,
        text_mask: bool = True,
        pos_embed_max_size: int | None = None,
        **patch_args: Any,
    ) -> None:
        if pos_embed not in ("sincos", "learned", "rope", "sd3"):
            raise ValueError(f"pos_embed must be 'sincos', 'learned', 'rope' or 'sd3', got {pos_embed!r}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        super().__init__(hidden_size=hidden_size, num_heads=num_heads, **patch_args)
        if pos_embed == "sd3" and not (pos_embed_max_size and pos_embed_max_size >= max(self.grid)):
            raise ValueError(f"pos_embed='sd3' needs pos_embed_max_size >= the latent grid's side "
                             f"{max(self.grid)}, got {pos_embed_max_size}")
        if pos_embed == "rope" and (hidden_size // num_heads) % 4:
            raise ValueError(f"pos_embed='rope' needs a head dimension divisible by 4, got {hidden_size // num_heads}")
        self.text_dim = text_dim
        self.pooled_dim = pooled_dim
        self.pos_embed_type = pos_embed
        self.qk_norm = qk_norm
        self.rope_theta = rope_theta
        self.pos_embed_max_size = pos_embed_max_size if pos_embed == "sd3" else None
        self.text_len = text_len
        self.mask_text = bool(text_mask)
        self.pooled_embedder = PooledEmbedder(pooled_dim, hidden_size)
        self.context_embedder = nn.Linear(text_dim, hidden_size, bias=True)
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_2d(hidden_size, *self.grid).unsqueeze(0), persistent=True)
        elif pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size))
        elif pos_embed == "sd3":
            m = int(pos_embed_max_size)
            self.register_buffer("pos_embed", sincos_2d(hidden_size, m, m).unsqueeze(0), persistent=True)
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList(
            MMDiTBlock(hidden_size, num_heads, self.mlp_ratio, qk_norm, text_output=i < depth - 1) for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels)
        self.register_buffer("null_emb", torch.zeros(1, 1, text_dim))
        self.register_buffer("null_mask", torch.zeros(1, 1, dtype=torch.bool))
        self.register_buffer("null_pooled", torch.zeros(1, pooled_dim))
        self.register_load_state_dict_pre_hook(_resize_null_condition)
        self.initialize_weights(self.init_mode)

    @property
    def null_condition(self) -> TextCondition:
        """The batch-1 unconditional condition (the empty prompt) used for caption dropout and CFG."""
        return TextCondition(self.null_emb, self.null_mask, self.null_pooled)

    @property
    def has_null_condition(self) -> bool:
        """Whether a null condition was set (an encoded empty prompt has at least one valid token); imported
        SD3 weights have none until ``import-sd3 --empty-prompt`` or a fine-tune sets it."""
        return bool(self.null_mask.any())

    @property
    def null_label(self) -> TextCondition:
        """Alias of :attr:`null_condition`, named like the DiT's null label."""
        return self.null_condition

    def set_null_condition(self, cond: TextCondition) -> None:
        """Store ``cond`` (batch 1, e.g. the encoded empty prompt) as the null condition.

        Raises:
            ValueError: If ``cond`` is not a batch of one or its widths do not match the model.
        """
        if len(cond) != 1 or cond.emb.shape[-1] != self.text_dim or cond.pooled.shape[-1] != self.pooled_dim:
            raise ValueError(f"the null condition must be a batch of one with text width {self.text_dim} and pooled "
                             f"width {self.pooled_dim}; got emb {tuple(cond.emb.shape)}, pooled "
                             f"{tuple(cond.pooled.shape)}")
        device = self.null_emb.device
        self.null_emb = cond.emb.detach().to(device, torch.float32).clone()
        self.null_mask = cond.mask.detach().to(device).clone()
        self.null_pooled = cond.pooled.detach().to(device, torch.float32).clone()

    @property
    def fixed_sincos(self) -> bool:
        """Whether ``pos_embed`` is the fixed sin-cos table of the configured grid (``pos_embed='sincos'``)."""
        return self.pos_embed_type == "sincos"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def routable_tokens(self) -> int:
        """Image tokens per sample: the tokens TREAD may route (text tokens never are)."""
        return self.num_tokens

    def block_flops(self, tokens: int, index: int, text_len: int | None = None) -> float:
        """Forward FLOPs of block ``index`` on one sample with ``tokens`` image and ``text_len`` text tokens
        (default: the ``text_len`` given at construction)."""
        return mmdit_block_flops(self.text_len if text_len is None else text_len, tokens, self.hidden_size,
                                 self.mlp_ratio, text_output=self.blocks[index].text_output)

    def initialize_weights(self, init: InitMode) -> None:
        """Re-initialise every weight per ``init``: xavier-uniform linears with zero biases, N(0, 0.02) for the
        timestep MLP and a learned position table, and (``adaln_zero``) zeroed modulation and output layers."""
        normal = [self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight]
        if isinstance(self.pos_embed, nn.Parameter):
            normal.append(self.pos_embed)
        zeroed = [s.adaLN_modulation[-1] for b in self.blocks for s in (b.img, b.txt)]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        self._reset_weights(init, normal, zeroed)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """FSDP wrap units: each block, each embedder and the final layer (read by Composer's FSDP2 policy)."""
        return (isinstance(module, (MMDiTBlock, PatchEmbed, TimestepEmbedder, PooledEmbedder, FinalLayer))
                or module is self.context_embedder)

    def embed(
        self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image tokens ``(B, N, D)`` (with additive positions), text tokens ``(B, L, D)`` and condition ``(B, D)``.

        Both residual streams are float32 whatever the position mode: under bf16 autocast the embedders
        compute in bf16, and the blocks' residual additions then stay in float32 (as the DiT's stream does,
        where the fp32 position table is added). Without ``.float()`` the RoPE mode (no table) and the text
        stream (never a table) ran their whole residual stream in bf16.
        """
        img = self.x_embedder(x).float()
        positions = self.additive_positions(self.grid_of(x.shape[-2], x.shape[-1]))
        if positions is not None:
            img = img + positions
        txt = self.context_embedder(cond.emb.to(self.context_embedder.weight.dtype)).float()
        c = self.t_embedder(t) + self.pooled_embedder(cond.pooled.to(img.dtype))
        return img, txt, c

    def additive_positions(self, grid: tuple[int, int] | None = None) -> torch.Tensor | None:
        """``(1, N, D)`` position table added to the image tokens of ``grid`` (default: the configured grid);
        None for ``pos_embed='rope'``.

        Raises:
            ValueError: For ``pos_embed='learned'`` on a grid other than the configured one (a learned table
                exists for that grid only), or ``pos_embed='sd3'`` on a grid larger than SD3's table.
        """
        grid = self.grid if grid is None else tuple(grid)
        if self.pos_embed_type == "rope":
            return None
        if self.pos_embed_type == "sd3":
            return self.cropped_pos_embed(grid)
        if self.pos_embed_type == "learned":
            problem = self.position_problem(grid)
            if problem:
                raise ValueError(problem)
            return self.pos_embed
        return self.sincos_positions(grid)

    def position_problem(self, grid: tuple[int, int]) -> str | None:
        """``learned`` positions exist for the configured grid only, SD3's table (``sd3``) covers grids up to
        ``pos_embed_max_size`` per side; sin-cos and RoPE positions cover any grid."""
        (gh, gw), p = grid, self.patch_size
        if self.pos_embed_type == "learned" and tuple(grid) != self.grid:
            ch, cw = self.grid
            return (f"pos_embed='learned' has a position table for the configured patch grid {ch}x{cw} "
                    f"(latent {ch * p}x{cw * p}) only; got the grid {gh}x{gw} (latent {gh * p}x{gw * p})")
        m = self.pos_embed_max_size
        if self.pos_embed_type == "sd3" and (gh > m or gw > m):
            return (f"pos_embed='sd3' crops a table of pos_embed_max_size={m} patches per side; the latent's "
                    f"patch grid {gh}x{gw} is larger")
        return None

    def cropped_pos_embed(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``(1, N, D)``: the centre ``grid`` (default: the configured grid) of SD3's ``pos_embed_max_size``²
        table (``pos_embed='sd3'``).

        Raises:
            ValueError: If ``grid`` does not fit in the table.
        """
        m, (gh, gw) = self.pos_embed_max_size, (self.grid if grid is None else grid)
        problem = self.position_problem((gh, gw))
        if problem:
            raise ValueError(problem)
        top, left = (m - gh) // 2, (m - gw) // 2
        table = self.pos_embed.reshape(1, m, m, -1)[:, top:top + gh, left:left + gw, :]
        return table.reshape(1, gh * gw, -1)

    def rope_table(self, device: torch.device | str | None = None,
                   grid: tuple[int, int] | None = None) -> torch.Tensor | None:
        """``(1, N, head_dim)`` float32 RoPE table of the image tokens of ``grid`` (default: the configured grid),
        row-major as the tokens; None unless ``pos_embed='rope'``. Cached per grid and device."""
        if self.pos_embed_type != "rope":
            return None
        grid = self.grid if grid is None else tuple(grid)
        return self._grid_table(
            ("rope", grid, device),
            lambda: rope_table(rope_angles(self.head_dim, *grid, theta=self.rope_theta, device=device)).unsqueeze(0),
        )

    @staticmethod
    def joint_mask(text_mask: torch.Tensor | None, image_tokens: int) -> torch.Tensor | None:
        """``(B, 1, 1, L + K)`` attention key mask over ``[text; image]``: padded text False, images True."""
        if text_mask is None:
            return None
        image = text_mask.new_ones(text_mask.shape[0], image_tokens)
        return torch.cat([text_mask, image], dim=1)[:, None, None, :]

    def _check_inputs(self, x: torch.Tensor, cond: TextCondition) -> tuple[int, int]:
        grid = self.check_latents(x)
        if not isinstance(cond, TextCondition):
            raise TypeError(f"MMDiT is conditioned on a TextCondition, got {type(cond).__name__}")
        if cond.emb.shape[-1] != self.text_dim or cond.pooled.shape[-1] != self.pooled_dim:
            raise ValueError(f"MMDiT expects text embeddings of width {self.text_dim} and pooled embeddings of width "
                             f"{self.pooled_dim}, got {cond.emb.shape[-1]} and {cond.pooled.shape[-1]}")
        if len(cond) != x.shape[0]:
            raise ValueError(f"the text condition has batch {len(cond)} but the latents have batch {x.shape[0]}")
        return grid

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: TextCondition,
        *,
        force_routing: bool = False,
        rate_override: float | None = None,
        routing_seed: int | list[int] | None = None,
    ) -> torch.Tensor:
        """Predict from a noisy latent.

        Args:
            x: ``(B, C, H, W)`` network input; H and W are any multiples of the patch size (``learned``
                positions: the configured size only; ``sd3``: up to ``pos_embed_max_size`` patches a side).
            t: ``(B,)`` or scalar noise-level input of the timestep embedder.
            cond: The text condition of batch B (use ``cond.expand(B)`` for a batch-1 condition).
            force_routing: Route image tokens in eval mode too; with ``rate_override`` and ``routing_seed``,
                the routing options of :meth:`route_schedule`.
            rate_override: Replace every route's rate (inference only).
            routing_seed: Seed, or per-sample seeds, of the routed subsets (else the router's stream).

        Returns:
            ``(B, out_channels, H, W)``, shaped like ``x``.

        Raises:
            ValueError: Naming the expected shape, if the channels are wrong or the patch does not divide H, W;
                or if the position mode has no table for the latent's grid.
        """
        grid = self._check_inputs(x, cond)
        n = grid[0] * grid[1]
        b = x.shape[0]
        if t.ndim == 0:
            t = t.expand(b)
        img, txt, c = self.embed(x, t, cond)
        rope = self.rope_table(img.device, grid=grid)
        if rope is not None:
            rope = rope.expand(b, -1, -1)
        # One host sync per call: an all-valid batch passes no mask, so SDPA may use its flash kernel.
        text_mask = None if not self.mask_text or bool(cond.mask.all()) else cond.mask.to(img.device)
        mask = self.joint_mask(text_mask, n)
        schedule = self.route_schedule(b, n, img.device, force_routing=force_routing, rate_override=rate_override,
                                       routing_seed=routing_seed)

        def run(block: nn.Module, state: tuple) -> tuple:
            img, txt, rope, mask = state
            return (*self.call_block(block, img, txt, c, rope, mask), rope, mask)

        def enter(state: tuple, ids: torch.Tensor) -> tuple[tuple, tuple]:
            # the kept image tokens take their RoPE rows (same ids) along; text tokens are never routed
            img, txt, rope, mask = state
            routed = (gather_tokens(img, ids), txt, gather_tokens(rope, ids) if rope is not None else None,
                      self.joint_mask(text_mask, ids.shape[1]))
            return routed, (img, rope, mask)

        def leave(saved: tuple, ids: torch.Tensor, state: tuple) -> tuple:
            img, txt = state[0], state[1]
            return scatter_tokens(saved[0], ids, img), txt, saved[1], saved[2]

        img = self.run_blocks((img, txt, rope, mask), schedule, run, enter, leave)[0]
        return self.unpatchify(self.final_layer(img, c), grid)
