"""JSON-lines logs keyed by step, where a step logged again (after a resume) replaces the earlier record."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
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


def json_objects(path: str | os.PathLike, error: type[Exception], expected: str,
                 example: str = "") -> Iterator[tuple[str, dict]]:
    """``(where, object)`` for each non-blank line of a JSON-lines file of objects; ``where`` is ``file:line``.

    Args:
        path: The ``.jsonl`` file.
        error: The exception raised for a bad line (e.g. :class:`~tread_scale.errors.ConfigError`).
        expected: What each object should hold, for the message (e.g. ``a JSON object with a "prompt"``).
        example: An example line for the message of a line that is not JSON.

    Raises:
        error: Naming the file and line of a line that is not JSON or not an object.
    """
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise error(f"{where}: not valid JSON ({e}); expected {expected} a line"
                            + (f", e.g. {example}" if example else "")) from None
            if not isinstance(obj, dict):
                raise error(f"{where}: expected {expected}, got a {type(obj).__name__}")
            yield where, obj


__all__ = ["json_objects", "last_record_per_step"]
