"""The trainer's wait for a batch from its DataLoader workers, bounded and explained.

``data.stall_timeout`` bounds every wait *inside* the dataset (a shard another process prepares, the next
ready window), but a worker that is itself stuck (frozen in an NFS/Lustre read, a socket without a
timeout, a lock inherited across fork, ``SIGSTOP``) never reaches those checks, and PyTorch's DataLoader
waits for its next batch for ever: one rank stops silently and every other rank waits in its next
collective (issue 20). Even a batch the worker had already queued can hang the trainer: its tensors
arrive as file descriptors that the trainer must fetch from the worker's own ``resource_sharer`` thread,
which a frozen worker never runs. A ``DataLoader(timeout=…)`` bounds neither case, so :class:`WorkerWatch`
bounds the whole wait from outside, on a thread:

* every worker notes what it is doing in a shared slot (:func:`note`: "reading 32 samples of shard …",
  "waiting for shard … to become local", "handed over …") with its pid and the time;
* each worker installs a ``faulthandler`` dump of its threads on ``SIGUSR2`` (into the rank's log);
* the trainer's wait for each batch is armed (:meth:`WorkerWatch.arm`) for :func:`batch_wait_bound`
  seconds, a margin past ``data.stall_timeout`` so that a worker that can still speak reports its own,
  more precise :class:`~tread_scale.errors.DataStallError` first;
* past the bound the watch thread writes the trainer's threads to stderr, asks each worker for its stack,
  and kills the workers; the trainer's blocked read then fails, and the loader raises the watch's
  :class:`~tread_scale.errors.DataStallError`, which names the rank, node, host, every worker's pid and
  state, and what each was last doing. Should the main thread still not return (it cannot be interrupted
  from another thread), the process exits with code 1 after :data:`RETURN_BOUND` more seconds.

The slots live in anonymous shared memory (``multiprocessing.RawArray``: an unlinked file), so nothing is
left in ``/dev/shm``, and they travel to workers started by fork, spawn or forkserver alike.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from tread_scale.errors import DataStallError

log = logging.getLogger(__name__)

#: The signal a worker answers with a dump of its threads' stacks (SIGUSR1 and SIGTERM mean preemption).
STACK_SIGNAL = signal.SIGUSR2
#: Seconds the main thread gets to leave the DataLoader after its workers were killed, before the process exits.
RETURN_BOUND = 30.0
_TEXT = 240  # bytes of a worker's note
_current: tuple["WorkerWatch", int] | None = None  # in a worker process: its watch and worker id


def batch_wait_bound(stall_timeout: float) -> float:
    """Seconds the trainer waits for a batch from a worker: ``stall_timeout + max(15 s, 20% of it)``.

    The margin lets the dataset's own bounded waits (``stall_timeout``, and ``stall_timeout`` plus
    ``max(5 s, 10%)`` for the next ready window) fire first, in the worker, with the shard at fault.
    """
    return float(stall_timeout) + max(15.0, 0.2 * float(stall_timeout))


def watched() -> bool:
    """Whether this process is a watched DataLoader worker (whose :func:`note` records anything)."""
    return _current is not None


def note(text: str) -> None:
    """Record what this DataLoader worker is doing now (nothing outside a watched worker)."""
    if _current is not None:
        watch, worker = _current
        watch._write(worker, text)


def describe_ids(ids: Sequence[int], shards: Sequence[str]) -> str:
    """``32 samples (ids 17, 45, 3, …) of shard group_00000/shard.00003.mds``: a batch in a note."""
    ids = list(ids)
    head = ", ".join(str(int(i)) for i in ids[:4]) + (", …" if len(ids) > 4 else "")
    names = sorted(set(shards))
    where = f"shard {names[0]}" if len(names) == 1 else f"shards {', '.join(names[:3])}{', …' if len(names) > 3 else ''}"
    return f"{len(ids)} samples (ids {head}) of {where}"


class WorkerWatch:
    """Shared per-worker slots, the workers' stack-dump handler, and the diagnosis of a stuck worker.

    Pass it as the DataLoader's ``worker_init_fn`` (it is callable); the trainer's side arms it around
    each wait for a batch (:meth:`arm`, :meth:`disarm`). See the module docstring.

    Args:
        num_workers: The DataLoader's workers.
        context: Their start method (``fork``, ``spawn``, ``forkserver``), or ``None`` for the default.
        bound: The seconds the DataLoader waits (said in the error).
        setting: The config key that sets the bound (said in the error).
    """

    def __init__(self, num_workers: int, context: str | None, bound: float, setting: str = "data.stall_timeout"):
        ctx = multiprocessing.get_context(context)
        self.num_workers = int(num_workers)
        self.bound = float(bound)
        self.setting = setting
        self._pid = ctx.RawArray("q", max(1, self.num_workers))
        self._since = ctx.RawArray("d", max(1, self.num_workers))
        self._text = ctx.RawArray("c", max(1, self.num_workers) * _TEXT)
        self._trainer_side()

    def _trainer_side(self) -> None:
        """The watch thread's state (never sent to workers: see ``__getstate__``)."""
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None
        self._wake = threading.Event()
        self._returned = threading.Event()
        self._closed = False
        self._fired: DataStallError | None = None

    def __getstate__(self) -> dict:
        keep = ("num_workers", "bound", "setting", "_pid", "_since", "_text")
        return {k: v for k, v in self.__dict__.items() if k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._trainer_side()

    def __call__(self, worker_id: int) -> None:
        """``worker_init_fn``: take slot ``worker_id``, answer ``SIGUSR2`` with a stack dump.

        A forked worker inherits the trainer's ``signal.set_wakeup_fd`` pipe: a signal to the worker would
        reach the trainer's :class:`~tread_scale.cluster.signals.SignalWatchdog` as if sent to the trainer.
        The worker gives that pipe up and ignores the preemption signals (Slurm signals every process of a
        step; the trainer decides when its workers end).
        """
        global _current
        _current = (self, int(worker_id))
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        self._pid[worker_id] = os.getpid()
        self._write(worker_id, "started")
        try:
            faulthandler.register(STACK_SIGNAL, file=sys.__stderr__, all_threads=True, chain=False)
        except (AttributeError, OSError, ValueError, RuntimeError):  # no usable stderr: no dump, still watched
            pass

    def _write(self, worker: int, text: str) -> None:
        data = text.encode("utf-8", "replace")[: _TEXT - 1]
        start = worker * _TEXT
        self._text[start:start + _TEXT] = data + b"\0" * (_TEXT - len(data))
        self._since[worker] = time.time()

    def workers(self) -> list[tuple[int, int, str, float]]:
        """``(worker id, pid, last note, seconds since)`` of every worker that has started."""
        out, now = [], time.time()
        for w in range(self.num_workers):
            pid = int(self._pid[w])
            if pid:
                text = bytes(self._text[w * _TEXT:(w + 1) * _TEXT]).split(b"\0", 1)[0].decode("utf-8", "replace")
                out.append((w, pid, text, now - float(self._since[w])))
        return out

    # --- the trainer's side (main process) -------------------------------------------------------------

    def arm(self) -> None:
        """The trainer starts waiting for a batch: fire unless :meth:`disarm` comes within the bound."""
        self._closed = False
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._watch, name="tread-dataloader-watch", daemon=True)
            self._thread.start()
        self._deadline = time.monotonic() + self.bound
        self._wake.set()

    def disarm(self) -> None:
        """The batch arrived (or the wait ended otherwise)."""
        self._deadline = None

    def close(self) -> None:
        """Stop the watch thread (the loader's workers are ending)."""
        self._deadline = None
        self._closed = True
        self._wake.set()

    @property
    def fired(self) -> DataStallError | None:
        """The error, once the bound passed (the workers are then being or have been killed)."""
        return self._fired

    def returned(self) -> None:
        """The main thread left the DataLoader after the watch fired: the process need not be ended."""
        self._returned.set()

    def _watch(self) -> None:
        try:
            while not self._closed:
                deadline = self._deadline
                if deadline is None:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                left = deadline - time.monotonic()
                if left > 0:
                    time.sleep(min(left, 1.0))
                    continue
                self._fire()
                return
        except Exception:  # noqa: BLE001 - never die silently: the trainer's wait would lose its bound
            log.exception("the DataLoader watch stopped; the wait for batches is no longer bounded")

    def _fire(self) -> None:
        from tread_scale.cluster.children import describe, end_processes
        from tread_scale.cluster.diagnostics import dump_threads, whereabouts

        workers = self.workers()
        parts = [f"worker {w} {describe(pid)}: {text}, {age:.0f} s ago" for w, pid, text, age in workers]
        message = (f"no batch from the DataLoader workers for {self.bound:g} s ({self.setting} plus its margin) "
                   f"on {whereabouts()}: " + ("; ".join(parts) if parts else "no worker started") +
                   ". A worker stuck like this is usually in a file system or network read that never returns; "
                   "its stack (if it could still answer) follows in this rank's log. The workers were killed and "
                   "the rank stops; rerun the same command to resume from the last checkpoint")
        dump_threads(message)
        self._fired = DataStallError(message)
        asked = []
        for _, pid, _, _ in workers:
            try:
                os.kill(pid, STACK_SIGNAL)
                asked.append(pid)
            except OSError:
                pass
        if asked:
            time.sleep(1.0)  # a worker that can still run writes its stacks now
        end_processes([pid for _, pid, _, _ in workers], timeout=1.0, why="DataLoader workers that gave no batch")
        if not self._returned.wait(RETURN_BOUND):
            dump_threads(f"the trainer did not leave the DataLoader within {RETURN_BOUND:g} s of killing its "
                         f"workers; exiting ({message})")
            os._exit(1)


__all__ = ["STACK_SIGNAL", "WorkerWatch", "batch_wait_bound", "describe_ids", "note", "watched"]
