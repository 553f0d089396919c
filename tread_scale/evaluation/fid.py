"""FID of generated samples against reference statistics, across any number of ranks.

Reference statistics come from an ADM-style ``.npz`` (``mu``, ``sigma``), or are computed from an MDS
dataset (latents decoded by the VAE, or pixel-space data) or an image folder, and can be saved for reuse.
:func:`fid_of_weights` is the whole evaluation of a weight file (``tread-scale fid``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tread_scale.diffusion.guidance import Guidance
from tread_scale.errors import ConfigError, DatasetError
from tread_scale.evaluation.inception import FEATURE_DIM, FIDInception
from tread_scale.evaluation.metrics import (FeatureStats, ReferenceStats, frechet_distance, inception_score,
                                            precision_recall)
from tread_scale.sampling.generate import rank_indices, world

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Inception statistics of one image set, optionally with kept features for IS and precision/recall."""

    pool: FeatureStats = field(default_factory=lambda: FeatureStats(FEATURE_DIM))
    spatial: FeatureStats | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    kept_pool: list[torch.Tensor] = field(default_factory=list)

    def add(self, inception: FIDInception, images_nhwc: np.ndarray, device: torch.device, keep: bool) -> None:
        """Accumulate a batch of uint8 NHWC images (``keep``: also keep logits and pool features)."""
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).to(device)
        out = inception(x)
        self.pool.update(out["pool"])
        if self.spatial is None:
            self.spatial = FeatureStats(out["spatial"].shape[1])
        self.spatial.update(out["spatial"])
        if keep:
            self.logits.append(out["logits"].cpu())
            self.kept_pool.append(out["pool"].cpu())

    def reduce(self) -> Features:
        """Combine the statistics (and kept features) of all ranks, in place; returns ``self``."""
        self.pool.all_reduce()
        if self.spatial is not None:
            self.spatial.all_reduce()
        rank, world_size = world()
        if world_size > 1 and self.kept_pool:
            import torch.distributed as dist

            gathered = [None] * world_size
            dist.all_gather_object(gathered, (torch.cat(self.logits), torch.cat(self.kept_pool)))
            self.logits = [g[0] for g in gathered]
            self.kept_pool = [g[1] for g in gathered]
        return self

    def reference(self) -> ReferenceStats:
        """These statistics as reference statistics (to compare against or save)."""
        mu, sigma = self.pool.mean_cov()
        mu_s, sigma_s = self.spatial.mean_cov() if self.spatial is not None else (None, None)
        return ReferenceStats(mu, sigma, mu_s, sigma_s)


def dataset_images(root: str, cache: str | None, decode: Callable[[torch.Tensor], torch.Tensor] | None,
                   device: torch.device, batch_size: int, limit: int | None) -> Iterator[np.ndarray]:
    """This rank's share of an MDS dataset as uint8 NHWC images (decoded when ``decode`` is given)."""
    from streaming.base.util import clean_stale_shared_memory

    from tread_scale.data.dataset import LatentStreamingDataset
    from tread_scale.data.location import default_cache, stream_location
    from tread_scale.data.metadata import read_metadata
    from tread_scale.imaging import to_uint8

    meta = read_metadata(root)
    if meta.vae != "none" and decode is None:
        raise DatasetError(f"{root} holds latents of VAE {meta.vae!r}: pass --vae to decode them for Inception")
    clean_stale_shared_memory()
    kwargs = stream_location(root, cache or default_cache(root))
    ds = LatentStreamingDataset(latent_shape=meta.latent_shape, num_classes=meta.num_classes, shuffle=False,
                                batch_size=1, **kwargs)
    rank, world_size = world()
    n = min(len(ds), limit) if limit else len(ds)
    idx = rank_indices(n, rank, world_size)
    for lo in range(0, len(idx), batch_size):
        lat = torch.stack([ds[i]["latent"].float() for i in idx[lo: lo + batch_size]]).to(device)
        yield to_uint8(decode(lat) if decode is not None else lat)


