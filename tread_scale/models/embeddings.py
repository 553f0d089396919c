"""Input embeddings of the DiT: patches, fixed 2-D sin-cos positions, timesteps, class labels."""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos table ``[sin(p·ω), cos(p·ω)]`` with ``ω_k = 1/10000^(k/(dim/2))``.

    Args:
        dim: Output channels (even).
        positions: Positions, any shape; flattened.

    Returns:
        A ``(positions.numel(), dim)`` float64 tensor.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional table (the MAE/DiT recipe), row-major over the patch grid.

    The first half of the channels encodes the column (w) coordinate and the second half the row (h)
    coordinate, as in MAE's ``get_2d_sincos_pos_embed``, so tables equal those stored in DiT checkpoints.

    Args:
        dim: Token width D (divisible by 4).
        grid_h: Patch rows.
        grid_w: Patch columns.

    Returns:
        A ``(grid_h * grid_w, dim)`` float32 tensor.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return table.to(torch.float32)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p × p`` patches of a ``(B, C, H, W)`` latent to ``(B, N, D)`` tokens.

    Args:
        in_channels: Latent channels C.
        hidden_size: Token width D.
        patch_size: Patch side p.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous(): the transposed view would otherwise set the memory layout of the whole residual
        # stream (elementwise ops follow their first input's strides), so every block would read its tokens
        # with stride N along D (measured: 2% of a B/2 block in fp32, 5-10% in bf16, on CPU).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Scalar noise level → 256-d sinusoid ``[cos(s·t·f), sin(s·t·f)]`` → MLP → ``(B, D)``.

    The sinusoid's frequencies ``f`` run from 1 down to 1/10000: they resolve inputs spread over hundreds of
    units. SD3 and Flux therefore feed the rectified-flow time ``t ∈ [0, 1]`` as ``1000·t`` (``scale``
    1000); fed as ``t`` itself, the 256 features span a nearly 2-dimensional set (2 principal components
    hold 99.9% of their variance over ``t ∈ [0, 1]``) and the conditioning is close to linear in ``t``.
    EDM's ``c_noise = ln(σ)/4`` is fed unscaled, as in EDM's reference.

    Args:
        hidden_size: Output width D.
        frequency_size: Width of the sinusoid (256 in DiT).
        scale: Multiplier ``s`` of the input noise level.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.scale = float(scale)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.to(torch.float32) * self.scale)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t))


class LabelEmbedder(nn.Module):
    """Class labels → ``(B, D)``; index ``num_classes`` is the null (unconditional) label for CFG.

    Args:
        num_classes: Number of real classes.
        hidden_size: Output width D.
    """

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)
