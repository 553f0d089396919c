"""Which peer failed: ranks leave a word in the rendezvous store before they exit with an error.

When one rank fails (a data stall, a bad batch, an exception), its peers learn of it only through their next
collective: under gloo it fails with "Connection closed by peer [127.0.0.1]:41563" (an address, not a
rank), or after the process group's timeout. :func:`report_failure` writes the failing rank's message into
the store every rank rendezvoused through (``MASTER_ADDR:MASTER_PORT``, env:// rendezvous), and
:func:`peer_report` reads the others' words back, so a rank whose collective failed can say *which* peer
went first and why. Rank 0 hosts that store under Composer's launcher (torchrun's agent hosts it under
torchrun), so a store that no longer answers is itself news: its host is gone.

Everything is best effort and bounded (a few seconds): it runs while a run is already failing.
"""

from __future__ import annotations

import datetime
import logging
import os

log = logging.getLogger(__name__)

_PREFIX = "tread_scale/failed/"
#: Seconds each store operation may take here.
STORE_TIMEOUT = 5.0


def _store():
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    return dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=STORE_TIMEOUT))


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def report_failure(message: str) -> None:
    """Leave this rank's failure (its first line, at most 1000 characters) for the peers to read."""
    rank, world = _world()
    if world <= 1:
        return
    try:
        store = _store()
        if store is not None:
            store.set(f"{_PREFIX}{rank}", message.strip().splitlines()[0][:1000] if message.strip() else "failed")
    except Exception as e:  # noqa: BLE001 - best effort while failing
        log.debug("could not leave the failure in the rendezvous store: %s", e)


def peer_report() -> str:
    """What the peers left: ``rank 0 failed first: data stall on …`` or why nothing could be read."""
    rank, world = _world()
    if world <= 1:
        return ""
    host = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        store = _store()
    except Exception as e:  # noqa: BLE001 - a store that does not answer is the answer
        return (f"the rendezvous store at {host} does not answer ({type(e).__name__}): the process that hosts it "
                "(rank 0 under Composer's launcher) is gone, so rank 0 failed or was killed; its log says why")
    if store is None:
        return "no rendezvous store to ask (MASTER_ADDR/MASTER_PORT unset)"
    found = []
    for peer in range(world):
        if peer == rank:
            continue
        try:
            if store.check([f"{_PREFIX}{peer}"]):
                found.append(f"rank {peer} failed: {store.get(f'{_PREFIX}{peer}').decode('utf-8', 'replace')}")
        except Exception as e:  # noqa: BLE001
            return (f"the rendezvous store at {host} stopped answering ({type(e).__name__}) while asking about rank "
                    f"{peer}: the process that hosts it (rank 0 under Composer's launcher) is gone"
                    + (f"; before that: {'; '.join(found)}" if found else ""))
    if not found:
        return "no peer reported a failure: a peer is stuck or was killed (its log, or the launcher's, says which)"
    return "; ".join(found)


__all__ = ["STORE_TIMEOUT", "peer_report", "report_failure"]
