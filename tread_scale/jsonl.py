"""JSON-lines logs keyed by step, where a step logged again (after a resume) replaces the earlier record."""

from __future__ import annotations

import json
import os
from pathlib import Path


def last_record_per_step(path: str | os.PathLike, key: str | None = None) -> list[dict]:
    """The records of a JSON-lines file, the last one of each step winning, in step order.

    A resumed run re-runs the steps after its checkpoint and appends their records again; the later ones
    are what the final run did. Blank lines are skipped.

    Args:
        path: The ``.jsonl`` file; every record has an integer ``step``.
        key: Only records holding this key are considered (e.g. ``fid`` in an ``eval.jsonl`` that also holds
            validation-loss records of the same steps), so that a record of another kind never replaces one.

    Returns:
        One record per step, sorted by step.

    Raises:
        FileNotFoundError: If the file does not exist.
    """
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if key is None or key in rec:
                by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


__all__ = ["last_record_per_step"]
