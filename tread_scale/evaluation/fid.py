"""FID, sFID, IS and precision/recall of generated samples against a reference, across any number of ranks.

Reference statistics come from an ADM reference batch or another ``.npz`` in ADM's format (``mu``,
``sigma``, ``mu_s``, ``sigma_s``), or are computed from an MDS dataset (pixel-space data, or latents decoded
by the VAE: *reconstructions*, a different reference than ADM's) or an image folder, and can be saved for
reuse. :func:`fid_of_weights` is the whole evaluation of a weight file (``tread-scale fid``); its result says
whether it is comparable to published numbers (:func:`tread_scale.evaluation.reference.comparability`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np
import torch

from tread_scale.diffusion.guidance import Guidance
from tread_scale.errors import ConfigError, DatasetError
from tread_scale.evaluation.inception import FEATURE_DIM, SPATIAL_DIM, FIDInception
from tread_scale.evaluation.metrics import (IMAGES, IS_SPLIT_SIZE, PIXEL_DATA, UNKNOWN, VAE_RECONSTRUCTIONS,
                                            FeatureStats, ReferenceStats, frechet_distance, inception_score,
                                            precision_recall)
from tread_scale.sampling.flops import SamplingFlops, counted
from tread_scale.sampling.generate import capped_batch_size, rank_indices, world

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Inception statistics of one image set, optionally with kept features for IS and precision/recall.

    Each rank adds the images ``rank, rank + W, …`` of the set (:func:`~tread_scale.sampling.rank_indices`);
    :meth:`reduce` puts kept features back in image order, which the Inception Score's splits depend on.
    """

    pool: FeatureStats = field(default_factory=lambda: FeatureStats(FEATURE_DIM))
    spatial: FeatureStats = field(default_factory=lambda: FeatureStats(SPATIAL_DIM))
    logits: list[torch.Tensor] = field(default_factory=list)
    kept_pool: list[torch.Tensor] = field(default_factory=list)

    def add(self, inception: FIDInception, images_nhwc: np.ndarray, device: torch.device, keep: bool) -> None:
        """Accumulate a batch of uint8 NHWC images (``keep``: also keep logits and pool features)."""
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).to(device)
        out = inception(x)
        self.pool.update(out["pool"])
        self.spatial.update(out["spatial"])
        if keep:
            self.logits.append(out["logits"].cpu())
            self.kept_pool.append(out["pool"].cpu())

    def reduce(self) -> Features:
        """Combine the statistics (and kept features, in image order) of all ranks, in place; returns ``self``."""
        self.pool.all_reduce()
        self.spatial.all_reduce()
        rank, world_size = world()
        if world_size > 1 and self.kept_pool:
            import torch.distributed as dist

            gathered = [None] * world_size
            dist.all_gather_object(gathered, (torch.cat(self.logits), torch.cat(self.kept_pool)))
            self.logits = [_interleave([g[0] for g in gathered])]
            self.kept_pool = [_interleave([g[1] for g in gathered])]
        return self

    def reference(self, source: str = UNKNOWN, inception_sha256: str | None = None) -> ReferenceStats:
        """These statistics as reference statistics (to compare against or save), with their provenance."""
        mu, sigma = self.pool.mean_cov()
        mu_s, sigma_s = self.spatial.mean_cov()
        return ReferenceStats(mu, sigma, mu_s, sigma_s, source=source, inception_sha256=inception_sha256,
                              num_images=self.pool.n)


def _interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rank ``r`` held images ``r, r + W, …``: put the parts back in image order."""
    world_size, n = len(parts), sum(len(t) for t in parts)
    if any(len(t) != len(range(r, n, world_size)) for r, t in enumerate(parts)):
        raise ValueError(f"ranks hold {[len(t) for t in parts]} images, not a strided split of {n}")
    out = torch.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, t in enumerate(parts):
        out[r::world_size] = t
    return out


def dataset_images(root: str, cache: str | None, decode: Callable[[torch.Tensor], torch.Tensor] | None,
                   device: torch.device, batch_size: int, limit: int | None) -> Iterator[np.ndarray]:
    """This rank's share of an MDS dataset as uint8 NHWC images (decoded when ``decode`` is given)."""
    from streaming.base.util import clean_stale_shared_memory

    from tread_scale.data.stream.dataset import LatentStreamingDataset
    from tread_scale.data.stream.location import default_cache, stream_location
    from tread_scale.data.metadata import base_range, read_metadata
    from tread_scale.imaging import to_uint8

    meta = read_metadata(root)
    if meta.vae != "none" and decode is None:
        raise DatasetError(f"{root} holds latents of VAE {meta.vae!r}: pass --vae to decode them for Inception")
    clean_stale_shared_memory()
    kwargs = stream_location(root, cache or default_cache(root))
    ds = LatentStreamingDataset(latent_shape=meta.latent_shape, num_classes=meta.num_classes, shuffle=False,
                                batch_size=1, buckets=meta.buckets, **kwargs)
    # the images of the model's own (square) size: all of them, or a bucketed dataset's base bucket
    first, stop = base_range(meta, root, " to take reference images from; give --ref-images or --ref")
    count = stop - first
    if meta.buckets:
        log.info("%s is bucketed: the reference is its %d samples of the base bucket %s", root, count,
                 "x".join(map(str, meta.latent_shape[1:])))
    rank, world_size = world()
    n = min(count, limit) if limit else count
    idx = [first + i for i in rank_indices(n, rank, world_size)]
    for lo in range(0, len(idx), batch_size):
        lat = torch.stack([ds[i]["latent"].float() for i in idx[lo: lo + batch_size]]).to(device)
        yield to_uint8(decode(lat) if decode is not None else lat)


