"""The training reader: MDS latents streamed by mosaicml-streaming, safe to fork.

:class:`LatentStreamingDataset` *is* a ``StreamingDataset`` (a subclass, never a wrapper, so Composer can
save and restore its position). It checks the shard columns against the model before training starts and
drops the S3 client that ``StreamingDataset.__init__`` used to fetch ``index.json``: mosaicml-streaming
0.13.0 otherwise hands that client, with its pooled keep-alive socket, to every forked DataLoader worker,
and workers then read each other's responses.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.dataset import _ShardState

from tread_scale.data.metadata import parse_ndarray_encoding
from tread_scale.errors import DatasetError, DatasetMismatchError, ObjectStoreError

log = logging.getLogger(__name__)


class LatentStreamingDataset(StreamingDataset):
    """Samples ``{"latent": (C, H, W) float16/32 tensor, "label": int64, "id": int64}`` from MDS shards.

    Args:
        latent_shape: Expected ``(C, H, W)``; the ``latent`` column must have exactly this static shape.
        num_classes: Labels must be in ``0..num_classes-1``; checked per sample.
        **kwargs: Passed to ``StreamingDataset`` (remote, local, batch_size, shuffle, …).

    Raises:
        DatasetMismatchError: If a column is missing or its shape/dtype disagrees with the model.
    """

    def __init__(self, *, latent_shape: tuple[int, int, int], num_classes: int, **kwargs: Any) -> None:
        import json

        where = kwargs.get("remote") or kwargs.get("local")
        try:
            super().__init__(**kwargs)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: index.json is truncated or corrupt ({e.msg} at line {e.lineno}); "
                               "re-run the conversion (it resumes) or restore the file") from None
        self.latent_shape = tuple(latent_shape)
        self.num_classes = num_classes
        self._check_columns(kwargs.get("remote") or kwargs.get("local"))
        self.drop_parent_clients()

    def drop_parent_clients(self) -> None:
        """Forget the object-store clients made in this process, so forked workers make their own."""
        for stream in self.streams:
            downloader = getattr(stream, "_downloader", None)
            if downloader is not None:
                downloader.clean_up()

    def _check_columns(self, where: str) -> None:
        for shard in self.shards:
            names = list(getattr(shard, "column_names", []))
            encodings = dict(zip(names, getattr(shard, "column_encodings", [])))
            basename = shard.raw_data.basename
            for col in ("latent", "label"):
                if col not in encodings:
                    raise DatasetMismatchError(f"{where}: shard {basename} has no {col!r} column (columns: {names})")
            dtype, shape = parse_ndarray_encoding(encodings["latent"])
            if shape != self.latent_shape:
                raise DatasetMismatchError(
                    f"{where}: shard {basename} stores latents of shape {shape} ({encodings['latent']}) but the model "
                    f"expects {self.latent_shape} (model.in_channels, model.input_size)"
                )
            if dtype not in ("float16", "float32", "bfloat16"):
                raise DatasetMismatchError(f"{where}: shard {basename} stores latents as {dtype}, not a float type")
            if encodings["label"] != "int":
                raise DatasetMismatchError(f"{where}: shard {basename} stores labels as {encodings['label']}, not int")

    def _remote_s3(self) -> str | None:
        remote = next((s.remote for s in self.streams if s.remote), None)
        return remote if remote and str(remote).startswith("s3://") else None

    def __iter__(self):
        try:
            yield from super().__iter__()
        except RuntimeError as e:
            remote = self._remote_s3()
            if remote and "Background thread failed" in str(e):
                from tread_scale.data.object_store import describe_endpoint

                raise ObjectStoreError(f"cannot fetch shards of {remote} from the S3 endpoint {describe_endpoint()}: "
                                       "a background download failed after all retries (its traceback is above); "
                                       "check that the endpoint is up and reachable, then rerun: the run "
                                       "autoresumes") from e
            raise

    # streaming 0.13.0 ends (and starts) an iteration by waiting, without a limit, until its prepare and
    # ready threads report that they exited; a thread that dies of an exception (a download against a dead
    # endpoint) never reports, and training hangs instead of failing (seen in the R3 fault test). Each
    # thread reports its exit when it dies; the failure itself still reaches training through streaming.

    @staticmethod
    def _reporting_exit(thread, it) -> None:
        try:
            thread(it)
        except BaseException:
            it.on_exit()
            raise

    def _prepare_thread(self, it) -> None:
        self._reporting_exit(super()._prepare_thread, it)

    def _ready_thread(self, it) -> None:
        self._reporting_exit(super()._ready_thread, it)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's download, but a failed download gives the shard back instead of leaving it "preparing".

        In mosaicml-streaming 0.13.0 a download that raises leaves the shard's shared state PREPARING, and
        any thread or process that then needs that shard waits for it for ever (a dead endpoint hangs
        training instead of failing it). Exceptions only come out of the downloading call, so resetting
        the state to REMOTE here is safe; the next reader retries the download and gets the error.
        """
        try:
            super().prepare_shard(shard_id, blocking)
        except BaseException:
            lock = self._cache_filelock
            lock.acquire()
            try:
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    self._shard_states[shard_id] = _ShardState.REMOTE
            finally:
                lock.release()
            raise

    def shard_name(self, sample_id: int) -> str:
        shard_id, _ = self.spanner[sample_id]
        return self.shards[shard_id].raw_data.basename

    def _mapped_sample(self, sample_id: int) -> dict[str, Any] | None:
        """Read a sample of a shard that is already local through a cached memory map (``None``: not possible).

        streaming's reader opens, seeks and reads the shard file twice per sample; with fixed-size columns
        (ours) a sample is two slices of a mapping instead. Anything unusual falls back to streaming.
        """
        if getattr(self, "_event", None) is not None and self._event.is_set():
            return None
        shard_id, index = self.spanner[sample_id]
        if self._shard_states[shard_id] != _LOCAL:
            return None
        layout = _layout(self.shards[shard_id])
        if layout is None:
            return None
        mapping = _shard_map(layout.path)
        if mapping is None:
            return None
        begin, end = _PAIR.unpack_from(mapping, 4 * (1 + index))
        if end - begin != layout.size:
            return None
        latent = np.frombuffer(mapping, dtype=layout.dtype, count=layout.count, offset=begin + layout.latent)
        raw = {"latent": latent.reshape(self.latent_shape),
               "label": int.from_bytes(mapping[begin + layout.label:begin + layout.label + 8], "little", signed=True)}
        if layout.id is not None:
            raw["id"] = int.from_bytes(mapping[begin + layout.id:begin + layout.id + 8], "little", signed=True)
        return raw

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        try:
            # streaming retries a sample's shard 1 + 7 times, each a download with its own download_retry
            # attempts: against a dead endpoint that is minutes. Twice is enough for the case the retry is
            # for (a shard evicted between download and read); the download itself retries.
            raw = self._mapped_sample(sample_id) or super().get_item(sample_id, min(retry, 1))
        except ValueError as e:
            if "Checksum failure" in str(e):
                raise DatasetError(f"shard {self.shard_name(sample_id)} is corrupt (checksum mismatch: {e}); delete "
                                   "the cached copy, or re-convert the dataset if the source is corrupt") from None
            raise
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 - download failures surface as many types (botocore, runtime, OS)
            remote = self._remote_s3()
            if remote:
                from tread_scale.data.object_store import describe_endpoint

                raise ObjectStoreError(f"cannot fetch shard {self.shard_name(sample_id)} of {remote} from the S3 "
                                       f"endpoint {describe_endpoint()} after retries: {type(e).__name__}: {e}") from e
            raise
        latent = raw["latent"]
        label = int(raw["label"])
        if not 0 <= label < self.num_classes:
            raise DatasetError(f"sample {sample_id} in shard {self.shard_name(sample_id)} has label {label}, "
                               f"outside 0..{self.num_classes - 1} (model.num_classes={self.num_classes})")
        if not np.isfinite(latent).all():
            raise DatasetError(f"sample {sample_id} in shard {self.shard_name(sample_id)} has NaN or Inf latents")
        return {
            "latent": torch.from_numpy(np.array(latent, copy=True)),
            "label": torch.tensor(label, dtype=torch.int64),
            "id": int(raw.get("id", sample_id)),
        }


