"""FID of generated samples against reference statistics, across any number of ranks.

Reference statistics come from an ADM-style ``.npz`` (``mu``, ``sigma``), or are computed from an MDS
dataset (latents decoded by the VAE, or pixel-space data) or an image folder; :func:`reference_stats`
can save them for reuse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tread_scale.errors import DatasetError
from tread_scale.evaluation.generate import rank_indices, world
from tread_scale.evaluation.inception import FEATURE_DIM, FIDInception
from tread_scale.evaluation.metrics import (FeatureStats, ReferenceStats, frechet_distance, inception_score,
                                            precision_recall)

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Inception statistics of one image set, optionally with kept features for IS and precision/recall."""

    pool: FeatureStats = field(default_factory=lambda: FeatureStats(FEATURE_DIM))
    spatial: FeatureStats | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    kept_pool: list[torch.Tensor] = field(default_factory=list)

    def add(self, inception: FIDInception, images_nhwc: np.ndarray, device: torch.device, keep: bool) -> None:
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
