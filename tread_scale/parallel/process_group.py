"""Joining and leaving a torch.distributed process group outside Composer (CLI commands, tests, benchmarks)."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

_SETTLE_S = 0.2  # seconds without the GIL between the barrier and destroy (see leave_process_group)
_monitor_groups: dict[int, object] = {}  # id of the default group -> its gloo twin for monitored barriers


def bounded_barrier(name: str, timeout_s: float) -> None:
    """A barrier over every rank that fails after ``timeout_s`` naming the ranks that did not arrive.

    Uses gloo's ``monitored_barrier`` (on a gloo twin of the default group when that is NCCL): rank 0
    collects every rank and reports the absent ones; the others report that rank 0 did not answer.

    Raises:
        DistributedTimeoutError: Naming the barrier, this rank and node, and the absent ranks; every
            thread's stack goes to stderr first.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from tread_scale.cluster.diagnostics import dump_threads, whereabouts
    from tread_scale.errors import DistributedTimeoutError

    default = dist.group.WORLD
    if dist.get_backend() == "gloo":
        group = default
    else:
        group = _monitor_groups.get(id(default))
        if group is None:
            group = _monitor_groups[id(default)] = dist.new_group(backend="gloo")
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        message = (f"the barrier at the {name} timed out after {timeout_s:g} s (train.barrier_timeout) on "
                   f"{whereabouts()}: {str(e).strip().splitlines()[0]}")
        dump_threads(message)
        raise DistributedTimeoutError(message) from None


def leave_process_group() -> None:
    """Wait for every rank, let gloo's workers settle, then destroy the default process group.

    Destroying a gloo group right after a collective can deadlock (torch 2.7): the destructor holds the
    GIL while it joins gloo's worker threads, and a worker may still be freeing finished work items (a
    barrier holds the collectives before it) whose tensors Python no longer references, which needs the
    GIL (py-spy showed both threads; a two-rank test hung one run in three). After the barrier this
    sleeps briefly, without the GIL, so the workers finish first: it narrows the race to nothing seen in
    48 runs, it does not remove it (that needs a torch fix). A rank that exits without destroying the
    group can die in the same destructor at interpreter exit ("terminate called without an active
    exception").
    """
    if dist.is_initialized():
        dist.barrier()
        time.sleep(_SETTLE_S)
        dist.destroy_process_group()


@contextmanager
def launched_process_group() -> Iterator[None]:
    """Within the block, be part of the process group a launcher described (``composer -n N`` / torchrun).

    Nothing happens without a launcher, or when a group exists already. At the end of the block every
    rank leaves the group together (:func:`leave_process_group`); after an error it is destroyed without
    waiting, since a failed peer may never arrive.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_process_group()
