"""Reading a dataset's first samples straight from its shards, without a ``StreamingDataset``.

For the few samples that evaluation and sampling need at start (the captions of a sample grid, the fixed
validation set): ``index.json`` and only the shards that hold those samples are read from the root (a local
folder or ``s3://`` prefix, compressed or not). No cache folder, no shared memory, no collective, so any
rank may call it alone and every rank reads the same samples whatever the world size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from tread_scale.errors import DatasetError


def read_first_samples(remote: str, n: int, split: str | None = None,
                       columns: Sequence[str] = (), hint: str = "", start: int = 0) -> list[dict[str, Any]]:
    """The first ``n`` samples of an MDS dataset from sample ``start`` on (fewer if it is smaller), decoded.

    Args:
        remote: The dataset root (local folder or ``s3://`` prefix).
        n: Samples to read.
        split: The dataset's split folder, if any.
        columns: Columns every shard must have; a shard without one is refused, naming it.
        hint: Said after that refusal (what kind of dataset has the columns).
        start: Samples to pass over first (e.g. to a bucket's first sample); their shards are not read.

    Returns:
        One dict per sample (column name → decoded value, numpy arrays for ndarray columns).

    Raises:
        DatasetError: If the dataset is missing, a listed shard is missing, a shard lacks one of ``columns``,
            or the dataset holds no samples.
    """
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    from tread_scale.data.object_store import join_uri, read_bytes

    root = join_uri(remote, split) if split else remote
    raw_index = read_bytes(join_uri(root, "index.json"))
    if raw_index is None:
        raise DatasetError(f"{root}: no index.json (not an MDS dataset)")
    samples: list[dict[str, Any]] = []
    for obj in json.loads(raw_index)["shards"]:
        if len(samples) >= n:
            break
        if start >= int(obj["samples"]):
            start -= int(obj["samples"])
            continue
        reader = reader_from_json(str(root), None, obj)
        lacking = [c for c in columns if c not in reader.column_names]
        if lacking:
            raise DatasetError(f"{root}: shard {reader.raw_data.basename} has no column(s) {lacking}{hint}")
        data = read_bytes(join_uri(root, reader.raw_data.basename))
        if data is None and reader.zip_data is not None:
            zipped = read_bytes(join_uri(root, reader.zip_data.basename))
            data = decompress(reader.compression, zipped) if zipped is not None else None
        if data is None:
            raise DatasetError(f"{root}: shard {reader.raw_data.basename} is listed in index.json but missing")
        count = int(np.frombuffer(data, "<u4", count=1)[0])
        offsets = np.frombuffer(data, "<u4", count=count + 1, offset=4)
        for i in range(start, min(count, start + n - len(samples))):
            samples.append(reader.decode_sample(data[int(offsets[i]):int(offsets[i + 1])]))
        start = 0
    if not samples:
        raise DatasetError(f"{root}: the dataset holds no samples")
    return samples


def base_bucket(root: str) -> tuple[int, int]:
    """``(first sample, count)`` of the samples of the dataset's base shape
    (:func:`~tread_scale.data.metadata.base_range`); the whole dataset when it has no metadata.

    Raises:
        DatasetError: If the dataset has buckets but none of its base shape.
    """
    from tread_scale.data.metadata import META_FILE, LatentMetadata, base_range
    from tread_scale.data.object_store import join_uri, read_bytes

    where = join_uri(root, META_FILE)
    raw = read_bytes(where)
    if raw is None:
        return 0, 1 << 62
    start, stop = base_range(LatentMetadata.from_json(raw, where), root)
    return start, stop - start