_LOCAL = _ShardState.LOCAL
_PAIR = struct.Struct("<II")
_MAPS: "OrderedDict[str, mmap.mmap]" = OrderedDict()
_MAPS_PID = [0]
_MAX_MAPS = 16


@dataclass(frozen=True)
class _Layout:
    path: str
    size: int  # bytes per sample
    latent: int  # offset of the latent bytes in a sample
    dtype: np.dtype
    count: int
    label: int
    id: int | None


_NO_LAYOUT = "none"


def _layout(shard) -> _Layout | None:
    """Byte layout of a shard's samples when every column has a fixed size, else ``None``."""
    cached = getattr(shard, "_tread_layout", None)
    if cached is not None:
        return None if cached == _NO_LAYOUT else cached
    shard._tread_layout = _NO_LAYOUT
    names = list(getattr(shard, "column_names", []))
    sizes = list(getattr(shard, "column_sizes", []))
    raw = getattr(shard, "raw_data", None)
    if names and raw is not None and all(sizes) and "latent" in names and "label" in names:
        offsets = dict(zip(names, np.cumsum([0] + sizes[:-1]).tolist()))
        encoding = shard.column_encodings[names.index("latent")]
        dtype, dims = parse_ndarray_encoding(encoding) if encoding.startswith("ndarray") else ("", None)
        label_ok = shard.column_encodings[names.index("label")] == "int"
        id_ok = "id" in names and shard.column_encodings[names.index("id")] == "int"
        if dims is not None and dtype != "unknown" and label_ok:
            shard._tread_layout = _Layout(
                path=os.path.join(shard.dirname, shard.split or "", raw.basename), size=int(sum(sizes)),
                latent=offsets["latent"], dtype=np.dtype(dtype), count=int(np.prod(dims)),
                label=offsets["label"], id=offsets["id"] if id_ok else None)
    return None if shard._tread_layout == _NO_LAYOUT else shard._tread_layout


def _shard_map(path: str) -> mmap.mmap | None:
    """A read-only memory map of a local shard file, cached per process (a few at a time)."""
    if _MAPS_PID[0] != os.getpid():  # a forked worker maps files itself
        _MAPS.clear()
        _MAPS_PID[0] = os.getpid()
    mapping = _MAPS.get(path)
    if mapping is not None:
        _MAPS.move_to_end(path)
        return mapping
    try:
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    _MAPS[path] = mapping
    while len(_MAPS) > _MAX_MAPS:
        _MAPS.popitem(last=False)[1].close()
    return mapping


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack latents and labels; keep ids a Python list (they seed per-sample draws on the host, no sync)."""
    return {
        "latent": torch.stack([s["latent"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "id": [s["id"] for s in samples],
    }
