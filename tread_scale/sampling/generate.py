"""Generating many samples: per-sample seeds and labels, any number of ranks, the same images.

Sample ``i`` has seed ``seed + i`` and label ``mix(seed + i) mod classes`` (or a given label). Rank ``r``
of ``W`` generates samples ``r, r + W, …`` in forward passes of exactly ``batch_size`` samples (the last
one padded), so a sample's computation is the same whatever the world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from tread_scale.diffusion.edm import EDM
from tread_scale.diffusion.guidance import Guidance
from tread_scale.imaging import to_uint8
from tread_scale.rng import mix_seed
from tread_scale.sampling.sampler import sample_latents, seeded_noise

LABEL_SALT = 0x1AB


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of torch.distributed, or ``(0, 1)`` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sample_label(seed: int, num_classes: int) -> int:
    """The label of the sample with seed ``seed`` when labels are drawn (the same on every rank)."""
    return mix_seed(seed, LABEL_SALT) % num_classes


def rank_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The samples of ``0..n-1`` that rank ``rank`` of ``world_size`` handles: ``rank, rank + W, …``."""
    return list(range(rank, n, world_size))


def generate(net: nn.Module, objective: str, indices: list[int], *, seed: int, num_classes: int, steps: int,
             guidance: Guidance | None, edm: EDM, device: torch.device, batch_size: int,
             decode: Callable[[torch.Tensor], torch.Tensor] | None = None, labels: list[int] | None = None
             ) -> Iterator[tuple[list[int], torch.Tensor, np.ndarray, list[int]]]:
    """Generate the samples ``indices``, batch by batch.

    Args:
        net: The DiT, on ``device``.
        objective: ``edm`` or ``rf``.
        indices: Sample numbers to generate (e.g. :func:`rank_indices`); sample ``i`` uses seed ``seed + i``.
        seed: Seed of sample 0.
        num_classes: Labels are drawn from ``0..num_classes-1`` unless ``labels`` is given.
        steps: Sampler steps.
        guidance: CFG / TREAD guidance, or ``None``.
        edm: EDM preconditioning constants (used by ``edm``).
        device: Where to sample.
        batch_size: Samples per forward pass; the last batch is padded to it.
        decode: Latents → images in [-1, 1] (a VAE decoder), or ``None`` for pixel-space models.
        labels: Sample ``i`` gets ``labels[i % len(labels)]``; ``None`` draws a label per seed.

    Yields:
        ``(indices, latents (CPU float32), images (uint8 NHWC), labels)`` of each batch.
    """
    shape = (net.in_channels, *net.input_size)
    for lo in range(0, len(indices), batch_size):
        idx = indices[lo: lo + batch_size]
        pad = batch_size - len(idx)
        run = idx + [idx[-1]] * pad
        seeds = [seed + i for i in run]
        ys = [labels[i % len(labels)] if labels else sample_label(s, num_classes) for i, s in zip(run, seeds)]
        noise = seeded_noise(seeds, shape).to(device)
        lat = sample_latents(net, objective, torch.tensor(ys, device=device), noise, steps, guidance, edm=edm,
                             routing_seed=seeds)
        images = decode(lat) if decode is not None else lat
        keep = len(idx)
        yield idx, lat[:keep].float().cpu(), to_uint8(images[:keep]), ys[:keep]
