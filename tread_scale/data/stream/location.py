"""Where streaming reads a dataset from and where it may write: the ``remote``/``local`` pair of a stream.

mosaicml-streaming coordinates its cache folder through shared memory and file locks that exist once per
*node*. A folder written by several nodes at once (a cache or a dataset on a shared file system) is
therefore raced: two nodes decompress the same shard through the same temporary file, one of them fails
on the rename, and its peers on that node may wait for the shard for ever (issue 12). So a dataset
folder is only ever read in place when there is nothing to write (every shard uncompressed); anything to
download or decompress goes to a cache folder of the node's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from tread_scale.data import object_store as s3
from tread_scale.errors import ConfigError, DatasetError


def compressed_shards(root: str, split: str | None = None) -> int:
    """How many shards of the local MDS dataset ``root`` exist only compressed (no raw file beside them).

    Raises:
        ConfigError: If ``root`` has no ``index.json``.
        DatasetError: If the index cannot be read.
    """
    folder = Path(root, split or "")
    index = folder / "index.json"
    if not index.is_file():
        raise ConfigError(f"{root!r}: no index.json there (not an MDS dataset)")
    try:
        shards = json.loads(index.read_text())["shards"]
    except (ValueError, KeyError) as e:
        raise DatasetError(f"{index}: index.json is truncated or corrupt ({e}); re-run the conversion") from None
    missing = 0
    for shard in shards:
        for raw_key, zip_key in (("raw_data", "zip_data"), ("raw_meta", "zip_meta")):
            raw, packed = shard.get(raw_key), shard.get(zip_key)
            if packed and not (raw and (folder / raw["basename"]).is_file()):
                missing += 1
                break
    return missing


def stream_location(source: str, cache: str | None, split: str | None = None) -> dict[str, str | None]:
    """``remote``/``local`` for a stream over ``source`` (``s3://…`` or a local MDS folder).

    Args:
        source: The dataset.
        cache: This node's own cache folder (``None``: streaming's default under the node's temp dir).
        split: The dataset's split subfolder, if any.

    Returns:
        ``{"remote": source, "local": cache}`` when shards must be downloaded or decompressed, and
        ``{"remote": None, "local": source}`` for a local folder of uncompressed shards (read in place,
        nothing written).
    """
    if s3.is_s3(source) or compressed_shards(source, split):
        return {"remote": source, "local": cache}
    return {"remote": None, "local": source}


def default_cache(source: str) -> str:
    """A cache folder for ``source`` on this node when none is configured (tools outside training).

    Under the node's temp dir, keyed by the source, the content of its ``index.json`` and the node rank: ranks
    of one node agree on it, reruns reuse it, and a dataset converted again in place (another ``index.json``)
    gets a fresh folder instead of the old conversion's cached index and shards (streaming trusts a cached
    ``index.json``).
    """
    index = s3.read_bytes(s3.join_uri(source, "index.json")) or b""
    key = hashlib.blake2s(source.encode() + b"\0" + index, digest_size=8).hexdigest()
    return str(Path(tempfile.gettempdir(), "tread_scale-cache", key, f"node{os.environ.get('NODE_RANK', '0')}"))
