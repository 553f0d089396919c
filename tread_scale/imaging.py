"""Turning sampled latents into images and PNG grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` floats in [-1, 1] → ``(B, H, W, C)`` uint8 (C = 3; other counts are mapped to RGB)."""
    x = images.detach().float().cpu()
    c = x.shape[1]
    if c == 1:
        x = x.repeat(1, 3, 1, 1)
    elif c != 3:
        # a latent without a decoder: show its first three channels, each min-max normalised
        x = x[:, :3] if c > 3 else torch.cat([x, x[:, -1:].repeat(1, 3 - c, 1, 1)], dim=1)
        lo = x.amin(dim=(0, 2, 3), keepdim=True)
        hi = x.amax(dim=(0, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``(B, H, W, 3)`` uint8 images into one ``(rows·(H+pad)+pad, …, 3)`` image."""
    b, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def mixed_size_grid(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """Tile rows of images of different sizes (one ``(n, H_i, W_i, 3)`` uint8 array a row, e.g. one a
    bucket) into one image: every cell is as large as the largest image, each image centred in its cell."""
    h = max(r.shape[1] for r in rows)
    w = max(r.shape[2] for r in rows)
    ncol = max(r.shape[0] for r in rows)
    grid = np.zeros((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        _, rh, rw, _ = row.shape
        top = pad + i * (h + pad) + (h - rh) // 2
        for j, image in enumerate(row):
            left = pad + j * (w + pad) + (w - rw) // 2
            grid[top:top + rh, left:left + rw] = image
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray, min_side: int = 256) -> Path:
    """Write an RGB uint8 image as PNG, upscaled (nearest) so that its short side is at least ``min_side``."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(image)
    scale = max(1, math.ceil(min_side / min(im.size)))
    if scale > 1:
        im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp")
    im.save(tmp, format="PNG")
    tmp.replace(path)
    return path
