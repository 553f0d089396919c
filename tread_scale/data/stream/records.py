"""Fast reads of MDS shards with fixed-size columns: a shard file is an array of equal records.

streaming's reader opens, seeks and reads the shard file twice per sample. Our shards (latent, label, id:
all fixed-size) are, after MDS's header of sample offsets, records laid back to back, so a memory map of
the file viewed as a structured array reads a sample as a row and a batch as one fancy index.
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from tread_scale.data.metadata import parse_ndarray_encoding

#: Columns of captioned datasets that the record view exposes when a shard has them.
TEXT_COLUMNS = ("text_emb", "text_mask", "text_pooled", "caption")

_RECORDS: "OrderedDict[str, tuple[np.ndarray, int]]" = OrderedDict()  # path -> (records, inode)
_RECORDS_PID = [0]
_MAX_MAPS = 64  # a shuffled batch reads from tens of shards; a mapping costs address space only


@dataclass(frozen=True)
class ShardLayout:
    """Where a shard's samples live: its local file and one sample's fields at their byte offsets."""

    path: str
    record: np.dtype  # one sample: latent, label and (when stored) id and text columns at their byte offsets


_LAYOUTS: "weakref.WeakKeyDictionary[Any, ShardLayout | None]" = weakref.WeakKeyDictionary()


def shard_layout(shard) -> ShardLayout | None:
    """Byte layout of a shard's samples when every column has a fixed size, else ``None`` (cached per shard)."""
    if shard not in _LAYOUTS:
        _LAYOUTS[shard] = _layout_of(shard)
    return _LAYOUTS[shard]


def _layout_of(shard) -> ShardLayout | None:
    names = list(getattr(shard, "column_names", []))
    sizes = list(getattr(shard, "column_sizes", []))
    raw = getattr(shard, "raw_data", None)
    if not (names and raw is not None and all(sizes) and "latent" in names and "label" in names):
        return None
    offsets = dict(zip(names, np.cumsum([0] + sizes[:-1]).tolist()))
    encodings = dict(zip(names, shard.column_encodings))
    dtype, dims = parse_ndarray_encoding(encodings["latent"]) if encodings["latent"].startswith("ndarray") \
        else ("", None)
    if dims is None or dtype not in ("float16", "float32", "float64") or encodings["label"] != "int":
        return None
    fields = {"latent": (np.dtype((np.dtype(dtype).newbyteorder("<"), tuple(dims))), offsets["latent"]),
              "label": (np.dtype("<i8"), offsets["label"])}
    if encodings.get("id") == "int":
        fields["id"] = (np.dtype("<i8"), offsets["id"])
    for name in TEXT_COLUMNS:  # captioned datasets' columns (tread_scale.data.conversion.captions): static ndarrays
        if name in encodings and encodings[name].startswith("ndarray"):
            col_dtype, col_dims = parse_ndarray_encoding(encodings[name])
            if col_dims is None or col_dtype == "unknown":
                return None
            fields[name] = (np.dtype((np.dtype(col_dtype).newbyteorder("<"), tuple(col_dims))), offsets[name])
    record = np.dtype({"names": list(fields), "formats": [f for f, _ in fields.values()],
                       "offsets": [o for _, o in fields.values()], "itemsize": int(sum(sizes))})
    return ShardLayout(path=os.path.join(shard.dirname, shard.split or "", raw.basename), record=record)


def shard_records(layout: ShardLayout) -> np.ndarray | None:
    """A local shard file's samples as a read-only structured array, cached per process (a few at a time).

    An MDS shard starts with its sample count and ``count + 1`` byte offsets; with fixed-size columns the
    samples follow back to back, which is checked here: any other layout gives ``None``.
    """
    if _RECORDS_PID[0] != os.getpid():  # a forked worker maps files itself
        _RECORDS.clear()
        _RECORDS_PID[0] = os.getpid()
    cached = _RECORDS.get(layout.path)
    if cached is not None:
        _RECORDS.move_to_end(layout.path)
        return cached[0]
    _forget_replaced()
    try:
        with open(layout.path, "rb") as f:
            inode = os.fstat(f.fileno()).st_ino
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    size = layout.record.itemsize
    count = int(np.frombuffer(mapping, "<u4", count=1)[0]) if len(mapping) >= 4 else -1
    offsets = np.frombuffer(mapping, "<u4", count=count + 1, offset=4) if 0 <= count < len(mapping) // 4 else None
    if offsets is None or not (np.diff(offsets) == size).all() or int(offsets[-1]) > len(mapping):
        return None
    records = np.frombuffer(mapping, layout.record, count=count, offset=int(offsets[0]))
    _RECORDS[layout.path] = (records, inode)
    while len(_RECORDS) > _MAX_MAPS:
        _RECORDS.popitem(last=False)  # the map closes when the last array over it is gone
    return records


def _forget_replaced() -> None:
    """Drop mappings of files since deleted or replaced (evicted shards), so their disk space is freed."""
    for path, (_, inode) in list(_RECORDS.items()):
        try:
            current = os.stat(path).st_ino
        except OSError:
            current = None
        if current != inode:
            del _RECORDS[path]

_EXPONENT = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Per sample of a float batch, whether all its values are finite.

    Tests the exponent bits (all ones: Inf or NaN) as integers, in scratch buffers kept per process:
    ``np.isfinite`` on float16 is ten times slower, and fresh temporaries of a batch's size cost page faults
    (together they were most of a batch read).
    """
    kind, mask = _EXPONENT[x.dtype.itemsize]
    bits = np.ascontiguousarray(x).reshape(len(x), -1).view(kind)
    key = (os.getpid(), bits.shape, kind)
    if _SCRATCH.get("key") != key:
        _SCRATCH.update(key=key, bits=np.empty(bits.shape, kind), hit=np.empty(bits.shape, bool))
    masked, hit = _SCRATCH["bits"], _SCRATCH["hit"]
    np.bitwise_and(bits, kind(mask), out=masked)
    np.equal(masked, kind(mask), out=hit)
    return ~hit.any(axis=1)


_SCRATCH: dict[str, Any] = {}
