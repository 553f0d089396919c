"""Files written atomically (a temporary name, then a rename) with the mode any new file of the process gets.

Some writers create their file with mode 0600 (``tempfile.mkstemp``; safetensors' ``save_file``, which writes
through a temporary file of its own), others with ``0666 & ~umask`` (``open``): :func:`replace_atomically`
gives every file it moves into place the latter, so files written side by side (``ema/ba<N>.safetensors``
and ``ema/latest.safetensors``, exported weights, ...) have the same mode.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where it can be, without changing it even for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it; restored at once
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def replace_atomically(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the finished temporary file ``tmp`` to ``path`` (atomically), with :func:`default_file_mode`.

    Args:
        tmp: The written file, on the same file system as ``path``.
        path: Where it goes (replaced if it exists).

    Returns:
        ``path`` as a Path.
    """
    os.chmod(tmp, default_file_mode())
    return Path(tmp).replace(path)


__all__ = ["current_umask", "default_file_mode", "replace_atomically"]
