"""Fixes for Composer 0.32.1 behaviour that breaks multi-node runs on a shared filesystem.

Composer is unmaintained since 2025-07, so these are applied at run time, once, by the trainer builder.

* ``dist.get_node_signal_file_name`` broadcasts rank 0's file name (``._signal_file_node0_<random>``) to
  every node. During autoresume every node's local rank 0 then writes and deletes that *same* file in the
  checkpoint folder; on a filesystem shared by the nodes the second delete fails with
  ``FileNotFoundError``. The fix keeps the shared random part but names each node's own file.
"""

from __future__ import annotations

import random
import string

_applied = False


def apply() -> None:
    """Apply the fixes (idempotent)."""
    global _applied
    if _applied:
        return
    from composer.utils import dist

    def get_node_signal_file_name(rng: random.Random | None = None) -> str:
        rng = rng or random.Random()
        token = ["".join(rng.choices(string.ascii_letters + string.digits, k=6))]
        dist.broadcast_object_list(token, src=0)
        return f"._signal_file_node{dist.get_node_rank()}_{token[0]}"

    dist.get_node_signal_file_name = get_node_signal_file_name
    _applied = True
