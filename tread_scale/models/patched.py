"""What the DiT and the MMDiT share as patch-token networks: un-patching and router attachment."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tread_scale.routing.router import TokenRouter


class PatchTokenNet(nn.Module):
    """Base of networks over a grid of ``patch_size`` patches with a ``router`` slot and a block stack.

    Subclasses set ``patch_size``, ``out_channels``, ``grid`` (patches per side), ``router`` (``None``) and
    ``depth``.
    """

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

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, p·p·C)`` tokens → ``(B, C, H, W)``."""
        b = x.shape[0]
        p, c = self.patch_size, self.out_channels
        gh, gw = self.grid
        x = x.reshape(b, gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, gh * p, gw * p)
