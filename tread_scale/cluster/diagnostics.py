"""What a process on a cluster says about itself when it gives up waiting: who it is and what its threads do."""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys

log = logging.getLogger(__name__)


def whereabouts() -> str:
    """This process in cluster terms, e.g. ``rank 2 (local 0) on node 1 (host gpu-17), DataLoader worker 1``.

    Read from the launcher's environment (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``), so it works in
    DataLoader workers and before ``torch.distributed`` is initialised.
    """
    env = os.environ
    text = (f"rank {env.get('RANK', '0')} (local {env.get('LOCAL_RANK', '0')}) on node {env.get('NODE_RANK', '0')} "
            f"(host {socket.gethostname()}, pid {os.getpid()})")
    try:
        from torch.utils.data import get_worker_info

        worker = get_worker_info()
    except ImportError:  # pragma: no cover - torch is a dependency
        worker = None
    if worker is not None:
        text += f", DataLoader worker {worker.id}"
    return text


def dump_threads(reason: str) -> None:
    """Log ``reason`` and write every thread's Python stack to stderr (the rank's log under the launchers)."""
    log.error("%s; stacks of all threads of %s follow on stderr", reason, whereabouts())
    for handler in logging.getLogger().handlers:
        handler.flush()
    out = sys.stderr
    try:
        out.flush()
        out.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (pytest): the process's own stderr
        out = sys.__stderr__
    faulthandler.dump_traceback(file=out, all_threads=True)
    out.flush()
