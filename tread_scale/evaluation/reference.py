"""ADM reference batches and whether a result is comparable to published numbers.

An ADM reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``) holds the reference images as ``arr_0``
(uint8 NHWC) next to their statistics ``mu``, ``sigma``, ``mu_s``, ``sigma_s``. ADM's suite reads the stored
statistics for FID and sFID, and embeds the images for precision/recall; :func:`npz_images` streams them
without loading the whole array (10000 x 256 x 256 x 3 bytes for ImageNet-256).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tread_scale.errors import DatasetError
from tread_scale.evaluation.metrics import (ADM_BATCH, IMAGES, PIPELINE, PIXEL_DATA, REAL_SOURCES,
                                            VAE_RECONSTRUCTIONS, ReferenceStats)

PUBLISHED_NUM_SAMPLES = 50000  # published FID/sFID/IS/precision/recall of ImageNet generators: 50K samples


def npz_images(path: str | Path, batch_size: int, rank: int = 0, world_size: int = 1,
               limit: int | None = None) -> Iterator[np.ndarray]:
    """This rank's share (images ``rank, rank + W, …``) of the ``arr_0`` images of an ``.npz``, in batches.

    Reads the array member of the zip file piece by piece (a ``.npy`` header, then raw rows), so memory
    holds one batch per rank at a time.

    Args:
        path: An ADM reference batch.
        batch_size: Images per yielded batch (the last may be shorter).
        rank: This rank.
        world_size: Number of ranks.
        limit: Use only the first ``limit`` images.

    Yields:
        uint8 ``(B, H, W, 3)`` arrays.

    Raises:
        DatasetError: If the file has no ``arr_0`` or it is not ``(N, H, W, 3)`` uint8 in C order.
    """
    p = Path(path)
    with zipfile.ZipFile(p) as zf:
        if "arr_0.npy" not in zf.namelist():
            raise DatasetError(f"{p}: no images (arr_0) in this .npz")
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise DatasetError(f"{p}: arr_0 has .npy format version {version}, expected 1.0 or 2.0")
            if fortran or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
                raise DatasetError(f"{p}: arr_0 is {'Fortran-ordered ' if fortran else ''}{dtype} {shape}, "
                                   "expected uint8 (N, H, W, 3) images")
            n = min(shape[0], limit) if limit else shape[0]
            row = int(np.prod(shape[1:]))
            step = batch_size * world_size
            for lo in range(0, n, step):
                count = min(step, n - lo)
                raw = f.read(count * row)
                if len(raw) != count * row:
                    raise DatasetError(f"{p}: arr_0 ends early (image {lo + len(raw) // row} of {shape[0]})")
                mine = np.frombuffer(raw, np.uint8).reshape(count, *shape[1:])[rank::world_size].copy()
                if len(mine):
                    yield mine


def text_to_image_reason(why: str) -> str:
    """Why a text-to-image FID is not comparable to published numbers, before :func:`comparability`'s ``why``."""
    return ("text-to-image FID has no named published protocol implemented here (COCO-30K needs its own captions, "
            f"images and resize); compare only with results of the same protocol; {why}")


def comparability(standard_weights: bool, reference: ReferenceStats, num_samples: int) -> tuple[bool, str]:
    """Whether a result is comparable to published (ADM-suite) numbers, and why (a short sentence).

    Comparable needs all of: the standard ``pt_inception-2015-12-05`` weights (checked by SHA-256), ADM's
    pipeline (TF1 resize, ``(x - 128) / 128``, ADM's feature definitions: always the case in this version),
    a reference of real images (an ADM reference batch's stored statistics, or statistics of real images
    computed by this pipeline with the standard weights: of an ADM batch's images, an image folder or
    pixel-space data; not VAE reconstructions), and
    :data:`PUBLISHED_NUM_SAMPLES` samples (FID falls as the sample count grows).

    Args:
        standard_weights: Whether the Inception weights are the standard file.
        reference: The reference statistics used (their ``source`` and provenance).
        num_samples: Generated samples evaluated.
    """
    reasons = []
    if not standard_weights:
        reasons.append("the Inception weights are not the standard pt_inception-2015-12-05 file (SHA-256)")
    src = reference.source
    if src == VAE_RECONSTRUCTIONS:
        reasons.append("the reference statistics come from VAE reconstructions of latents, not real images")
    elif src not in REAL_SOURCES:
        reasons.append("the reference .npz has no provenance (neither an ADM reference batch nor statistics "
                       "saved by this pipeline)")
    elif src != ADM_BATCH or reference.inception_sha256 is not None:  # computed here, not stored by ADM
        if reference.pipeline != PIPELINE:
            reasons.append(f"the reference statistics were computed by another pipeline ({reference.pipeline})")
        if not (reference.inception_sha256 and _is_standard(reference.inception_sha256)):
            reasons.append("the reference statistics were not computed with the standard Inception weights")
    if num_samples < PUBLISHED_NUM_SAMPLES:
        reasons.append(f"{num_samples} samples, published numbers use {PUBLISHED_NUM_SAMPLES}")
    if reasons:
        return False, "not comparable: " + "; ".join(reasons)
    what = {ADM_BATCH: "an ADM reference batch", IMAGES: "real images (image folder)",
            PIXEL_DATA: "real images (pixel-space dataset)"}[src]
    return True, (f"standard Inception weights, ADM's resize and features, {num_samples} samples, reference "
                  f"from {what}")


def _is_standard(sha256: str) -> bool:
    from tread_scale.evaluation.inception import STANDARD_WEIGHTS_SHA256

    return sha256 == STANDARD_WEIGHTS_SHA256
