"""Sample grids: how many columns, which images, captions beside prompt rows, one grid rendered from a network."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tread_scale.imaging import make_grid
from tread_scale.sampling.generate import generate
from tread_scale.sampling.loading import Decoder
from tread_scale.sampling.prompts import PromptSet
from tread_scale.sampling.settings import SamplerSettings

#: Images shown in a grid unless asked otherwise (the ``.npz`` of ``tread-scale sample`` keeps them all).
DEFAULT_GRID_MAX = 64
#: Prompt rows per block of a captioned grid; more rows go into blocks side by side.
CAPTION_ROWS_PER_BLOCK = 8
#: Name of the captions file written beside a text model's grids.
CAPTIONS_FILE = "captions.txt"


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


def prompt_rows(num_images: int, num_prompts: int) -> list[list[int]]:
    """Which images go in each row of a prompt grid: row ``p`` holds the images of prompt ``p``.

    Image ``i`` has prompt ``i mod num_prompts``, so row ``p`` is ``p, p + n, p + 2n, …`` (below
    ``num_images``); prompts without an image get no row.
    """
    return [list(range(p, num_images, num_prompts)) for p in range(min(num_prompts, num_images))]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled font: no file on disk needed
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def captioned_grid(images: np.ndarray, prompts: Sequence[str], min_tile: int = 96, wrap: int = 44) -> np.ndarray:
    """A grid with one row per prompt and the prompt written beside its row.

    Image ``i`` of ``images`` has prompt ``i mod len(prompts)`` (see :func:`prompt_rows`). Images are
    upscaled (nearest) to at least ``min_tile`` pixels a side so the text is legible next to them; more than
    :data:`CAPTION_ROWS_PER_BLOCK` rows are laid out in blocks side by side.

    Args:
        images: ``(B, H, W, 3)`` uint8 images.
        prompts: The prompts, in order.
        min_tile: Smallest side of a shown image, in pixels.
        wrap: Characters per caption line.

    Returns:
        The grid as an ``(H, W, 3)`` uint8 image (already large: :func:`~tread_scale.imaging.save_png` keeps it).
    """
    from PIL import Image, ImageDraw

    b, h, w, _ = images.shape
    scale = max(1, math.ceil(min_tile / min(h, w)))
    tile_h, tile_w, pad = h * scale, w * scale, 4
    rows = prompt_rows(b, len(prompts))
    per_row = max(len(r) for r in rows)
    font_size = max(10, min(18, tile_h // 5))
    font = _font(font_size)
    lines = [textwrap.wrap(f"{p + 1}. {prompts[p]}", wrap) or [f"{p + 1}."] for p in range(len(rows))]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textlength(line, font=font) for ls in lines for line in ls)
    line_h = font_size + 3
    row_h = max(tile_h, line_h * max(len(ls) for ls in lines)) + pad
    block_w = per_row * (tile_w + pad) + pad + int(text_w) + 3 * pad
    blocks = math.ceil(len(rows) / CAPTION_ROWS_PER_BLOCK)
    rows_per_block = math.ceil(len(rows) / blocks)
    canvas = Image.new("RGB", (blocks * block_w, rows_per_block * row_h + pad), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, members in enumerate(rows):
        bx, y = (r // rows_per_block) * block_w, (r % rows_per_block) * row_h + pad
        for c, i in enumerate(members):
            tile = Image.fromarray(images[i]).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (bx + pad + c * (tile_w + pad), y))
        ty = y + max(0, (tile_h - line_h * len(lines[r])) // 2)
        for k, line in enumerate(lines[r]):
            draw.text((bx + pad + per_row * (tile_w + pad) + pad, ty + k * line_h), line, fill=(235, 235, 235),
                      font=font)
    return np.asarray(canvas)


def write_captions(path: str | Path, prompts: Sequence[str], num_images: int) -> Path:
    """Write the prompt of each row of a prompt grid to a text file (``row N: prompt``), beside the PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = prompt_rows(num_images, len(prompts))
    text = "".join(f"row {p + 1} ({len(r)} image{'s' * (len(r) != 1)}): {prompts[p]}\n" for p, r in enumerate(rows))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


@torch.no_grad()
def render_grid(net: nn.Module, sampler: SamplerSettings, num_images: int, num_classes: int, seed: int = 0,
                decode: Decoder | None = None, prompts: PromptSet | None = None) -> np.ndarray:
    """Sample ``num_images`` images in one batch and tile them, a column per class or a row per prompt.

    Image ``i`` has seed ``seed + i`` and label ``i mod num_classes`` (or prompt ``i mod len(prompts)``), so
    successive grids of a training run are directly comparable.

    Args:
        net: The DiT or MMDiT; sampling runs on its device.
        sampler: Objective, steps, guidance scale and σ_data.
        num_images: Images in the grid.
        num_classes: Labels cycle through ``0..num_classes-1`` (DiT).
        seed: Seed of image 0.
        decode: Latents → images in [-1, 1], or ``None`` for pixel-space models.
        prompts: The prompts of a text-conditioned network; the grid then has a row per prompt with the
            prompt written beside it (:func:`captioned_grid`).

    Returns:
        The grid as an ``(H, W, 3)`` uint8 image.
    """
    device = next(net.parameters()).device
    labels = None if prompts is not None else [i % num_classes for i in range(num_images)]
    _, _, images, _ = next(generate(net, sampler.objective, list(range(num_images)), seed=seed,
                                    num_classes=num_classes, steps=sampler.steps, guidance=sampler.guidance(),
                                    edm=sampler.edm(), device=device, batch_size=num_images, decode=decode,
                                    labels=labels, prompts=prompts, shift=sampler.shift))
    if prompts is not None:
        return captioned_grid(images, prompts.prompts)
    return grid_image(images, grid_columns(num_images, num_classes))
