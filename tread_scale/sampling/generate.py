"""Generating many samples: per-sample seeds and conditions, any number of ranks, the same images.

Sample ``i`` has seed ``seed + i`` and, for a class-conditional DiT, label ``mix(seed + i) mod classes`` (or
a given label); for a text-conditioned MMDiT, prompt ``i mod n`` of a :class:`~tread_scale.sampling.prompts.
PromptSet`. Rank ``r`` of ``W`` generates samples ``r, r + W, …`` in forward passes of exactly
``batch_size`` samples (the last one padded), so a sample's computation is the same whatever the world size.
A batch size larger than the total number of samples asked for is capped to it (the same on every rank):
no forward pass computes more padding than samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from tread_scale.diffusion.edm import EDM
from tread_scale.diffusion.guidance import Guidance
from tread_scale.errors import ConfigError
from tread_scale.imaging import to_uint8
from tread_scale.rng import mix_seed
from tread_scale.sampling.prompts import PromptSet
from tread_scale.sampling.sampler import sample_latents, seeded_noise

LABEL_SALT = 0x1AB

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of torch.distributed, or ``(0, 1)`` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rows_on_rank0(rows: list[tuple]) -> list[tuple] | None:
    """Every rank's ``rows`` (tuples whose first item is the sample index) on rank 0, sorted by index;
    ``None`` on the other ranks. Every rank of the process group must call it."""
    rank, world_size = world()
    if world_size > 1:
        import torch.distributed as dist

        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if rank != 0:
        return None
    return sorted(rows, key=lambda r: r[0])


def sample_label(seed: int, num_classes: int) -> int:
    """The label of the sample with seed ``seed`` when labels are drawn (the same on every rank)."""
    return mix_seed(seed, LABEL_SALT) % num_classes


def is_text_model(net: nn.Module) -> bool:
    """Whether ``net`` is conditioned on text (an MMDiT) rather than on class labels."""
    return hasattr(net, "set_null_condition")


def rank_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The samples of ``0..n-1`` that rank ``rank`` of ``world_size`` handles: ``rank, rank + W, …``."""
    return list(range(rank, n, world_size))


def capped_batch_size(batch_size: int, num: int | None) -> int:
    """The batch size of generating ``num`` samples in all (on every rank): ``min(batch_size, num)``.

    Args:
        batch_size: Samples per forward pass asked for (``--batch-size``).
        num: Samples asked for in all, over every rank (``--num``), or ``None`` for no cap.

    Raises:
        ConfigError: If ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if num is not None and 0 < num < batch_size:
        log.info("--batch-size %d > --num %d: batches of %d", batch_size, num, num)
        return num
    return batch_size


def generate(net: nn.Module, objective: str, indices: list[int], *, seed: int, num_classes: int, steps: int,
             guidance: Guidance | None, edm: EDM, device: torch.device, batch_size: int,
             decode: Callable[[torch.Tensor], torch.Tensor] | None = None, labels: list[int] | None = None,
             prompts: PromptSet | None = None, shift: float = 1.0, num: int | None = None,
             latent_hw: tuple[int, int] | None = None) -> Iterator[tuple[list[int], torch.Tensor, np.ndarray, list[int]]]:
    """Generate the samples ``indices``, batch by batch.

    Args:
        net: The DiT or MMDiT, on ``device``.
        objective: ``edm`` or ``rf``.
        indices: Sample numbers to generate (e.g. :func:`rank_indices`); sample ``i`` uses seed ``seed + i``.
        seed: Seed of sample 0.
        num_classes: Labels are drawn from ``0..num_classes-1`` unless ``labels`` is given.
        steps: Sampler steps.
        guidance: CFG / TREAD guidance, or ``None``.
        edm: EDM preconditioning constants (used by ``edm``).
        shift: Rectified flow's timestep shift (used by ``rf``).
        device: Where to sample.
        batch_size: Samples per forward pass; the last batch is padded to it. Capped to ``num`` when given.
        decode: Latents → images in [-1, 1] (a VAE decoder), or ``None`` for pixel-space models.
        labels: Sample ``i`` gets ``labels[i % len(labels)]``; ``None`` draws a label per seed (DiT only).
        prompts: The prompts of a text-conditioned network (required for one): sample ``i`` gets prompt
            ``i % len(prompts)``.
        num: The number of samples asked for in all, over every rank (e.g. ``n`` of :func:`rank_indices`);
            batches are at most this big (:func:`capped_batch_size`). ``None``: ``batch_size`` as given.
        latent_hw: Latent ``(H, W)`` to sample at (an aspect-ratio bucket, see :func:`latent_size_of`);
            ``None``: the network's configured size.

    Yields:
        ``(indices, latents (CPU float32), images (uint8 NHWC), conditions)`` of each batch; the conditions
        are the labels, or for a text-conditioned network the prompt numbers.

    Raises:
        ConfigError: If a text-conditioned network gets labels or no prompts, a DiT gets prompts, or
            ``batch_size`` < 1.
    """
    if is_text_model(net) and (prompts is None or labels):
        raise ConfigError("a text-conditioned network samples from prompts, not class labels")
    if prompts is not None and not is_text_model(net):
        raise ConfigError("prompts apply to text-conditioned (MMDiT) networks; a DiT samples from class labels")
    batch_size = capped_batch_size(batch_size, num)
    padding = -len(indices) % batch_size
    if padding:
        log.info("the last batch of %d computes %d padded sample(s) and discards them (a fixed batch size keeps "
                 "each sample's result the same whatever the number of ranks)", batch_size, padding)
    shape = (net.in_channels, *(latent_hw or net.input_size))
    for lo in range(0, len(indices), batch_size):
        idx = indices[lo: lo + batch_size]
        pad = batch_size - len(idx)
        run = idx + [idx[-1]] * pad
        seeds = [seed + i for i in run]
        if prompts is not None:
            ys = [i % len(prompts) for i in run]
            cond = prompts.for_samples(run, device)
        else:
            ys = [labels[i % len(labels)] if labels else sample_label(s, num_classes) for i, s in zip(run, seeds)]
            cond = torch.tensor(ys, device=device)
        noise = seeded_noise(seeds, shape).to(device)
        lat = sample_latents(net, objective, cond, noise, steps, guidance, edm=edm, routing_seed=seeds,
                             shift=shift)
        images = decode(lat) if decode is not None else lat
        keep = len(idx)
        yield idx, lat[:keep].float().cpu(), to_uint8(images[:keep]), ys[:keep]


def latent_size_of(size: str, net: nn.Module, pixel_space: bool) -> tuple[int, int]:
    """``--size WxH`` (pixels) → the latent ``(H, W)`` to sample at.

    Args:
        size: ``WxH`` in pixels, e.g. ``1216x832``.
        net: The network (its patch size and position scheme decide which grids it can run).
        pixel_space: The model works on pixels (``vae: none``); else latents are 8x smaller than images.

    Raises:
        ConfigError: Naming ``--size`` if it is malformed, not divisible by the latent patch, or a grid the
            network's positions cannot cover.
    """
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--size {size!r}: expected WIDTHxHEIGHT in pixels, e.g. 512x384")
    width, height = (int(p) for p in parts)
    down = 1 if pixel_space else 8
    unit = down * net.patch_size
    if width % unit or height % unit:
        raise ConfigError(f"--size {size}: width and height must be multiples of {unit} (patch {net.patch_size}"
                          + ("" if pixel_space else " x the VAE's 8") + ")")
    hw = (height // down, width // down)
    try:
        net.check_latent_size(*hw)
    except ValueError as e:
        raise ConfigError(f"--size {size}: {e}") from None
    return hw
