"""Shared memory that crashed training processes left behind in ``/dev/shm``.

mosaicml-streaming names each dataset's shared memory ``/dev/shm/<6-digit prefix>_<name>``. A process
killed with SIGKILL (OOM killer, node failure, ``kill -9``) cannot unlink them, and streaming's
``clean_stale_shared_memory`` stops at the first prefix without leftovers, so leftovers after a gap in the
numbering stay for ever. :func:`clean_dead_streaming_shm` removes every streaming prefix that no live
process has mapped (read from ``/proc/<pid>/maps``), and leaves the memory of running jobs alone.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{6})_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume|"
                   r"epoch_shape|epoch_data)$")


def _mapped_prefixes(shm_dir: str) -> set[str] | None:
    """Prefixes of ``/dev/shm`` files some live process maps (``None`` if that cannot be known)."""
    used: set[str] = set()
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "maps").read_text()
        except (OSError, UnicodeDecodeError):
            continue  # gone, or not ours to read: its memory is not counted, so be conservative below
        used.update(re.findall(re.escape(shm_dir.rstrip("/")) + r"/(\d{6})_", text))
    return used


def clean_dead_streaming_shm(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink streaming shared memory that no live process maps; returns the names removed.

    Only files whose every process can be inspected are judged: if some ``/proc/<pid>/maps`` could not
    be read (another user's process), nothing is removed.
    """
    root = Path(shm_dir)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if _NAME.match(p.name)]
    if not names:
        return []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and not os.access(entry / "maps", os.R_OK):
            return []
    used = _mapped_prefixes(str(root.resolve()))
    if used is None:
        return []
    removed = []
    for name in names:
        if _NAME.match(name).group(1) not in used:
            try:
                (root / name).unlink()
                removed.append(name)
            except OSError:
                pass
    if removed:
        log.info("removed %d shared-memory file(s) left in %s by training processes that died", len(removed),
                 shm_dir)
    return removed
