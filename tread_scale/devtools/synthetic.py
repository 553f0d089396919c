"""Random latent datasets for tests and benchmarks, written straight to MDS (no images, no VAE)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tread_scale.data.conversion.writer import merge_group_indexes


def write_bucketed_latents(root: str | Path, shapes_counts: Sequence[tuple[tuple[int, int, int], int]],
                           num_classes: int = 3, seed: int = 0, shard_size: str = "4kb") -> list[dict]:
    """Random float16 latents in aspect-ratio buckets, as ``convert ... --buckets`` lays them out.

    Each bucket is a group folder of shards of one latent shape, merged into one ``index.json``; samples of
    bucket ``k`` are the contiguous ids after those of buckets ``0..k-1``.

    Args:
        root: Output folder (created).
        shapes_counts: ``((C, H, W), count)`` of each bucket, in sample-id order.
        num_classes: Labels cycle through ``0..num_classes-1``.
        seed: Seed of the latents.
        shard_size: MDS shard size limit.

    Returns:
        The buckets as ``LatentMetadata.buckets`` lists them (``latent_shape``, ``start``, ``count``).
    """
    from streaming import MDSWriter

    root = Path(root)
    rng = np.random.default_rng(seed)
    buckets, groups, start = [], [], 0
    for k, (shape, count) in enumerate(shapes_counts):
        group = f"group-{k:05d}"
        cols = {"latent": "ndarray:float16:" + ",".join(map(str, shape)), "label": "int", "id": "int"}
        with MDSWriter(out=str(root / group), columns=cols, size_limit=shard_size) as writer:
            for i in range(start, start + count):
                writer.write({"latent": rng.standard_normal(shape).astype(np.float16), "label": i % num_classes,
                              "id": i})
        buckets.append({"latent_shape": list(shape), "start": start, "count": count})
        groups.append(group)
        start += count
    merge_group_indexes(root, groups)
    return buckets
