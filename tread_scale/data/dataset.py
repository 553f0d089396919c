"""The training reader: MDS latents streamed by mosaicml-streaming, safe to fork.

:class:`LatentStreamingDataset` *is* a ``StreamingDataset`` (a subclass, never a wrapper, so Composer can
save and restore its position). It checks the shard columns against the model before training starts and
drops the S3 client that ``StreamingDataset.__init__`` used to fetch ``index.json``: mosaicml-streaming
0.13.0 otherwise hands that client, with its pooled keep-alive socket, to every forked DataLoader worker,
and workers then read each other's responses.

Training reads it ``batched`` through :class:`BatchLoader`: a worker reads a whole batch per shard with one
fancy index over a memory map (:mod:`tread_scale.data.records`) and streaming's per-sample background
loops run per window of samples; the batches, their order and resumption are exactly those of a
``DataLoader(batch_size=…, drop_last=True)`` over the same dataset (tested).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.constant import TICK
from streaming.base.dataset import _ShardState
from torch.utils.data import DataLoader

from tread_scale.data.metadata import parse_ndarray_encoding
from tread_scale.data.records import finite_rows, shard_layout, shard_records
from tread_scale.cluster.diagnostics import dump_threads, whereabouts
from tread_scale.errors import DatasetError, DatasetMismatchError, DataStallError, ObjectStoreError

log = logging.getLogger(__name__)


class LatentStreamingDataset(StreamingDataset):
    """Samples ``{"latent": (C, H, W) float16/32 tensor, "label": int64, "id": int64}`` from MDS shards.

    Args:
        latent_shape: Expected ``(C, H, W)``; the ``latent`` column must have exactly this static shape.
        num_classes: Labels must be in ``0..num_classes-1``; checked per sample.
        stall_timeout: Seconds any wait of the data path (a shard another process prepares, the next ready
            window) may last without progress before the read fails with :class:`DataStallError`, which
            names the shard, its state, the rank and the node; every thread's stack goes to stderr.
        batched: Iterate whole batches of ``batch_size`` samples (each what :func:`collate_latents` makes of
            them, read with :meth:`get_batch`) instead of single samples; a worker's last incomplete batch is
            dropped, as a ``DataLoader(drop_last=True)`` drops it. Pair with :class:`BatchLoader`.
        **kwargs: Passed to ``StreamingDataset`` (remote, local, batch_size, shuffle, …).

    Raises:
        DatasetMismatchError: If a column is missing or its shape/dtype disagrees with the model.
    """

    def __init__(self, *, latent_shape: tuple[int, int, int], num_classes: int, batched: bool = False,
                 stall_timeout: float = 300.0, **kwargs: Any) -> None:
        import json

        where = kwargs.get("remote") or kwargs.get("local")
        try:
            super().__init__(**kwargs)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: index.json is truncated or corrupt ({e.msg} at line {e.lineno}); "
                               "re-run the conversion (it resumes) or restore the file") from None
        self.latent_shape = tuple(latent_shape)
        self.num_classes = num_classes
        self.batched = batched
        if not stall_timeout > 0:
            raise DatasetError(f"stall_timeout={stall_timeout} must be a positive number of seconds (data.stall_timeout)")
        self.stall_timeout = float(stall_timeout)
        self._background_error: BaseException | None = None
        if batched and not self.batch_size:
            raise DatasetError("a batched LatentStreamingDataset needs batch_size (the per-rank batch)")
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
            if "Background thread failed" in str(e):
                raise self._background_failure() from (self._background_error or e)
            raise
        # streaming 0.13.0 ends the epoch *normally* when a background thread failed: its sample loop stops
        # on the failure event and the iterator returns, so the rank silently trains on fewer batches (or
        # none) while its peers wait for it. A failure is an error here.
        if getattr(self, "_event", None) is not None and self._event.is_set():
            raise self._background_failure() from self._background_error

    def _background_failure(self) -> Exception:
        """The error to raise in the training process for a failed download or ready thread."""
        err = self._background_error
        if isinstance(err, DatasetError):
            return DataStallError(str(err)) if isinstance(err, DataStallError) else DatasetError(str(err))
        remote = self._remote_s3()
        cause = f"{type(err).__name__}: {err}" if err is not None else "see the traceback above"
        if remote:
            from tread_scale.data.object_store import describe_endpoint

            return ObjectStoreError(f"cannot fetch shards of {remote} from the S3 endpoint {describe_endpoint()}: "
                                    f"a background download failed after all retries ({cause}); "
                                    "check that the endpoint is up and reachable, then rerun: the run autoresumes")
        where = next((s.remote or s.local for s in self.streams), "?")
        return DatasetError(f"reading shards of {where} failed in a background thread on {whereabouts()}: {cause}")

    # The three loops of an epoch. streaming 0.13.0 runs each of them once per *sample*: its download
    # thread takes a file lock and stats the shard file per sample, and all three compete for the GIL with
    # the reads. Ours step through the epoch's sample ids a window at a time (each shard of a window is
    # prepared or waited for once) and, batched, hand whole batches of ids to __getitem__. They keep
    # streaming's protocol: the same indices into the same ids (so partition, resumption and predownload are
    # streaming's), and each loop reports its exit.

    def _window(self, it, index: int) -> int:
        """End of the next window of ids from ``index``, within ``predownload`` of what was yielded."""
        end = min(it.total, index + _WINDOW)
        if self.predownload is not None:
            end = min(end, max(index + 1, it.yield_index + self.predownload + 1))
        return end

    def _ahead(self, it, index: int) -> bool:
        return self.predownload is not None and index - it.yield_index > self.predownload

    def _shard_of(self, ids: np.ndarray) -> np.ndarray:
        """The shard of each sample id (``self.spanner`` for a whole array at once)."""
        return np.searchsorted(self.sample_offset_per_shard, ids, side="right") - 1

    def _shards_of(self, ids: np.ndarray) -> np.ndarray:
        """The shards of sample ids, in order of first appearance, without repeats (``-1`` ids skipped)."""
        shards = self._shard_of(ids[ids >= 0])
        unique, first = np.unique(shards, return_index=True)
        return unique[np.argsort(first)]

    def _prepare_thread(self, it) -> None:
        self._reporting_exit(self._prepare_loop, it)

    def _prepare_loop(self, it) -> None:
        while not (it.should_exit() or self._event.is_set()):
            if it.ready_index == it.total:  # nothing left to wait for: let the epoch end
                it.prepare_index = it.total
            if it.prepare_index == it.total:
                break
            if self._ahead(it, it.prepare_index):
                time.sleep(TICK)
                continue
            end = self._window(it, it.prepare_index)
            for shard_id in self._shards_of(it.sample_ids[it.prepare_index:end]).tolist():
                if not self._touch_if_ready(shard_id):
                    self.prepare_shard(shard_id, False)
            it.prepare_index = end
        it.on_exit()

    def _touch_if_ready(self, shard_id: int) -> bool:
        """For a shard that is local and decompressed, what ``prepare_shard`` does, without its file lock.

        ``prepare_shard`` of such a shard only checks the file and notes the access time (for eviction),
        but under a file lock that cost a fifth of a worker's time. The time is noted without the lock, as
        streaming's own reader does.
        """
        layout = shard_layout(self.shards[shard_id])
        if self._shard_states[shard_id] != _LOCAL or layout is None or not os.path.isfile(layout.path):
            return False
        self._shard_access_times[shard_id] = time.time_ns()
        return True

    def _ready_thread(self, it) -> None:
        self._reporting_exit(self._ready_loop, it)

    def _ready_loop(self, it) -> None:
        while not (it.should_exit() or self._event.is_set()) and it.ready_index < it.total:
            if self._ahead(it, it.ready_index):
                time.sleep(TICK)
                continue
            end = self._window(it, it.ready_index)
            for shard_id in self._shards_of(it.sample_ids[it.ready_index:end]).tolist():
                self._wait_local(shard_id, it)
            it.ready_index = end
        it.on_exit()

    def _wait_local(self, shard_id: int, it=None) -> None:
        """Wait until a shard is local, preparing it whenever nobody is; bounded by ``stall_timeout``.

        A shard can go back to REMOTE *while* we wait: evicted, or given back by a preparer whose download
        failed (:meth:`prepare_shard`). streaming 0.13.0 checked for that once, before waiting, so such a
        shard was waited for for ever (the two-node hang of issue 12); here every tick re-checks it.
        """
        started = time.monotonic()
        while True:
            state = self._shard_states[shard_id]
            event = getattr(self, "_event", None)
            if state == _LOCAL or (event is not None and event.is_set()) or (it is not None and it.should_exit()):
                return
            if state == _ShardState.REMOTE:
                self._prepare_now(shard_id)  # ours to download now (raises on failure)
                continue
            if time.monotonic() - started > self.stall_timeout:
                raise self._stall(shard_id, f"waited {time.monotonic() - started:.0f} s for it to become local")
            time.sleep(TICK)

    def _stall(self, shard_id: int, what: str) -> DataStallError:
        """A :class:`DataStallError` about one shard (after dumping every thread's stack to stderr)."""
        state = _ShardState(int(self._shard_states[shard_id])).name
        shard = self.shards[shard_id].raw_data.basename
        stream = self.streams[self.stream_per_shard[shard_id]]
        hint = {"PREPARING": "another thread or process on this node claimed it and has not finished: a hung "
                             "download, a process that died mid-download, or a cache folder shared with "
                             "another node",
                "REMOTE": "nobody downloads it"}.get(state, "")
        message = (f"data stall on {whereabouts()}: shard {shard} of {stream.remote or stream.local} is {state}; "
                   f"{what} (data.stall_timeout={self.stall_timeout:g} s){': ' + hint if hint else ''}")
        dump_threads(message)
        return DataStallError(message)

    def _each_sample_id(self, it):
        """Ready sample ids one at a time or, batched, as batches of ``batch_size`` (a last short one dropped)."""
        batch, ids = _IdBatch(), it.sample_ids
        waiting_since = None
        while not (it.should_exit() or it.yield_index == it.total or self._event.is_set()):
            if it.ready_index <= it.yield_index:
                waiting_since = waiting_since or time.monotonic()
                # a little longer than the ready thread's own bound, whose error names the shard it waits for
                if time.monotonic() - waiting_since > self.stall_timeout + max(5.0, 0.1 * self.stall_timeout):
                    shards = self._shards_of(ids[it.yield_index:self._window(it, it.yield_index)])
                    raise self._stall(int(shards[0]) if len(shards) else self._shard_of(ids[it.yield_index:][:1])[0],
                                      f"sample {it.yield_index} of {it.total} in this epoch was not ready after "
                                      f"{time.monotonic() - waiting_since:.0f} s (ready thread "
                                      f"{'stopped' if it.ready_index < it.total else 'done'} at {it.ready_index})")
                time.sleep(TICK)
                continue
            waiting_since = None
            if not self.batched:
                for at in range(it.yield_index, it.ready_index):
                    if ids[at] >= 0:
                        yield int(ids[at])
                    it.yield_index = at + 1
                continue
            window = ids[it.yield_index:it.ready_index]
            valid = np.flatnonzero(window >= 0)
            take = valid[:self.batch_size - len(batch)]
            batch.extend(window[take].tolist())
            it.yield_index += int(take[-1]) + 1 if len(batch) == self.batch_size else len(window)
            if len(batch) == self.batch_size:
                yield batch
                batch = _IdBatch()
        it.on_exit()

    def __getitem__(self, at):
        if isinstance(at, _IdBatch):
            return self.get_batch(at)
        return super().__getitem__(at)

    # streaming 0.13.0 ends (and starts) an iteration by waiting, without a limit, until its prepare and
    # ready threads report that they exited; a thread that dies of an exception (a download against a dead
    # endpoint) never reports, and training hangs instead of failing (seen in the R3 fault test). Each
    # thread reports its exit when it dies; the failure itself still reaches training through streaming.

    def _reporting_exit(self, thread, it) -> None:
        try:
            thread(it)
        except BaseException as e:
            self._background_error = e  # raised in the training process by __iter__
            it.on_exit()
            raise

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's download, but a failed download gives the shard back instead of leaving it "preparing".

        In mosaicml-streaming 0.13.0 a download that raises leaves the shard's shared state PREPARING, and
        any thread or process that then needs that shard waits for it for ever (a dead endpoint hangs
        training instead of failing it). Exceptions only come out of the downloading call, so resetting
        the state to REMOTE here is safe; the next reader retries the download and gets the error.
        """
        self._prepare_now(shard_id)
        if blocking:  # streaming waits for a PREPARING shard without a bound, and misses a give-back
            self._wait_local(shard_id)

    def _prepare_now(self, shard_id: int) -> None:
        """streaming's non-blocking ``prepare_shard``, giving the shard back (REMOTE) if our download raises."""
        try:
            super().prepare_shard(shard_id, False)
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

    def _records(self, shard_id: int) -> np.ndarray | None:
        """All samples of a local shard as one structured array over a memory map (``None``: not possible).

        streaming's reader opens, seeks and reads the shard file twice per sample; with fixed-size columns
        (ours) a shard is an array of equal records, so a sample is a row and a batch one fancy index.
        Anything unusual (not local yet, variable-size columns, a background failure) returns ``None`` and
        the caller falls back to streaming's reader.
        """
        if getattr(self, "_event", None) is not None and self._event.is_set():
            return None
        if self._shard_states[shard_id] != _LOCAL:
            return None
        layout = shard_layout(self.shards[shard_id])
        if layout is None:
            return None
        records = shard_records(layout)
        if records is not None:
            self._shard_access_times[shard_id] = time.time_ns()  # as streaming's reader does, for eviction
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
        return {
            "latent": torch.from_numpy(np.array(latent, copy=True)),
            "label": torch.tensor(label, dtype=torch.int64),
            "id": int(raw.get("id", sample_id)),
        }

    def get_batch(self, sample_ids: Sequence[int]) -> dict[str, Any]:
        """Samples as one collated batch (what :func:`collate_latents` makes of their :meth:`get_item`).

        Reads each shard's rows with one fancy index and checks labels and finiteness once per batch;
        falls back to :meth:`get_item` per sample when a shard cannot be mapped.
        """
        ids = np.asarray(sample_ids, dtype=np.int64)
        shards = self._shard_of(ids)
        rows = ids - self.sample_offset_per_shard[shards]
        latents, labels, out_ids = None, np.empty(len(ids), np.int64), ids.copy()
        for shard_id in np.unique(shards).tolist():
            records = self._records(shard_id)
            if records is None or (latents is not None and records.dtype["latent"].base != latents.dtype):
                return collate_latents([self.get_item(int(i)) for i in ids])
            at = np.flatnonzero(shards == shard_id)
            picked = records[rows[at]]
            if latents is None:
                latents = np.empty((len(ids), *self.latent_shape), records.dtype["latent"].base)
            latents[at] = picked["latent"]
            labels[at] = picked["label"]
            if "id" in records.dtype.names:
                out_ids[at] = picked["id"]
        if latents is None:
            raise DatasetError("get_batch needs at least one sample id")
        self._check(ids, labels, latents)
        return {"latent": torch.from_numpy(latents), "label": torch.from_numpy(labels), "id": out_ids.tolist()}


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


class _IdBatch(list):
    """Sample ids that :meth:`LatentStreamingDataset.__getitem__` reads as one batch."""


class BatchLoader(DataLoader):
    """A ``DataLoader`` over a batched :class:`LatentStreamingDataset` (see ``batched``).

    The dataset collates, so this loader only moves whole batches (through workers and pinned memory);
    its length is the number of batches, as a batching ``DataLoader`` with ``drop_last`` reports it.

    Args:
        dataset: A dataset made with ``batched=True``.
        **kwargs: ``DataLoader`` arguments other than batching ones (num_workers, pin_memory, …).
    """

    def __init__(self, dataset: LatentStreamingDataset, **kwargs: Any) -> None:
        if not getattr(dataset, "batched", False):
            raise ValueError("BatchLoader needs a LatentStreamingDataset made with batched=True")
        super().__init__(dataset, batch_size=None, collate_fn=_as_is, **kwargs)

    def __len__(self) -> int:
        return len(self.dataset) // self.dataset.batch_size


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


_LOCAL = _ShardState.LOCAL
_WINDOW = 256  # sample ids the download and ready threads take at a time
def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack latents and labels; keep ids a Python list (they seed per-sample draws on the host, no sync)."""
    return {
        "latent": torch.stack([s["latent"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "id": [s["id"] for s in samples],
    }
