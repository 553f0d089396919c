"""The batch plan of a bucketed dataset: every global batch holds one aspect-ratio bucket.

A bucketed dataset (``convert ... --buckets``) stores each bucket as a contiguous range of sample ids
(``LatentMetadata.buckets``). Training must give every step one bucket on every rank (the latents of a batch
share one shape; collectives see equal shapes), see each sample once per epoch, and resume exactly, also on
another number of ranks. The plan here does that by construction:

* Each bucket's ids are permuted (seeded by ``seed``, the epoch and the bucket) and cut into *global*
  batches of ``global_batch`` ids; a bucket's last ``count % global_batch`` ids of the epoch's permutation are
  left out of that epoch (a different set each epoch; :func:`epoch_left_out` lists them).
* The global batches of all buckets are put in one order (permuted by ``seed`` and the epoch).
* Step ``s`` of the epoch is global batch ``s``; rank ``r`` of ``R`` reads its slice ``[r·b, (r+1)·b)``
  (``b = global_batch / R``); the DataLoader's workers take the steps round-robin.

Nothing in the plan depends on the number of nodes, ranks or workers, only on ``global_batch``, the seed and
the epoch, so a run resumed on 1 rank from a checkpoint of 2 continues the very same sequence of global
batches (resumption skips ``sample_in_epoch // global_batch`` whole steps).

Plain numpy: no streaming import (the hook that feeds it to streaming is
:meth:`tread_scale.compat.streaming.PatchedStreamingDataset._get_work`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tread_scale.errors import DatasetError

#: Salt of the order of global batches across buckets (the buckets' own permutations use their index).
_ORDER_SALT = 0x5EED_B0C5


def _rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(salt)])


def plan_epoch(ranges: Sequence[tuple[int, int]], global_batch: int, seed: int, epoch: int,
               shuffle: bool = True) -> np.ndarray:
    """All global batches of one epoch, in step order.

    Args:
        ranges: ``(start, count)`` of each bucket's sample ids, in the metadata's order.
        global_batch: Samples per step over all ranks.
        seed: The dataset's shuffle seed.
        epoch: Epoch number (each epoch has its own permutations).
        shuffle: Permute ids within buckets and the order of batches; ``False`` keeps sample order and takes
            the buckets one after another.

    Returns:
        ``(steps, global_batch)`` int64 array of sample ids.

    Raises:
        DatasetError: If no bucket holds a whole global batch.
    """
    if global_batch < 1:
        raise DatasetError(f"global batch {global_batch} must be >= 1")
    batches = []
    for k, (start, count) in enumerate(ranges):
        ids = np.arange(start, start + count, dtype=np.int64)
        if shuffle:
            ids = _rng(seed, epoch, k).permutation(ids)
        full = count // global_batch
        batches.append(ids[: full * global_batch].reshape(full, global_batch))
    plan = np.concatenate(batches) if batches else np.empty((0, global_batch), np.int64)
    if not len(plan):
        counts = ", ".join(str(c) for _, c in ranges)
        raise DatasetError(f"no bucket holds a whole global batch of {global_batch} samples (bucket sizes: "
                           f"{counts}); lower train.global_batch_size or convert more images")
    if shuffle:
        plan = plan[_rng(seed, epoch, _ORDER_SALT).permutation(len(plan))]
    return plan


def steps_per_epoch(ranges: Sequence[tuple[int, int]], global_batch: int) -> int:
    """Global batches (steps) in one epoch."""
    return sum(count // global_batch for _, count in ranges)


def epoch_left_out(ranges: Sequence[tuple[int, int]], global_batch: int, seed: int, epoch: int,
                   shuffle: bool = True) -> np.ndarray:
    """Sample ids that ``epoch`` leaves out (each bucket's remainder of its permutation), sorted."""
    used = plan_epoch(ranges, global_batch, seed, epoch, shuffle).ravel()
    every = np.concatenate([np.arange(s, s + c, dtype=np.int64) for s, c in ranges])
    return np.setdiff1d(every, used)


def worker_ids(plan: np.ndarray, first_step: int, rank: int, num_ranks: int, worker: int,
               num_workers: int) -> np.ndarray:
    """One DataLoader worker's sample ids from ``first_step`` on: its steps' slices for ``rank``, flattened.

    Args:
        plan: :func:`plan_epoch`'s output.
        first_step: The first step still to run (resumption: ``sample_in_epoch // global_batch``).
        rank: This rank (over all nodes).
        num_ranks: Ranks over all nodes.
        worker: This DataLoader worker of the rank.
        num_workers: The rank's DataLoader workers (1 without workers).

    Raises:
        DatasetError: If the global batch does not split evenly over the ranks.
    """
    steps, global_batch = plan.shape
    if global_batch % num_ranks:
        raise DatasetError(f"global batch {global_batch} does not split over {num_ranks} ranks")
    b = global_batch // num_ranks
    mine = plan[first_step + worker::num_workers, rank * b:(rank + 1) * b]
    return np.ascontiguousarray(mine).reshape(-1)
