"""``Routable``: what a network offers so that TREAD routing (and its FLOP accounting) can be applied to it.

Routing code (:class:`~tread_scale.routing.router.TokenRouter`, the ``TREADRouting`` Composer algorithm,
:func:`~tread_scale.routing.flops.routed_flops_fraction`) talks to a model only through this protocol, so a
new model family needs no change there. DiT and MMDiT implement it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tread_scale.routing.router import TokenRouter


@runtime_checkable
class Routable(Protocol):
    """A stack of ``depth`` blocks over a sequence of which ``routable_tokens`` tokens may skip blocks.

    The contract a model fulfils:

    * ``attach_router(router)`` calls ``router.check_depth(self.depth)``, stores the router as
      ``self.router`` (``None`` until then) and raises ``RuntimeError`` if one is already attached.
    * Each forward pass calls ``router.schedule(B, N, device, training=self.training, force=...,
      rate_override=..., seed=...)`` once, before the first block, with ``N`` the routable tokens of *this
      call* (``self.routable_tokens`` at the configured size; a model that runs on any latent grid, like the
      DiT and the MMDiT, passes the token count of the input's grid), and gets ``{start: (end, ids_keep)}``
      with ``ids_keep`` ``(B, K)`` indices into the routable tokens, ``K`` the route's share of ``N``.
    * Before block ``start`` it gathers the kept routable tokens, and everything that is per routable token
      and must travel with them (e.g. RoPE position tables), runs blocks ``start..end`` on the shorter
      sequence, and after block ``end`` scatters the kept tokens back into the sequence as it was at
      ``start``; the skipped tokens come out unchanged. Tokens that are not routable (e.g. text) take part
      in every block.
    * ``block_flops(tokens, index)`` is the forward FLOPs of block ``index`` on one sample when ``tokens``
      of the routable tokens go through it (used for logs and MFU, never for the computation).

    Attributes:
        router: The attached router, or ``None``.
    """

    router: TokenRouter | None

    @property
    def depth(self) -> int:
        """Number of blocks that routes index (0-based; negative route indices count from the end)."""
        ...

    @property
    def routable_tokens(self) -> int:
        """Tokens per sample that may be routed at the configured input size (N of the router's draws; the
        default of FLOP accounting)."""
        ...

    def attach_router(self, router: TokenRouter) -> None:
        """Validate the router's routes against ``depth`` and use it in every forward pass."""
        ...

    def block_flops(self, tokens: int, index: int) -> float:
        """Forward FLOPs of block ``index`` on one sample when ``tokens`` routable tokens go through it."""
        ...