def folder_images(folder: str, resolution: int, batch_size: int, limit: int | None) -> Iterator[np.ndarray]:
    """This rank's share of the images under ``folder`` (recursively), centre-cropped to ``resolution``."""
    from tread_scale.data.conversion.sources import IMAGE_SUFFIXES, _load_image

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


def scores(fake: Features, ref: ReferenceStats, real: Features | None = None, split_size: int = IS_SPLIT_SIZE,
           device: str | torch.device | None = None) -> dict[str, float]:
    """ADM's metrics: FID; sFID (when the reference has spatial statistics); IS and precision/recall (when kept).

    Args:
        fake: Features of the generated samples.
        ref: Reference statistics.
        real: Features of the reference images, with kept pool features for precision/recall.
        split_size: Inception Score split size (ADM: 5000).
        device: Where to compute precision/recall's distances.
    """
    fmu, fsig = fake.pool.mean_cov()
    out = {"fid": frechet_distance(fmu, fsig, ref.mu, ref.sigma), "num_samples": fake.pool.n}
    if ref.mu_s is not None:
        smu, ssig = fake.spatial.mean_cov()
        out["sfid"] = frechet_distance(smu, ssig, ref.mu_s, ref.sigma_s)
    if fake.logits:
        out["inception_score"], out["inception_score_std"] = inception_score(torch.cat(fake.logits), split_size)
    if real is not None and real.kept_pool and fake.kept_pool:
        out["precision"], out["recall"] = precision_recall(torch.cat(real.kept_pool), torch.cat(fake.kept_pool),
                                                           device=device)
    return out


def dataset_source(root: str) -> str:
    """What reference statistics of the MDS dataset ``root`` describe: real pixels or VAE reconstructions."""
    from tread_scale.data.metadata import read_metadata

    return PIXEL_DATA if read_metadata(root).vae == "none" else VAE_RECONSTRUCTIONS


