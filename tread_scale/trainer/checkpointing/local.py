"""Checkpoint files that autoresume must not trip over.

Composer writes ``ep{e}-ba{b}-rank{r}.pt`` and then moves the ``latest-rank{r}.pt`` symlink to it. A
process killed between the two (``kill -9``, a node failure) leaves a checkpoint newer than ``latest``:
possibly truncated, and in the way of the resumed run, whose saver refuses to overwrite a file "that may
conflict with a future checkpoint". :func:`set_aside_orphans` moves such files to ``<folder>/orphaned/``
(kept, not deleted) before the trainer looks for a checkpoint to resume from.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ep\d+-ba(\d+)-rank(\d+)\.pt$")


def batch_of(name: str) -> int:
    """The batch number in a checkpoint name (``.../ep0-ba12-rank0.pt`` -> 12), or -1."""
    m = _NAME.match(name.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def set_aside_orphans(folder: str | os.PathLike) -> list[Path]:
    """Move checkpoints newer than each rank's ``latest`` pointer into ``<folder>/orphaned/``.

    Args:
        folder: A local checkpoint folder (Composer's layout); a missing folder is fine.

    Returns:
        The new paths of the files moved.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    latest: dict[str, int] = {}
    for link in folder.glob("latest-rank*.pt"):
        rank = link.name[len("latest-rank"):-len(".pt")]
        latest[rank] = batch_of(os.readlink(link)) if link.is_symlink() else -1
    moved = []
    for path in sorted(folder.iterdir()):
        m = _NAME.match(path.name)
        if not m or not path.is_file() or path.is_symlink():
            continue
        if int(m.group(1)) <= latest.get(m.group(2), -1):
            continue
        dest_dir = folder / "orphaned"
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / path.name
        if dest.exists():
            dest = dest_dir / f"{path.stem}.{int(time.time())}{path.suffix}"
        try:
            path.rename(dest)
        except FileNotFoundError:  # another node sharing the folder moved it first
            continue
        log.warning("checkpoint %s is newer than the latest pointer (%s): the run that wrote it stopped before "
                    "finishing it. Moved to %s; resuming from the latest pointer.", path,
                    f"batch {latest[m.group(2)]}" if latest.get(m.group(2), -1) >= 0 else "none", dest)
        moved.append(dest)
    return moved
