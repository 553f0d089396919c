"""What the DiT and the MMDiT share as patch-token networks.

:class:`PatchTokenNet` holds the set-up both constructors need (latent size and patch checks, the patch and
timestep embedders, the stored sizes), the input check of the forward pass, the TREAD block loop with
activation checkpointing, weight initialisation common to both, and un-patching.

A network is configured for one latent size ``input_size`` (its default, largest size: the stored position
tables and FLOP accounting refer to it) but runs on any latent grid whose sides the patch divides, so one
model can train on batches of different aspect-ratio buckets or continue at a higher resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tread_scale.models.embeddings import PatchEmbed, TimestepEmbedder, sincos_2d

if TYPE_CHECKING:
    from tread_scale.routing.router import TokenRouter

log = logging.getLogger(__name__)

InitMode = Literal["adaln_zero", "xavier_all"]
State = TypeVar("State")


def parse_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(H, W)`` of a latent size given as one side (square) or as ``(H, W)``."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def patch_grid(size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` of a latent of ``size``.

    Raises:
        ValueError: If ``patch_size`` does not divide both sides (or a side is not positive).
    """
    h, w = parse_hw(size)
    if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the latent size {h}x{w}")
    return h // patch_size, w // patch_size


def _adopt_own_sincos_table(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Before loading a state dict: a fixed sin-cos ``pos_embed`` stored for another grid (weights of the same
    model configured for another ``input_size``) is replaced by this model's own table, a function of the grid
    only. Any other mismatch is left for ``load_state_dict`` to report."""
    key = prefix + "pos_embed"
    stored, own = state_dict.get(key), getattr(module, "pos_embed", None)
    if (not module.fixed_sincos or stored is None or own is None or stored.ndim != 3 or stored.shape == own.shape
            or stored.shape[-1] != own.shape[-1]):
        return
    log.info("%s: the stored sin-cos table has %d positions, this model's grid %dx%d has %d; using this grid's "
             "table (a fixed function of the grid)", key, stored.shape[1], *module.grid, own.shape[1])
    state_dict[key] = own.detach().clone()


class PatchTokenNet(nn.Module):
    """Base of networks over a grid of ``patch_size`` patches with a ``router`` slot and a block stack.

    The constructor validates and stores the shared sizes and creates ``x_embedder`` (patches → tokens) and
    ``t_embedder`` (noise level → condition), in that order, before the subclass adds its own modules.
    Subclasses take the arguments below as keywords (their own defaults of ``hidden_size`` and ``num_heads``),
    add ``blocks`` and ``final_layer``, and initialise the weights per ``init_mode``.

    Args:
        hidden_size: Token width D.
        num_heads: Attention heads; must divide D.
        input_size: Configured latent side H (= W), or ``(H, W)``: the default (largest) size, to which
            ``grid``, ``num_tokens``, stored position tables and FLOP accounting refer. Forward passes accept
            any ``H × W`` that the patch divides.
        patch_size: Patch side p; must divide H and W.
        in_channels: Latent channels C.
        mlp_ratio: MLP width multiple.
        out_channels: Output channels; defaults to ``in_channels``.
        init: ``adaln_zero`` (zeroed modulation gates and output layer) or ``xavier_all`` (xavier
            everywhere, as the TREAD reference does for the DiT); kept as ``init_mode`` for the subclass.
        timestep_scale: Multiplier of ``t`` before the timestep sinusoid (1000 for rectified flow, as SD3).

    Raises:
        ValueError: If the patch does not divide the latent, ``init`` is unknown or the width does not fit
            the heads.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        mlp_ratio: float = 4.0,
        out_channels: int | None = None,
        init: InitMode = "adaln_zero",
        timestep_scale: float = 1.0,
    ) -> None:
        super().__init__()
        grid = patch_grid(input_size, patch_size)
        if init not in ("adaln_zero", "xavier_all"):
            raise ValueError(f"init must be 'adaln_zero' or 'xavier_all', got {init!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.input_size = parse_hw(input_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.grid = grid
        self.num_tokens = grid[0] * grid[1]
        self.init_mode = init
        self.grad_checkpointing = False
        self.router: TokenRouter | None = None
        # position tables computed per grid (other grids' sin-cos, RoPE), by (kind, grid, device[, dtype]);
        # not state: rebuilt on demand, dropped when the module is moved or cast
        self._grid_tables: dict[tuple, torch.Tensor] = {}
        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, scale=timestep_scale)
        self.register_load_state_dict_pre_hook(_adopt_own_sincos_table)

    @property
    def fixed_sincos(self) -> bool:
        """Whether ``pos_embed`` is the fixed sin-cos table of the configured grid (a subclass says)."""
        return False

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    # ------------------------------------------------------------------ grids and token counts

    def grid_of(self, h: int, w: int) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of an ``h × w`` latent.

        Raises:
            ValueError: If the patch does not divide ``h`` and ``w``.
        """
        return patch_grid((h, w), self.patch_size)

    def check_latent_size(self, h: int, w: int) -> tuple[int, int]:
        """Patch grid of an ``h × w`` latent that this network can run (an aspect-ratio bucket, a sampling size).

        Raises:
            ValueError: If the patch does not divide ``h`` and ``w``, or (see :meth:`position_problem`) the
                network's positions cannot cover the grid.
        """
        grid = self.grid_of(h, w)
        problem = self.position_problem(grid)
        if problem:
            raise ValueError(problem)
        return grid

    def position_problem(self, grid: tuple[int, int]) -> str | None:
        """Why this network's positions cannot cover patch grid ``grid`` (``None``: they can). Positions
        computed for any grid, as the DiT's, always can; a subclass with a table of fixed size says otherwise."""
        return None

    def tokens_for(self, latent_hw: int | tuple[int, int] | None = None) -> int:
        """Image (= routable) tokens per sample of a latent of ``latent_hw`` (``None``: the configured size).

        Use it for the token count and routing FLOPs of an aspect-ratio bucket, e.g.
        ``routed_block_flops(net, routes, num_tokens=net.tokens_for((h, w)))``.
        """
        if latent_hw is None:
            return self.num_tokens
        gh, gw = patch_grid(latent_hw, self.patch_size)
        return gh * gw

    def check_latents(self, x: torch.Tensor) -> tuple[int, int]:
        """Check that ``x`` is a ``(B, C, H, W)`` latent the network takes and return its patch grid.

        Raises:
            ValueError: Naming the expected shape, if the channels are wrong or the patch does not divide
                H and W.
        """
        c, p = self.in_channels, self.patch_size
        if x.ndim == 4 and x.shape[2] > 0 and x.shape[3] > 0 and not (x.shape[2] % p or x.shape[3] % p):
            if x.shape[1] == c:
                return x.shape[2] // p, x.shape[3] // p
            expected = f"(B, {c}, {x.shape[2]}, {x.shape[3]})"
        else:
            h, w = self.input_size
            expected = f"(B, {c}, H, W) with H and W multiples of the patch size {p} (configured: (B, {c}, {h}, {w}))"
        raise ValueError(f"{type(self).__name__} expects latents of shape {expected}, got {tuple(x.shape)}")

    # ------------------------------------------------------------------ positions of other grids

    def _grid_table(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()``, cached under ``key`` (not under inference mode or compilation, where it is rebuilt)."""
        if torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
            return build()  # an inference tensor cached here could not be used later in training
        table = self._grid_tables.get(key)
        if table is None:
            table = self._grid_tables[key] = build()
        return table

    def sincos_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(1, N, D)`` fixed 2-D sin-cos table of ``grid``: the stored ``pos_embed`` buffer for the configured
        grid, else :func:`~tread_scale.models.embeddings.sincos_2d` of ``grid`` on the buffer's device and dtype.
        """
        stored = self.pos_embed
        if tuple(grid) == self.grid:
            return stored
        key = ("sincos", tuple(grid), stored.device, stored.dtype)
        return self._grid_table(key, lambda: sincos_2d(self.hidden_size, *grid).to(stored.device, stored.dtype)[None])

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> PatchTokenNet:
        self._grid_tables.clear()  # moved or cast: tables are rebuilt on the new device / dtype
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ weights

    def _reset_weights(self, init: InitMode, normal: list[torch.Tensor], zeroed: list[nn.Linear]) -> None:
        """Xavier-uniform linears (and the patch projection) with zero biases, reset RMSNorms, N(0, 0.02) for
        the tensors in ``normal`` (in that order) and, for ``adaln_zero``, zeroed ``zeroed`` layers."""

        def _basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                module.reset_parameters()

        self.apply(_basic)
        conv = self.x_embedder.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        for weight in normal:
            nn.init.normal_(weight, std=0.02)
        if init == "adaln_zero":
            for lin in zeroed:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    # ------------------------------------------------------------------ routing and the block loop

    def attach_router(self, router: TokenRouter) -> None:
        """Attach a TREAD router; it decides per call which (routable) tokens skip which blocks.

        Raises:
            RuntimeError: If a router is already attached.
        """
        if self.router is not None:
            raise RuntimeError(f"this {type(self).__name__} already has a TREAD router attached; routing cannot "
                               "be applied twice")
        router.check_depth(self.depth)
        self.router = router

    def route_schedule(
        self,
        batch: int,
        num_tokens: int,
        device: torch.device,
        *,
        force_routing: bool = False,
        rate_override: float | None = None,
        routing_seed: int | list[int] | None = None,
    ) -> dict[int, tuple[int, torch.Tensor]]:
        """The router's plan for one forward pass over ``num_tokens`` routable tokens (``{}`` without router).

        Args:
            batch: Batch size B.
            num_tokens: Routable tokens per sample of this call (those of the input's latent grid).
            device: Device of the tokens.
            force_routing: Route even in eval mode (TREAD guidance).
            rate_override: Replace every route's rate (inference only).
            routing_seed: Draw the routed subsets from this seed (or one seed per sample) instead of the
                router's stream.

        Returns:
            ``{start_block: (end_block, ids_keep (B, K))}``.
        """
        if self.router is None:
            return {}
        return self.router.schedule(batch, num_tokens, device, training=self.training, force=force_routing,
                                    rate_override=rate_override, seed=routing_seed)

    def call_block(self, block: nn.Module, *args: Any) -> Any:
        """``block(*args)``, under activation checkpointing when it is on and gradients are recorded."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def run_blocks(
        self,
        state: State,
        schedule: dict[int, tuple[int, torch.Tensor]],
        run: Callable[[nn.Module, State], State],
        enter: Callable[[State, torch.Tensor], tuple[State, Any]],
        leave: Callable[[Any, torch.Tensor, State], State],
    ) -> State:
        """Run every block on ``state``, routing per ``schedule`` (see :meth:`route_schedule`).

        Args:
            state: What the blocks update (e.g. the tokens).
            schedule: ``{start: (end, ids_keep)}``.
            run: ``run(block, state)`` → the state after the block.
            enter: ``enter(state, ids_keep)`` → ``(routed state, saved)`` at a route's first block.
            leave: ``leave(saved, ids_keep, state)`` → the full state after a route's last block.

        Returns:
            The state after the last block.
        """
        saved, ids, end = None, None, -1
        for i, block in enumerate(self.blocks):
            if i in schedule:
                end, ids = schedule[i]
                state, saved = enter(state, ids)
            state = run(block, state)
            if i == end:
                state = leave(saved, ids, state)
                saved, ids, end = None, None, -1
        return state

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, N, p·p·C)`` tokens, row-major over ``grid`` (default: the configured grid) → ``(B, C, H, W)``.

        Token ``k`` is the patch at row ``k // cols`` and column ``k % cols``, as :class:`PatchEmbed` flattens.
        """
        b = x.shape[0]
        p, c = self.patch_size, self.out_channels
        gh, gw = self.grid if grid is None else grid
        x = x.reshape(b, gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, gh * p, gw * p)
