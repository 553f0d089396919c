"""Everything tread_scale changes inside PyTorch 2.7.0's distributed internals, as named functions.

* :func:`average_fsdp2_gradients_on_gloo`: FSDP2 (``torch.distributed.fsdp._fully_shard._fsdp_collectives``)
  averages fp32/bf16 gradients by passing ``ReduceOp.AVG`` to ``reduce_scatter_tensor`` (it leaves the
  division to NCCL). Gloo has no AVG: its ``all_reduce`` refuses it, but its ``reduce_scatter_tensor``
  silently **sums**, so on a CPU (gloo) process group FSDP2's gradients are ``world_size`` times DDP's.
  Adam hides most of a constant factor, but not all of it: every gradient entry below Adam's ``eps``
  moves ``world_size`` times further (with adaLN-Zero's near-zero initial gradients, 2-rank FSDP2 on CPU
  ended 20 steps 16% of the distance trained away from DDP, in fp32), and gradient clipping, weight decay
  and any gradient norm see the wrong scale. Here, for a gloo group, FSDP2 takes the path upstream uses
  for fp16: divide by the world size around a ``SUM`` (``_get_gradient_divide_factors``), exact for
  power-of-two worlds. NCCL groups keep upstream's path.
* :func:`end_dataloader_workers`: a multi-process DataLoader iterator
  (``torch.utils.data.dataloader._MultiProcessingDataLoaderIter``) ends its workers in
  ``_shutdown_workers``: it joins each for 5 s, then sends ``SIGTERM``, and leaves it at that; Python's
  ``multiprocessing`` exit handler later joins every child *without a bound*. A worker frozen in I/O
  (or stopped) obeys neither, so the trainer never exits (issue 20). Upstream also keeps the worker pids
  in its ``SIGCHLD`` handler's set until that shutdown, so killing a worker earlier makes the handler
  raise "DataLoader worker ... exited unexpectedly" at an arbitrary point of the main thread. Here the
  pids leave that set first, the workers are asked to exit (upstream's done event and ``None`` index),
  whatever does not exit within the bound is killed with ``SIGKILL``, then upstream's shutdown runs over
  dead workers (it no longer waits).
"""

from __future__ import annotations

import torch

WRITTEN_FOR = "2.7.0"
if torch.__version__.split("+")[0] != WRITTEN_FOR:
    raise ImportError(f"tread_scale.compat.torch was written for PyTorch {WRITTEN_FOR}, but {torch.__version__} is "
                      "installed: install the pinned version (requirements.lock) or re-check each change this module's "
                      "docstring lists (FSDP2's ReduceOp.AVG with gloo, the DataLoader's worker shutdown)")

_fixed = {"fsdp2_gloo_average": False}


def average_fsdp2_gradients_on_gloo() -> None:
    """Make FSDP2 average (not sum) gradients on gloo process groups (idempotent); see the module docstring."""
    if _fixed["fsdp2_gloo_average"]:
        return
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    upstream = _fsdp_collectives._get_gradient_divide_factors

    def _get_gradient_divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type=""):
        if dist.get_backend(reduce_scatter_group) == "gloo":
            # upstream's fp16 path (explicit SUM between a pre- and a post-division), for every dtype
            return upstream(reduce_scatter_group, all_reduce_group, torch.float16, device_type)
        return upstream(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type)

    _fsdp_collectives._get_gradient_divide_factors = _get_gradient_divide_factors
    _fixed["fsdp2_gloo_average"] = True


def end_dataloader_workers(iterator, timeout: float = 5.0, why: str = "") -> list[int]:
    """End a DataLoader iterator's worker processes within ``timeout`` s; see the module docstring.

    Args:
        iterator: What ``iter(DataLoader)`` returned (anything else, or a finished one, is left alone).
        timeout: Seconds the workers get to exit before ``SIGKILL``.
        why: Said in the log line when a worker had to be killed.

    Returns:
        The pids that had to be killed.
    """
    from torch.utils.data import _utils
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    from tread_scale.cluster.children import end_processes

    if not isinstance(iterator, _MultiProcessingDataLoaderIter) or iterator._shutdown:
        return []
    pids = [w.pid for w in iterator._workers if w.pid is not None]
    if iterator._worker_pids_set:
        _utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    iterator._workers_done_event.set()
    for worker_id, queue in enumerate(iterator._index_queues):
        if iterator._workers_status[worker_id] or iterator._persistent_workers:
            queue.put(None)
    killed = end_processes(pids, timeout, why)
    iterator._shutdown_workers()
    return killed


__all__ = ["WRITTEN_FOR", "average_fsdp2_gradients_on_gloo", "end_dataloader_workers"]
