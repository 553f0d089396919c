"""Helpers for data tests: read a converted dataset back completely, in id order."""

from __future__ import annotations

import numpy as np
from streaming.base.util import clean_stale_shared_memory

from tread_scale.data.stream.dataset import LatentStreamingDataset
from tread_scale.data.stream.location import default_cache, stream_location
from tread_scale.data.metadata import read_metadata


def read_back(root: str, cache: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All samples of a dataset as ``(ids, latents, labels)`` sorted by id."""
    clean_stale_shared_memory()
    meta = read_metadata(root)
    kwargs = stream_location(root, cache or default_cache(root))
    ds = LatentStreamingDataset(latent_shape=meta.latent_shape, num_classes=meta.num_classes, shuffle=False,
                                batch_size=1, **kwargs)
    items = sorted((int(s["id"]), s["latent"].numpy(), int(s["label"])) for s in (ds[i] for i in range(len(ds))))
    return (np.array([i for i, _, _ in items]), np.stack([x for _, x, _ in items]),
            np.array([y for _, _, y in items]))
