"""The TREAD router: which tokens of each sample go through each route."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tread_scale.rng import SeedStream, mix_seed, seeded_generator
from tread_scale.routing.routes import ResolvedRoute, Route, check_rate, resolve_routes, scale_routes
from tread_scale.routing.tokens import num_kept


class TokenRouter(nn.Module):
    """Draws, per sample, the random subset of tokens that each route keeps (spec §3.2).

    Randomness is counter-based: the subsets of call ``i`` come from a ``torch.Generator`` seeded with
    ``mix(seed, rank, i, route)``, created on the tokens' device. The router's whole random state is
    therefore ``(seed, calls)``: it can be saved, restored on another device or world size, and gives
    every data-parallel rank its own stream. ``rate_factor`` scales every route's rate (a routing schedule
    sets it before each batch; 1 by default).

    Args:
        routes: Routes to apply, validated against the depth when attached to a model.
        seed: Base seed of the routing stream.
        rank: Data-parallel rank, mixed into the seed.
    """

    def __init__(self, routes: Sequence[Route], seed: int = 0, rank: int = 0) -> None:
        super().__init__()
        self.routes: list[Route] = [r if isinstance(r, Route) else Route(r.rate, r.start, r.end) for r in routes]
        self.resolved: list[ResolvedRoute] = []
        self.stream = SeedStream(seed, rank)
        self.enabled = True
        self.rate_factor = 1.0

    def active_routes(self) -> list[Route]:
        """The routes with the rates in use now (``rate × rate_factor``; see :mod:`tread_scale.routing.schedule`)."""
        return scale_routes(self.routes, self.rate_factor)

    @property
    def rank(self) -> int:
        return self.stream.rank

    @property
    def calls(self) -> int:
        return self.stream.calls

    def check_depth(self, depth: int) -> None:
        """Validate the routes against a model depth (negative indices resolved)."""
        self.resolved = resolve_routes(self.routes, depth)

    def extra_repr(self) -> str:
        return f"routes={[r.describe() for r in self.routes]}, seed={self.stream.seed}, rank={self.rank}"

    def routing_state(self) -> dict[str, Any]:
        """The router's random state: everything needed to continue its stream."""
        return self.stream.state()

    def load_routing_state(self, state: dict[str, Any]) -> None:
        """Restore the state returned by :meth:`routing_state`."""
        self.stream.load_state(state)

    def schedule(
        self,
        batch: int,
        num_tokens: int,
        device: torch.device,
        *,
        training: bool,
        force: bool = False,
        rate_override: float | None = None,
        seed: int | Sequence[int] | None = None,
    ) -> dict[int, tuple[int, torch.Tensor]]:
        """Draw the kept indices of every active route for one forward pass.

        Routing is on when ``training and enabled`` or when ``force`` is set. All subsets are drawn before
        any block runs, so recomputation under activation checkpointing sees the same subsets.

        Args:
            batch: Batch size B.
            num_tokens: Routable tokens N of this call (e.g. of the batch's latent grid).
            device: Device of the tokens.
            training: Whether the model is in training mode.
            force: Route even outside training.
            rate_override: Use this rate for every route (else each route's rate × ``rate_factor``).
            seed: Draw from this seed without advancing the router's own stream; a sequence of ``batch``
                seeds draws each sample's subsets from its own seed (batching-independent sampling).

        Returns:
            ``{start_block: (end_block, ids_keep (B, K))}`` for routes that skip at least one token.
        """
        if not ((training and self.enabled) or force):
            return {}
        if rate_override is not None:
            check_rate(rate_override, "rate_override")
        per_sample = seed is not None and not isinstance(seed, int)
        if per_sample and len(seed) != batch:
            raise ValueError(f"got {len(seed)} routing seeds for a batch of {batch}")
        call_seed = self.stream.next_seed() if seed is None else (0 if per_sample else mix_seed(seed))
        plan: dict[int, tuple[int, torch.Tensor]] = {}
        for k, route in enumerate(self.resolved):
            rate = route.rate * self.rate_factor if rate_override is None else rate_override
            keep = num_kept(num_tokens, rate)
            if keep == num_tokens:
                continue  # rate 0 (or N·rate < 1): the route is the identity; no permutation is applied
            if per_sample:
                noise = torch.stack([torch.rand(num_tokens, generator=seeded_generator(device, mix_seed(int(s), k)),
                                                device=device) for s in seed])
            else:
                noise = torch.rand(batch, num_tokens, generator=seeded_generator(device, mix_seed(call_seed, k)), device=device)
            ids = noise.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
            plan[route.start] = (route.end, ids)
        return plan
