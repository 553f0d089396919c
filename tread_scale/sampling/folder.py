"""Samples of exported weights written to a folder: ``grid.png`` and ``samples.npz`` (``tread-scale sample``).

A class-conditional DiT samples labels; a text-to-image MMDiT samples prompts, encoded with the encoders its
training data was embedded with (their folders recorded with the weights, or given; checked by content
hash), and its grid has a row per prompt with the prompt beside it (and in ``captions.txt``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tread_scale.devices import resolve_device
from tread_scale.diffusion.guidance import Guidance
from tread_scale.errors import ConfigError
from tread_scale.imaging import save_png
from tread_scale.sampling.flops import SamplingFlops, counted
from tread_scale.sampling.generate import (capped_batch_size, generate, latent_size_of, rank_indices, rows_on_rank0,
                                          world)
from tread_scale.sampling.grid import CAPTIONS_FILE, DEFAULT_GRID_MAX, captioned_grid, grid_columns, grid_image, \
    write_captions
from tread_scale.sampling.loading import load_net, make_decoder
from tread_scale.sampling.prompts import PromptSet, encode_prompts
from tread_scale.sampling.settings import SamplerSettings, default_steps
from tread_scale.weights import WeightsMeta, read_meta, resolve_weights

log = logging.getLogger(__name__)


def sample_to_folder(weights: str, out: str, *, num: int | None = None, seed: int = 0,
                     labels: list[int] | None = None, prompts: list[str] | None = None, t5: str | None = None,
                     clip: str | None = None, clip_l: str | None = None, clip_g: str | None = None,
                     steps: int | None = None, guidance: Guidance | None = None,
                     vae: str | None = None, batch_size: int = 64, device: str = "auto",
                     grid_max: int = DEFAULT_GRID_MAX, count_flops: bool = False,
                     size: str | None = None) -> dict[str, Any]:
    """Sample ``num`` images and write ``grid.png`` and ``samples.npz`` into ``out`` (rank 0).

    Under torch.distributed every rank generates its share (samples ``rank, rank + W, …``); the files are
    identical to a single-process run. Sample ``i`` uses seed ``seed + i``; labels cycle through the
    classes unless given, prompts (text-to-image weights) cycle in order. The ``.npz`` holds every sample
    (``latents``, ``seeds``, uint8 ``images``, and ``labels`` or ``prompts`` + ``prompt_ids``); the grid
    shows the first ``grid_max``, for prompts a row per prompt with the prompt beside it, also listed in
    ``captions.txt``.

    Args:
        weights: A ``.safetensors`` weight file, or a run folder.
        out: Output folder (created).
        num: Number of samples (default: 16, or 4 per prompt).
        seed: Seed of sample 0.
        labels: Labels to cycle through (default: every class in turn); class-conditional weights only.
        prompts: Prompts to cycle through; text-to-image weights only (and required for them).
        t5: Local T5 encoder folder (default: the one recorded with the weights).
        clip: Local CLIP encoder folder (default: the one recorded with the weights).
        clip_l: Local CLIP-L folder, SD3's layout (default: the one recorded with the weights).
        clip_g: Local CLIP-G folder, SD3's layout (default: the one recorded with the weights).
        steps: Sampler steps (default: 40 for EDM-Heun, 50 for RF-Euler).
        guidance: CFG / TREAD guidance, or ``None``.
        vae: Local VAE folder to decode latents, or ``None``.
        batch_size: Samples per forward pass (results do not depend on it); at most ``num``.
        device: ``auto``, ``cpu``, ``gpu``/``cuda`` or ``cuda:N``.
        grid_max: At most this many samples in ``grid.png``.
        count_flops: Also return ``sampling_flops_per_image``: the forward FLOPs of the network calls made while
            generating (:class:`~tread_scale.sampling.flops.SamplingFlops`), per computed row (``sample --sweep``).
        size: ``WxH`` in pixels to sample at (e.g. one of the training data's aspect-ratio buckets); ``None``:
            the weights' configured size.

    Returns:
        Paths of the written files (``grid``, ``npz``, and ``captions`` for prompts), with ``count_flops`` also
        ``sampling_flops_per_image``; empty on ranks other than 0.

    Raises:
        ConfigError: If a label is out of range, prompts and weights do not go together, the text encoders
            are missing or not the ones the training data was embedded with, ``grid_max`` < 1 or the device
            is unavailable.
        CheckpointError: If the weights cannot be loaded.
    """
    if grid_max < 1:
        raise ConfigError(f"--grid-max must be >= 1, got {grid_max}")
    path = resolve_weights(weights)
    text_model = _check_conditioning(read_meta(path), path, labels, prompts)
    num = num if num is not None else (4 * len(prompts) if text_model else 16)
    if num < 1:
        raise ConfigError(f"--num must be >= 1, got {num}")
    dev = resolve_device(device)
    net, meta = load_net(path, dev)
    num_classes = meta.num_classes
    prompt_set: PromptSet | None = None
    default_labels = labels is None
    if text_model:
        prompt_set = encode_for_weights(meta, path, prompts,
                                        {"t5": t5, "clip": clip, "clip_l": clip_l, "clip_g": clip_g}, dev)
        labels = None
    else:
        labels = labels if labels is not None else [i % num_classes for i in range(num)]
        labels = [labels[i % len(labels)] for i in range(num)]
        bad = [y for y in labels if not 0 <= y < num_classes]
        if bad:
            raise ConfigError(f"--labels: {bad} outside 0..{num_classes - 1}")
    settings = SamplerSettings(meta.objective_kind, steps or default_steps(meta.objective_kind),
                               sigma_data=meta.sigma_data, shift=meta.shift)
    rank, world_size = world()
    decode = make_decoder(vae, meta.data.vae, dev)
    latent_hw = None if size is None else latent_size_of(size, net, pixel_space=meta.data.vae in (None, "none"))
    rows = []
    counter, computed = SamplingFlops(net), 0  # rows computed (padded ones included), for count_flops
    rows_per_batch = capped_batch_size(batch_size, num) if count_flops else 0
    batches = generate(net, settings.objective, rank_indices(num, rank, world_size), seed=seed,
                       num_classes=num_classes, steps=settings.steps, guidance=guidance, edm=settings.edm(),
                       device=dev, batch_size=batch_size, decode=decode, labels=labels, prompts=prompt_set,
                       shift=settings.shift, num=num, latent_hw=latent_hw)
    for idx, lat, pixels, ys in (counted(batches, counter) if count_flops else batches):
        rows += list(zip(idx, lat.numpy(), pixels, ys))
        computed += rows_per_batch
    rows = rows_on_rank0(rows)
    if rows is None:
        return {}
    latents = np.stack([r[1] for r in rows])
    pixels = np.stack([r[2] for r in rows])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = min(num, grid_max)
    npz = out_dir / "samples.npz"
    seeds = np.asarray([seed + r[0] for r in rows])
    written = {}
    if prompt_set is not None:
        written["grid"] = save_png(out_dir / "grid.png", captioned_grid(pixels[:shown], prompt_set.prompts))
        written["captions"] = write_captions(out_dir / CAPTIONS_FILE, prompt_set.prompts, shown)
        ids = np.asarray([r[3] for r in rows])
        np.savez(npz, latents=latents, prompt_ids=ids, prompts=np.asarray(prompt_set.prompts)[ids], seeds=seeds,
                 images=pixels)
    else:
        written["grid"] = save_png(out_dir / "grid.png", grid_image(
            pixels, grid_columns(shown, num_classes, by_class=default_labels), max_images=shown))
        np.savez(npz, latents=latents, labels=np.asarray([r[3] for r in rows]), seeds=seeds, images=pixels)
    if shown < num:
        log.info("grid.png shows the first %d of %d samples; samples.npz holds them all", shown, num)
    if count_flops:
        return {**written, "npz": npz, "sampling_flops_per_image": counter.per_image(computed)}
    return {**written, "npz": npz}


def _check_conditioning(meta: WeightsMeta, path: Path, labels: list[int] | None, prompts: list[str] | None) -> bool:
    """Whether the weights are text-to-image; labels for those, or prompts for a DiT, are a clear error."""
    text_model = meta.model_config().model_family() == "mmdit"
    if text_model and labels is not None:
        raise ConfigError(f"--labels: {path} holds a text-to-image MMDiT, which is conditioned on prompts, not "
                          "class labels; give --prompt TEXT (repeatable) or --prompts FILE")
    if text_model and not prompts:
        raise ConfigError(f"{path} holds a text-to-image MMDiT: give the prompts to sample with --prompt TEXT "
                          "(repeatable) or --prompts FILE (one a line)")
    if not text_model and prompts:
        raise ConfigError(f"--prompt/--prompts: {path} holds a class-conditional DiT ({meta.num_classes} classes), "
                          "which takes no text; use --labels (comma-separated class numbers) instead")
    return text_model


def encode_for_weights(meta: WeightsMeta, path: Path, prompts: list[str], given: dict[str, str | None],
                       dev) -> PromptSet:
    """The prompts encoded with the given encoder folders, or those recorded with the weights (checked
    against the encoders the weights' training data was converted with)."""
    text_meta = meta.data.text_metadata()
    if text_meta is None:
        raise ConfigError(f"{path}: the weights record no text facts of their training data (encoders, hashes), so "
                          "prompts cannot be encoded to match; re-export them with this version of tread_scale")
    recorded = meta.text or {}
    folders = {k: v or recorded.get(k) for k, v in given.items()}
    return encode_prompts(prompts, text_meta, **folders, device=dev,
                          where=f"the training data of {path.name} ({meta.run_name or 'imported weights'})")
