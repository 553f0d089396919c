"""2-D rotary position embedding (RoPE) of image tokens.

Each attention head's channels are taken as ``head_dim / 2`` consecutive pairs ``(x[2i], x[2i+1])``, and
pair ``i`` is rotated by an angle that depends on the token's patch position: the first ``head_dim / 4``
pairs by ``row · ω_i``, the last ``head_dim / 4`` pairs by ``col · ω_i``, with
``ω_i = θ^(-i / (head_dim / 4))``. The dot product of a rotated query and key then depends on the
difference of their rows and columns only.

Positions are carried as a per-token table (:func:`rope_table`) rather than recomputed from the sequence
index, so a subset of tokens (TREAD routing) can take its positions along by gathering the same rows.
"""

from __future__ import annotations

import torch


def rope_angles(head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Rotation angles of every patch, row-major over the grid.

    Args:
        head_dim: Channels per attention head (divisible by 4).
        grid_h: Patch rows.
        grid_w: Patch columns.
        theta: Base of the frequencies.
        device: Where to build the table.

    Returns:
        ``(grid_h · grid_w, head_dim / 2)`` float32 angles: row angles, then column angles.

    Raises:
        ValueError: If ``head_dim`` is not divisible by 4.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    omega = theta ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64, device=device),
                                torch.arange(grid_w, dtype=torch.float64, device=device), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega], dim=1)
    return angles.to(torch.float32)


def rope_table(angles: torch.Tensor) -> torch.Tensor:
    """``[cos | sin]`` of the angles: ``(..., head_dim / 2)`` → ``(..., head_dim)`` float32.

    One tensor rather than two so that routing gathers positions with the same call as tokens.
    """
    angles = angles.to(torch.float32)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys by their tokens' positions (computed in float32, returned in ``x.dtype``).

    Args:
        x: ``(B, H, K, head_dim)`` per-head queries or keys.
        table: ``(B, K, head_dim)`` or ``(1, K, head_dim)`` table from :func:`rope_table` for the same
            K tokens, in the same order.

    Returns:
        The rotated tensor, shaped like ``x``.
    """
    cos, sin = table.unsqueeze(1).chunk(2, dim=-1)  # (B, 1, K, head_dim/2)
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
