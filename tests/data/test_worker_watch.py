"""The trainer's wait for a batch from its DataLoader workers is bounded and explained (issue 20).

In-process and fast: a worker stuck in Python (here a sleep inside ``get_batch``) can still answer the stack
request; the end-to-end SIGSTOP cases are in tests/reliability/test_stuck_worker.py.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tread_scale.data.stream.dataset import BatchLoader, LatentStreamingDataset
from tread_scale.errors import DataStallError


class _HangsAfter(LatentStreamingDataset):
    """Reads ``ok`` batches, then blocks reading the next (as a read that never returns would)."""

    ok = 2

    def _read_batch(self, ids, shards):
        self.served = getattr(self, "served", 0) + 1
        if self.served > self.ok:
            time.sleep(3600)  # the frame the worker's stack dump must show
        return super()._read_batch(ids, shards)


def _dataset(cls, data, tmp_path):
    return cls(latent_shape=(4, 8, 8), num_classes=5, batched=True, batch_size=4, local=str(data), remote=None,
               shuffle=False, stall_timeout=60)


def test_a_worker_stuck_in_a_read_fails_the_wait_with_its_stack(latent_dataset, tmp_path, capfd):
    loader = BatchLoader(_dataset(_HangsAfter, latent_dataset, tmp_path), num_workers=1, batch_timeout=3,
                         multiprocessing_context="fork", persistent_workers=True, prefetch_factor=1)
    it = iter(loader)
    assert len(next(it)["id"]) == 4 and len(next(it)["id"]) == 4
    pid = loader.watch.workers()[0][1]
    started = time.monotonic()
    with pytest.raises(DataStallError) as info:
        while True:
            next(it)
    took = time.monotonic() - started
    assert 2.5 < took < 3 + 30, took
    message = str(info.value)
    for part in ("no batch from the DataLoader workers for 3 s", f"worker 0 pid {pid} (", "reading 4 samples (ids",
                 "of shard group_00000/shard.", "rank 0 (local 0) on node 0"):
        assert part in message, message
    err = capfd.readouterr().err
    assert "in _read_batch" in err and "test_worker_watch.py" in err, err[-3000:]  # the worker's own stack
    assert "most recent call first" in err
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_healthy_workers_end_without_being_killed(latent_dataset, tmp_path):
    loader = BatchLoader(_dataset(LatentStreamingDataset, latent_dataset, tmp_path), num_workers=2,
                         multiprocessing_context="fork", persistent_workers=True)
    ids = [i for batch in loader for i in batch["id"]]
    assert sorted(ids) == list(range(64))
    pids = [pid for _, pid, _, _ in loader.watch.workers()]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)  # persistent: alive between epochs
    started = time.monotonic()
    assert loader.end_workers(3.0) == []  # asked to exit, none had to be killed
    assert time.monotonic() - started < 3.0
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_a_signal_to_a_worker_does_not_reach_the_trainer(latent_dataset, tmp_path):
    """A forked worker inherits the trainer's ``set_wakeup_fd`` pipe; a SIGTERM to the worker must neither
    end it (the trainer decides) nor reach the trainer's SIGTERM watchdog through that pipe."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    os.set_blocking(read_fd, False)
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: None)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        loader = BatchLoader(_dataset(LatentStreamingDataset, latent_dataset, tmp_path), num_workers=1,
                             multiprocessing_context="fork", persistent_workers=True)
        it = iter(loader)
        next(it)
        pid = loader.watch.workers()[0][1]
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(BlockingIOError):
            os.read(read_fd, 16)  # nothing arrived in the trainer's pipe
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # the worker ignored it
        assert len(next(it)["id"]) == 4
        loader.end_workers(3.0)
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous_handler)
        os.close(read_fd)
        os.close(write_fd)
