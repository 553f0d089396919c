"""Gather and scatter of kept tokens along the sequence axis."""

from __future__ import annotations

import torch


def num_kept(num_tokens: int, rate: float) -> int:
    """Tokens that go through a route: ``N - floor(N·rate)`` (spec §3.2)."""
    return num_tokens - int(num_tokens * rate)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Select the kept tokens of each sample.

    Args:
        x: ``(B, N, D)`` tokens.
        ids_keep: ``(B, K)`` int64 indices into N.

    Returns:
        ``(B, K, D)`` tokens (a new tensor; ``x`` is not modified).
    """
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(saved: torch.Tensor, ids_keep: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Re-insert routed tokens into the pre-route sequence, out of place.

    Positions not in ``ids_keep`` keep exactly their pre-route values; nothing is added.

    Args:
        saved: ``(B, N, D)`` sequence as it was at route start.
        ids_keep: ``(B, K)`` indices the kept tokens came from.
        kept: ``(B, K, D)`` tokens after the routed blocks.

    Returns:
        ``(B, N, D)`` full sequence.
    """
    if kept.dtype != saved.dtype:
        kept = kept.to(saved.dtype)
    return saved.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, saved.shape[-1]), kept)
