"""Sample grids: how many columns, which images, and one grid rendered from a network."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tread_scale.imaging import make_grid
from tread_scale.sampling.generate import generate
from tread_scale.sampling.loading import Decoder
from tread_scale.sampling.settings import SamplerSettings

#: Images shown in a grid unless asked otherwise (the ``.npz`` of ``tread-scale sample`` keeps them all).
DEFAULT_GRID_MAX = 64


def grid_columns(num_images: int, num_classes: int, by_class: bool = True) -> int:
    """A column per class when labels cycle through at most 12 classes, otherwise up to 8 columns.

    Args:
        num_images: Images in the grid.
        num_classes: Classes of the model.
        by_class: Whether image ``i`` has label ``i mod num_classes``.
    """
    return num_classes if by_class and num_classes <= 12 else min(num_images, 8)


def grid_image(images: np.ndarray, columns: int, max_images: int | None = None) -> np.ndarray:
    """Tile the first ``max_images`` (all when ``None``) of ``(B, H, W, 3)`` uint8 images into one image."""
    shown = images[:max_images] if max_images is not None else images
    return make_grid(shown, nrow=columns)


@torch.no_grad()
def render_grid(net: nn.Module, sampler: SamplerSettings, num_images: int, num_classes: int, seed: int = 0,
                decode: Decoder | None = None) -> np.ndarray:
    """Sample ``num_images`` images in one batch and tile them, a column per class.

    Image ``i`` has seed ``seed + i`` and label ``i mod num_classes``, so successive grids of a training run
    are directly comparable.

    Args:
        net: The DiT; sampling runs on its device.
        sampler: Objective, steps, guidance scale and σ_data.
        num_images: Images in the grid.
        num_classes: Labels cycle through ``0..num_classes-1``.
        seed: Seed of image 0.
        decode: Latents → images in [-1, 1], or ``None`` for pixel-space models.

    Returns:
        The grid as an ``(H, W, 3)`` uint8 image.
    """
    device = next(net.parameters()).device
    labels = [i % num_classes for i in range(num_images)]
    _, _, images, _ = next(generate(net, sampler.objective, list(range(num_images)), seed=seed,
                                    num_classes=num_classes, steps=sampler.steps, guidance=sampler.guidance(),
                                    edm=sampler.edm(), device=device, batch_size=num_images, decode=decode,
                                    labels=labels))
    return grid_image(images, grid_columns(num_images, num_classes))
