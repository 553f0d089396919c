"""The training reader: MDS latents streamed by mosaicml-streaming, safe to fork.

:class:`LatentStreamingDataset` *is* a ``StreamingDataset`` (through
:class:`~tread_scale.compat.streaming.PatchedStreamingDataset`, which holds every change to streaming's
internals; never a wrapper, so Composer can save and restore its position). It checks the shard columns
against the model before training starts.

Training reads it ``batched`` through :class:`BatchLoader`: a worker reads a whole batch per shard with one
fancy index over a memory map (:mod:`tread_scale.data.stream.records`); the batches, their order and resumption
are exactly those of a ``DataLoader(batch_size=…, drop_last=True)`` over the same dataset (tested).

Captioned datasets (``tread-scale convert captions``) read with ``text_shape`` set also carry ``text_emb``,
``text_mask``, ``text_pooled`` and ``caption``; without ``text_shape`` every dataset reads as before.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from tread_scale.compat.streaming import PatchedStreamingDataset
from tread_scale.data.metadata import parse_ndarray_encoding
from tread_scale.data.metadata import decode_captions
from tread_scale.data.stream.records import TEXT_COLUMNS, finite_rows, shard_layout, shard_records
from tread_scale.data.stream.worker_watch import WorkerWatch, batch_wait_bound, describe_ids, note, watched
from tread_scale.errors import DatasetError, DatasetMismatchError, ObjectStoreError

log = logging.getLogger(__name__)


class LatentStreamingDataset(PatchedStreamingDataset):
    """Samples ``{"latent": (C, H, W) float16/32 tensor, "label": int64, "id": int64}`` from MDS shards.

    With ``text_shape=(L, D, P)`` (a captioned dataset's ``meta.text.shape``) samples also hold
    ``text_emb`` ``(L, D)`` float16, ``text_mask`` ``(L,)`` bool, ``text_pooled`` ``(P,)`` float16 and, when
    ``captions``, ``caption`` (str); batches stack them to ``(B, L, D)``, ``(B, L)``, ``(B, P)`` and a list
    of ``B`` strings.

    Args:
        latent_shape: Expected ``(C, H, W)``; the ``latent`` column must have exactly this static shape.
        num_classes: Labels must be in ``0..num_classes-1``; checked per sample.
        text_shape: ``(seq_len, emb_dim, pooled_dim)`` of a captioned dataset's text columns, which must
            have exactly these shapes; ``None`` reads latents and labels only (text columns are ignored).
        captions: With ``text_shape``, also decode the caption strings (cheap: a fixed-width column).
        stall_timeout: Seconds any wait of the data path (a shard another process prepares, the next ready
            window) may last without progress before the read fails with :class:`DataStallError`, which
            names the shard, its state, the rank and the node; every thread's stack goes to stderr.
        batched: Iterate whole batches of ``batch_size`` samples (each what :func:`collate_latents` makes of
            them, read with :meth:`get_batch`) instead of single samples; a worker's last incomplete batch is
            dropped, as a ``DataLoader(drop_last=True)`` drops it. Pair with :class:`BatchLoader`.
        buckets: A bucketed dataset's ``LatentMetadata.buckets`` (``latent_shape``, ``start``, ``count`` each):
            latents then have their bucket's shape, and every batch holds one bucket
            (:mod:`tread_scale.data.stream.buckets`). ``latent_shape`` is then the
            model's configured shape, not checked against the shards.
        **kwargs: Passed to ``StreamingDataset`` (remote, local, batch_size, shuffle, …).

    Raises:
        DatasetMismatchError: If a column is missing or its shape/dtype disagrees with the model.
    """

    def __init__(self, *, latent_shape: tuple[int, int, int], num_classes: int, batched: bool = False,
                 stall_timeout: float = 300.0, text_shape: tuple[int, int, int] | None = None, captions: bool = True,
                 buckets: list[dict] | None = None, **kwargs: Any) -> None:
        import json

        where = kwargs.get("remote") or kwargs.get("local")
        ranges = None if not buckets else [(int(b["start"]), int(b["count"])) for b in buckets]
        self.bucket_shapes = None if not buckets else {tuple(int(x) for x in b["latent_shape"]) for b in buckets}
        try:
            super().__init__(batched=batched, stall_timeout=stall_timeout, bucket_ranges=ranges, **kwargs)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: index.json is truncated or corrupt ({e.msg} at line {e.lineno}); "
                               "re-run the conversion (it resumes) or restore the file") from None
        self.latent_shape = tuple(latent_shape)
        self.num_classes = num_classes
        self.text_shape = None if text_shape is None else tuple(int(x) for x in text_shape)
        self.captions = bool(captions) and text_shape is not None
        self._caption_width: int | None = None
        self._check_columns(where)

    def _check_columns(self, where: str) -> None:
        for shard in self.shards:
            names = list(getattr(shard, "column_names", []))
            encodings = dict(zip(names, getattr(shard, "column_encodings", [])))
            basename = shard.raw_data.basename
            for col in ("latent", "label"):
                if col not in encodings:
                    raise DatasetMismatchError(f"{where}: shard {basename} has no {col!r} column (columns: {names})")
            dtype, shape = parse_ndarray_encoding(encodings["latent"])
            if self.bucket_shapes is not None:
                if shape not in self.bucket_shapes:
                    raise DatasetMismatchError(
                        f"{where}: shard {basename} stores latents of shape {shape} ({encodings['latent']}), none of "
                        f"the buckets of the metadata ({sorted(self.bucket_shapes)}): metadata and shards are of "
                        "different conversions")
            elif shape != self.latent_shape:
                raise DatasetMismatchError(
                    f"{where}: shard {basename} stores latents of shape {shape} ({encodings['latent']}) but the model "
                    f"expects {self.latent_shape} (model.in_channels, model.input_size)"
                )
            if dtype not in ("float16", "float32", "bfloat16"):
                raise DatasetMismatchError(f"{where}: shard {basename} stores latents as {dtype}, not a float type")
            if encodings["label"] != "int":
                raise DatasetMismatchError(f"{where}: shard {basename} stores labels as {encodings['label']}, not int")
            if self.text_shape is not None:
                self._check_text_columns(where, basename, names, encodings)

    def _check_text_columns(self, where: str, basename: str, names: list[str], encodings: dict[str, str]) -> None:
        seq, emb, pooled = self.text_shape
        expected = {"text_emb": ("float16", (seq, emb)), "text_mask": ("uint8", (seq,)),
                    "text_pooled": ("float16", (pooled,))}
        for col, (dtype, shape) in expected.items():
            if col not in encodings:
                raise DatasetMismatchError(f"{where}: shard {basename} has no {col!r} column (columns: {names}); is it "
                                           "a captioned dataset (tread-scale convert captions)?")
            got = parse_ndarray_encoding(encodings[col])
            if got != (dtype, shape):
                raise DatasetMismatchError(f"{where}: shard {basename} stores {col} as {encodings[col]} but "
                                           f"ndarray:{dtype}:{','.join(map(str, shape))} is expected (text_shape "
                                           f"{self.text_shape} from the dataset's metadata)")
        if self.captions:
            dtype, shape = parse_ndarray_encoding(encodings.get("caption", "ndarray"))
            if dtype != "uint8" or shape is None or len(shape) != 1:
                raise DatasetMismatchError(f"{where}: shard {basename} has no fixed-width 'caption' column "
                                           f"({encodings.get('caption')}); read it with captions=False")
            if self._caption_width not in (None, shape[0]):
                raise DatasetMismatchError(f"{where}: shard {basename} stores captions of {shape[0]} bytes, other "
                                           f"shards of {self._caption_width}: the dataset mixes conversions")
            self._caption_width = shape[0]

    def _remote_s3(self) -> str | None:
        remote = next((s.remote for s in self.streams if s.remote), None)
        return remote if remote and str(remote).startswith("s3://") else None

    def background_failure(self) -> Exception:
        """A failed background download of an ``s3://`` dataset names the endpoint; others as upstream's."""
        remote = self._remote_s3()
        if remote is None or isinstance(self.background_error, DatasetError):
            return super().background_failure()
        from tread_scale.data.object_store import describe_endpoint

        err = self.background_error
        cause = f"{type(err).__name__}: {err}" if err is not None else "its traceback is above"
        return ObjectStoreError(f"cannot fetch shards of {remote} from the S3 endpoint {describe_endpoint()}: "
                                f"a background download failed after all retries ({cause}); check that the "
                                "endpoint is up and reachable, then rerun: the run autoresumes")

    def shard_name(self, sample_id: int) -> str:
        shard_id, _ = self.spanner[sample_id]
        return self.shards[shard_id].raw_data.basename

    def _records(self, shard_id: int) -> np.ndarray | None:
        """All samples of a local shard as one structured array over a memory map (``None``: not possible).

        streaming's reader opens, seeks and reads the shard file twice per sample; with fixed-size columns
        (ours) a shard is an array of equal records, so a sample is a row and a batch one fancy index.
        Anything unusual (not local yet, variable-size columns, a background failure) returns ``None`` and
        the caller falls back to streaming's reader.
        """
        if not self.shard_is_local(shard_id):
            return None
        layout = shard_layout(self.shards[shard_id])
        if layout is None:
            return None
        records = shard_records(layout)
        if records is not None:
            self.note_shard_access(shard_id)  # as streaming's reader does, for eviction
        return records

    def _mapped_sample(self, sample_id: int) -> dict[str, Any] | None:
        """One sample through :meth:`_records`, or ``None``."""
        shard_id, index = self.spanner[sample_id]
        records = self._records(shard_id)
        if records is None:
            return None
        row = records[index]
        raw = {"latent": row["latent"], "label": int(row["label"])}
        if "id" in records.dtype.names:
            raw["id"] = int(row["id"])
        if self.text_shape is not None:
            for col in TEXT_COLUMNS:
                if col in records.dtype.names:
                    raw[col] = row[col]
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
        self._check([sample_id], np.array([label]), latent[None])
        sample = {
            "latent": torch.from_numpy(np.array(latent, copy=True)),
            "label": torch.tensor(label, dtype=torch.int64),
            "id": int(raw.get("id", sample_id)),
        }
        if self.text_shape is not None:
            sample["text_emb"] = torch.from_numpy(np.array(raw["text_emb"], dtype=np.float16))
            sample["text_mask"] = torch.from_numpy(np.array(raw["text_mask"]).astype(bool))
            sample["text_pooled"] = torch.from_numpy(np.array(raw["text_pooled"], dtype=np.float16))
            if self.captions:
                sample["caption"] = decode_captions(raw["caption"])[0]
        return sample

    def get_batch(self, sample_ids: Sequence[int]) -> dict[str, Any]:
        """Samples as one collated batch (what :func:`collate_latents` makes of their :meth:`get_item`).

        Reads each shard's rows with one fancy index and checks labels and finiteness once per batch;
        falls back to :meth:`get_item` per sample when a shard cannot be mapped.
        """
        ids = np.asarray(sample_ids, dtype=np.int64)
        shards = self.shard_of(ids)
        if not watched():  # the main process, or an unwatched loader: no note to describe the batch for
            return self._read_batch(ids, shards)
        what = describe_ids(ids, [self.shards[i].raw_data.basename for i in np.unique(shards).tolist()])
        note(f"reading {what}")
        batch = self._read_batch(ids, shards)
        note(f"handed over {what}")
        return batch

    def _read_batch(self, ids: np.ndarray, shards: np.ndarray) -> dict[str, Any]:
        rows = ids - self.sample_offset_per_shard[shards]
        latents, labels, out_ids = None, np.empty(len(ids), np.int64), ids.copy()
        text = self._text_buffers(len(ids))
        for shard_id in np.unique(shards).tolist():
            records = self._records(shard_id)
            if records is None or (latents is not None and records.dtype["latent"].base != latents.dtype) \
                    or not all(col in records.dtype.names for col in text):
                return collate_latents([self.get_item(int(i)) for i in ids])
            at = np.flatnonzero(shards == shard_id)
            picked = records[rows[at]]
            if latents is None:
                latents = np.empty((len(ids), *records.dtype["latent"].shape), records.dtype["latent"].base)
            elif records.dtype["latent"].shape != latents.shape[1:]:
                raise DatasetError(f"a batch mixes latent shapes {latents.shape[1:]} and {records.dtype['latent'].shape} "
                                   f"(shard {self.shards[shard_id].raw_data.basename}): a bucketed dataset read "
                                   "without its buckets?")
            latents[at] = picked["latent"]
            labels[at] = picked["label"]
            if "id" in records.dtype.names:
                out_ids[at] = picked["id"]
            for col, buffer in text.items():
                buffer[at] = picked[col]
        if latents is None:
            raise DatasetError("get_batch needs at least one sample id")
        self._check(ids, labels, latents)
        batch = {"latent": torch.from_numpy(latents), "label": torch.from_numpy(labels), "id": out_ids.tolist()}
        if text:
            batch["text_emb"] = torch.from_numpy(text["text_emb"])
            batch["text_mask"] = torch.from_numpy(text["text_mask"].view(np.bool_))  # stored 0/1
            batch["text_pooled"] = torch.from_numpy(text["text_pooled"])
            if "caption" in text:
                batch["caption"] = decode_captions(text["caption"])
        return batch

    def _text_buffers(self, n: int) -> dict[str, np.ndarray]:
        """Empty arrays for a batch's text columns (none without ``text_shape``)."""
        if self.text_shape is None:
            return {}
        seq, emb, pooled = self.text_shape
        buffers = {"text_emb": np.empty((n, seq, emb), np.float16), "text_mask": np.empty((n, seq), np.uint8),
                   "text_pooled": np.empty((n, pooled), np.float16)}
        if self.captions:
            buffers["caption"] = np.empty((n, self._caption_width), np.uint8)
        return buffers

    def _check(self, ids: Sequence[int], labels: np.ndarray, latents: np.ndarray) -> None:
        """Raise for the first sample whose label is out of range or whose latent is not finite."""
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if len(bad):
            i = int(ids[bad[0]])
            raise DatasetError(f"sample {i} in shard {self.shard_name(i)} has label {int(labels[bad[0]])}, "
                               f"outside 0..{self.num_classes - 1} (model.num_classes={self.num_classes})")
        finite = finite_rows(latents)
        if not finite.all():
            i = int(ids[np.flatnonzero(~finite)[0]])
            raise DatasetError(f"sample {i} in shard {self.shard_name(i)} has NaN or Inf latents")


class BatchLoader(DataLoader):
    """A ``DataLoader`` over a batched :class:`LatentStreamingDataset` (see ``batched``).

    The dataset collates, so this loader only moves whole batches (through workers and pinned memory);
    its length is the number of batches, as a batching ``DataLoader`` with ``drop_last`` reports it.

    With workers, the wait for each batch is bounded (:mod:`tread_scale.data.stream.worker_watch`): no batch
    within ``batch_timeout`` seconds (default :func:`~tread_scale.data.stream.worker_watch.batch_wait_bound` of
    the dataset's ``stall_timeout``) raises :class:`~tread_scale.errors.DataStallError` naming every
    worker's pid, state and last activity, after their stacks were asked for and the workers ended.

    Args:
        dataset: A dataset made with ``batched=True``.
        batch_timeout: Seconds to wait for a batch from the workers (``None``: derived from the dataset's
            ``stall_timeout``); ignored without workers, where the dataset's own waits are bounded.
        **kwargs: ``DataLoader`` arguments other than batching ones (num_workers, pin_memory, …).
    """

    def __init__(self, dataset: LatentStreamingDataset, batch_timeout: float | None = None, **kwargs: Any) -> None:
        if not getattr(dataset, "batched", False):
            raise ValueError("BatchLoader needs a LatentStreamingDataset made with batched=True")
        self.watch: WorkerWatch | None = None
        self._live = None
        workers = int(kwargs.get("num_workers", 0) or 0)
        if workers > 0:
            if "worker_init_fn" in kwargs:
                raise ValueError("BatchLoader sets worker_init_fn itself (it watches its workers)")
            bound = batch_timeout or batch_wait_bound(dataset.stall_timeout)
            self.watch = WorkerWatch(workers, kwargs.get("multiprocessing_context"), bound)
            kwargs["worker_init_fn"] = self.watch
        super().__init__(dataset, batch_size=None, collate_fn=_as_is, **kwargs)

    def __len__(self) -> int:
        if self.dataset.bucket_ranges is not None:
            return self.dataset.bucketed_steps()
        return len(self.dataset) // self.dataset.batch_size

    def __iter__(self):
        iterator = super().__iter__()
        if self.watch is None:
            return iterator
        self._live = iterator
        return _WatchedIterator(iterator, self)

    def end_workers(self, timeout: float = 5.0, why: str = "") -> list[int]:
        """End the workers of the live iterator within ``timeout`` s (``SIGKILL`` past it); returns killed pids.

        Nothing on the way out of training then waits on a worker that cannot answer (issue 20).
        """
        from tread_scale.compat.torch import end_dataloader_workers

        if self.watch is not None:
            self.watch.close()
        live, self._live = self._live, None
        return [] if live is None else end_dataloader_workers(live, timeout, why)


class _WatchedIterator:
    """A DataLoader iterator whose every wait for a batch is armed on the loader's watch (see :class:`BatchLoader`)."""

    def __init__(self, iterator, loader: BatchLoader) -> None:
        self._iterator = iterator
        self._loader = loader

    def __iter__(self):
        return self

    def __next__(self):
        watch = self._loader.watch
        watch.arm()
        try:
            batch = next(self._iterator)
        except StopIteration:
            raise
        except BaseException:
            if watch.fired is None:
                raise
            batch = None
        finally:
            watch.disarm()
        if watch.fired is not None:  # the workers were killed while (or just after) this batch arrived
            watch.returned()
            self._loader.end_workers(1.0)
            raise watch.fired from None
        return batch

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name: str):
        return getattr(self._iterator, name)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch




def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack latents and labels; keep ids a Python list (they seed per-sample draws on the host, no sync).

    Text fields, when the samples have them, are stacked too; captions stay a list of strings.
    """
    batch = {
        "latent": torch.stack([s["latent"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "id": [s["id"] for s in samples],
    }
    for key in ("text_emb", "text_mask", "text_pooled"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    if "caption" in samples[0]:
        batch["caption"] = [s["caption"] for s in samples]
    return batch
