"""Everything tread_scale changes inside mosaicml-streaming 0.13.0, in one class.

mosaicml-streaming is frozen at 0.13.0 (it pins ``numpy<2.2``; no release since), so fixes live here, in
:class:`PatchedStreamingDataset`, a ``StreamingDataset`` subclass (never a wrapper: Composer saves and
restores its position through ``state_dict``). Domain code (:mod:`tread_scale.data.stream.dataset`) subclasses it
and uses only the public methods defined here. Each patch, upstream vs. here:

* ``__init__``: upstream keeps the boto3 client that fetched ``index.json``; forked DataLoader workers
  inherit it with its pooled keep-alive socket and read each other's responses. Here it is dropped.
* ``_prepare_thread`` / ``_ready_thread`` / ``_each_sample_id`` (the three loops of an epoch): upstream
  runs each once per *sample* (a file lock and a stat per sample in the download thread); here each steps
  through a window of sample ids (same indices, so partition, resumption and predownload are upstream's),
  and yields whole batches of ids when ``batched``.
* The same loops: upstream's thread that dies of an error never reports its exit, and the end of the
  epoch waits for it for ever (a dead endpoint hung training); here each thread reports its exit.
* ``prepare_shard``: upstream leaves a shard whose download raised PREPARING for ever; here it goes back
  to REMOTE, so the next reader retries and gets the error.
* Waiting for a shard: upstream checks once, before waiting, whether a shard is REMOTE; a shard given
  back while waited for was then waited for for ever (the two-node hang of issue 12). Here every wait
  re-checks, takes the shard over, and is bounded by ``stall_timeout`` (:class:`DataStallError` naming
  the shard, its state, the rank and the node, after a dump of every thread's stack).
* ``_get_work``: for a bucketed dataset (``bucket_ranges`` set) the epoch's sample ids come from
  :mod:`tread_scale.data.stream.buckets` (every global batch one bucket, the same sequence for any number
  of ranks and workers) instead of upstream's partition, whose ``per_stream`` batching comes closest but
  repeats samples to pad a bucket to the world size (so elastic resumption changes the epoch) and has one
  batch size. Without buckets, upstream's partition as is.
* ``__iter__``: upstream ends the epoch *normally* when a background thread failed (the rank silently
  trains on fewer batches, or none, while its peers wait); here the failure is raised.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import streaming
from streaming import StreamingDataset
from streaming.base.constant import TICK
from streaming.base.dataset import _ShardState

from tread_scale.cluster.diagnostics import dump_threads, whereabouts
from tread_scale.data.stream.worker_watch import note
from tread_scale.errors import DatasetError, DataStallError

log = logging.getLogger(__name__)

WRITTEN_FOR = "0.13.0"
if streaming.__version__ != WRITTEN_FOR:
    raise ImportError(f"tread_scale.compat.streaming was written for mosaicml-streaming {WRITTEN_FOR}, but "
                      f"{streaming.__version__} is installed: install the pinned version (requirements.lock) or "
                      "re-check every patch in this module against the new version")

_LOCAL = _ShardState.LOCAL
_REMOTE = _ShardState.REMOTE
_PREPARING = _ShardState.PREPARING
_WINDOW = 256  # sample ids the download and ready threads take at a time


class IdBatch(list):
    """Sample ids that :meth:`PatchedStreamingDataset.__getitem__` reads as one batch (:meth:`get_batch`)."""


class PatchedStreamingDataset(StreamingDataset):
    """``StreamingDataset`` with the fixes listed in the module docstring.

    Args:
        batched: Iterate :class:`IdBatch` es of ``batch_size`` ids, read by :meth:`get_batch`, instead of
            single samples; a worker's last incomplete batch is dropped (as ``drop_last=True`` does).
        stall_timeout: Seconds a data wait may go without progress before :class:`DataStallError`.
        bucket_ranges: ``(start, count)`` of each aspect-ratio bucket's sample ids (a bucketed dataset's
            metadata); batches then never mix buckets (:mod:`tread_scale.data.stream.buckets`).
        **kwargs: ``StreamingDataset`` arguments.

    Raises:
        DatasetError: If ``stall_timeout`` is not positive, or ``batched`` without ``batch_size``.
    """

    def __init__(self, *, batched: bool = False, stall_timeout: float = 300.0,
                 bucket_ranges: list[tuple[int, int]] | None = None, **kwargs: Any) -> None:
        if not stall_timeout > 0:
            raise DatasetError(f"stall_timeout={stall_timeout} must be a positive number of seconds "
                               "(data.stall_timeout)")
        super().__init__(**kwargs)
        self.batched = batched
        self.stall_timeout = float(stall_timeout)
        self.background_error: BaseException | None = None
        if batched and not self.batch_size:
            raise DatasetError("a batched dataset needs batch_size (the per-rank batch)")
        self.bucket_ranges = None if bucket_ranges is None else [(int(a), int(n)) for a, n in bucket_ranges]
        if self.bucket_ranges is not None:
            if sum(n for _, n in self.bucket_ranges) != self.num_samples:
                raise DatasetError(f"the buckets of the metadata hold {sum(n for _, n in self.bucket_ranges)} "
                                   f"samples but the shards hold {self.num_samples}: metadata and index.json "
                                   "are of different conversions")
        self.drop_parent_clients()

    # ---- the public face the domain subclass uses -------------------------------------------------------

    def drop_parent_clients(self) -> None:
        """Forget the object-store clients made in this process, so forked workers make their own."""
        for stream in self.streams:
            downloader = getattr(stream, "_downloader", None)
            if downloader is not None:
                downloader.clean_up()

    def shard_is_local(self, shard_id: int) -> bool:
        """Whether the shard's files are in the local cache (and no background failure stopped reading)."""
        event = getattr(self, "_event", None)
        return not (event is not None and event.is_set()) and self._shard_states[shard_id] == _LOCAL

    def note_shard_access(self, shard_id: int) -> None:
        """Record a read of the shard for cache eviction (as upstream's reader does, without the lock)."""
        self._shard_access_times[shard_id] = time.time_ns()

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """The shard of each sample id (``spanner`` for a whole array at once)."""
        return np.searchsorted(self.sample_offset_per_shard, ids, side="right") - 1

    def local_shard_file(self, shard_id: int) -> str:
        """Path of the shard's (first) raw file in the local cache."""
        shard = self.shards[shard_id]
        return os.path.join(shard.dirname, shard.split or "", shard.file_pairs[0][0].basename)

    def get_batch(self, sample_ids: list[int]) -> Any:
        """One collated batch of samples (``batched`` datasets implement this)."""
        raise NotImplementedError

    def background_failure(self) -> Exception:
        """The error to raise in the training process for a failed download or ready thread (overridable)."""
        err = self.background_error
        if isinstance(err, DatasetError):
            return err
        cause = f"{type(err).__name__}: {err}" if err is not None else "see the traceback above"
        where = next((s.remote or s.local for s in self.streams), "?")
        return DatasetError(f"reading shards of {where} failed in a background thread on {whereabouts()}: {cause}")

    def bucketed_steps(self) -> int:
        """Steps (global batches) of one epoch of a bucketed dataset on this run's ranks."""
        from tread_scale.data.stream.buckets import steps_per_epoch

        return steps_per_epoch(self.bucket_ranges, self.batch_size * self._parallel_rank_world.num_ranks)

    # ---- patches --------------------------------------------------------------------------------------

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        if self.bucket_ranges is None:
            return super()._get_work(epoch, sample_in_epoch)
        from tread_scale.data.stream.buckets import plan_epoch, worker_ids

        world = self._parallel_worker_world
        global_batch = self.batch_size * world.num_ranks
        if sample_in_epoch % global_batch:
            log.warning("resuming at sample %d of the epoch, not a whole global batch of %d: the step's rest is "
                        "skipped", sample_in_epoch, global_batch)
        plan = plan_epoch(self.bucket_ranges, global_batch, self.shuffle_seed, epoch, self.shuffle)
        return worker_ids(plan, sample_in_epoch // global_batch, world.rank, world.num_ranks, world.worker_of_rank,
                          world.workers_per_rank)


    def __iter__(self):
        try:
            yield from super().__iter__()
        except RuntimeError as e:
            if "Background thread failed" in str(e):
                raise self.background_failure() from (self.background_error or e)
            raise
        if getattr(self, "_event", None) is not None and self._event.is_set():
            raise self.background_failure() from self.background_error

    def __getitem__(self, at):
        if isinstance(at, IdBatch):
            return self.get_batch(at)
        return super().__getitem__(at)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Upstream's download; a failed download gives the shard back; a blocking wait is bounded."""
        self._prepare_now(shard_id)
        if blocking:
            self._wait_local(shard_id)

    def _prepare_now(self, shard_id: int) -> None:
        """Upstream's non-blocking ``prepare_shard``, giving the shard back (REMOTE) if our download raises."""
        try:
            super().prepare_shard(shard_id, False)
        except BaseException:
            lock = self._cache_filelock
            lock.acquire()
            try:
                if self._shard_states[shard_id] == _PREPARING:
                    self._shard_states[shard_id] = _REMOTE
            finally:
                lock.release()
            raise

    def _wait_local(self, shard_id: int, it=None) -> None:
        """Wait until a shard is local, preparing it whenever nobody is; bounded by ``stall_timeout``."""
        started, noted = time.monotonic(), False
        while True:
            state = self._shard_states[shard_id]
            event = getattr(self, "_event", None)
            if state == _LOCAL or (event is not None and event.is_set()) or (it is not None and it.should_exit()):
                return
            if state == _REMOTE:
                self._prepare_now(shard_id)  # ours to download now (raises on failure)
                continue
            if not noted:
                note(f"waiting for shard {self.shards[shard_id].raw_data.basename} to become local "
                     f"({_ShardState(int(state)).name})")
                noted = True
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

    def _window(self, it, index: int) -> int:
        """End of the next window of ids from ``index``, within ``predownload`` of what was yielded."""
        end = min(it.total, index + _WINDOW)
        if self.predownload is not None:
            end = min(end, max(index + 1, it.yield_index + self.predownload + 1))
        return end

    def _ahead(self, it, index: int) -> bool:
        return self.predownload is not None and index - it.yield_index > self.predownload

    def _shards_of(self, ids: np.ndarray) -> np.ndarray:
        """The shards of sample ids, in order of first appearance, without repeats (``-1`` ids skipped)."""
        shards = self.shard_of(ids[ids >= 0])
        unique, first = np.unique(shards, return_index=True)
        return unique[np.argsort(first)]

    def _reporting_exit(self, thread, it) -> None:
        try:
            thread(it)
        except BaseException as e:
            self.background_error = e  # raised in the training process by __iter__
            it.on_exit()
            raise

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
        """For a local shard, what upstream's ``prepare_shard`` does (note the access) without its file lock.

        Upstream took a file lock per sample for this, a fifth of a worker's time.
        """
        if self._shard_states[shard_id] != _LOCAL or not os.path.isfile(self.local_shard_file(shard_id)):
            return False
        self.note_shard_access(shard_id)
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

    def _each_sample_id(self, it):
        """Ready sample ids one at a time or, batched, as :class:`IdBatch` es (a last short one dropped)."""
        batch, ids = IdBatch(), it.sample_ids
        waiting_since = None
        while not (it.should_exit() or it.yield_index == it.total or self._event.is_set()):
            if it.ready_index <= it.yield_index:
                waiting_since = waiting_since or time.monotonic()
                # a little longer than the ready thread's own bound, whose error names the shard it waits for
                if time.monotonic() - waiting_since > self.stall_timeout + max(5.0, 0.1 * self.stall_timeout):
                    shards = self._shards_of(ids[it.yield_index:self._window(it, it.yield_index)])
                    raise self._stall(int(shards[0]) if len(shards) else int(self.shard_of(ids[it.yield_index:][:1])[0]),
                                      f"sample {it.yield_index} of {it.total} in this epoch was not ready after "
                                      f"{time.monotonic() - waiting_since:.0f} s (ready thread at {it.ready_index})")
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
                batch = IdBatch()
        it.on_exit()


def shard_state_name(dataset: StreamingDataset, shard_id: int) -> str:
    """``REMOTE``, ``PREPARING`` or ``LOCAL``: the node-wide state of a shard (for tests and diagnostics)."""
    return _ShardState(int(dataset._shard_states[shard_id])).name


def set_shard_state(dataset: StreamingDataset, shard_id: int, name: str) -> None:
    """Set a shard's node-wide state, as another process of the node would (for fault-injection tests)."""
    dataset._shard_states[shard_id] = _ShardState[name]