def folder_images(folder: str, resolution: int, batch_size: int, limit: int | None) -> Iterator[np.ndarray]:
    """This rank's share of the images under ``folder`` (recursively), centre-cropped to ``resolution``."""
    from tread_scale.data.sources import IMAGE_SUFFIXES, _load_image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"image folder {folder!r} holds no images")
    files = files[:limit] if limit else files
    rank, world_size = world()
    mine = [files[i] for i in rank_indices(len(files), rank, world_size)]
    for lo in range(0, len(mine), batch_size):
        arr = np.stack([_load_image(f, resolution) for f in mine[lo: lo + batch_size]])
        yield ((arr.transpose(0, 2, 3, 1) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def features_of(batches: Iterator[np.ndarray], inception: FIDInception, device: torch.device,
                keep: bool = False) -> Features:
    """Inception statistics of uint8 NHWC image batches, reduced over all ranks.

    Args:
        batches: This rank's images.
        inception: The FID Inception network.
        device: Where to run it.
        keep: Also keep logits and pool features (for IS and precision/recall).
    """
    feats = Features()
    for images in batches:
        feats.add(inception, images, device, keep)
    return feats.reduce()


def scores(fake: Features, ref: ReferenceStats, real: Features | None = None, splits: int = 10) -> dict[str, float]:
    """FID, sFID (when spatial statistics exist on both sides), IS and precision/recall (when kept)."""
    fmu, fsig = fake.pool.mean_cov()
    out = {"fid": frechet_distance(fmu, fsig, ref.mu, ref.sigma), "num_samples": fake.pool.n}
    if fake.spatial is not None and ref.mu_s is not None:
        smu, ssig = fake.spatial.mean_cov()
        out["sfid"] = frechet_distance(smu, ssig, ref.mu_s, ref.sigma_s)
    if fake.logits:
        out["inception_score"], out["inception_score_std"] = inception_score(torch.cat(fake.logits), splits)
    if real is not None and real.kept_pool and fake.kept_pool:
        out["precision"], out["recall"] = precision_recall(torch.cat(real.kept_pool), torch.cat(fake.kept_pool))
    return out


def fid_of_weights(weights: str, inception: str, *, ref: str | None = None, ref_data: str | None = None,
                   ref_images: str | None = None, ref_num: int | None = None, save_ref: str | None = None,
                   num: int = 50000, seed: int = 0, extra: bool = False, steps: int | None = None,
                   guidance: Guidance | None = None, vae: str | None = None, batch_size: int = 64,
                   device: str = "auto") -> dict[str, float]:
    """FID (and sFID; with ``extra`` also IS and precision/recall) of samples of a weight file, across ranks.

    Every rank of the process group (if any) generates and embeds its share of the samples; statistics are
    all-reduced, so every rank returns the same result, equal to a single-process run's. Exactly one of
    ``ref``, ``ref_data`` and ``ref_images`` gives the reference.

    Args:
        weights: A ``.safetensors`` weight file, or a run folder.
        inception: Local FID Inception weights (``.pth`` state dict or ``.safetensors``).
        ref: Reference statistics ``.npz`` (ADM format: ``mu``, ``sigma``).
        ref_data: An MDS dataset (folder or ``s3://``) to compute reference statistics from.
        ref_images: An image folder to compute reference statistics from.
        ref_num: Use at most this many reference images.
        save_ref: Write computed reference statistics here (rank 0).
        num: Generated samples; sample ``i`` uses seed ``seed + i`` and a label drawn from it.
        seed: Seed of sample 0.
        extra: Also the Inception Score, and precision/recall when the reference is data or images.
        steps: Sampler steps (default: 40 for EDM-Heun, 50 for RF-Euler).
        guidance: CFG / TREAD guidance, or ``None``.
        vae: Local VAE folder to decode latents (generated and ``ref_data``), or ``None``.
        batch_size: Samples per forward pass (results do not depend on it).
        device: ``auto``, ``cpu``, ``gpu``/``cuda`` or ``cuda:N``.

    Returns:
        ``fid``, ``num_samples`` and, where computable, ``sfid``, ``inception_score(_std)``, ``precision``,
        ``recall``.

    Raises:
        ConfigError: If not exactly one reference is given, or the device is unavailable.
        CheckpointError: If the weights or Inception weights cannot be loaded.
        DatasetError: If reference data cannot be read.
    """
    from tread_scale.devices import resolve_device
    from tread_scale.evaluation.inception import load_inception
    from tread_scale.sampling import SamplerSettings, default_steps, generate, load_net, make_decoder

    if sum(r is not None for r in (ref, ref_data, ref_images)) != 1:
        raise ConfigError("give exactly one reference: statistics (--ref), data (--ref-data) or images "
                          "(--ref-images)")
    dev = resolve_device(device)
    net_inception = load_inception(inception, dev)
    net, meta = load_net(weights, dev)
    decode = make_decoder(vae, meta.data.vae, dev)
    real = None
    if ref is not None:
        reference = ReferenceStats.load(ref)
    else:
        if ref_data is not None:
            batches = dataset_images(ref_data, None, decode, dev, batch_size, ref_num)
        else:
            batches = folder_images(ref_images, net.input_size[0] * (8 if decode else 1), batch_size, ref_num)
        real = features_of(batches, net_inception, dev, keep=extra)
        reference = real.reference()
        if save_ref and world()[0] == 0:
            reference.save(save_ref)
    settings = SamplerSettings(meta.objective_kind, steps or default_steps(meta.objective_kind),
                               sigma_data=meta.sigma_data)
    rank, world_size = world()
    fakes = (images for _, _, images, _ in generate(
        net, settings.objective, rank_indices(num, rank, world_size), seed=seed, num_classes=meta.num_classes,
        steps=settings.steps, guidance=guidance, edm=settings.edm(), device=dev, batch_size=batch_size,
        decode=decode))
    fake = features_of(fakes, net_inception, dev, keep=extra)
    return scores(fake, reference, real)
