"""TREAD routing done the way the spec describes the reference doing it, for step-time comparisons only.

Written from the behaviour described in ``tread-spec.md`` §3.2–3.3, not from the reference's code (its
licence forbids copying). It runs the blocks and embedders of one of our :class:`~tread_scale.models.DiT`
networks, so two runs differ only in how tokens are routed:

- at route start the whole sequence is cloned (``x_D_last``) before the gather;
- kept indices are the first ``N - floor(N·rate)`` of an ``argsort`` of uniform noise from the global RNG
  (unsorted);
- at route end the kept tokens are scattered, out of place, into a copy of ``x_D_last``;
- the block right after each re-insertion runs with autocast disabled (fp32), the rule our model drops
  (README, "The method as implemented").

With the same kept indices and no autocast, it computes exactly what our DiT computes
(``tests/routing/test_reference_behaviour.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tread_scale.models import DiT
from tread_scale.routing import ResolvedRoute, num_kept


class ReferenceStyleRouting(nn.Module):
    """A DiT forward pass with the reference's routing mechanics (see the module docstring).

    Args:
        net: The DiT whose modules (and parameters) are used; its own router, if any, is ignored.
        routes: Resolved, sorted, non-overlapping routes.

    Attributes:
        drawn: Kept indices ``(B, K)`` of each route in the last forward pass, in route order.
    """

    def __init__(self, net: DiT, routes: Sequence[ResolvedRoute]) -> None:
        super().__init__()
        self.net = net
        self.routes = list(routes)
        self.drawn: list[torch.Tensor] = []

    @property
    def null_label(self) -> int:
        return self.net.null_label

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = self.net
        tokens = net.x_embedder(x) + net.pos_embed
        c = net.t_embedder(t.expand(x.shape[0]) if t.ndim == 0 else t) + net.y_embedder(y)
        b, n, d = tokens.shape
        self.drawn = []
        k, saved, index, fp32_next = 0, None, None, False
        for i, block in enumerate(net.blocks):
            route = self.routes[k] if k < len(self.routes) else None
            if route is not None and i == route.start:
                saved = tokens.clone()
                ids_keep = torch.rand(b, n, device=tokens.device).argsort(dim=1)[:, : num_kept(n, route.rate)]
                self.drawn.append(ids_keep)
                index = ids_keep.unsqueeze(-1).expand(-1, -1, d)
                tokens = torch.gather(tokens, 1, index)
            if fp32_next:
                with torch.autocast(tokens.device.type, enabled=False):
                    tokens = block(tokens, c)
                fp32_next = False
            else:
                tokens = block(tokens, c)
            if route is not None and i == route.end:
                tokens = saved.scatter(1, index, tokens.to(saved.dtype))  # out of place: a copy of x_D_last
                saved, index, fp32_next, k = None, None, True, k + 1
        return net.unpatchify(net.final_layer(tokens, c))