def fid_of_weights(weights: str, inception: str, *, ref: str | None = None, ref_data: str | None = None,
                   ref_images: str | None = None, ref_num: int | None = None, save_ref: str | None = None,
                   num: int | None = None, seed: int = 0, extra: bool = False, steps: int | None = None,
                   guidance: Guidance | None = None, vae: str | None = None, batch_size: int = 64,
                   device: str = "auto", prompts: list[str] | None = None, prompt_data: str | None = None,
                   clip: str | None = None, encoders: dict[str, str | None] | None = None,
                   reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """ADM's metrics of samples of a weight file, across ranks: FID and sFID; with ``extra`` IS and precision/recall.

    A class-conditional DiT samples a label per seed. A text-to-image MMDiT samples a prompt set, one image
    per prompt: ``prompts`` (strings, encoded with the encoders recorded with the weights or ``encoders``) or
    ``prompt_data`` (a captioned dataset's captions and stored embeddings, e.g. a held-out split); with
    ``clip``, the CLIP score of every image with its prompt is reported next to FID. A text result carries
    its ``protocol`` (prompts, their number, seed, resolution and resize, sampler, guidance, reference).

    Every rank of the process group (if any) generates and embeds its share of the samples; statistics are
    all-reduced, so every rank returns the same result, equal to a single-process run's. Exactly one of
    ``ref``, ``ref_data`` and ``ref_images`` gives the reference. With an ADM reference batch (an ``.npz``
    holding its images as ``arr_0``), FID and sFID use its stored statistics and precision/recall embed its
    images, as ADM's suite does.

    Args:
        weights: A ``.safetensors`` weight file, or a run folder.
        inception: Local FID Inception weights (``.pth`` state dict or ``.safetensors``).
        ref: Reference statistics ``.npz`` (ADM format: ``mu``, ``sigma``, ``mu_s``, ``sigma_s``; an ADM
            reference batch also has ``arr_0``).
        ref_data: An MDS dataset (folder or ``s3://``) to compute reference statistics from. Latent datasets
            are decoded by the VAE: the reference is then VAE reconstructions, not real images, and the
            result is labelled not comparable to published numbers.
        ref_images: An image folder to compute reference statistics from.
        ref_num: Use at most this many reference images.
        save_ref: Write computed reference statistics (with their provenance) here (rank 0).
        num: Generated samples; sample ``i`` uses seed ``seed + i`` and a label drawn from it, or prompt ``i``
            of the prompt set. Default: 50000, or one per prompt.
        seed: Seed of sample 0.
        extra: Also the Inception Score, and precision/recall when reference images exist (data, an image
            folder, or an ADM reference batch).
        steps: Sampler steps (default: 40 for EDM-Heun, 50 for RF-Euler).
        guidance: CFG / TREAD guidance, or ``None``.
        vae: Local VAE folder to decode latents (generated and ``ref_data``), or ``None``.
        batch_size: Samples per forward pass (results do not depend on it).
        device: ``auto``, ``cpu``, ``gpu``/``cuda`` or ``cuda:N``.
        prompts: Prompt strings of a text-to-image model (one image each).
        prompt_data: A captioned dataset whose first ``num`` captions (all, without ``num``) are the prompts.
        clip: A local CLIP folder: also the CLIP score (:mod:`tread_scale.evaluation.clip_score`).
        encoders: Encoder folders (``t5``, ``clip``, ``clip_l``, ``clip_g``) for ``prompts`` other than
            those recorded with the weights.
        reuse: A dict that keeps the reference statistics (and real features) between calls with the same
            reference, e.g. the settings of a guidance sweep: the first call fills it, the next ones use it.

    Returns:
        ``fid``, ``num_samples``, ``comparable_to_published`` (bool), ``comparable_reason`` (why) and, where
        computable, ``sfid``, ``inception_score(_std)``, ``precision``, ``recall``; for a text model
        ``protocol`` and, with ``clip``, ``clip_score`` and ``clip_model``.

    Raises:
        ConfigError: If not exactly one reference is given, or the device is unavailable.
        CheckpointError: If the weights or Inception weights cannot be loaded.
        DatasetError: If reference data cannot be read.
    """
    from tread_scale.devices import resolve_device
    from tread_scale.evaluation.inception import load_inception
    from tread_scale.evaluation.clip_score import CLIPTally
    from tread_scale.evaluation.reference import comparability, text_to_image_reason
    from tread_scale.sampling import SamplerSettings, default_steps, generate, load_net, make_decoder

    if sum(r is not None for r in (ref, ref_data, ref_images)) != 1:
        raise ConfigError("give exactly one reference: statistics (--ref), data (--ref-data) or images "
                          "(--ref-images)")
    dev = resolve_device(device)
    net_inception = load_inception(inception, dev)
    net, meta = load_net(weights, dev)
    prompt_set, prompt_source = _prompt_set(weights, meta, prompts, prompt_data, num, encoders, dev)
    if num is None:
        num = len(prompt_set) if prompt_set is not None else 50000
    elif prompt_set is not None and num > len(prompt_set):
        raise ConfigError(f"--num {num}: one image per prompt, and the prompt set ({prompt_source}) holds "
                          f"{len(prompt_set)}; give at most that many (or leave --num out)")
    scorer = _clip_scorer(clip, prompt_set, dev)
    decode = make_decoder(vae, meta.data.vae, dev)
    rank, world_size = world()
    if reuse is not None and "reference" in reuse:  # a sweep: the reference of the first setting
        reference, real = reuse["reference"], reuse["real"]
    else:
        reference, real = _reference(ref, ref_data, ref_images, ref_num, save_ref, extra, net_inception,
                                     _pixel_size(net, decode)[0], decode, dev, batch_size)
        if reuse is not None:
            reuse.update(reference=reference, real=real)
    settings = SamplerSettings(meta.objective_kind, steps or default_steps(meta.objective_kind),
                               sigma_data=meta.sigma_data, shift=meta.shift)
    batches = generate(net, settings.objective, rank_indices(num, rank, world_size), seed=seed,
                       num_classes=meta.num_classes, steps=settings.steps, guidance=guidance, edm=settings.edm(),
                       device=dev, batch_size=batch_size, decode=decode, shift=settings.shift, num=num,
                       prompts=prompt_set)
    tally = CLIPTally(scorer, prompt_set.prompts, dev) if scorer is not None else None
    counter, rows = SamplingFlops(net), [0]

    def fakes() -> Iterator[np.ndarray]:
        for _, _, images, ys in counted(batches, counter):
            rows[0] += capped_batch_size(batch_size, num)
            if tally is not None:
                tally.add(images, ys)
            yield images

    fake = features_of(fakes(), net_inception, dev, keep=extra)
    result: dict[str, Any] = scores(fake, reference, real, device=dev)
    result["sampling_flops_per_image"] = counter.per_image(rows[0])
    ok, why = comparability(net_inception.standard_weights, reference, result["num_samples"])
    if prompt_set is not None:
        ok, why = False, text_to_image_reason(why)
        result["protocol"] = {"prompts": prompt_source, "num_prompts": len(prompt_set), "num_samples": num,
                              "seed": seed, "resolution": _pixel_size(net, decode),
                              "resize": "Inception input: TF1 bilinear to 299 (ADM's pipeline)",
                              "sampler": f"{settings.objective} {settings.steps} steps (shift {settings.shift:g})",
                              "guidance": dataclasses.asdict(guidance) if guidance else None,
                              "reference": reference.source}
    if tally is not None:
        result["clip_score"] = tally.mean()
        result["clip_model"] = scorer.describe()
    result["comparable_to_published"], result["comparable_reason"] = ok, why
    if rank == 0:
        log.info("evaluation %s", why)
    return result


def _prompt_set(weights: str, meta, prompts: list[str] | None, prompt_data: str | None, num: int | None,
                encoders: dict[str, str | None] | None, dev: torch.device):
    """``(PromptSet, description)`` of a text model's prompts, ``(None, None)`` for a class model.

    Raises:
        ConfigError: If a text model gets no prompt set or two, or a class model gets one.
    """
    from tread_scale.sampling.folder import encode_for_weights
    from tread_scale.sampling.prompts import dataset_prompts

    text_model = meta.data.text is not None
    given = (prompts is not None) + (prompt_data is not None)
    if not text_model:
        if given:
            raise ConfigError(f"{weights}: a class-conditional model samples labels; --prompts/--prompt-data are for "
                              "text-to-image (MMDiT) weights")
        return None, None
    if given != 1:
        raise ConfigError(f"{weights}: a text-to-image model's FID needs one prompt set: --prompts FILE (encoded with "
                          "the weights' encoders) or --prompt-data DATASET (its captions and stored embeddings)")
    if prompt_data is not None:
        ps = dataset_prompts(prompt_data, num if num is not None else 1 << 62)
        return ps, f"captions of {prompt_data} (first {len(ps)})"
    if not prompts:
        raise ConfigError("--prompts: the prompt file holds no prompts")
    ps = encode_for_weights(meta, Path(weights), prompts, encoders or {}, dev)
    return ps, f"{len(prompts)} prompts from a file"


def _clip_scorer(clip: str | None, prompt_set, dev: torch.device):
    if clip is None:
        return None
    if prompt_set is None:
        raise ConfigError("--clip: the CLIP score scores images against their prompts; a class-conditional model "
                          "has none")
    from tread_scale.evaluation.clip_score import CLIPScorer

    return CLIPScorer(clip, device=dev)


def _pixel_size(net, decode) -> list[int]:
    """Height and width of the generated images (latents × 8 when a VAE decodes them)."""
    return [side * (8 if decode is not None else 1) for side in net.input_size]


def _reference(ref, ref_data, ref_images, ref_num, save_ref, extra, net_inception, pixels: int, decode, dev,
               batch_size: int):
    """``(reference statistics, real features or None)`` from the one reference given (see
    :func:`fid_of_weights`); ``pixels``: the generated images' side (an image folder is resized to it)."""
    from tread_scale.evaluation.reference import npz_images

    rank, world_size = world()
    real = None
    if ref is not None:
        reference = ReferenceStats.load(ref)
        if reference.has_images and (extra or reference.mu is None):
            batches = npz_images(ref, batch_size, rank, world_size, ref_num)
            real = features_of(batches, net_inception, dev, keep=extra)
            if reference.mu is None:  # ADM computes the statistics from the images when none are stored
                stored = reference
                reference = real.reference(stored.source, net_inception.weights_sha256)
                reference.path = stored.path
                if save_ref and rank == 0:
                    reference.save(save_ref)
    else:
        if ref_data is not None:
            source = dataset_source(ref_data)
            if source == VAE_RECONSTRUCTIONS:
                log.warning("--ref-data %s holds latents: its reference statistics are of their VAE "
                            "reconstructions, not of the real images (ADM's reference batches are real "
                            "images); the result is not comparable to published numbers", ref_data)
            batches = dataset_images(ref_data, None, decode, dev, batch_size, ref_num)
        else:
            source = IMAGES
            batches = folder_images(ref_images, pixels, batch_size, ref_num)
        real = features_of(batches, net_inception, dev, keep=extra)
        reference = real.reference(source, net_inception.weights_sha256)
        if save_ref and rank == 0:
            reference.save(save_ref)
    return reference, real
