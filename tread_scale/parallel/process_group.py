"""Joining and leaving a torch.distributed process group outside Composer (CLI commands, tests, benchmarks)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def leave_process_group() -> None:
    """Wait for every rank, then destroy the default process group.

    Destroying a gloo group right after a collective can deadlock (torch 2.7): the destructor joins gloo's
    worker thread while holding the GIL, and that thread may still be releasing the collective's tensor,
    which needs the GIL (seen as a two-rank test hanging for ever, one run in three). The barrier's wait
    releases the GIL, so those threads finish first. A rank that exits without destroying the group dies
    in the same destructor at interpreter exit ("terminate called without an active exception").
    """
    if dist.is_initialized():
        dist.barrier()
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
