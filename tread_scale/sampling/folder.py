"""Samples of exported weights written to a folder: ``grid.png`` and ``samples.npz`` (``tread-scale sample``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tread_scale.devices import resolve_device
from tread_scale.diffusion.guidance import Guidance
from tread_scale.errors import ConfigError
from tread_scale.imaging import save_png
from tread_scale.sampling.generate import generate, rank_indices, world
from tread_scale.sampling.grid import DEFAULT_GRID_MAX, grid_columns, grid_image
from tread_scale.sampling.loading import load_net, make_decoder
from tread_scale.sampling.settings import SamplerSettings, default_steps

log = logging.getLogger(__name__)


def sample_to_folder(weights: str, out: str, *, num: int = 16, seed: int = 0, labels: list[int] | None = None,
                     steps: int | None = None, guidance: Guidance | None = None, vae: str | None = None,
                     batch_size: int = 64, device: str = "auto", grid_max: int = DEFAULT_GRID_MAX
                     ) -> dict[str, Path]:
    """Sample ``num`` images and write ``grid.png`` and ``samples.npz`` into ``out`` (rank 0).

    Under torch.distributed every rank generates its share (samples ``rank, rank + W, …``); the files are
    identical to a single-process run. Sample ``i`` uses seed ``seed + i``; labels cycle through the
    classes unless given. The ``.npz`` holds every sample (``latents``, ``labels``, ``seeds``, uint8
    ``images``); the grid shows the first ``grid_max``.

    Args:
        weights: A ``.safetensors`` weight file, or a run folder.
        out: Output folder (created).
        num: Number of samples.
        seed: Seed of sample 0.
        labels: Labels to cycle through (default: every class in turn).
        steps: Sampler steps (default: 40 for EDM-Heun, 50 for RF-Euler).
        guidance: CFG / TREAD guidance, or ``None``.
        vae: Local VAE folder to decode latents, or ``None``.
        batch_size: Samples per forward pass (results do not depend on it).
        device: ``auto``, ``cpu``, ``gpu``/``cuda`` or ``cuda:N``.
        grid_max: At most this many samples in ``grid.png``.

    Returns:
        Paths of the written files (``grid``, ``npz``); empty on ranks other than 0.

    Raises:
        ConfigError: If a label is out of range, ``grid_max`` < 1 or the device is unavailable.
        CheckpointError: If the weights cannot be loaded.
    """
    if grid_max < 1:
        raise ConfigError(f"--grid-max must be >= 1, got {grid_max}")
    dev = resolve_device(device)
    net, meta = load_net(weights, dev)
    num_classes = meta.num_classes
    default_labels = labels is None
    labels = labels if labels is not None else [i % num_classes for i in range(num)]
    labels = [labels[i % len(labels)] for i in range(num)]
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ConfigError(f"--labels: {bad} outside 0..{num_classes - 1}")
    settings = SamplerSettings(meta.objective_kind, steps or default_steps(meta.objective_kind),
                               sigma_data=meta.sigma_data)
    rank, world_size = world()
    decode = make_decoder(vae, meta.data.vae, dev)
    rows = []
    for idx, lat, pixels, ys in generate(net, settings.objective, rank_indices(num, rank, world_size), seed=seed,
                                         num_classes=num_classes, steps=settings.steps, guidance=guidance,
                                         edm=settings.edm(), device=dev, batch_size=batch_size, decode=decode,
                                         labels=labels):
        rows += list(zip(idx, lat.numpy(), pixels, ys))
    if world_size > 1:
        import torch.distributed as dist

        gathered = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if rank != 0:
        return {}
    rows.sort(key=lambda r: r[0])
    latents = np.stack([r[1] for r in rows])
    pixels = np.stack([r[2] for r in rows])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = min(num, grid_max)
    grid = save_png(out_dir / "grid.png",
                    grid_image(pixels, grid_columns(shown, num_classes, by_class=default_labels), max_images=shown))
    npz = out_dir / "samples.npz"
    np.savez(npz, latents=latents, labels=np.asarray([r[3] for r in rows]),
             seeds=np.asarray([seed + r[0] for r in rows]), images=pixels)
    if shown < num:
        log.info("grid.png shows the first %d of %d samples; samples.npz holds them all", shown, num)
    return {"grid": grid, "npz": npz}
